"""``strided``: the strided pattern of the Sparse Transformer (Child et al. 2019, "Generating Long Sequences with
Sparse Transformers"): query ``i`` attends the local keys ``i - stride < j <= i`` (bidirectional:
``|i - j| < stride``) and every key with ``(i - j) % stride == 0`` (causal: earlier keys only), in one softmax over
the union. Fast path and reference: :mod:`hf_reshape.ops.block_sparse`."""

from dataclasses import dataclass, field

from ..ops import block_sparse as ops
from ..ops.common import masked_softmax, upcast
from ..registry import VariantParams, check_int, register_variant


@dataclass
class StridedParams(VariantParams):
    stride: int = field(default=128, metadata={"help": "local block width and the step of the strided keys"})

    def validate(self):
        check_int("stride", self.stride)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return ops.strided_attention(q, k, v, mask=mask, causal=causal, scaling=scaling, stride=params.stride,
                                 dropout=dropout, training=training)


def _reference(q, k, v, *, mask, causal, scaling, params):
    return ops.strided_reference(q, k, v, mask=mask, causal=causal, scaling=scaling, stride=params.stride)


def weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """Softmax probabilities over the local and strided keys, zeros elsewhere."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    allowed = ops.strided_allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, stride=params.stride)
    return masked_softmax(q @ k.transpose(-1, -2) * scaling, allowed).to(out_dtype)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``Q K^T`` and ``P V`` over the pattern's (query, key) pairs."""
    return float(batch * num_heads * 4 * head_dim * ops.strided_pairs(t, stride=params.stride, causal=causal))


register_variant(
    name="strided",
    family="sparse",
    params_cls=StridedParams,
    forward=_forward,
    reference=_reference,
    degenerate=lambda t: {"stride": max(int(t), 1)},
    complexity="O(T (s + T / s) D) time and memory",
    quadratic=False,
    description="Sparse Transformer: a local block plus every stride-th key",
    small_params={"stride": 3},
    paper="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
    weights=weights,
    flops=flops,
    bench_params={"stride": 128},
    quick_params={"stride": 4},
    demo_params={"stride": 4},
)
