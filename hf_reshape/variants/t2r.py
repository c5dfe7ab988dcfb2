"""``t2r``: linear attention with a learned MLP + ReLU feature map per head, ``phi(x) = relu(x W + b)`` (Kasai et al.
2021, "Finetuning Pretrained Transformers into RNNs", EMNLP: T2R, "Transformer-to-RNN").

One map per head, shared by queries and keys as in the paper, ``W`` ``[H, D, F]`` and ``b`` ``[H, F]`` learned
parameters of the layer (trained, saved with the model, reloaded exactly). At first ``W`` holds signed coordinate
vectors and ``b = 0`` (:class:`hf_reshape.ops.feature_maps.T2RFeatureMap`): with the default ``F = D`` the map is
``relu(x)``, so a freshly reshaped model runs exactly ``linear`` with ``feature_map="relu"``, usable before the
fine-tuning the paper relies on (or attention transfer, :func:`hf_reshape.transfer`). Cost is that of linear
attention with ``F`` features: ``O(T F D)``, no ``T x T``; ``scaling`` does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidParameterError
from ..ops.feature_maps import T2RFeatureMap, t2r_features
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import kernel_flops, variant_functions


@dataclass
class T2RParams(VariantParams):
    feature_dim: int | None = field(default=None, metadata={"help": "F, features per head; None = the head dim"})
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        check_int("feature_dim", self.feature_dim, optional=True)
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def init_state(params, *, num_heads, head_dim, **_):
    fmap = T2RFeatureMap(num_heads, head_dim, feature_dim=params.feature_dim)
    return {"feature_weight": nn.Parameter(fmap.weight.detach().clone()),
            "feature_bias": nn.Parameter(fmap.bias.detach().clone())}


def _check(weight, bias):
    if weight is None or bias is None:
        raise InvalidParameterError(
            "t2r needs its state tensors `feature_weight` [H, D, F] and `feature_bias` [H, F]; make them with "
            "hf_reshape.functional.init_state('t2r', num_heads=..., head_dim=...)"
        )


def features(q, k, *, params, scaling, q_offset=0, k_offset=0, feature_weight=None, feature_bias=None):
    _check(feature_weight, feature_bias)
    return t2r_features(q, feature_weight, feature_bias), t2r_features(k, feature_weight, feature_bias)


def kernel(q, k, *, params, scaling, q_offset=0, feature_weight=None, feature_bias=None):
    fq, fk = features(q, k, params=params, scaling=scaling, feature_weight=feature_weight, feature_bias=feature_bias)
    return torch.matmul(fq, fk.transpose(-1, -2))


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: the map's ``x W`` for queries and keys, then linear attention over ``F`` features."""
    f = params.feature_dim or head_dim
    return float(batch * num_heads * kernel_flops(t, f, head_dim, map_matmul=f))


register_variant(
    name="t2r",
    family="linear",
    params_cls=T2RParams,
    **variant_functions(features, kernel),
    init_state=init_state,
    state_names=("feature_weight", "feature_bias"),
    complexity="O(T F D) time, O(T F + F D) memory (causal: chunked)",
    quadratic=False,
    description="linear attention with a learned relu(x W + b) feature map per head (starts as relu)",
    small_params={"chunk_size": 4},
    paper="Kasai et al. 2021, Finetuning Pretrained Transformers into RNNs (EMNLP)",
    cache_layer="linear_state",
    flops=flops,
    quick_params={},
)
