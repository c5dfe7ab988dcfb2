"""Variant attention as plain functions, for use inside your own models.

```python
>>> import torch, hf_reshape
>>> q = k = v = torch.randn(2, 4, 128, 32)                      # [B, H, T, D]
>>> out = hf_reshape.functional.attention(q, k, v, "sliding_window", window=16, is_causal=True)
>>> out.shape                                                   # [B, H, T_q, D]
torch.Size([2, 4, 128, 32])
```
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidParameterError, NotCausalError
from .ops.common import tracing
from .registry import VariantSpec, get_variant, list_variants, make_params


def check_form(spec: VariantSpec, is_causal: bool) -> None:
    """Refuse a causal call of a bidirectional-only variant (and the converse), naming those that fit."""
    if is_causal and not spec.causal:
        fits = [n for n in list_variants() if get_variant(n).causal]
        raise NotCausalError(
            f"variant {spec.name!r} is bidirectional only: it is not causal and cannot run causal attention; "
            f"causal variants: {fits}"
        )
    if not is_causal and not spec.bidirectional:
        fits = [n for n in list_variants() if get_variant(n).bidirectional]
        raise NotCausalError(f"variant {spec.name!r} is causal only; bidirectional variants: {fits}")


def _split(spec: VariantSpec, kwargs: dict[str, Any]):
    state = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.state_names}
    return make_params(spec, kwargs), state


def _check_inputs(query, key, value, attention_mask):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise InvalidParameterError("query, key and value must be [B, H, T, D] tensors")
    if query.shape[:2] != key.shape[:2] or key.shape[:3] != value.shape[:3] or query.shape[-1] != key.shape[-1]:
        raise InvalidParameterError(
            f"incompatible shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InvalidParameterError(
                f"attention_mask must be {_MASK_FORM}, a tensor [B, T_k]; got {type(attention_mask).__name__}"
            )
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (key.shape[0], key.shape[2]):
            raise InvalidParameterError(
                f"attention_mask must be a bool key-padding mask [B, T_k] = {(key.shape[0], key.shape[2])}, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        _check_mask_values(attention_mask)
        attention_mask = attention_mask.to(device=key.device, dtype=torch.bool)
    return attention_mask


_MASK_FORM = (
    "a key-padding mask of bool (True = real token, False = padding) or of 0/1 integers (1 = real token, as "
    "tokenizers return)"
)


def _check_mask_values(mask: torch.Tensor) -> None:
    """Refuse masks whose meaning would change under ``.to(bool)``: float masks (an additive mask, 0 for allowed and
    -inf for masked, would become its own inverse) and integer masks holding values other than 0 and 1."""
    if mask.dtype == torch.bool:
        return
    if mask.is_floating_point() or mask.is_complex():
        raise InvalidParameterError(
            f"attention_mask must be {_MASK_FORM}; got dtype {mask.dtype}. A float mask is refused because an "
            "additive mask (0 = attend, -inf = masked) would be read backwards: pass `mask == 0` for an additive "
            "mask, or `mask.bool()` for a 0./1. one"
        )
    if not tracing() and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = sorted({int(x) for x in mask[(mask != 0) & (mask != 1)].unique()[:5]})
        raise InvalidParameterError(f"attention_mask must be {_MASK_FORM}; got an integer mask holding {bad}")


def _prepare(query, key, value, method, attention_mask, is_causal, scaling, params):
    """Validate a functional call; return the spec and the keyword arguments its forward/reference take."""
    spec = get_variant(method)
    p, state = _split(spec, dict(params))
    check_form(spec, is_causal)
    mask = _check_inputs(query, key, value, attention_mask)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return spec, {"mask": mask, "causal": is_causal, "scaling": scaling, "params": p, **state}


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    method: str,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scaling: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Attention of a registered variant, fast path.

    Args:
        query (`torch.Tensor` of shape `[B, H, T_q, D]`), key (`[B, H, T_k, D]`), value (`[B, H, T_k, D_v]`).
        method (`str`): a name from `hf_reshape.list_variants()`.
        attention_mask (`torch.BoolTensor` of shape `[B, T_k]`, *optional*): key-padding mask, True = real token;
            0/1 integers (a tokenizer's mask) are accepted too. Float masks (additive 0 / -inf masks) are refused
            with `InvalidParameterError`, as are integers other than 0 and 1.
        is_causal (`bool`): causal form; queries are the last `T_q` positions of the keys.
        scaling (`float`, *optional*): score scale, defaults to `1 / sqrt(D)`.
        dropout (`float`), training (`bool`): dropout on attention probabilities where the variant has them.
        **params: the variant's parameters, and for stateful variants their state tensors
            (e.g. Linformer's `proj_k`, `proj_v`).

    Returns:
        `torch.Tensor` of shape `[B, H, T_q, D_v]`; a query with no allowed key gets zeros.
    """
    spec, call = _prepare(query, key, value, method, attention_mask, is_causal, scaling, params)
    return spec.forward(query, key, value, dropout=dropout, training=training, **call)


def reference(query, key, value, method, *, attention_mask=None, is_causal=False, scaling=None, **params):
    """The variant's plain, materialised reference (same arguments as :func:`attention`, no dropout). Slow: it
    builds the full `T_q x T_k` matrix; use it to check fast paths, in float64."""
    spec, call = _prepare(query, key, value, method, attention_mask, is_causal, scaling, params)
    return spec.reference(query, key, value, **call)


def init_state(method: str, *, num_heads: int, head_dim: int, layer_index: int = 0,
               **params: Any) -> dict[str, torch.Tensor]:
    """Fresh per-layer state of a stateful variant (e.g. Linformer's projections); `{}` for stateless ones.
    `layer_index`: the layer's index in a model (random state such as Performer's projection differs per layer)."""
    spec = get_variant(method)
    p = make_params(spec, params)
    if spec.init_state is None:
        return {}
    return spec.init_state(p, num_heads=num_heads, head_dim=head_dim, layer_index=layer_index)
