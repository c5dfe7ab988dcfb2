"""``topk``: each query keeps its ``top_k`` highest scaled scores among the keys it may attend to."""

from dataclasses import dataclass, field

from .. import attention_weights
from ..ops import naive, sparse
from ..registry import VariantParams, check_int, register_variant


@dataclass
class TopKParams(VariantParams):
    top_k: int = field(default=64, metadata={"help": "keys kept per query (all of them when fewer are allowed)"})

    def validate(self):
        check_int("top_k", self.top_k)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return sparse.topk_attention(
        q, k, v, mask=mask, causal=causal, scaling=scaling, top_k=params.top_k, dropout=dropout, training=training
    )


def _reference(q, k, v, *, mask, causal, scaling, params):
    return naive.topk_reference(q, k, v, mask=mask, causal=causal, scaling=scaling, top_k=params.top_k)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: every allowed score, then ``P V`` over the ``top_k`` kept keys only."""
    pairs = t * (t + 1) / 2 if causal else t * t
    return float(batch * num_heads * (2 * pairs * head_dim + 2 * t * min(params.top_k, t) * head_dim))


register_variant(
    name="topk",
    family="sparse",
    params_cls=TopKParams,
    forward=_forward,
    reference=_reference,
    degenerate=lambda t: {"top_k": t},
    complexity="O(T^2 D) time, O(T * chunk) memory",
    quadratic=True,
    description="softmax over each query's top_k scores",
    small_params={"top_k": 5},
    paper="Gupta et al. 2021, Memory-efficient Transformers via Top-k Attention; Wang et al. 2022, KVT",
    weights=attention_weights.topk_weights,
    flops=flops,
    bench_params={"top_k": 64},
    quick_params={"top_k": 8},
    demo_params={"top_k": 8},
)
