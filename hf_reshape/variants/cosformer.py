"""``cosformer``: ReLU features with cosFormer's cos re-weighting (Qin et al. 2022, "cosFormer: Rethinking Softmax in
Attention", ICLR).

``A_ij = relu(q_i) . relu(k_j) cos(pi (i - j) / (2 M))``: non-negative like softmax's weights, and concentrated
near the diagonal (the locality bias that the paper finds softmax's strength). ``cos(a - b) = cos a cos b +
sin a sin b`` splits it into ``2D`` features per token, ``[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]``
(:func:`hf_reshape.ops.feature_maps.cosformer_features`), so it runs as linear attention: ``O(T D^2)``, no
``T x T``, causal and bidirectional.

Positions are absolute indices in the key sequence (pads included): query ``i`` of a causal call with a decoder's
past sits at ``T_k - T_q + i``, and a recurrent decode state (:class:`hf_reshape.cache.LinearRecurrentLayer`) carries
the number of tokens seen as the offset of the next ones. Only differences ``i - j`` enter the kernel, so left or
right padding leaves a sequence's outputs unchanged. ``M`` is ``max_length``: by default the model's maximum
positions (set at reshape time), so the re-weighting is the same at every sequence length and stays non-negative
(``|i - j| < M``); a longer sequence is refused with ``SequenceTooLongError``. Called through
:func:`hf_reshape.functional.attention` with ``max_length=None``, ``M`` is the sequence length (the paper's choice).
``scaling`` does not apply (ReLU features, as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import SequenceTooLongError
from ..ops.feature_maps import cosformer_features
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import kernel_flops, variant_functions


@dataclass
class CosformerParams(VariantParams):
    max_length: int | None = field(
        default=None,
        metadata={"help": "M of the re-weighting cos(pi (i - j) / 2M), the longest sequence accepted; None = the "
                  "model's maximum positions (functional calls: the number of keys)"},
    )
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        check_int("max_length", self.max_length, optional=True)
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def _m(params, last):
    """``M``: ``max_length``, or (functional calls without one) the number of positions in the call."""
    return last if params.max_length is None else params.max_length


def features(q, k, *, params, scaling, q_offset=0, k_offset=0):
    m = _m(params, max(q_offset + q.shape[-2], k_offset + k.shape[-2]))
    return cosformer_features(q, q_offset, m), cosformer_features(k, k_offset, m)


def kernel(q, k, *, params, scaling, q_offset=0):
    """``relu(q_i) . relu(k_j) cos(pi (i - j) / 2M)`` from the positions directly, not through the features."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    m = _m(params, max(t_k, q_offset + t_q))
    if max(t_k, q_offset + t_q) > m:
        raise SequenceTooLongError(f"cosformer was built for sequences of at most max_length={m} tokens, got {t_k}")
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    i = torch.arange(q_offset, q_offset + t_q, device=q.device, dtype=torch.float64)[:, None]
    j = torch.arange(t_k, device=q.device, dtype=torch.float64)[None, :]
    weight = torch.cos((i - j) * (math.pi / (2 * max(m, 1)))).to(dtype)
    return torch.matmul(F.relu(q.to(dtype)), F.relu(k.to(dtype)).transpose(-1, -2)) * weight


def _prepare(params, facts):
    if params.max_length is None:
        return replace(params, max_length=facts.max_positions)
    return params


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs of linear attention over ``2 D`` features (``relu(x) cos``, ``relu(x) sin``)."""
    return float(batch * num_heads * kernel_flops(t, 2 * head_dim, head_dim))


register_variant(
    name="cosformer",
    family="linear",
    params_cls=CosformerParams,
    **variant_functions(features, kernel),
    prepare_params=_prepare,
    complexity="O(T D^2) time, O(T D + D^2) memory (causal: chunked); 2D features",
    quadratic=False,
    description="ReLU linear attention re-weighted by cos(pi (i - j) / 2M) (no dropout, no scaling)",
    small_params={"chunk_size": 4},
    paper="Qin et al. 2022, cosFormer: Rethinking Softmax in Attention (ICLR)",
    cache_layer="linear_state",
    flops=flops,
    quick_params={},
)
