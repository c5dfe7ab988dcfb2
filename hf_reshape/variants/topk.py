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
)
