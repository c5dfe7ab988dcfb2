"""``linear``: linearized attention ``phi(q) . phi(k)`` with a guarded denominator, causal or bidirectional."""

from dataclasses import dataclass, field

from ..ops import linear as linear_ops
from ..ops import naive
from ..errors import InvalidParameterError
from ..ops.feature_maps import FEATURE_MAPS, list_feature_maps
from ..registry import VariantParams, check_choice, check_float, check_int, list_variants, register_variant
from ._kernelized import kernel_flops


@dataclass
class LinearParams(VariantParams):
    feature_map: str = field(
        default="elu",
        metadata={"help": f"phi applied to q and k: one of {sorted(FEATURE_MAPS)}, or an elementwise map registered "
                  "with hf_reshape.ops.feature_maps.register_feature_map"},
    )
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        if isinstance(self.feature_map, str) and self.feature_map not in FEATURE_MAPS and \
                self.feature_map in list_feature_maps():
            raise InvalidParameterError(
                f"`feature_map` {self.feature_map!r} is a registered feature map but not an elementwise, parameter-free "
                f"one, which is what `linear` takes: one of {sorted(FEATURE_MAPS)}"
                + (f"; use the {self.feature_map!r} variant" if self.feature_map in list_variants() else "")
            )
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    # there is no probability matrix to drop out; `scaling` does not apply to phi(q) . phi(k)
    return linear_ops.linear_attention(
        q, k, v, mask=mask, causal=causal, phi=FEATURE_MAPS[params.feature_map], eps=params.eps,
        chunk_size=params.chunk_size,
    )


def _reference(q, k, v, *, mask, causal, scaling, params):
    return naive.linear_reference(q, k, v, mask=mask, causal=causal, phi=FEATURE_MAPS[params.feature_map], eps=params.eps)


def features(q, k, *, params, scaling, q_offset=0, k_offset=0):
    phi = FEATURE_MAPS[params.feature_map]
    return phi(q), phi(k)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs (elementwise ``phi``: ``D`` features): ``4 T D^2 + 2 T D`` per head."""
    return float(batch * num_heads * kernel_flops(t, head_dim, head_dim))


register_variant(
    name="linear",
    family="linear",
    params_cls=LinearParams,
    forward=_forward,
    reference=_reference,
    features=features,
    complexity="O(T D^2) time, O(T D + D^2) memory (causal: chunked)",
    quadratic=False,
    description="kernelized attention with phi = elu+1 or relu (no dropout, no scaling)",
    small_params={"feature_map": "elu", "chunk_size": 4},
    paper="Katharopoulos et al. 2020, Transformers are RNNs",
    cache_layer="linear_state",
    flops=flops,
    bench_params={"feature_map": "elu"},
    quick_params={"feature_map": "elu"},
    demo_params={"feature_map": "elu"},
)
