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
from ..ops.feature_maps import taylor_features, taylor_output_dim, taylor_unit
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


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    """The linear kernels with the Taylor map itself as ``phi`` (on ``q`` and ``k`` scaled by ``sqrt(scaling)``),
    not pre-mapped inputs: the bidirectional kernel maps slice by slice, forward and backward (the map has a
    hand-written derivative), the causal one segment by segment, so neither holds ``[B, H, T, F]`` features."""
    root = math.sqrt(scaling)
    out = linear_ops.linear_attention(q * root, k * root, v, mask=mask, causal=causal, phi=taylor_unit, eps=params.eps,
                                      chunk_size=params.chunk_size)
    return out.to(v.dtype)


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
