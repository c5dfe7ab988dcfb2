"""Sparse attention fast paths.

Sliding window (Beltagy et al. 2020, Longformer's local attention; Child et al. 2019 for the blocked layout):
queries are cut into blocks of ``b`` tokens and each block meets only the ``b + 2w`` (bidirectional) or
``b + w`` (causal) keys its window can reach, so time is ``O(T (b + 2w))``, never ``T x T``. The blocks run
through ``F.scaled_dot_product_attention`` (blocks in place of heads, a bool band mask), whose fused kernels
keep neither scores nor probabilities, so memory is ``O(T D)`` plus one mask per block group. Dropout, which
acts on the probabilities, takes an explicit matmul + softmax path instead.

Top-k (Wang et al. 2022, "KVT"; Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"):
scores are inherently ``O(T^2)``; queries are processed in chunks to bound memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (
    allowed_mask,
    causal_offset,
    dropout_probs,
    empty_attention,
    masked_softmax,
    padding_or_none,
    sdpa_zero_empty_rows,
    tracing,
    upcast,
)

# per-group temporaries (scores, masks, key-window gradients) are kept under this many elements: bounds peak
# memory at long T, and at 32 MiB in fp32 they stay at glibc's ceiling for reusing freed heap memory (a larger
# one is a fresh mmap whose pages fault in on every call). Smaller groups overlap more (each group's key range
# reaches span - blk keys into the next), and autograd keeps every group's key-range gradient until it stacks
# them. Sliding window(256) fwd+bwd measured side by side, exponent T = 2048 -> 16384 (bidirectional / causal)
# and peak at T = 32768 (bidirectional): 2**24 1.14 / 1.19, 953 MiB; 2**23 1.08 / 1.12, 896 MiB;
# 2**22 1.04 / 1.03, 1023 MiB.
_MAX_SCORE_ELEMENTS = 1 << 23


def sliding_window_attention(
    q, k, v, *, mask=None, causal=False, scaling, window, block_size=None, dropout=0.0, training=False
):
    """Query ``i`` attends key ``j`` when ``|i - j| <= window`` (or ``0 <= i - j <= window`` when causal)."""
    # plain ints even under torch.jit.trace (whose sizes are tensors): the block geometry is Python arithmetic
    t_q, t_k = int(q.shape[-2]), int(k.shape[-2])
    if q.numel() == 0 or k.numel() == 0:
        return empty_attention(q, k, v, causal=causal)  # no batch, heads, queries or keys: no block to cut
    if t_q != t_k:
        # decoding against a cache: only the last T_q + window keys can be reached
        offset = causal_offset(t_q, t_k) if causal else None
        if offset is None:
            raise ValueError(f"bidirectional sliding_window needs T_q == T_k, got {t_q} and {t_k}")
        start = max(0, t_k - t_q - window)
        k, v = k[..., start:, :], v[..., start:, :]
        mask = None if mask is None else mask[:, start:]
        allowed = allowed_mask(mask, t_q, k.shape[-2], True, q.device, window=window)
        probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed)
        return torch.matmul(dropout_probs(probs, dropout, training), v)
    return _blocked_window(q, k, v, padding_or_none(mask), causal, scaling, window, block_size, dropout, training)


def _blocked_window(q, k, v, mask, causal, scaling, window, block_size, dropout, training):
    """Blocked band: block ``g`` of ``blk`` queries meets the ``span`` keys starting at ``g * blk - w`` (keys
    outside ``[0, T)`` are zero padding and masked). ``[.., n, blk, span]`` replaces ``[.., T, T]``."""
    bsz, h, t, d = (int(x) for x in q.shape)
    dv = int(v.shape[-1])
    w = min(window, t)
    band = _Band(t, w, min(block_size or _default_block(w), t), causal)
    if dropout > 0.0 and training:
        return _window_explicit(q, k, v, mask, band, scaling, dropout, training)
    if mask is None:
        # one key mask for every sequence: batch and heads fold into one dimension
        out = _window_sdpa(q.reshape(bsz * h, t, d), k.reshape(bsz * h, t, d), v.reshape(bsz * h, t, dv), None,
                           band, scaling)
        return out.view(bsz, h, t, dv)
    # one sequence at a time (unbind, not indexing: autograd then gathers the per-sequence gradients in one op)
    seqs = zip(q.unbind(0), k.unbind(0), v.unbind(0), mask.bool().unbind(0))
    return torch.stack([_window_sdpa(qi, ki, vi, oki, band, scaling) for qi, ki, vi, oki in seqs])


def _default_block(w):
    """Query block size. A block computes ``blk x (blk + 2w)`` scores (``blk + w`` causal) of which ``2w + 1``
    (``w + 1``) per row count, so small blocks waste less, but SDPA's CPU kernel runs thin blocks poorly
    (its backward most). 64 measured best for forward + backward at w = 64..512; small windows use w."""
    return max(16, min(64, w))


_BAND_PATTERNS: dict[tuple[int, int, bool], torch.Tensor] = {}
_BAND_PATTERNS_MAX = 64


def _band_pattern(blk, w, causal):
    """``[blk, span]`` bool: query ``c`` of a block may see key slot ``s`` (key position ``start + s - w``).
    Cached: it depends on the geometry only, and building it is three launches per call otherwise.
    Read-only (shared between calls).

    Only eagerly built plain CPU tensors are cached: under ``torch.export`` / ``torch.compile`` / ``torch.jit.trace``
    the pattern is built afresh inside the graph (a tensor made while tracing is a fake or traced tensor that
    later eager calls must never see), and so is one made under a fake-tensor mode or a ``meta`` device."""
    key = (int(blk), int(w), bool(causal))
    if tracing():
        return _build_band_pattern(*key)
    pattern = _BAND_PATTERNS.get(key)
    if pattern is None:
        pattern = _build_band_pattern(*key)
        if type(pattern) is not torch.Tensor or pattern.device.type != "cpu":
            return pattern
        if len(_BAND_PATTERNS) >= _BAND_PATTERNS_MAX:
            _BAND_PATTERNS.pop(next(iter(_BAND_PATTERNS)))  # oldest first
        _BAND_PATTERNS[key] = pattern
    return pattern


def _build_band_pattern(blk, w, causal):
    c_idx = torch.arange(blk, device="cpu")[:, None]
    s_idx = torch.arange(blk + (w if causal else 2 * w), device="cpu")[None, :]
    rel = c_idx + w - s_idx  # i - j
    return (rel >= 0) & (rel <= w) if causal else rel.abs() <= w


class _Band:
    """Geometry of the blocked band: ``n`` query blocks of ``blk``; block ``g`` sees keys
    ``[g * blk - w, g * blk - w + span)``; ``pattern[c, s]`` says whether query ``c`` of a block may see key slot
    ``s`` (before padding); blocks ``[lo, hi)`` are interior (all their key slots lie inside ``[0, T)``)."""

    def __init__(self, t, w, blk, causal):
        self.t, self.w, self.blk = t, w, blk
        self.n = math.ceil(t / blk)
        self.span = blk + (w if causal else 2 * w)
        self.right = 0 if causal else w  # keys a block reaches past its last query
        self.lo = min(self.n, math.ceil(w / blk))
        self.hi = max(self.lo, (t - blk - self.right) // blk + 1)
        self.pattern = _band_pattern(blk, w, causal)  # [blk, span]

    def padded(self, x, g0, g1, dim):
        """Keys (or a key mask) for blocks ``[g0, g1)``: positions ``[g0 * blk - w, (g1 - 1) * blk - w + span)``
        of ``x`` along ``dim``, zero (False) outside ``[0, T)``."""
        start, stop = g0 * self.blk - self.w, (g1 - 1) * self.blk - self.w + self.span
        x = x.narrow(dim, max(start, 0), min(stop, self.t) - max(start, 0))
        pads = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [max(-start, 0), max(stop - self.t, 0)]
        return F.pad(x, pads) if any(pads) else x

    def key_groups(self, x, g0, g1, size, dim=None):
        """Keys (or key mask) of blocks ``[g0, g1)`` in groups of ``size`` blocks, each group the positions its
        blocks reach (``(size - 1) * blk + span``, overlapping the next group's by ``span - blk``).

        All groups are views of one padded range, equal groups cut by one ``unfold`` + ``unbind`` and a shorter
        last group by one ``narrow``: autograd then folds the groups' gradients back in a constant number of
        ops. Indexing the range once per group would make each group's backward build a gradient the size of
        the whole range, ``O(T^2 / size)`` work over a sequence.
        """
        dim = (1 if x.dim() > 1 else 0) if dim is None else dim
        xs = self.padded(x, g0, g1, dim)
        full, rest = divmod(g1 - g0, size)
        if full <= 1 and rest == 0:
            return [xs]
        glen, step = (size - 1) * self.blk + self.span, size * self.blk
        groups = [w.movedim(-1, dim) for w in xs.unfold(dim, glen, step).unbind(dim)] if full else []
        if rest:
            groups.append(xs.narrow(dim, full * step, (rest - 1) * self.blk + self.span))
        return groups

    def queries(self, q, g0, g1):
        """Queries of blocks ``[g0, g1)`` as ``[X, g, blk, D]``, the last block zero-padded."""
        start, stop = g0 * self.blk, min(g1 * self.blk, self.t)
        x, short = q[:, start:stop], (g1 - g0) * self.blk - (stop - start)
        x = F.pad(x, (0, 0, 0, short)) if short else x
        return x.reshape(q.shape[0], g1 - g0, self.blk, q.shape[-1])


def _window_sdpa(q, k, v, key_ok, band, scaling):
    """The band through ``F.scaled_dot_product_attention`` with a bool mask. ``q, k, v`` are ``[X, T, D]`` (``X``
    heads of one sequence, or all sequences' heads when there is no padding), ``key_ok`` is ``[T]`` or None.

    SDPA's fused kernels (flash on CPU) never store scores or probabilities, and backward recomputes them, so
    memory stays ``O(T D)``; blocks stand in for SDPA's heads: queries ``[X, g, blk, D]`` against overlapping key
    windows ``[X, g, span, D]`` (an ``unfold`` view, no copy). Interior blocks of an unpadded sequence all share
    one 2D ``[blk, span]`` mask and read the keys in place; the few edge blocks (and every block of a padded
    sequence) get zero-padded keys and a 4D mask (the CPU flash kernel takes 2D or 4D masks; a 3D one falls
    back to the math kernel). A query whose window holds no real key would be a fully masked row, which torch's
    backends do not all treat alike: such rows go through ``common.sdpa_zero_empty_rows``.
    """
    pattern = band.pattern.to(q.device)
    # Blocks go to SDPA in groups: a 4D mask costs blk * span per block, and with autograd on, SDPA's backward
    # returns each key window's gradient, [X, g, span, D], span / blk times the size of k. Interior blocks
    # without autograd go in one call (their 2D mask does not grow with their number).
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    per_block = max(band.blk * band.span, int(q.shape[0]) * band.span * int(q.shape[-1]) if grad else 0)
    group = max(1, _MAX_SCORE_ELEMENTS // per_block)
    if key_ok is None and band.hi > band.lo:
        ranges = [(0, band.lo, False), (band.lo, band.hi, True), (band.hi, band.n, False)]
    else:
        ranges = [(0, band.n, False)]
    # without padding every real query sees itself; only the zero queries filling a ragged last block can
    # see nothing
    rows_see_a_key = key_ok is None and band.n * band.blk == band.t
    if key_ok is None:
        key_ok = torch.ones(band.t, dtype=torch.bool, device=q.device)
    pieces = []
    for g_start, g_stop, interior in ranges:
        if g_stop <= g_start:
            continue
        size = g_stop - g_start if interior and not grad else group
        q_groups = band.queries(q, g_start, g_stop).split(size, 1)  # [X, g, blk, D] each
        k_groups, v_groups, ok_groups = (band.key_groups(x, g_start, g_stop, size) for x in (k, v, key_ok))
        for qb, kg, vg, okg in zip(q_groups, k_groups, v_groups, ok_groups):
            kb = kg.unfold(1, band.span, band.blk).transpose(-1, -2)  # [X, g, span, D]
            vb = vg.unfold(1, band.span, band.blk).transpose(-1, -2)
            if interior:
                pieces.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=pattern, scale=scaling))
                continue
            allowed = (pattern & okg.unfold(0, band.span, band.blk)[:, None, :])[None]  # [1, g, blk, span]
            if rows_see_a_key:
                pieces.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scaling))
                continue
            pieces.append(sdpa_zero_empty_rows(qb, kb, vb, allowed, scaling))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)  # [X, n, blk, Dv]
    return out.flatten(1, 2)[:, : band.t]


def _window_explicit(q, k, v, mask, band, scaling, dropout, training):
    """Scores, softmax and dropout written out (dropout acts on the probabilities, which SDPA does not expose)."""
    bsz, h, t, d = q.shape
    dv = v.shape[-1]
    qx, kx, vx = q.reshape(bsz * h, t, d), k.reshape(bsz * h, t, d), v.reshape(bsz * h, t, dv)
    key_ok = torch.ones(bsz, t, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    pattern = band.pattern.to(q.device)
    group = max(1, _MAX_SCORE_ELEMENTS // (bsz * h * band.blk * band.span))
    groups = zip(band.queries(qx, 0, band.n).split(group, 1), *(band.key_groups(x, 0, band.n, group) for x in (kx, vx)),
                 band.key_groups(key_ok, 0, band.n, group, dim=1))
    outs = []
    for qb, kg, vg, okg in groups:
        kb = kg.unfold(1, band.span, band.blk).transpose(-1, -2)  # [BH, g, span, D]
        vb = vg.unfold(1, band.span, band.blk).transpose(-1, -2)
        allowed = pattern & okg.unfold(1, band.span, band.blk)[:, None, :, None, :]  # [B, 1, g, blk, span]
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * scaling  # [BH, g, blk, span]
        probs = masked_softmax(scores.view(bsz, h, *scores.shape[1:]), allowed)
        outs.append(torch.matmul(dropout_probs(probs, dropout, training).flatten(0, 1), vb))  # [BH, g, blk, Dv]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.flatten(1, 2)[:, :t].view(bsz, h, t, dv)


def topk_attention(q, k, v, *, mask=None, causal=False, scaling, top_k, dropout=0.0, training=False):
    """Per query, softmax over its ``top_k`` highest allowed scores (all of them if fewer are allowed).

    Scores are computed, ranked and normalised in float32 for float16 / bfloat16 inputs: ranking low-precision
    scores would pick a different key set for rows whose k-th and (k+1)-th scores round together (measured: 3.9%
    of rows in bf16), a discrete change no later step can undo. The output is cast back to ``v``'s dtype."""
    b, h, t_q, _ = q.shape
    t_k = k.shape[-2]
    if q.numel() == 0 or k.numel() == 0:
        # an empty batch, no heads, no queries or no keys: nothing to rank (a query with no key gets zeros)
        return empty_attention(q, k, v, causal=causal)
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)
    kk = min(top_k, t_k)
    chunk = max(1, _MAX_SCORE_ELEMENTS // (b * h * t_k))
    allowed_all = allowed_mask(mask, t_q, t_k, causal, q.device)  # [B or 1, 1, T_q or 1, T_k] or None
    k_t = k.transpose(-1, -2)
    outs = []
    for s in range(0, t_q, chunk):
        e = min(t_q, s + chunk)
        scores = torch.matmul(q[..., s:e, :], k_t) * scaling  # [B, H, c, T_k]
        allowed = allowed_all
        if allowed is not None:
            # a key-padding mask alone has one row for every query (its query axis has size 1): slice only a
            # mask that has a row per query
            allowed = allowed[..., s:e, :] if allowed.shape[-2] > 1 else allowed
            scores = scores.masked_fill(~allowed, float("-inf"))
        vals, idx = scores.topk(kk, dim=-1)  # [B, H, c, kk]
        # a disallowed key can only enter the top-k when fewer than k keys are allowed; it stays -inf
        probs = dropout_probs(masked_softmax(vals, torch.isfinite(vals)), dropout, training)
        dense = torch.zeros_like(scores).scatter(-1, idx, probs)
        outs.append(torch.matmul(dense, v))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out.to(out_dtype)
