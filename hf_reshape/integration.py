"""The only module that touches transformers' dispatch: an attention function and a mask function registered
under one name in ``AttentionInterface`` and ``AttentionMaskInterface``.

The mask function hands the attention function the compact 2D key-padding mask ``[B, T_k]`` (or ``None``),
never a ``T x T`` matrix; causality comes from ``module.is_causal``. A module that carries no reshaped state
(a layer left out with ``layers=[...]``, a cross-attention) runs exact softmax attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .functional import check_form
from .ops.common import allowed_mask, sdpa_zero_empty_rows
from .registry import VariantParams, get_variant

ATTN_IMPLEMENTATION = "hf_reshape"
STATE_ATTR = "hf_reshape"  # name of the ReshapedAttention submodule on a transformers attention module


class ReshapedAttention(nn.Module):
    """Per-layer variant state, registered as a submodule of the attention module it replaces, so it moves
    with ``.to()``, is seen by optimizers and is saved with the weights (learned state as parameters, random
    state as persistent buffers)."""

    def __init__(self, method: str, params: VariantParams, state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.method = method
        self.params = params
        self.state_names = tuple((state or {}).keys())
        for name, tensor in (state or {}).items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor, persistent=True)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.params.to_dict().items())

    def park_recurrent_state(self, layer, key: torch.Tensor) -> None:
        """Called by a recurrent cache layer's ``update`` (see :mod:`hf_reshape.cache`): hand ``layer`` to the
        attention call that receives exactly the tensor ``key``. Kept out of ``_modules``/``state_dict``."""
        self.__dict__["_hf_reshape_parked"] = (layer, key)

    def take_recurrent_state(self, key: torch.Tensor):
        """Pop the parked cache layer if it was parked for this very ``key`` tensor, else drop it and return None
        (a plain forward never sees state left over from an interrupted step)."""
        parked = self.__dict__.pop("_hf_reshape_parked", None)
        if parked is None or parked[1] is not key:
            return None
        return parked[0]

    def forward(self, query, key, value, mask, causal: bool, scaling: float, dropout: float = 0.0):
        spec = get_variant(self.method)
        check_form(spec, causal)
        state = {name: getattr(self, name) for name in self.state_names}
        return spec.forward(
            query, key, value, mask=mask, causal=causal, scaling=scaling, params=self.params, dropout=dropout,
            training=self.training, **state,
        )


def exact_attention(query, key, value, mask, causal, scaling, dropout=0.0, training=False):
    """Softmax attention through torch SDPA; queries with no allowed key give zeros (SDPA would give NaN)."""
    t_q, t_k = query.shape[-2], key.shape[-2]
    if mask is None and (not causal or t_q == t_k):
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if training else 0.0, is_causal=causal and t_q > 1, scale=scaling
        )
    allowed = allowed_mask(mask, t_q, t_k, causal, query.device)
    return sdpa_zero_empty_rows(query, key, value, allowed, scaling, dropout_p=dropout if training else 0.0)


def hf_reshape_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention-interface signature: ``[B, H, T, D]`` in, ``([B, T_q, H, D_v], None)`` out."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "hf_reshape attention takes a 2D key-padding mask [B, T_k] (built by its registered mask function); "
                f"got a {attention_mask.dim()}D mask. Pass a 2D `attention_mask` to the model, not a prepared 4D one."
            )
        attention_mask = attention_mask.to(torch.bool)
        if attention_mask.shape[-1] > key.shape[-2]:
            # one mask serves every layer: sized for a layer that keeps all keys, it covers all tokens seen, while
            # a bounded cache layer (hf_reshape.cache) hands over only the last T_k keys
            attention_mask = attention_mask[:, -key.shape[-2] :]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", False))
    reshaped = getattr(module, STATE_ATTR, None)
    if isinstance(reshaped, ReshapedAttention):
        recurrent = reshaped.take_recurrent_state(key)
        if recurrent is not None:
            # generation with a ReshapeCache: attend over the running state, then fold the new keys into it
            out = recurrent.attend(query, key, value, attention_mask, reshaped.params)
        else:
            out = reshaped(query, key, value, attention_mask, causal, scaling, dropout)
    else:
        out = exact_attention(query, key, value, attention_mask, causal, scaling, dropout, module.training)
    return out.transpose(1, 2).contiguous(), None


def hf_reshape_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask interface: return the 2D key-padding mask for the ``kv_length`` keys (or ``None``). Patterns that
    transformers composes into ``mask_function`` (packed sequences, overlays) are not supported."""
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)


def register_with_transformers() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_reshape_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_reshape_mask)


register_with_transformers()
