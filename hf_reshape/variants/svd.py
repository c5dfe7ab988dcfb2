"""``svd``: the exact attention matrix truncated to its top ``rank`` singular values (an analysis baseline)."""

from dataclasses import dataclass, field

from .. import attention_weights
from ..ops import low_rank, naive
from ..registry import VariantParams, check_int, register_variant


@dataclass
class SVDParams(VariantParams):
    rank: int = field(default=32, metadata={"help": "singular values kept per head"})

    def validate(self):
        check_int("rank", self.rank)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return low_rank.svd_attention(q, k, v, mask=mask, scaling=scaling, rank=params.rank, dropout=dropout, training=training)


def _reference(q, k, v, *, mask, causal, scaling, params):
    return naive.svd_reference(q, k, v, mask=mask, scaling=scaling, rank=params.rank)


# SVD of an n x n matrix with both singular-vector sets (Golub-Reinsch, Golub & Van Loan, Matrix Computations,
# 4th ed., Fig. 8.6.1): about 21 n^3 flops
SVD_FLOP_FACTOR = 21


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: the scores, the SVD of the ``T x T`` matrix, the rank-``r`` product, ``P V``."""
    per_head = 2 * t * t * head_dim + SVD_FLOP_FACTOR * t**3 + 2 * t * t * params.rank + 2 * t * t * head_dim
    return float(batch * num_heads * per_head)


register_variant(
    name="svd",
    family="low_rank",
    params_cls=SVDParams,
    forward=_forward,
    reference=_reference,
    causal=False,
    degenerate=lambda t: {"rank": t},
    complexity="O(T^3) time (SVD of the T x T matrix), O(T^2) memory",
    quadratic=True,
    description="attention matrix truncated to its top singular values (analysis baseline)",
    small_params={"rank": 4},
    paper="Eckart-Young; used as the low-rank baseline in Wang et al. 2020 (Linformer), Sec. 3",
    weights=attention_weights.svd_weights,
    flops=flops,
    bench_params={"rank": 32},
    quick_params={"rank": 8},
    demo_params={"rank": 8},
)
