"""``taylor``: linear attention whose kernel is the second-order Taylor expansion of softmax's
``exp(s q . k)``: ``A_ij = 1 + s q_i . k_j + (s q_i . k_j)^2 / 2`` (Arora et al. 2024, "Simple linear attention
language models balance the recall-throughput tradeoff", ICML: the Based feature map; Zhang et al. 2024 compare it
in Hedgehog).

The kernel is a dot product of ``1 + D + D(D+1)/2`` features per token, ``[1, u, upper triangle of u u^T]`` with
``u = x sqrt(s)`` (:func:`hf_reshape.ops.feature_maps.taylor_features`): the upper triangle, weighted, carries the
quadratic term without the ``D^2`` entries of the full outer product. ``s`` is the model's softmax scale
(``scaling``, ``D^-1/2`` by default, Based's choice), so the kernel tracks the softmax it replaces. It is at least
``1/2`` for every pair, so every allowed key keeps a positive weight and the denominator never vanishes while a key
is visible. No parameters. Cost ``O(T D^2 D_v)``: at ``D = 64`` that is ``2,145`` features per token, so the fast
path never materialises them for the whole sequence: the bidirectional kernel maps slices of rows (forward and
backward, :func:`hf_reshape.ops.feature_maps.taylor_unit_grad`) and the causal kernel segments sized from them.

There is no setting that makes it exact softmax (the degenerate check does not apply); the kernel identity is
tested instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..ops import linear as linear_ops
from ..ops.common import LOW_PRECISION, autograd_records, padding_or_none
from ..ops.feature_maps import (taylor_diagonal_features, taylor_features, taylor_features_into, taylor_output_dim,
                                taylor_unit)
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import kernel_flops, variant_functions


@dataclass
class TaylorParams(VariantParams):
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def features(q, k, *, params, scaling, q_offset=0, k_offset=0):
    return taylor_features(q, scaling), taylor_features(k, scaling)


def kernel(q, k, *, params, scaling, q_offset=0):
    """``1 + s q.k + (s q.k)^2 / 2`` from the scores directly, not through the features."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scaling
    return 1.0 + s + 0.5 * s * s


# Bytes of one [B, H, rows, F] fp32 slice of features that the inference paths map at a time (one buffer, reused).
# Measured at T = 8192, H = 12, D = 64 (F = 2,145): below ~100 rows the [F, D_v] sums are accumulated over too few
# rows per matmul, far above it the slice leaves the cache.
SEGMENT_BYTES = 32 << 20
# Causal: rows per segment (a multiple of 64 where the budget allows). Inside a segment the kernel is computed from
# the scores directly, a masked [rows, rows] product over the head dimension; across segments through the features.
CAUSAL_ROWS = 256


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    """The linear kernels with the Taylor map itself as ``phi`` (on ``q`` and ``k`` scaled by ``sqrt(scaling)``),
    not pre-mapped inputs: the bidirectional kernel maps slice by slice, forward and backward (the map has a
    hand-written derivative), the causal one segment by segment, so neither holds ``[B, H, T, F]`` features.
    Without autograd (inference), :func:`_bidirectional` and :func:`_causal` instead: fewer, larger matmuls and one
    reused feature buffer."""
    root = math.sqrt(scaling)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not any(autograd_records(x) for x in (q, k, v)) and 0 not in q.shape and 0 not in k.shape and (not causal or t_q == t_k):
        work = torch.float32 if v.dtype in LOW_PRECISION else v.dtype
        u_q, u_k, v_w = (q.to(work) * root), (k.to(work) * root), v.to(work)
        run = _causal if causal else _bidirectional
        return run(u_q, u_k, v_w, padding_or_none(mask), params.eps).to(v.dtype)
    out = linear_ops.linear_attention(q * root, k * root, v, mask=mask, causal=causal, phi=taylor_unit, eps=params.eps,
                                      chunk_size=params.chunk_size)
    return out.to(v.dtype)


class _Features:
    """The Taylor features of slices of rows, feature-major ``[BH, F, rows]`` (the layout ``phi(K)^T V`` reads
    directly; ``phi(Q) S`` reads it transposed at the same speed), written into one reused buffer and never weighted:
    the callers halve the diagonal rows of their sums instead (:func:`taylor_features_into`)."""

    def __init__(self, u: torch.Tensor, rows: int):
        b, h, _, d = u.shape
        self.f = taylor_output_dim(d)
        self.buffer = u.new_empty(b * h * rows * self.f)

    def __call__(self, u_slice: torch.Tensor) -> torch.Tensor:
        b, h, n, d = u_slice.shape
        ut = u_slice.reshape(b * h, n, d).transpose(1, 2).contiguous()  # [BH, D, n]
        out = self.buffer[:b * h * n * self.f].view(b * h, self.f, n)
        return taylor_features_into(ut, out, weighted=False, dim=-2)


def _rows(u: torch.Tensor) -> int:
    b, h, t, d = u.shape
    return max(16, SEGMENT_BYTES // max(1, 4 * b * h * taylor_output_dim(d)))


def _halve_diagonal(s1: torch.Tensor, d: int) -> torch.Tensor:
    """``s1`` ``[BH, F, E]`` with the rows of the diagonal features halved (the unweighted features' correction)."""
    diagonal = taylor_diagonal_features(d, s1.device)
    s1[:, diagonal] *= 0.5
    return s1


def _key_sums(fk: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor) -> None:
    """Add ``phi(K)^T (v m)`` to ``s`` ``[BH, F, D_v]`` and ``phi(K)^T m`` to ``z`` ``[BH, F, 1]`` (``m`` the key
    padding ``[B, n]`` or None). The denominator apart from the numerator: a 64-wide product runs faster than a
    65-wide one, and unpadded the sum over keys is a reduction, not a product (measured 241 against 292 ms per
    8,192 rows)."""
    bh, f, n = fk.shape
    if m is None:
        s.baddbmm_(fk, v.reshape(bh, n, -1))
        z.add_(fk.sum(-1, keepdim=True))
        return
    b = m.shape[0]
    mv = m[:, None, :, None].to(v.dtype)  # [B, 1, n, 1]
    s.baddbmm_(fk, (v * mv).reshape(bh, n, -1))
    z.baddbmm_(fk, mv.expand(b, bh // b, n, 1).reshape(bh, n, 1))


def _normalised_into(out: torch.Tensor, o1: torch.Tensor, eps: float) -> None:
    """``out`` ``[B, H, n, D_v]`` ``= num / max(den, eps)`` from the fused ``[BH, n, D_v + 1]`` sums
    (:func:`hf_reshape.ops.linear._normalise`: a zero denominator gives zeros)."""
    out.copy_(linear_ops._normalise(o1, eps).view(out.shape))


def _bidirectional(u_q, u_k, v, mask, eps):
    """Inference, all keys: ``S1 = sum_j phi(k_j)^T [v_j m_j, m_j]`` over slices of keys (padded keys enter with
    ``m_j = 0``), its diagonal rows halved, then ``phi(q) S1`` per slice of queries, normalised."""
    b, h, t_k, d = u_k.shape
    t_q, d_v = u_q.shape[-2], v.shape[-1]
    rows = min(_rows(u_k), max(t_q, t_k))
    phi = _Features(u_k, rows)
    s = u_k.new_zeros(b * h, phi.f, d_v)
    z = u_k.new_zeros(b * h, phi.f, 1)
    for j in range(0, t_k, rows):
        _key_sums(phi(u_k[..., j:j + rows, :]), v[..., j:j + rows, :], None if mask is None else mask[:, j:j + rows],
                  s, z)
    s1 = _halve_diagonal(torch.cat([s, z], -1), d)  # [BH, F, D_v + 1]: one product per query slice gives both
    out = v.new_empty(b, h, t_q, d_v)
    for i in range(0, t_q, rows):
        fq = phi(u_q[..., i:i + rows, :])
        _normalised_into(out[..., i:i + fq.shape[-1], :], torch.bmm(fq.transpose(1, 2), s1), eps)
    return out


def _causal(u_q, u_k, v, mask, eps):
    """Inference, causal, ``T_q = T_k``, in segments of :data:`CAUSAL_ROWS`: inside a segment the kernel
    ``1 + s + s^2 / 2`` straight from the scores ``s = u_q . u_k`` (a lower-triangular ``[rows, rows]`` product over
    the head dimension, cheaper there than ``[rows, F]`` features), plus ``phi(q) P`` for the keys of earlier
    segments, whose sums ``P = sum_j phi(k_j)^T [v_j m_j, m_j]`` run from segment to segment. So the ``F``-wide
    features enter only in two matmuls per segment with ``rows`` or ``F`` as their inner dimension, never in the
    per-chunk ``[F, D_v]`` prefix states a chunked kernel writes (measured T = 8192, H = 12, D = 64: 0.37x SDPA
    through the chunked kernel, about 1.05x here)."""
    b, h, t, d = u_q.shape
    d_v = v.shape[-1]
    rows = min(CAUSAL_ROWS, t)
    phi = _Features(u_q, rows)
    s_sum = u_q.new_zeros(b * h, phi.f, d_v)
    z_sum = u_q.new_zeros(b * h, phi.f, 1)
    out = v.new_empty(b, h, t, d_v)
    for i in range(0, t, rows):
        n = min(rows, t - i)
        uq, uk, v_s = u_q[..., i:i + n, :], u_k[..., i:i + n, :], v[..., i:i + n, :]
        m_s = None if mask is None else mask[:, i:i + n]
        v1 = linear_ops._with_ones(v_s, m_s).reshape(b * h, n, d_v + 1)
        a = torch.matmul(uq, uk.transpose(-1, -2)).view(b * h, n, n)  # scores s
        a.addcmul_(a, a, value=0.5).add_(1.0).tril_()  # 1 + s + s^2 / 2 elementwise in place, causal
        o1 = torch.bmm(a, v1)
        if i:
            p = _halve_diagonal(torch.cat([s_sum, z_sum], -1), d)
            o1.baddbmm_(phi(uq).transpose(1, 2), p)
        if i + n < t:
            _key_sums(phi(uk), v_s, m_s, s_sum, z_sum)
        _normalised_into(out[..., i:i + n, :], o1, eps)
    return out


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs of linear attention over the ``1 + D + D(D+1)/2`` Taylor features (the features
    themselves are products of coordinates, not counted)."""
    return float(batch * num_heads * kernel_flops(t, taylor_output_dim(head_dim), head_dim))


register_variant(
    name="taylor",
    family="linear",
    params_cls=TaylorParams,
    **{**variant_functions(features, kernel), "forward": _forward},
    complexity="O(T D^2 D_v) time, O(T D^2 + D^2 D_v) memory (causal: chunked); 1 + D + D(D+1)/2 features",
    quadratic=False,
    description="linear attention with the 2nd-order Taylor kernel 1 + s q.k + (s q.k)^2/2 (Based)",
    small_params={"chunk_size": 4},
    paper="Arora et al. 2024, Simple linear attention language models balance the recall-throughput tradeoff (Based)",
    cache_layer="linear_state",
    flops=flops,
    quick_params={},
)
