"""``sink_window``: a sliding window plus attention sinks, the attention of StreamingLLM (Xiao et al. 2024,
"Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

Query ``i`` attends key ``j`` when ``j`` is in its window (``0 <= i - j <= window`` causal, ``|i - j| <= window``
bidirectional) or when ``j`` is one of the first ``num_sink`` *real* tokens of the sequence (a sink; causal: only
once ``j <= i``). Xiao et al. found that softmax attention piles weight on the first tokens whatever they say, so a
window that drops them degrades, and keeping four of them recovers full attention's perplexity at constant memory.
Sinks are counted over real tokens (ranks, as Linformer's columns are), so left padding does not turn pads into
sinks: a sequence alone and the same sequence padded in a batch give the same outputs. A sink inside the window is
attended once. ``num_sink=0`` is ``sliding_window``; ``window >= T - 1`` is exact softmax.

Generation keeps the sinks and the last ``window`` keys of each causal layer
(:class:`hf_reshape.cache.SinkWindowLayer`): constant memory for any number of tokens.

Fast path: queries in blocks of ``blk``; block ``g`` meets the sinks plus the ``blk + window`` (causal) or
``blk + 2 window`` keys its band can reach, through ``F.scaled_dot_product_attention`` with a bool mask, in groups of
blocks under the sliding window's element budget (``hf_reshape.ops.sparse._MAX_SCORE_ELEMENTS``): time
``O(T (w + s) D)``, no ``T x T`` tensor. The band layout follows :mod:`hf_reshape.ops.sparse` (Beltagy et al. 2020;
Child et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops import sparse
from ..ops.common import (
    allowed_mask,
    causal_offset,
    dropout_probs,
    empty_attention,
    masked_softmax,
    padding_or_none,
    sdpa_zero_empty_rows,
    upcast,
)
from ..registry import VariantParams, check_int, register_variant


@dataclass
class SinkWindowParams(VariantParams):
    num_sink: int = field(default=4, metadata={"help": "first real tokens every query sees (the attention sinks)"})
    window: int = field(default=128, metadata={"help": "how far each query sees on each side (past only if causal)"})

    def validate(self):
        check_int("num_sink", self.num_sink, minimum=0)
        check_int("window", self.window, minimum=0)


# ---------------------------------------------------------------------------------------------------- sinks


def sink_positions(mask: torch.Tensor | None, t: int, num_sink: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[B or 1, s]`` of the first ``s = min(num_sink, t)`` real tokens of each sequence, in order, and
    whether each exists (a sequence with fewer real tokens has fewer sinks). No data-dependent shapes, so graph
    capture keeps working: a stable sort puts the real tokens first."""
    s = min(num_sink, t)
    if mask is None:
        return torch.arange(s, device=device)[None], torch.ones(1, s, dtype=torch.bool, device=device)
    real = mask.bool()
    pos = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)[:, :s]
    return pos, real.gather(-1, pos)


def is_sink(mask: torch.Tensor | None, t: int, num_sink: int, device) -> torch.Tensor:
    """``[B or 1, T]``: whether each key is one of the first ``num_sink`` real tokens of its sequence."""
    if mask is None:
        return (torch.arange(t, device=device) < num_sink)[None]
    real = mask.bool()
    return real & (real.long().cumsum(-1) <= num_sink)  # rank (cumsum - 1) < num_sink


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows ``pos`` (``[B or 1, s]``) of ``x`` (``[B, H, T, D]``) along T: ``[B, H, s, D]``."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, pos[:, None, :, None].expand(b, h, pos.shape[-1], d))


# ---------------------------------------------------------------------------------------------------- reference


def _allowed(mask, t_q, t_k, causal, device, num_sink, window):
    """Dense ``[B or 1, 1, T_q, T_k]`` allowed pairs: the window (and padding), or a sink (causal: ``j <= i``)."""
    band = allowed_mask(mask, t_q, t_k, causal, device, window=window)
    sinks = is_sink(mask, t_k, num_sink, device)[:, None, None, :]
    if causal:
        i = torch.arange(t_q, device=device)[:, None] + causal_offset(t_q, t_k)
        sinks = sinks & (torch.arange(t_k, device=device)[None, :] <= i)
    return band | sinks


def sink_window_weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """The attention matrix, ``[B, H, T_q, T_k]``: softmax over the window and the sinks, zero elsewhere (rows of
    queries with no allowed key are zeros). Materialised: the reference, ``output_attentions`` and transfer."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    allowed = _allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, params.num_sink, params.window)
    return masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed).to(out_dtype)


def sink_window_reference(q, k, v, *, mask=None, causal=False, scaling, num_sink, window):
    """The plain ``T_q x T_k`` reading of the definition (for checks, in float64)."""
    allowed = _allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, num_sink, window)
    return torch.matmul(masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed), v)


# ---------------------------------------------------------------------------------------------------- fast path


def sink_window_attention(q, k, v, *, mask=None, causal=False, scaling, num_sink, window, dropout=0.0,
                          training=False):
    """Window plus sinks (see the module docstring), ``[B, H, T_q, D_v]``; a query with no key gets zeros."""
    t_q, t_k = int(q.shape[-2]), int(k.shape[-2])
    if q.numel() == 0 or k.numel() == 0:
        return empty_attention(q, k, v, causal=causal)
    if t_q != t_k:
        if not causal:
            raise ValueError(f"bidirectional sink_window needs T_q == T_k, got {t_q} and {t_k}")
        return _decode(q, k, v, mask, scaling, num_sink, window, dropout, training)
    if min(num_sink, t_k) == 0 or window >= t_k - 1:
        # no sink, or every key inside the window already: the sliding window itself
        return sparse.sliding_window_attention(q, k, v, mask=mask, causal=causal, scaling=scaling, window=window,
                                               dropout=dropout, training=training)
    return _blocked(q, k, v, padding_or_none(mask), causal, scaling, num_sink, window, dropout, training)


def _decode(q, k, v, mask, scaling, num_sink, window, dropout, training):
    """Causal, fewer queries than keys (a decoder's past): the sinks plus the last ``T_q + window`` keys, explicit
    (``T_q x (s + T_q + window)`` scores), in float32 for half-precision inputs."""
    t_q, t_k = int(q.shape[-2]), int(k.shape[-2])
    offset = causal_offset(t_q, t_k)
    start = max(0, offset - window)  # the first key a window reaches
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)
    pos, sink_ok = sink_positions(mask, t_k, num_sink, q.device)
    band_ok = ~is_sink(mask, t_k, num_sink, q.device)  # a sink is attended through its sink slot, once
    if mask is not None:
        band_ok = band_ok & mask.bool()
    i = torch.arange(t_q, device=q.device)[:, None] + offset
    rel = i - torch.arange(start, t_k, device=q.device)[None, :]
    band = (rel >= 0) & (rel <= window)  # [T_q, L]
    allowed = torch.cat([sink_ok[:, None, :] & (pos[:, None, :] <= i[None]),  # [B|1, T_q, s]
                         band[None] & band_ok[:, None, start:]], dim=-1)[:, None]  # [B|1, 1, T_q, s + L]
    keys = torch.cat([_gather(k, pos), k[..., start:, :]], dim=-2)
    values = torch.cat([_gather(v, pos), v[..., start:, :]], dim=-2)
    probs = masked_softmax(torch.matmul(q, keys.transpose(-1, -2)) * scaling, allowed)
    return torch.matmul(dropout_probs(probs, dropout, training), values).to(out_dtype)


def _block_size(window: int, t: int) -> int:
    """Query block: as :func:`hf_reshape.ops.sparse._default_block` (64 measured best for SDPA's CPU kernel at
    w = 64..512, small windows use w, never under 16), at most ``t``."""
    return min(max(16, min(64, window)), t)


def _blocked(q, k, v, mask, causal, scaling, num_sink, window, dropout, training):
    """The blocked path over ``[B, H, T, D]``: without padding every sequence has the same structure, so batch and
    heads fold into one dimension; with padding, one sequence at a time (as :mod:`hf_reshape.ops.sparse` does)."""
    b, h, t, d = (int(x) for x in q.shape)
    dv = int(v.shape[-1])
    args = (causal, scaling, num_sink, window, dropout, training)
    if mask is None:
        out = _blocked_rows(q.reshape(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, dv), None, *args)
        return out.view(b, h, t, dv)
    seqs = zip(q.unbind(0), k.unbind(0), v.unbind(0), mask.bool().unbind(0))
    return torch.stack([_blocked_rows(qi, ki, vi, oki, *args) for qi, ki, vi, oki in seqs])


def _blocked_rows(q, k, v, key_ok, causal, scaling, num_sink, window, dropout, training):
    """``q, k, v`` ``[X, T, D]`` (the heads of one sequence, or of all of them), ``key_ok`` ``[T]`` or None. Block
    ``g`` of ``blk`` queries (positions ``g blk + c``) meets ``[sinks | band keys]``: the ``s`` sinks, then the
    positions ``[g blk - w, g blk - w + span)`` (zero padding outside ``[0, T)``), through SDPA with the ``X`` rows
    as its batch and the blocks as its heads, so one ``[g, blk, s + span]`` bool mask serves every row. The band
    keys are an ``unfold`` view of the padded keys; the sinks are copied in front of each block's window."""
    x, t, d = (int(n) for n in q.shape)
    dv = int(v.shape[-1])
    w = window
    blk = _block_size(w, t)
    n = math.ceil(t / blk)
    span = blk + w + (0 if causal else w)
    tail = n * blk - t + (0 if causal else w)  # zero keys past the end, so every block's span exists
    ok = None if key_ok is None else key_ok[None]
    pos, sink_ok = (z[0] for z in sink_positions(ok, t, num_sink, q.device))  # [s] each
    s = int(pos.shape[0])
    sk, sv = k.index_select(1, pos), v.index_select(1, pos)  # [X, s, D]
    band_ok = ~is_sink(ok, t, num_sink, q.device)[0]  # a sink is attended through its sink slot, once
    if key_ok is not None:
        band_ok = band_ok & key_ok
    band_ok = F.pad(band_ok, (w, tail)).unfold(0, span, blk)  # [n, span]
    kb = F.pad(k, (0, 0, w, tail)).unfold(1, span, blk)  # [X, n, D, span]
    vb = F.pad(v, (0, 0, w, tail)).unfold(1, span, blk)
    rel = torch.arange(blk, device=q.device)[:, None] + w - torch.arange(span, device=q.device)[None, :]  # i - j
    pattern = ((rel >= 0) & (rel <= w)) if causal else (rel.abs() <= w)  # [blk, span]
    qpos = torch.arange(n * blk, device=q.device).view(n, blk)
    sink_vis = sink_ok[None, None, :].expand(n, blk, s)
    if causal:
        sink_vis = sink_vis & (pos[None, None, :] <= qpos[:, :, None])  # [n, blk, s]
    qb = F.pad(q, (0, 0, 0, n * blk - t)).view(x, n, blk, d)
    per_block = blk * (s + span) + x * (s + span) * (d + dv)
    group = max(1, sparse._MAX_SCORE_ELEMENTS // per_block)  # read at call time: one budget for both kernels
    p = dropout if training else 0.0
    outs = []
    for g0 in range(0, n, group):
        g = min(n, g0 + group) - g0
        kg = torch.cat([sk[:, None].expand(x, g, s, d), kb[:, g0 : g0 + g].transpose(-1, -2)], dim=-2)
        vg = torch.cat([sv[:, None].expand(x, g, s, dv), vb[:, g0 : g0 + g].transpose(-1, -2)], dim=-2)
        allowed = torch.cat([sink_vis[g0 : g0 + g], pattern & band_ok[g0 : g0 + g, None, :]], dim=-1)[None]
        if key_ok is None:  # every query sees the sinks (s >= 1 here): no row is empty
            outs.append(F.scaled_dot_product_attention(qb[:, g0 : g0 + g], kg, vg, attn_mask=allowed, dropout_p=p,
                                                       scale=scaling))
        else:
            outs.append(sdpa_zero_empty_rows(qb[:, g0 : g0 + g], kg, vg, allowed, scaling, dropout_p=p))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)  # [X, n, blk, Dv]
    return out.reshape(x, n * blk, dv)[:, :t]


# ---------------------------------------------------------------------------------------------------- registry


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return sink_window_attention(q, k, v, mask=mask, causal=causal, scaling=scaling, num_sink=params.num_sink,
                                 window=params.window, dropout=dropout, training=training)


def _reference(q, k, v, *, mask, causal, scaling, params):
    return sink_window_reference(q, k, v, mask=mask, causal=causal, scaling=scaling, num_sink=params.num_sink,
                                 window=params.window)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``Q K^T`` and ``P V`` over the band's pairs plus, per query, the sinks outside its band
    (those it may see: causal, only sinks at or before it), sinks taken as the first ``num_sink`` positions."""
    from .sliding_window import band_pairs

    s, w = min(params.num_sink, t), params.window
    i = torch.arange(t, dtype=torch.long)
    if causal:
        extra = (i - w).clamp(0, s)  # sinks j < min(s, i - w): before the band
    else:
        extra = (i - w).clamp(0, s) + (s - (i + w + 1)).clamp(0, s)  # sinks before and after the band
    pairs = band_pairs(t, w, causal) + int(extra.sum())
    return float(batch * num_heads * 4 * pairs * head_dim)


register_variant(
    name="sink_window",
    family="sparse",
    params_cls=SinkWindowParams,
    forward=_forward,
    reference=_reference,
    degenerate=lambda t: {"window": t},
    complexity="O(T (w + s) D) time, O(T D) memory",
    quadratic=False,
    description="sliding window plus the first `num_sink` tokens (attention sinks); streaming generation",
    small_params={"num_sink": 2, "window": 3},
    paper="Xiao et al. 2024, StreamingLLM (attention sinks); Beltagy et al. 2020, Longformer",
    weights=sink_window_weights,
    cache_layer="sink_window",
    flops=flops,
    bench_params={"num_sink": 4, "window": 256},
    quick_params={"num_sink": 2, "window": 8},
    demo_params={"num_sink": 2, "window": 8},
)
