"""Linearized attention fast paths: no ``T x T`` tensor and never a ``[T, D, D]`` one.

Bidirectional: two matmuls per head, ``phi(K)^T V`` and ``phi(Q) (phi(K)^T V)`` (Katharopoulos et al. 2020),
walked in slices of about 4 MiB by :class:`_BidirectionalChunked`, whose backward is written out.
Causal: the chunked form used by flash-linear-attention's ``chunk`` kernels and by Yang et al. 2023 (GLA):
inside a chunk of ``C`` tokens a masked ``C x C`` product, across chunks a running ``D x D_v`` state, so time
is ``O(T C D + T D D_v)`` and memory ``O(T D + (T / C) D D_v)``.

Speed notes (CPU, measured against torch SDPA at B=1, H=12, T=8192, D=64):

* The denominator rides along with the numerator. Bidirectional: ``z = sum_j phi(k_j)`` is appended to
  ``phi(K)^T V`` as one more column, so a single ``[T, D] x [D, D_v + 1]`` matmul over ``phi(Q)`` gives both.
  Causal: values get a column of ones (``v1 = [v * m, m]``, which also applies the key-padding mask), so every
  chunk product carries the denominator along instead of needing its own reductions over ``[n, C, C]``.
* Fresh memory is expensive here: first-touch page faults on a new ``[T, D]`` buffer cost about as much as a
  matmul over it. So the paths reuse buffers and work in place wherever autograd allows it (the normalisation
  divides in place when autograd is not recording; the causal kernel reuses its spent prefix states for the
  intra-chunk products).
* Long causal inputs run in segments of about 4 MiB (``CAUSAL_SEGMENT_BYTES``), the running state carried from
  one segment to the next, for the same reason as the bidirectional slices: fwd+bwd T = 2048 -> 16384 went from
  a time exponent of 1.31 in one piece to 1.05 (side by side, same run).
* Causal chunk size: 64 is the sweet spot for ``D = 64`` (measured 32..256: the ``[n, C, C]`` intra products
  grow with ``C``, the ``[n, D, D_v + 1]`` prefix states shrink with it).
* The causal chunked form is a ``torch.autograd.Function`` (:class:`_CausalChunked`): its forward works in
  buffers it owns, and its backward recomputes the ``[n, C, C]`` intra products and the prefix states instead
  of keeping them, so training holds ``fq, fk, v1`` and the output only. The backward is the chunked form again
  (as in fla's ``chunk`` kernels): per chunk a masked ``C x C`` product plus the running sum, over later
  chunks, of ``phi(q)^T dO``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .common import LOW_PRECISION, autograd_records, causal_offset, empty_attention, padding_or_none, upcast
from .feature_maps import FEATURE_MAP_GRADS, elu_plus_one

DEFAULT_CHUNK = 64
# bidirectional kernel: rows per step so that one [B, H, rows, D] fp32 slice is about this many bytes (small enough
# to be served from glibc's heap rather than a fresh mmap; measured 256 KiB .. 16 MiB). 1 MiB and 4 MiB are on a par
# on a quiet machine (T = 8192 forward 26 / 27 ms, T = 16384 forward + backward 419-432 / 375-410 ms); beside one
# busy process per core 4 MiB is 1.6x faster (167 -> 104 ms): a quarter of the ops, each of which waits for its
# slowest thread. 16 MiB leaves the cache (49 ms quiet).
BIDIRECTIONAL_CHUNK_BYTES = 4 << 20
# causal kernel: segment length in bytes of one [B, H, rows, D] fp32 slice (the chunked kernel runs per segment)
CAUSAL_SEGMENT_BYTES = 4 << 20


def _feature_dim(phi, d):
    """Features per token of ``phi`` on head dim ``d``: ``d`` for elementwise maps, else what ``phi.feature_dim(d)``
    declares (a map that widens the features, such as Taylor's, sizes the slices and segments by it)."""
    return getattr(phi, "feature_dim", lambda d: d)(d)


def _feature_map(phi, x):
    if phi is elu_plus_one:
        # same values as elu_plus_one, one temporary fewer: elu's backward reads its input, not its output,
        # so adding 1 in place is safe for autograd
        return F.elu(x).add_(1.0)
    return phi(x)


def _with_ones(v, mask):
    """``[v * m, m]``: values with a trailing column that accumulates the normaliser ``[B, H, T, Dv + 1]``."""
    b, h, t, _ = v.shape
    if mask is None:
        return torch.cat([v, v.new_ones(1, 1, 1, 1).expand(b, h, t, 1)], -1)  # no [B, H, T, 1] fill
    m = mask[:, None, :, None].to(v.dtype)  # [B, 1, T, 1]
    return torch.cat([v * m, m.expand(b, h, t, 1)], -1)


def _normalise(o1, eps):
    """``num / max(den, eps)`` from the fused ``[..., Dv + 1]`` result; a zero denominator gives zeros."""
    num, den = o1[..., :-1], o1[..., -1:].clamp_min(eps)
    # without autograd, divide in place (the result is a strided view of o1): no fresh [T, Dv] buffer
    return num / den if autograd_records(o1) else num.div_(den)


def _normalise_backward(grad, out, raw, eps, d_o1):
    """Gradient of the fused ``[num, den]`` sums for ``out = num / max(den, eps)``, written into ``d_o1``:
    numerator part ``g / den``, denominator part ``-(g / den) . out``, zero where ``den`` was clamped
    (``clamp_min`` passes no gradient below ``eps``). ``raw`` is the unclamped denominator column."""
    den = raw.clamp_min(eps)
    g_num = torch.div(grad, den, out=d_o1[..., :-1])
    d_den = torch.linalg.vecdot(g_num, out).unsqueeze(-1).neg_()
    d_o1[..., -1:] = d_den.masked_fill_(raw < eps, 0.0)
    return d_o1


def linear_attention(q, k, v, *, mask=None, causal=False, phi, eps=1e-6, chunk_size=DEFAULT_CHUNK):
    """``out_i = phi(q_i) S_i / phi(q_i) z_i`` with ``S_i = sum_j phi(k_j) v_j^T``, ``z_i = sum_j phi(k_j)`` over
    the keys query ``i`` may see; a zero denominator (no allowed key) gives a zero output."""
    if q.numel() == 0 or k.numel() == 0:
        return empty_attention(q, k, v, causal=causal)  # no batch, heads, queries or keys: nothing to slice
    out_dtype = v.dtype
    mask = padding_or_none(mask)
    if not causal and phi in FEATURE_MAP_GRADS:
        return _BidirectionalChunked.apply(q, k, v, mask, phi, eps)
    if not causal:
        # a feature map without a hand-written derivative (see FEATURE_MAP_GRADS): plain autograd
        fq, fk, v = upcast(_feature_map(phi, q), _feature_map(phi, k), v)
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)  # a padded key contributes nothing to either sum
        kv = torch.matmul(fk.transpose(-1, -2), v)  # [B, H, D, Dv]
        kv1 = torch.cat([kv, fk.sum(-2).unsqueeze(-1)], -1)  # [B, H, D, Dv + 1]: S and z side by side
        return _normalise(torch.matmul(fq, kv1), eps).to(out_dtype)  # [B, H, Tq, Dv]
    t_q, t_k = q.shape[-2], k.shape[-2]
    offset = causal_offset(t_q, t_k)
    state1 = None
    if offset:
        # keys before the first query (a decoder's past) enter as an initial state
        k_past, k = k.split([offset, t_q], -2)
        v_past, v = v.split([offset, t_q], -2)
        m_past, mask = (None, None) if mask is None else mask.split([offset, t_q], -1)
        fk_past, v_past = upcast(_feature_map(phi, k_past), v_past)
        state1 = torch.matmul(fk_past.transpose(-1, -2), _with_ones(v_past, m_past))  # [B, H, D, Dv + 1]
    # Segments of about CAUSAL_SEGMENT_BYTES, the running state carried from one to the next: the feature maps,
    # the chunk products and what autograd keeps are then segment-sized (heap-served, in cache) rather than
    # [B, H, T, *] buffers that at long T are fresh mmaps faulted in on every call. split (not indexing) keeps
    # the backward to one cat per input.
    seg = _causal_segment(q, max(v.shape[-1] + 1, _feature_dim(phi, q.shape[-1])), chunk_size)
    if not any(autograd_records(x) for x in (q, k, v)):
        # Without autograd: chunk after chunk from one running state (causal_linear_recurrent), no per-chunk
        # states. Measured T = 8192, H = 12, D_v = 64, causal forward of the kernel on F features: F = 64
        # 45 -> 31 ms, F = 128 68 -> 45 ms, F = 256 176 -> 87 ms.
        mapped = lambda x: upcast(_feature_map(phi, x))[0]  # noqa: E731
        out = mapped_linear_inference(q, k, v, mask=mask, causal=True, phi_q=mapped, phi_k=mapped, eps=eps,
                                      chunk_size=chunk_size, rows=seg, state1=state1)
        return out.to(out_dtype)
    masks = [None] * math.ceil(t_q / seg) if mask is None else mask.split(seg, -1)
    outs = []
    for q_s, k_s, v_s, m_s in zip(q.split(seg, -2), k.split(seg, -2), v.split(seg, -2), masks):
        fq, fk, v_s = upcast(_feature_map(phi, q_s), _feature_map(phi, k_s), v_s)
        v1 = _with_ones(v_s, m_s)  # [B, H, n, Dv + 1]; a padded key contributes nothing to either sum
        outs.append(_causal_chunked(fq, fk, v1, chunk_size, state1, eps))
        if len(outs) * seg < t_q:
            step = torch.matmul(fk.transpose(-1, -2), v1)  # this segment's keys, for the segments after it
            state1 = step if state1 is None else state1 + step
    out = outs[0] if len(outs) == 1 else torch.cat(outs, -2)
    return out.to(out_dtype)


def causal_linear_recurrent(fq, fk, v1, state1, *, chunk_size, eps, out):
    """Inference form of causal linear attention: chunk after chunk, ``o1_c = tril(fq_c fk_c^T) v1_c + fq_c P`` and
    then ``P += fk_c^T v1_c``, the running state ``P`` ``[BH, F, E]`` (``state1``, updated in place) carried from one
    chunk to the next, never a state per chunk. ``fq, fk`` ``[BH, n, F]``, ``v1 = [v m, m]`` ``[BH, n, E]``; writes
    ``num / max(den, eps)`` into ``out`` ``[BH, n, E - 1]``. No backward (the chunked kernel,
    :class:`_CausalChunked`, is the training form).

    For wide feature maps it beats the chunked kernel: the chunked form writes the ``[F, E]`` prefix state of every
    chunk (products with ``C`` as their inner dimension, then a cumulative sum over them), which at ``F = 256``
    features costs more than the attention (measured ``performer(256)``, T = 8192, H = 12, D = 64, causal
    forward: 247 ms chunked, 161-166 ms in this form; torch SDPA 696 ms in the same run)."""
    bh, n, f = fq.shape
    e = v1.shape[-1]
    c = max(1, chunk_size)
    for i in range(0, n, c):
        fq_c, fk_c, v1_c = fq[:, i:i + c], fk[:, i:i + c], v1[:, i:i + c]
        o1 = torch.bmm(torch.bmm(fq_c, fk_c.transpose(1, 2)).tril_(), v1_c).baddbmm_(fq_c, state1)
        state1.baddbmm_(fk_c.transpose(1, 2), v1_c)
        torch.div(o1[..., :-1], o1[..., -1:].clamp_min(eps), out=out[:, i:i + c])
    return out


def mapped_linear_inference(q, k, v, *, mask, causal, phi_q, phi_k, eps, chunk_size, rows, state1=None):
    """Linear attention without autograd for a variant whose queries and keys have maps of their own (``phi_q``,
    ``phi_k``: ``[B, H, n, D] -> [B, H, n, F]``, applied to ``rows`` tokens at a time, so the features of the whole
    sequence never exist; fresh ``[T, F]`` buffers are mmaps that fault in on every call). Bidirectional:
    ``S = sum_j phi_k(k_j)^T v_j`` and ``z = sum_j phi_k(k_j)`` over slices of keys (padded keys zeroed), then
    ``phi_q(q) [S, z]`` per slice of queries. Causal (``T_q = T_k``): segment after segment through
    :func:`causal_linear_recurrent`, the running state carried over, starting from ``state1`` ``[B, H, F, D_v + 1]``
    (the sums of earlier keys, e.g. a decoder's past; not modified) when given. Returns ``[B, H, T_q, D_v]`` in
    float32 for half-precision values. Used by :func:`linear_attention`, ``performer`` and ``hedgehog``."""
    b, h, t_q, _ = q.shape
    t_k, d_v = k.shape[-2], v.shape[-1]
    work = torch.float32 if v.dtype in LOW_PRECISION else v.dtype
    out = q.new_empty(b, h, t_q, d_v, dtype=work)
    if causal:
        state1 = None if state1 is None else state1.reshape(b * h, *state1.shape[-2:]).clone()
        for s in range(0, t_q, rows):
            fq = phi_q(q[..., s:s + rows, :])
            n, f = fq.shape[-2], fq.shape[-1]
            fk = phi_k(k[..., s:s + n, :])  # padded keys enter through v1 = [v m, m]: no masking needed
            v1 = _with_ones(v[..., s:s + n, :].to(work), None if mask is None else mask[:, s:s + n])
            if state1 is None:
                state1 = fq.new_zeros(b * h, f, d_v + 1)
            causal_linear_recurrent(fq.reshape(b * h, n, f), fk.reshape(b * h, n, f), v1.reshape(b * h, n, -1),
                                    state1, chunk_size=chunk_size, eps=eps, out=out[..., s:s + n, :].view(b * h, n, d_v))
        return out
    kv = z = None
    for s in range(0, t_k, rows):
        fk = phi_k(k[..., s:s + rows, :])
        n, f = fk.shape[-2], fk.shape[-1]
        if mask is not None:
            fk = fk.mul_(mask[:, None, s:s + n, None].to(fk.dtype))  # a padded key adds to neither sum
        if kv is None:  # contiguous: baddbmm_ into a strided view runs per head
            kv, z = fk.new_zeros(b * h, f, d_v), fk.new_zeros(b * h, f, 1)
        fk = fk.reshape(b * h, n, f)
        kv.baddbmm_(fk.transpose(1, 2), v[..., s:s + n, :].to(work).reshape(b * h, n, d_v))
        z += fk.sum(1).unsqueeze(-1)
    s1 = torch.cat([kv, z], -1)  # [BH, F, Dv + 1]: S and z side by side, one product per slice gives both
    for s in range(0, t_q, rows):
        fq = phi_q(q[..., s:s + rows, :])
        n, f = fq.shape[-2], fq.shape[-1]
        o1 = torch.bmm(fq.reshape(b * h, n, f), s1)
        out[..., s:s + n, :] = _normalise(o1, eps).view(b, h, n, d_v)
    return out


def _rows_within(nbytes, q, e):
    """Rows of one ``[B, H, rows, max(D, E)]`` fp32 slice of about ``nbytes`` (``q`` gives ``B, H, D``)."""
    b, h, _, d = q.shape
    return nbytes // (4 * b * h * max(d, e))


def _causal_segment(q, e, chunk_size):
    """Rows per causal segment: a multiple of the chunk size, a slice of about ``CAUSAL_SEGMENT_BYTES``."""
    rows = _rows_within(CAUSAL_SEGMENT_BYTES, q, e)
    return min(q.shape[-2], max(chunk_size, rows // chunk_size * chunk_size)) or 1


def causal_linear_chunked(fq, fk, v, *, eps, chunk_size, state=None, norm=None):
    """Causal linear attention on feature-mapped ``fq, fk`` of equal length ``T`` (padded keys already zeroed in
    ``fk``); ``state``/``norm`` are the optional sums over earlier tokens (``[B, H, D, Dv]`` / ``[B, H, D]``)."""
    v1 = _with_ones(v, None)
    state1 = None if state is None else torch.cat([state, norm.unsqueeze(-1)], -1)  # [B, H, D, Dv + 1]
    return _causal_chunked(fq, fk, v1, chunk_size, state1, eps)


def _causal_chunked(fq, fk, v1, chunk_size, state1, eps):
    """``sum_{j <= i} (fq_i . fk_j) v_j / max(sum_{j <= i} fq_i . fk_j, eps)`` ``[B, H, T, Dv]``, by chunks of
    ``C`` (``v1 = [v, 1]`` carries the denominator; ``state1`` ``[B, H, D, Dv + 1]`` holds earlier keys' sums)."""
    b, h, t, d = fq.shape
    e = v1.shape[-1]
    c = max(1, min(chunk_size, t))
    n = math.ceil(t / c)
    pad = n * c - t
    if pad:
        # zero features are inert: they add nothing to sums and get a zero output that is sliced off
        fq, fk, v1 = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v1))
    chunked = (x.reshape(b * h, n, c, x.shape[-1]) for x in (fq, fk, v1))  # [BH, n, C, D or Dv + 1]
    state1 = None if state1 is None else state1.reshape(b * h, d, e)
    out = _CausalChunked.apply(*chunked, state1, eps)  # [BH, n, C, Dv]
    return out.reshape(b, h, n * c, e - 1)[:, :, :t]


def _prefix_states(fk, v1, state1):
    """Inclusive prefix sums over chunks of ``fk_c^T v1_c``, plus ``state1``: ``[BH * n, D, E]``, row ``c`` is
    the state after chunk ``c`` (so chunk ``c`` starts from row ``c - 1``, or ``state1`` for the first)."""
    bh, n, c, d = fk.shape
    e = v1.shape[-1]
    kv = torch.bmm(fk.view(bh * n, c, d).transpose(1, 2), v1.view(bh * n, c, e))  # [BHn, D, E]
    kv.view(bh, n, d, e).cumsum_(1)
    if state1 is not None:
        kv.view(bh, n, d, e).add_(state1[:, None])
    return kv


def _times_prev_state(x, states, state1, transpose):
    """Per chunk ``x_c @ P_c`` (``P_c^T`` if ``transpose``) where ``P_c`` is the state chunk ``c`` starts from:
    ``states`` row ``c - 1`` inside a head, ``state1`` (or zero) for a head's first chunk. ``x`` ``[BH, n, C, *]``.

    The flat ``[BH * n]`` batch makes "row ``c - 1``" a one-row shift, so a single bmm over contiguous slices
    does all chunks; the one wrong pairing per head (its first chunk with the previous head's last state) is
    then overwritten.
    """
    bh, n, c, _ = x.shape
    xf = x.view(bh * n, c, x.shape[-1])
    prev = states.transpose(1, 2) if transpose else states
    out = xf.new_empty(bh * n, c, prev.shape[-1])
    torch.bmm(xf[1:], prev[:-1], out=out[1:])
    first = out.view(bh, n, c, -1)[:, 0]  # [BH, C, *]
    if state1 is None:
        first.zero_()
    else:
        first.copy_(torch.bmm(x[:, 0], state1.transpose(1, 2) if transpose else state1))
    return out


def _scratch(buffer, shape):
    """A tensor of ``shape`` in ``buffer``'s memory when it fits (its contents are overwritten), else a new one."""
    size = math.prod(shape)
    if buffer.is_contiguous() and buffer.numel() >= size:
        return buffer.view(-1)[:size].view(shape)
    return buffer.new_empty(shape)


class _CausalChunked(torch.autograd.Function):
    """Chunked causal linear attention with its own backward. Inputs ``[BH, n, C, *]`` (contiguous chunks),
    ``state1`` ``[BH, D, E]`` or None; output ``[BH, n, C, E - 1]`` (a view of the ``[.., E]`` sums).

    Forward, per chunk ``c``: ``o1_c = fq_c P_c + tril(fq_c fk_c^T) v1_c``, then ``out = o1[:-1] / max(o1[-1], eps)``.
    Backward, with ``dO1`` the gradient of ``o1``: ``dP_c = tril(dO1_c v1_c^T)``,
    ``dfq_c = dP_c fk_c + dO1_c P_c^T``, ``dfk_c = dP_c^T fq_c + v1_c G_c^T``,
    ``dv1_c = tril(fq_c fk_c^T)^T dO1_c + fk_c G_c``, ``dstate1 = sum_c fq_c^T dO1_c``, where
    ``G_c = sum_{c' > c} fq_c'^T dO1_c'`` (the suffix sum of later chunks, summed backwards: :func:`_later_sums`).
    """

    @staticmethod
    def forward(ctx, fq, fk, v1, state1, eps):
        bh, n, c, d = fq.shape
        e = v1.shape[-1]
        fq, fk, v1 = fq.contiguous(), fk.contiguous(), v1.contiguous()
        states = _prefix_states(fk, v1, state1)  # [BHn, D, E]
        o1 = _times_prev_state(fq, states, state1, transpose=False)  # [BHn, C, E]
        # the states are spent: their memory takes the intra-chunk products (fresh memory costs page faults)
        intra = _scratch(states, (bh * n, c, c))
        torch.bmm(fq.view(bh * n, c, d), fk.view(bh * n, c, d).transpose(1, 2), out=intra).tril_()  # [BHn, C, C]
        o1.baddbmm_(intra, v1.view(bh * n, c, e))
        del states, intra
        o1 = o1.view(bh, n, c, e)
        out = o1[..., :-1].div_(o1[..., -1:].clamp_min(eps))  # the raw denominator column stays in o1
        ctx.save_for_backward(fq, fk, v1, state1, o1)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        fq, fk, v1, state1, o1 = ctx.saved_tensors
        bh, n, c, d = fq.shape
        e = v1.shape[-1]
        flat = lambda x: x.view(bh * n, c, x.shape[-1])  # noqa: E731
        # forward left the normalised output in o1[..., :-1] and the raw denominator in its last column
        d_o1 = _normalise_backward(grad, o1[..., :-1], o1[..., -1:], ctx.eps, torch.empty_like(o1))  # [BH, n, C, E]
        do = flat(d_o1)
        states = _prefix_states(fk, v1, state1)  # recomputed, not kept from forward
        d_p = torch.bmm(do, flat(v1).transpose(1, 2)).tril_()  # [BHn, C, C]
        d_fq = _times_prev_state(d_o1, states, state1, transpose=True).baddbmm_(d_p, flat(fk))
        # G_c, the sums over later chunks (in the spent states' memory)
        qd = torch.bmm(flat(fq).transpose(1, 2), do, out=_scratch(states, (bh * n, d, e))).view(bh, n, d, e)
        total, later_next = _later_sums(qd, need_total=state1 is not None and ctx.needs_input_grad[3])
        d_fk = torch.bmm(d_p.transpose(1, 2), flat(fq))
        intra = torch.bmm(flat(fq), flat(fk).transpose(1, 2), out=_scratch(d_p, (bh * n, c, c))).tril_()
        d_v1 = torch.bmm(intra.transpose(1, 2), do)
        if n > 1:  # with one chunk per head no chunk comes later
            d_fk[:-1].baddbmm_(flat(v1)[:-1], later_next.transpose(1, 2))
            d_v1[:-1].baddbmm_(flat(fk)[:-1], later_next)
        shape = (bh, n, c)
        return d_fq.view(*shape, d), d_fk.view(*shape, d), d_v1.view(*shape, e), total, None


def _later_sums(qd, need_total):
    """From the per-chunk ``qd_c = fq_c^T dO1_c`` ``[BH, n, D, E]`` (overwritten in place): the total over chunks
    ``[BH, D, E]`` (the gradient of ``state1``; None unless ``need_total``) and ``G`` laid out for a one-row shift,
    ``[BH * n - 1, D, E]``, whose row ``i`` is ``G`` of flat chunk ``i`` (the last chunk of every head, whose ``G``
    is zero, meets the next head's zeroed first row).

    The sums run from the last chunk backwards, never as "total minus running prefix": a query row with no
    visible real key (left padding) has its output clamped, ``out = num / eps``, so its numerator gradient
    ``g / eps`` is about 1e6 times the others. Its contributions to ``dk``/``dv`` are exactly zero (the keys it
    sees are pads, ``v1 = 0``, or have features orthogonal to it, which ``phi'`` zeroes), but a difference of two
    sums that both hold it keeps only its rounding error: in float32, errors as large as the gradient itself.
    One in-place add per chunk over ``[BH, D, E]`` (measured faster than ``cumsum`` along the chunk axis, and
    than flipping, on CPU: no fresh memory).
    """
    bh, n, d, e = qd.shape
    for c in range(n - 2, -1, -1):
        qd[:, c].add_(qd[:, c + 1])  # qd[:, c] = sum over chunks c' >= c
    total = qd[:, 0].clone() if need_total else None
    # G of chunk c is the inclusive sum of chunk c + 1: read one row ahead in the flat layout, where a head's
    # first row (its total) would otherwise be the G of the previous head's last chunk
    qd[:, 0].zero_()
    return total, qd.view(bh * n, d, e)[1:]


def _bidirectional_rows(q: torch.Tensor, e: int) -> int:
    return max(16, _rows_within(BIDIRECTIONAL_CHUNK_BYTES, q, e))


class _BidirectionalChunked(torch.autograd.Function):
    """Bidirectional linear attention that walks the sequence in slices of rows and keeps only ``[D, Dv + 1]`` sums.

    Forward: ``S1 = sum_j phi(k_j)^T [v_j, 1]`` (``[B, H, D, Dv + 1]``, padded keys masked out), accumulated slice
    by slice; then per slice of queries ``o1 = phi(q) S1`` and ``out = o1[:-1] / max(o1[-1], eps)``. Saves only
    the inputs and ``S1``. A map that widens the features (``phi.feature_dim(D) = F``, Taylor's) gives ``[F, Dv + 1]``
    sums and slices sized by ``F``; its features exist one slice at a time, here and in the backward.

    Backward, with ``g`` the output gradient, per query slice: ``dnum = g / den``,
    ``dden = -(dnum . out)`` (zero where ``den`` was clamped), ``dO1 = [dnum, dden]``,
    ``dq = phi'(q) * (dO1 S1^T)`` and ``dS1 += phi(q)^T dO1``; then per key slice ``dk = phi'(k) * m * ([v, 1] dS1^T)``
    and ``dv = (m * phi(k)) dS1[:, :-1]``.

    Why not autograd over two matmuls: at ``T = 16384`` every ``[B, H, T, D]`` intermediate autograd keeps
    (``phi(q)``, ``phi(k)``, the masked keys, the fused result, their gradients) is 48 MiB, past glibc's 32 MiB
    ceiling for reusing heap memory, so each is a fresh ``mmap`` whose pages fault in on first touch, and each
    pass over it runs from DRAM. Slices of a few MiB stay in the heap: forward + backward went from
    a time exponent of 1.48 (T = 2048 -> 16384) to about 1 (``docs/bench``). Low-precision inputs are computed
    in float32 slice by slice, never upcast whole.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, phi, eps):
        b, h, t_q, d = q.shape
        t_k, d_v = k.shape[-2], v.shape[-1]
        f = _feature_dim(phi, d)
        work = torch.float32 if v.dtype in LOW_PRECISION else v.dtype
        rows = _bidirectional_rows(q, max(d_v + 1, f))
        m = None if mask is None else mask.to(work)
        kv = q.new_zeros(b * h, f, d_v, dtype=work)
        z = q.new_zeros(b * h, f, 1, dtype=work)
        for s in range(0, t_k, rows):
            fk = _feature_map(phi, k[..., s:s + rows, :].to(work))
            if m is not None:
                fk.mul_(m[:, None, s:s + rows, None])
            n = fk.shape[-2]
            fk = fk.reshape(b * h, n, f)
            kv.baddbmm_(fk.transpose(1, 2), v[..., s:s + rows, :].to(work).reshape(b * h, n, d_v))
            z.add_(fk.sum(1).unsqueeze(-1))
        s1 = torch.cat([kv, z], -1)  # [BH, D, Dv + 1]: S and z side by side, so one bmm per slice gives both
        out = v.new_empty(b, h, t_q, d_v)
        for s in range(0, t_q, rows):
            fq = _feature_map(phi, q[..., s:s + rows, :].to(work))
            n = fq.shape[-2]
            o1 = torch.bmm(fq.reshape(b * h, n, f), s1)
            out[..., s:s + n, :] = _normalise(o1, eps).view(b, h, n, d_v)
        ctx.save_for_backward(q, k, v, mask, s1)
        ctx.phi, ctx.eps, ctx.rows = phi, eps, rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, mask, s1 = ctx.saved_tensors
        phi, eps, rows = ctx.phi, ctx.eps, ctx.rows
        dphi = FEATURE_MAP_GRADS[phi]
        b, h, t_q, d = q.shape
        t_k, d_v = k.shape[-2], v.shape[-1]
        f = s1.shape[-2]  # features per token
        work = s1.dtype
        m = None if mask is None else mask.to(work)
        d_s1 = torch.zeros_like(s1)  # [BH, D, Dv + 1]
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        for s in range(0, t_q, rows):
            q_c = q[..., s:s + rows, :].to(work)
            n = q_c.shape[-2]
            fq = _feature_map(phi, q_c).reshape(b * h, n, f)
            o1 = torch.bmm(fq, s1)  # [BH, n, Dv + 1], recomputed
            g = grad[..., s:s + n, :].to(work).reshape(b * h, n, d_v)
            d_o1 = _normalise_backward(g, _normalise(o1, eps), o1[..., d_v:], eps, torch.empty_like(o1))
            d_s1.baddbmm_(fq.transpose(1, 2), d_o1)
            if dq is not None:
                d_fq = torch.bmm(d_o1, s1.transpose(1, 2)).view(b, h, n, f)
                dq[..., s:s + n, :] = dphi(q_c, fq.reshape(b, h, n, f), d_fq)
        need_k, need_v = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        d_kv, d_z = d_s1[..., :d_v].contiguous(), d_s1[..., d_v]
        for s in range(0, t_k if (need_k or need_v) else 0, rows):
            k_c = k[..., s:s + rows, :].to(work)
            n = k_c.shape[-2]
            fk = _feature_map(phi, k_c)
            m_c = None if m is None else m[:, None, s:s + n, None]
            if need_v:
                fk_m = fk if m_c is None else fk * m_c
                dv[..., s:s + n, :] = torch.bmm(fk_m.reshape(b * h, n, f), d_kv).view(b, h, n, d_v)
            if need_k:
                v_c = v[..., s:s + n, :].to(work).reshape(b * h, n, d_v)
                d_fk = torch.baddbmm(d_z[:, None, :], v_c, d_kv.transpose(1, 2)).view(b, h, n, f)
                if m_c is not None:
                    d_fk.mul_(m_c)
                dk[..., s:s + n, :] = dphi(k_c, fk, d_fk)
        return dq, dk, dv, None, None, None
