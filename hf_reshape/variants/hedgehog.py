"""``hedgehog``: linear attention with a learnable feature map per head, ``phi(x) = [softmax(x W), softmax(-x W)]``
over the feature dimension (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry"; queries and keys get separate maps, as in LoLCATs, Zhang et al. 2024).

The maps are initialised to the identity (``W = I``), so a reshaped model is usable before any training: the
attention weights ``phi(q_i) . phi(k_j)`` are positive and rise with the alignment of ``q_i`` and ``k_j``. Attention
transfer (:func:`hf_reshape.transfer`) then trains ``W`` to mimic softmax: the attention-output MSE plus, since the
variant's weights live over the same keys as softmax's, the KL between the two attention distributions (the
Hedgehog loss). Cost is that of linear attention with feature dimension ``2 F``: ``O(T F D)``, no ``T x T``.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidParameterError
from ..ops import linear as linear_ops
from ..ops.feature_maps import HedgehogFeatureMap, hedgehog_features
from ..ops import naive
from ..ops.common import autograd_records, padding_or_none
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import kernel_flops


@dataclass
class HedgehogParams(VariantParams):
    feature_dim: int | None = field(
        default=None, metadata={"help": "F, features per half of the map (2F in all); None = the head dim"}
    )
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        check_int("feature_dim", self.feature_dim, optional=True)
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def init_state(params, *, num_heads, head_dim, **_):
    w = HedgehogFeatureMap(num_heads, head_dim, feature_dim=params.feature_dim).weight.detach()  # [H, D, F], W = I
    return {"map_q": nn.Parameter(w.clone()), "map_k": nn.Parameter(w.clone())}


def feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[softmax(x W), softmax(-x W)]`` per head: ``x`` ``[B, H, T, D]``, ``weight`` ``[H, D, F]`` -> ``[B, H, T, 2F]``.
    Computed in float32 for half-precision inputs (:func:`hf_reshape.ops.feature_maps.hedgehog_features`)."""
    return hedgehog_features(x, weight)


def _check(map_q, map_k):
    if map_q is None or map_k is None:
        raise InvalidParameterError(
            "hedgehog needs its state tensors `map_q` and `map_k` of shape [H, D, F]; make them with "
            "hf_reshape.functional.init_state('hedgehog', num_heads=..., head_dim=...)"
        )


def _identity(x):
    return x


def features(q, k, *, params, scaling, q_offset=0, k_offset=0, map_q=None, map_k=None):
    """``phi_q(q), phi_k(k)`` (``VariantSpec.features``: the recurrent decode state of causal generation)."""
    _check(map_q, map_k)
    return feature_map(q, map_q), feature_map(k, map_k)


# Bytes of one [B, H, rows, 2F] fp32 slice of features that inference maps at a time (the features of the whole
# sequence are two fresh [T, 2F] buffers, mmaps that fault in on every call).
SEGMENT_BYTES = 8 << 20


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False, map_q=None, map_k=None):
    """Without autograd, the maps run slice by slice (:func:`hf_reshape.ops.linear.mapped_linear_inference`); with
    it, once over the sequence, then the linear kernels (which carry their own backward)."""
    _check(map_q, map_k)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not any(autograd_records(x) for x in (q, k, v, map_q, map_k)) and 0 not in q.shape and 0 not in k.shape and (not causal or t_q == t_k):
        b, h = q.shape[:2]
        rows = max(params.chunk_size, SEGMENT_BYTES // (4 * b * h * 2 * map_q.shape[-1]))
        out = linear_ops.mapped_linear_inference(
            q, k, v, mask=padding_or_none(mask), causal=causal, eps=params.eps, chunk_size=params.chunk_size,
            rows=rows, phi_q=lambda x: feature_map(x, map_q), phi_k=lambda x: feature_map(x, map_k))
        return out.to(v.dtype)
    fq, fk = feature_map(q, map_q), feature_map(k, map_k)
    out = linear_ops.linear_attention(fq, fk, v, mask=mask, causal=causal, phi=_identity, eps=params.eps,
                                      chunk_size=params.chunk_size)
    return out.to(v.dtype)


def _reference(q, k, v, *, mask, causal, scaling, params, map_q=None, map_k=None):
    _check(map_q, map_k)
    fq, fk = feature_map(q, map_q), feature_map(k, map_k)
    return naive.linear_reference(fq, fk, v.to(fq.dtype), mask=mask, causal=causal, phi=_identity, eps=params.eps)


def weights(q, k, v, *, mask, causal, scaling, params, map_q=None, map_k=None):
    """The attention distribution ``phi(q_i) . phi(k_j) / sum_j'`` over allowed keys ``[B, H, T_q, T_k]`` (a row with
    no allowed key is zero)."""
    from ..ops.common import allowed_mask

    _check(map_q, map_k)
    a = torch.matmul(feature_map(q, map_q), feature_map(k, map_k).transpose(-1, -2))
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if allowed is not None:
        a = a * allowed
    return a / a.sum(-1, keepdim=True).clamp_min(params.eps)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: the maps' ``x W`` (``F`` columns) for queries and keys, then linear attention over the
    ``2 F`` features ``[softmax(x W), softmax(-x W)]``."""
    f = params.feature_dim or head_dim
    return float(batch * num_heads * kernel_flops(t, 2 * f, head_dim, map_matmul=f))


register_variant(
    name="hedgehog",
    family="linear",
    params_cls=HedgehogParams,
    forward=_forward,
    reference=_reference,
    init_state=init_state,
    state_names=("map_q", "map_k"),
    weights=weights,
    weights_over_keys=True,
    features=features,
    complexity="O(T F D) time, O(T F + F D) memory (causal: chunked)",
    quadratic=False,
    description="linear attention with a learnable softmax feature map per head, trained to mimic softmax",
    small_params={"chunk_size": 4},
    paper="Zhang et al. 2024, The Hedgehog & the Porcupine (ICLR); Zhang et al. 2024, LoLCATs",
    cache_layer="linear_state",
    flops=flops,
    quick_params={},
)
