"""``sliding_window``: query ``i`` attends key ``j`` when ``|i - j| <= window`` (or ``0 <= i - j <= window``
when causal)."""

from dataclasses import dataclass, field

from .. import attention_weights
from ..ops import naive, sparse
from ..registry import VariantParams, check_int, register_variant


@dataclass
class SlidingWindowParams(VariantParams):
    window: int = field(default=128, metadata={"help": "how far each query sees on each side (past only if causal)"})
    block_size: int | None = field(
        default=None, metadata={"help": "query block of the blocked kernel (speed knob only); None picks one"}
    )

    def validate(self):
        check_int("window", self.window, minimum=0)
        check_int("block_size", self.block_size, optional=True)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return sparse.sliding_window_attention(
        q, k, v, mask=mask, causal=causal, scaling=scaling, window=params.window,
        block_size=params.block_size, dropout=dropout, training=training,
    )


def _reference(q, k, v, *, mask, causal, scaling, params):
    return naive.sliding_window_reference(q, k, v, mask=mask, causal=causal, scaling=scaling, window=params.window)


def band_pairs(t: int, window: int, causal: bool) -> int:
    """(query, key) pairs of a length-``t`` sequence within the band: ``0 <= i - j <= window`` causal,
    ``|i - j| <= window`` bidirectional."""
    w = min(window, max(t - 1, 0))
    if causal:
        return (w + 1) * t - w * (w + 1) // 2  # row i sees min(i, w) + 1 keys
    return (2 * w + 1) * t - w * (w + 1)  # row i sees min(t, i + w + 1) - max(0, i - w) keys


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``Q K^T`` and ``P V`` over the band's pairs only."""
    return float(batch * num_heads * 4 * band_pairs(t, params.window, causal) * head_dim)


register_variant(
    name="sliding_window",
    family="sparse",
    params_cls=SlidingWindowParams,
    forward=_forward,
    reference=_reference,
    degenerate=lambda t: {"window": t},
    complexity="O(T w D) time, O(T w) memory",
    quadratic=False,
    description="local attention within a band of half-width `window`",
    small_params={"window": 3, "block_size": 4},
    paper="Beltagy et al. 2020, Longformer; Child et al. 2019, Sparse Transformers",
    weights=attention_weights.sliding_window_weights,
    cache_layer="window",
    flops=flops,
    bench_params={"window": 256},
    quick_params={"window": 8},
    demo_params={"window": 8},
)
