"""The only module that touches transformers' dispatch: an attention function and a mask function registered
under one name in ``AttentionInterface`` and ``AttentionMaskInterface``.

The mask function hands the attention function the compact 2D key-padding mask ``[B, T_k]`` (or ``None``),
never a ``T x T`` matrix; causality comes from ``module.is_causal``. A module that carries no reshaped state
(a layer left out with ``layers=[...]``, a cross-attention) runs exact softmax attention.

Two guards keep a reshaped model from silently running softmax attention:

* every reshaped attention module gets a forward pre-hook that raises :class:`AttentionImplementationError`
  when the model's attention implementation is no longer ``"hf_reshape"`` (``model.set_attn_implementation("sdpa")``
  or ``config._attn_implementation = ...`` after ``reshape``);
* a model built by transformers alone from a config that records a variant (``AutoModel.from_pretrained`` of a
  reshaped checkpoint, ``BertModel(reshaped.config)``) logs a warning through transformers' logger that names
  ``hf_reshape.from_pretrained``. The seam is ``PreTrainedModel.post_init``, which every transformers model calls
  at the end of its ``__init__``: importing hf_reshape wraps it once (the wrapper calls the original, then only
  reads ``config.hf_reshape``). Without hf_reshape imported nothing warns: such a load runs softmax attention.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from contextvars import ContextVar
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging as hf_logging

from . import observe
from .architectures import EXACT_ONLY_ARGUMENTS, NEUTRAL_ARGUMENTS, WINDOW_ARGUMENT, uses_attention_interface
from .attention_weights import softmax_weights
from .config import MODEL_CONFIG_KEY
from .errors import AttentionImplementationError, UnsupportedModelError
from .functional import check_form
from .ops.common import allowed_mask, sdpa_zero_empty_rows
from .registry import VariantParams, get_variant, list_variants

try:  # transformers' output-capturing context: says whether `output_attentions` was asked for (GPT-2 pops the kwarg)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another transformers: only the `output_attentions` keyword reaching the attention is seen
    _active_collector = None

ATTN_IMPLEMENTATION = "hf_reshape"
STATE_ATTR = "hf_reshape"  # name of the ReshapedAttention submodule on a transformers attention module
# the form discovery found for a module whose `is_causal` attribute says otherwise (set by reshape)
CAUSAL_ATTR = "_hf_reshape_is_causal"
# a child of transformers' library logger: its handler, and `transformers.logging.set_verbosity_*`, apply
logger = hf_logging.get_logger("transformers.hf_reshape")


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

    def forward(self, query, key, value, mask, causal: bool, scaling: float, dropout: float = 0.0, params=None):
        """``params`` replaces the layer's parameters for this call (the model's own window composed in)."""
        spec = get_variant(self.method)
        check_form(spec, causal)
        state = {name: getattr(self, name) for name in self.state_names}
        return spec.forward(
            query, key, value, mask=mask, causal=causal, scaling=scaling, params=self.params if params is None else params,
            dropout=dropout, training=self.training, **state,
        )


# ---------- the attention call's own arguments: grouped-query heads, the model's window, soft-capping, sinks ----------

# variants that serve a layer with its own sliding window, and how they compose it with their parameters
WINDOW_VARIANTS = ("sliding_window",)


def compose_window(method: str, params: VariantParams, window: int) -> VariantParams:
    """The parameters of a ``method`` layer inside a model window ``window`` (the attention call's
    ``sliding_window``: keys with ``i - j < window``): ``sliding_window``'s ``window`` (``i - j <= window``) becomes
    ``min(window, model window - 1)``, the intersection of both."""
    if method == "sliding_window" and params.window > window - 1:
        return replace(params, window=max(window - 1, 0))
    return params


def repeat_kv_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H_kv, T, D] -> [B, H_kv * groups, T, D]``, each key/value head repeated for the ``groups`` query heads
    that share it (grouped-query attention, Ainslie et al. 2023; query head ``h`` reads key/value head
    ``h // groups``, the layout of transformers' ``repeat_kv``)."""
    if groups == 1:
        return states
    b, h, t, d = states.shape
    return states[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def module_is_causal(module: nn.Module) -> bool:
    """The form of ``module``'s attention: what ``reshape`` found (:data:`CAUSAL_ATTR`, for the odd modules whose
    ``is_causal`` attribute is not it), else its ``is_causal``."""
    found = module.__dict__.get(CAUSAL_ATTR)
    return bool(getattr(module, "is_causal", False)) if found is None else found


def call_arguments(module: nn.Module, kwargs: dict) -> dict:
    """Take the arguments of an attention call that change its maths out of ``kwargs``: ``is_causal`` (the
    module's ``is_causal`` when not given), ``sliding_window``, and those only exact attention applies
    (``softcap``, ``s_aux``, ``position_bias``). Any other argument with a value is refused: hf_reshape does not
    know what it does to the attention, and dropping it would silently run something else (a bool is a flag that
    selects outputs, and passes)."""
    out = {"is_causal": kwargs.pop("is_causal", None), WINDOW_ARGUMENT: kwargs.pop(WINDOW_ARGUMENT, None)}
    for name in EXACT_ONLY_ARGUMENTS:
        out[name] = kwargs.pop(name, None)
    packed = [name for name in ("cu_seq_lens_q", "cu_seq_lens_k") if kwargs.get(name) is not None]
    # a flag (a bool) selects outputs, it does not change the attention
    unknown = sorted(k for k, v in kwargs.items() if v is not None and not isinstance(v, bool) and k not in NEUTRAL_ARGUMENTS)
    if packed or unknown:
        why = (f"packed sequences ({packed}), which the 2D key-padding mask cannot describe" if packed else
               f"the argument(s) {unknown}, which hf_reshape does not know how to apply")
        raise UnsupportedModelError(
            f"{type(module).__name__} passed hf_reshape's attention function {why}; running without them would "
            f"silently compute another attention. Arguments hf_reshape applies: {[WINDOW_ARGUMENT, *EXACT_ONLY_ARGUMENTS]}"
        )
    if out["is_causal"] is None:
        out["is_causal"] = module_is_causal(module)
    return out


# ---------- handing a recurrent cache layer to the attention call ----------

_HANDED_OVER = "_hf_reshape_cache_layer"


def hand_over(key: torch.Tensor, layer) -> torch.Tensor:
    """Called by a recurrent cache layer's ``update`` (:mod:`hf_reshape.cache`): return a fresh alias of ``key``
    that carries ``layer``. transformers passes ``update``'s keys straight to the attention function, so only
    this call's attention sees the layer: nothing is left on a shared module for another thread (or a later
    forward) to take."""
    alias = key.view_as(key)
    setattr(alias, _HANDED_OVER, layer)
    return alias


def handed_over(key: torch.Tensor):
    """The cache layer :func:`hand_over` attached to ``key``, or None."""
    return getattr(key, _HANDED_OVER, None)


def exact_attention(query, key, value, mask, causal, scaling, dropout=0.0, training=False, window=None, softcap=None,
                    s_aux=None, position_bias=None, dense_mask=None):
    """Softmax attention through torch SDPA; queries with no allowed key give zeros (SDPA would give NaN).

    The model's own attention arguments, where given, are applied as transformers' eager attention applies them:
    ``window`` (keys with ``0 <= i - j < window``, ``|i - j| < window`` bidirectional), ``softcap`` (scores
    ``softcap * tanh(scores / softcap)``, Gemma 2), ``position_bias`` (added to the scores, T5) and ``s_aux``
    (one learned sink logit per head that takes part in the softmax and is dropped after it, gpt-oss); see
    transformers/models/gemma2/modeling_gemma2.py and gpt_oss/modeling_gpt_oss.py, ``eager_attention_forward``.
    ``dense_mask``: a 4D mask the model built itself (Swin's shifted windows with their relative bias): bool =
    allowed, float = added to the scores, as eager attention adds it."""
    t_q, t_k = query.shape[-2], key.shape[-2]
    if dense_mask is not None:
        if dense_mask.dtype == torch.bool:
            # as a bias: disallowed pairs get the most negative score, as transformers' own masks give them
            dense_mask = torch.zeros(dense_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~dense_mask, torch.finfo(query.dtype).min)
        position_bias = dense_mask if position_bias is None else position_bias + dense_mask
    if window is not None or softcap is not None or s_aux is not None or position_bias is not None:
        return _exact_with_arguments(query, key, value, mask, causal, scaling, dropout if training else 0.0, window,
                                     softcap, s_aux, position_bias)
    if mask is None and (not causal or t_q == t_k):
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if training else 0.0, is_causal=causal and t_q > 1, scale=scaling
        )
    allowed = allowed_mask(mask, t_q, t_k, causal, query.device)
    return sdpa_zero_empty_rows(query, key, value, allowed, scaling, dropout_p=dropout if training else 0.0)


def _exact_with_arguments(query, key, value, mask, causal, scaling, dropout, window, softcap, s_aux, position_bias):
    """Materialised softmax attention with the model's window, soft-capping, bias and sinks (see exact_attention)."""
    t_q, t_k = query.shape[-2], key.shape[-2]
    allowed = allowed_mask(mask, t_q, t_k, causal, query.device, None if window is None else max(window - 1, 0))
    dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype  # softmax as eager's
    scores = torch.matmul(query, key.transpose(-1, -2)).to(dtype) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias.to(dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if s_aux is not None:
        sink = s_aux.to(dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    row_max = scores.amax(-1, keepdim=True)
    # a query with no allowed key (and no sink) has max -inf: shift by 0 so exp() gives zeros, not NaN
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if s_aux is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, dropout, training=dropout > 0).to(value.dtype)
    return torch.matmul(probs, value)


def key_padding_of(mask: torch.Tensor, causal: bool, t_q: int, t_k: int) -> torch.Tensor | None:
    """The 2D key-padding mask ``[B, T_k]`` (True = real) a 4D mask ``[B or 1, H or 1, T_q, T_k]`` encodes, or None
    when it encodes more than padding (and causality): a bias, a window, a block pattern. A bool mask is True where
    allowed; a float mask is 0 where allowed and -1e4 or lower (BERT's -10000, the dtype's lowest value, -inf)
    where not. Rows of
    padded queries are not compared (transformers may unmask them entirely)."""
    if mask.dim() != 4 or mask.shape[-1] != t_k or mask.shape[-2] not in (1, t_q):
        return None
    mask = mask.expand(*mask.shape[:2], t_q, t_k)  # [B, 1, 1, T_k] masks (BERT's extended mask) serve every query
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not (allowed | (mask <= -1e4)).all():
            return None
    if allowed.shape[1] > 1 and not (allowed == allowed[:, :1]).all():
        return None
    allowed = allowed[:, 0]  # [B, T_q, T_k]
    if causal:
        key = allowed[:, -1, :]  # the last query sees every real key
    else:  # the row of a real query: the fewest allowed keys, empty (fully padded) rows aside
        counts = allowed.sum(-1).masked_fill(allowed.sum(-1) == 0, t_k + 1)
        key = allowed.gather(1, counts.argmin(-1)[:, None, None].expand(-1, 1, t_k))[:, 0]
    expected = allowed_mask(key, t_q, t_k, causal, mask.device)[:, 0]
    real_query = (key[:, t_k - t_q:] if causal else key)[:, :, None]
    # a padded query's row may be empty or unmasked entirely (transformers' `_unmask_unattended`), nothing else:
    # a block-diagonal mask (several images in one sequence) is not padding
    loose = allowed.all(-1, keepdim=True) | ~allowed.any(-1, keepdim=True)
    if not ((allowed == expected) | (~real_query & loose)).all():
        return None
    return key


def _model_window_binds(window, key: torch.Tensor) -> bool:
    """Whether the model's own window (keys with ``i - j < window``) hides a key from a query in this call."""
    return window is not None and key.shape[-2] > window


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
    """transformers attention-interface signature: ``[B, H, T, D]`` in, ``([B, T_q, H, D_v], weights)`` out;
    ``weights`` is None unless attention weights were asked for (``output_attentions``)."""
    dense_mask = None  # a 4D mask that is more than key padding: a bias or a pattern only exact layers apply
    holder = getattr(module, STATE_ATTR, None)
    holder = holder if isinstance(holder, ReshapedAttention) else None
    if attention_mask is not None and attention_mask.dim() == 4:
        causal_given = kwargs.get("is_causal")
        causal_given = module_is_causal(module) if causal_given is None else bool(causal_given)
        padding = key_padding_of(attention_mask, causal_given, query.shape[-2], key.shape[-2])
        if padding is None and holder is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} carries hf_reshape's {holder.method!r} attention, which takes a 2D key-padding "
                f"mask [B, T_k]; its attention call got a 4D mask {tuple(attention_mask.shape)} that is not one (a "
                "relative position bias, a shifted window or another pattern the model builds itself), which no "
                "variant applies. Keep these layers exact (`layers=[...]`), or pass the model a 2D `attention_mask`."
            )
        attention_mask, dense_mask = (padding, None) if padding is not None else (None, attention_mask)
    elif attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "hf_reshape attention takes a 2D key-padding mask [B, T_k] (built by its registered mask function); "
            f"got a {attention_mask.dim()}D mask. Pass a 2D `attention_mask` to the model."
        )
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.bool)
        if attention_mask.shape[-1] > key.shape[-2]:
            # one mask serves every layer: sized for a layer that keeps all keys, it covers all tokens seen, while
            # a bounded cache layer (hf_reshape.cache) hands over only the last T_k keys
            attention_mask = attention_mask[:, -key.shape[-2] :]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    arguments = call_arguments(module, kwargs)
    causal, window = bool(arguments["is_causal"]), arguments[WINDOW_ARGUMENT]
    recurrent = handed_over(key) if holder is not None else None
    kv_heads = key, value  # as the model hands them over: a recurrent cache layer keeps its sums per key/value head
    if key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        # grouped-query / multi-query attention: transformers hands over the key/value heads as they are (each
        # counted on its own: a few models group the keys only)
        for states in (key, value):
            if states.shape[1] == 0 or query.shape[1] % states.shape[1]:
                raise ValueError(f"{query.shape[1]} query heads cannot share {states.shape[1]} key/value heads evenly")
        key = repeat_kv_heads(key, query.shape[1] // key.shape[1])
        value = repeat_kv_heads(value, query.shape[1] // value.shape[1])
    params = None
    if holder is not None:
        _check_reshaped_call(module, holder, arguments, query, key, causal)
        if window is not None:
            params = compose_window(holder.method, holder.params, window)
    if recurrent is not None:
        # generation with a ReshapeCache: attend over the running state, then fold the new keys into it
        grouped = getattr(recurrent, "takes_kv_heads", False)
        out = recurrent.attend(query, *(kv_heads if grouped else (key, value)), attention_mask, holder.params,
                               scaling=scaling)
    elif holder is not None:
        out = holder(query, key, value, attention_mask, causal, scaling, dropout, params=params)
    else:
        out = exact_attention(query, key, value, attention_mask, causal, scaling, dropout, module.training, window,
                              arguments["softcap"], arguments["s_aux"], arguments["position_bias"], dense_mask)
    if observe.active():  # the observer seam (hf_reshape.observe): attention transfer, diagnostics
        out = observe.notify(observe.AttentionCall(module, holder, query, key, value, attention_mask, causal, scaling, out))
    weights = None
    if weights_requested(kwargs):
        weights = attention_weights(holder, query, key, value, attention_mask, causal, scaling, recurrent is not None)
    return out.transpose(1, 2).contiguous(), weights


def _check_reshaped_call(module, holder, arguments, query, key, causal) -> None:
    """A reshaped layer refuses what its variant cannot serve (``reshape`` refuses it first where it can tell): an
    argument only exact attention applies, a model window that hides keys in this call under a variant that cannot
    compose it, and keys of another length than its queries in a bidirectional call (cross-attention)."""
    given = [name for name in EXACT_ONLY_ARGUMENTS if arguments[name] is not None]
    if given:
        raise UnsupportedModelError(
            f"{type(module).__name__} carries hf_reshape's {holder.method!r} attention but its attention call receives "
            f"{given} ({'; '.join(EXACT_ONLY_ARGUMENTS[n] for n in given)}), which no variant applies; keep this layer "
            "exact (reshape with `layers=[...]` leaving it out)"
        )
    if holder.method not in WINDOW_VARIANTS and _model_window_binds(arguments[WINDOW_ARGUMENT], key):
        raise UnsupportedModelError(
            f"{type(module).__name__} has its own sliding window (`sliding_window={arguments[WINDOW_ARGUMENT]}`), "
            f"which {holder.method!r} cannot apply; variants that can: {list(WINDOW_VARIANTS)}"
        )
    if not causal and query.shape[-2] != key.shape[-2]:
        raise UnsupportedModelError(
            f"{type(module).__name__} carries hf_reshape's {holder.method!r} attention but attends {query.shape[-2]} "
            f"queries over {key.shape[-2]} keys without a causal cache: it is a cross-attention, which hf_reshape does "
            "not reshape; leave it out with `layers=[...]`"
        )


# ---------- output_attentions ----------


def weights_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights: the ``output_attentions`` keyword where the model passes
    it down (BERT, ViT), else transformers' output-capturing context (``capture_outputs`` collects output 1 of
    the attention modules; GPT-2 pops the keyword before its layers)."""
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    collector = _active_collector.get() if _active_collector is not None else None
    return bool(collector) and any(name.endswith("attentions") for name in collector)


def attention_weights(holder, query, key, value, mask, causal, scaling, recurrent=False):
    """The weights ``output_attentions`` returns for one call: exact softmax probabilities for a module left
    exact, the variant's ``VariantSpec.weights`` for a reshaped one (before dropout), or None with a warning
    (once per variant) where the variant has none or a recurrent cache step ran, as transformers does for
    ``sdpa``."""
    if holder is None:
        return softmax_weights(query, key, value, mask=mask, causal=causal, scaling=scaling)
    spec = get_variant(holder.method)
    if spec.weights is None or recurrent:
        why = "a recurrent cache step keeps no keys" if recurrent else "it forms no attention-probability matrix"
        with_weights = [name for name in list_variants() if get_variant(name).weights is not None]
        logger.warning_once(
            f"hf_reshape variant {holder.method!r} returns no attention weights ({why}): `output_attentions` gets "
            f"nothing for its layers. Variants that return them: {with_weights}"
        )
        return None
    state = {name: getattr(holder, name) for name in holder.state_names}
    return spec.weights(query, key, value, mask=mask, causal=causal, scaling=scaling, params=holder.params, **state)


# ---------- configs that `set_attn_implementation` does not reach ----------


def sync_attention_configs(model: nn.Module, implementation: str, only_from: str | None = None) -> int:
    """Set ``implementation`` on the config of every module of ``model`` that calls the attention interface, where
    ``model.set_attn_implementation`` left it otherwise (only where it is ``only_from``, when given). Returns how many
    configs changed.

    An ``EncoderDecoderModel`` (transformers/models/encoder_decoder/modeling_encoder_decoder.py) re-points its
    encoder's and decoder's ``config`` at its own sub-configs, while their attention modules keep the config object
    the towers were built with; ``set_attn_implementation`` walks models and sub-configs, never those, so the
    attention would keep reading ``"sdpa"`` (and get the 2D masks of hf_reshape's mask function)."""
    from transformers import PretrainedConfig

    changed = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(config, PretrainedConfig) or id(config) in changed:
            continue
        if not uses_attention_interface(type(module)):
            continue
        current = config._attn_implementation
        if current != implementation and (only_from is None or current == only_from):
            config._attn_implementation_internal = implementation
            changed[id(config)] = config
    return len(changed)


def is_peft_model(model) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (peft/peft_model.py), told by class without importing peft."""
    return any(k.__name__ == "PeftModel" and k.__module__.startswith("peft") for k in type(model).__mro__)


def freeze_variant_state(model: nn.Module) -> int:
    """Freeze the variant's own parameters in ``model`` (``requires_grad=False``), as PEFT freezes every weight of
    the base model but its adapters: a variant installed inside a ``PeftModel`` then trains as it would had it been
    installed before wrapping, and ``PeftModel.save_pretrained`` (adapters only) loses nothing that trained.
    Returns how many parameters were frozen."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, ReshapedAttention):
            for param in module.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += 1
    return frozen


# ---------- guard: a reshaped module runs only through hf_reshape's attention function ----------


def require_hf_reshape_attention(module: nn.Module, args) -> None:
    """Forward pre-hook on every reshaped attention module (installed by ``reshape``): refuse to run once the
    model's attention implementation is no longer ``"hf_reshape"``, which would silently run another attention
    while the model still carries (and saves) the variant."""
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", ATTN_IMPLEMENTATION)
    holder = getattr(module, STATE_ATTR, None)
    if implementation != ATTN_IMPLEMENTATION and isinstance(holder, ReshapedAttention):
        raise AttentionImplementationError(
            f"{type(module).__name__} carries hf_reshape's {holder.method!r} attention, but the model's attention "
            f"implementation is now {implementation!r}, which would run exact attention in its place. Call "
            "hf_reshape.unreshape(model) for exact attention, or model.set_attn_implementation('hf_reshape') to "
            "run the variant again."
        )


def install_guard(module: nn.Module) -> None:
    remove_guard(module)
    module.register_forward_pre_hook(require_hf_reshape_attention)


def remove_guard(module: nn.Module) -> None:
    for handle_id, hook in list(module._forward_pre_hooks.items()):
        if hook is require_hf_reshape_attention:
            del module._forward_pre_hooks[handle_id]


# ---------- warning: a model built by transformers alone from a reshaped model's config ----------

_LOADING = ContextVar("hf_reshape_loading", default=False)
_WARNED: dict[int, weakref.ref] = {}  # configs already warned about (a BertFor* and its BertModel share one)


@contextlib.contextmanager
def reshaping_after_load():
    """Within this context, models built from a config with a variant record do not warn: hf_reshape's own
    loaders reshape them right after building them."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def warn_if_built_plain(model: nn.Module) -> None:
    """Warn (once per config object) when ``model``'s config records a variant that the model does not carry."""
    config = getattr(model, "config", None)
    record = getattr(config, MODEL_CONFIG_KEY, None)
    if record is None or _LOADING.get():
        return
    if any(isinstance(m, ReshapedAttention) for m in model.modules()):
        return
    seen = _WARNED.get(id(config))
    if seen is not None and seen() is config:
        return
    for key in [k for k, ref in _WARNED.items() if ref() is None]:
        del _WARNED[key]
    try:
        _WARNED[id(config)] = weakref.ref(config)
    except TypeError:  # a config that cannot be weakly referenced: warn every time
        pass
    method = record.get("method") if isinstance(record, dict) else record
    logger.warning(
        f"{type(model).__name__}: its config records the hf_reshape variant {method!r} (`config.{MODEL_CONFIG_KEY}`), "
        "but the model was built by transformers alone: it runs exact attention, and variant state saved with the "
        "weights is not loaded. Load a reshaped checkpoint with hf_reshape.from_pretrained(path) (a "
        "SentenceTransformer folder: hf_reshape.from_pretrained(path, model_class=SentenceTransformer)), or reshape "
        "the model with hf_reshape.reshape(model, ...)."
    )


def _wrap_post_init() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_hf_reshape_wrapped", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        warn_if_built_plain(self)
        return result

    post_init._hf_reshape_wrapped = True
    PreTrainedModel.post_init = post_init


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
    """Mask interface: return the 2D key-padding mask for the ``kv_length`` keys (or ``None``). Causality reaches the
    attention function as ``is_causal`` and a sliding window as ``sliding_window``; any other pattern transformers
    composes into ``mask_function`` (chunked attention, packed sequences, bidirectional image tokens) is refused
    when it hides a key this call would otherwise see (:func:`check_mask_function`)."""
    check_mask_function(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                        attention_mask.device if attention_mask is not None else None)
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)


_SAMPLED_ROWS = 64


def check_mask_function(mask_function, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, device=None) -> None:
    """Refuse a mask pattern hf_reshape would drop: evaluate transformers' ``mask_function`` (``(batch, head, q, kv)
    -> allowed``, broadcast over index tensors as ``masking_utils.sdpa_mask`` does) on up to 64 query rows and every
    key of this call, and accept only causal, bidirectional, or either within a sliding window (``|i - j| < W``),
    which the attention call's ``is_causal`` and ``sliding_window`` carry. O(64 x T_k) per mask built."""
    if mask_function is None or q_length <= 0 or kv_length <= 0:
        return
    from .ops.common import tracing

    if tracing():  # under torch.export / compile the check would branch on data; it ran in eager use already
        return
    rows = torch.arange(q_length, device=device)
    if q_length > _SAMPLED_ROWS:
        rows = torch.linspace(0, q_length - 1, _SAMPLED_ROWS, device=device).round().long().unique()
    q = rows + q_offset
    kv = torch.arange(kv_length, device=device) + kv_offset
    b = torch.arange(batch_size, device=device)
    try:
        got = mask_function(b[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                            q[None, None, :, None], kv[None, None, None, :])
        got = torch.as_tensor(got, dtype=torch.bool).expand(batch_size, 1, len(rows), kv_length)
    except Exception as err:  # a pattern that cannot be evaluated on index tensors (vmap only)
        raise UnsupportedModelError(
            f"the model's attention mask pattern ({getattr(mask_function, '__name__', mask_function)}) cannot be "
            f"checked by hf_reshape ({type(err).__name__}: {err}); hf_reshape applies only causal, bidirectional and "
            "sliding-window patterns"
        ) from None
    rel = q[:, None] - kv[None, :]
    for base in (rel >= 0, torch.ones_like(rel, dtype=torch.bool)):
        if bool((got <= base).all()):
            seen = got.any(0).any(0)  # [rows, keys] allowed for some sequence
            width = int(rel.abs()[seen].max()) + 1 if bool(seen.any()) else 0
            if bool((got == (base & (rel.abs() < width))).all()) or bool((got == base).all()):
                return
    raise UnsupportedModelError(
        f"the model builds an attention mask pattern beyond causality, a sliding window and padding (mask function "
        f"{getattr(mask_function, '__name__', type(mask_function).__name__)!r}: chunked attention, packed sequences, "
        "bidirectional image tokens or the like), which hf_reshape's attention function would drop; hf_reshape "
        "applies only causal, bidirectional and sliding-window patterns"
    )


def register_with_transformers() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_reshape_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_reshape_mask)


register_with_transformers()
_wrap_post_init()
