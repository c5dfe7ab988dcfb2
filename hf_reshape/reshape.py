"""``reshape`` / ``unreshape`` / ``from_pretrained``: swap a model's self-attention in place, and reload.

``reshape`` checks everything (variant, parameters, form, layers, model, the variant's state) before it changes
anything, so a refused call leaves the model as it was; if switching the attention implementation itself fails,
the model is put back. A reshaped model gets its own copy of its config, so models built from one shared config
object (``BertModel(other.config)``) are not reshaped with it. A wrapper that holds one transformers model (a
``SentenceTransformer``) is reshaped through that model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import EXACT_ONLY_ARGUMENTS, attention_modules, get_architecture, model_facts
from .cache import HOOK_ATTR, install_generation_hook, remove_generation_hook
from .config import MODEL_CONFIG_KEY, ReshapeConfig, resolve_file
from .errors import InvalidParameterError, NotCausalError, UnsupportedModelError
from . import positions
from .functional import check_form
from .integration import (
    ATTN_IMPLEMENTATION,
    CAUSAL_ATTR,
    STATE_ATTR,
    WINDOW_VARIANTS,
    ReshapedAttention,
    compose_window,
    install_guard,
    remove_guard,
    freeze_variant_state,
    is_peft_model,
    reshaping_after_load,
    sync_attention_configs,
)
from .registry import field_defaults, make_params

_ORIGINAL_ATTR = "_hf_reshape_original_attn_implementation"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def _as_config(method_or_config, layers, params) -> ReshapeConfig:
    if isinstance(method_or_config, (ReshapeConfig, dict, list, tuple)):
        if params or layers is not None:
            raise InvalidParameterError(
                "pass either a ReshapeConfig (or its dict, or a hybrid's parts) or a method name with parameters, "
                "not both"
            )
        if isinstance(method_or_config, dict) and "method" in method_or_config:
            return ReshapeConfig.from_dict(method_or_config)  # a record (`to_dict`, a model's `config.hf_reshape`)
        if isinstance(method_or_config, (dict, list, tuple)):  # a hybrid's parts: {variant: {...}} or [part, ...]
            return ReshapeConfig.hybrid(method_or_config)
        return method_or_config
    return ReshapeConfig(method_or_config, layers=layers, **params)


def _inner_models(module: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside ``module`` (a SentenceTransformer holds one)."""
    from transformers import PreTrainedModel

    found = []
    for child in module.children():
        if isinstance(child, PreTrainedModel):
            found.append(child)
        else:
            found.extend(_inner_models(child))
    return found


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model that ``reshape`` works on: ``model`` itself, or the one transformers model held by a
    wrapper that is not one (``SentenceTransformer``: its ``Transformer`` module's model). Anything else is
    returned as it is, for :func:`get_architecture` to refuse with the list of supported models."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) or not isinstance(model, nn.Module):
        return model
    inner = _inner_models(model)
    if len(inner) > 1:
        names = [type(m).__name__ for m in inner]
        raise UnsupportedModelError(
            f"{type(model).__name__} holds {len(inner)} transformers models {names}: reshape the one you mean "
            "(hf_reshape.reshape(that_model, ...))"
        )
    return inner[0] if inner else model


@dataclass
class _Plan:
    """Everything ``reshape`` will install, built and checked before the model is touched."""

    config: ReshapeConfig
    holders: list[tuple[nn.Module, ReshapedAttention]]
    extension: positions.Extension | None = None
    # self-attention modules whose form discovery tells apart from their `is_causal` attribute (hf_reshape.architectures)
    forms: list[tuple[nn.Module, bool]] = dataclasses.field(default_factory=list)


def reshape(
    model: nn.Module,
    method_or_config: str | ReshapeConfig,
    *,
    layers: list[int] | None = None,
    max_positions: int | None = None,
    image_size: int | None = None,
    **params: Any,
):
    """Swap the self-attention of `model` for a registered variant, in place.

    Args:
        model: any transformers model whose attention goes through transformers' attention interface (Llama,
            Qwen, Mistral, BERT, RoBERTa, GPT-2, ViT, CLIP, BART, Whisper, ...; `hf_reshape.architectures` finds its
            self-attention layers, grouped-query ones included), or a
            wrapper holding one (a `SentenceTransformer`: its transformers model is reshaped, and
            `SentenceTransformer.save` keeps the variant; reload with
            `hf_reshape.from_pretrained(path, model_class=SentenceTransformer)`).
        method_or_config: a variant name from `hf_reshape.list_variants()` or a `ReshapeConfig`; or, for a
            per-layer hybrid, `{variant: {"layers": [...], **params}, ...}` or a list of single-variant
            `ReshapeConfig`s (see `ReshapeConfig.hybrid`): each part reshapes its layers, layers no part names keep
            exact attention, and every part is checked on every layer before anything changes.
        layers (`list[int]`, *optional*): reshape only these layers; the others keep exact attention.
        max_positions (`int`, *optional*): extend a text model's learned absolute positions (BERT, GPT-2) to this
            many in the same call: the table grows by copying the trained rows (Longformer's initialisation), so
            inputs that fit the trained table give the same outputs; the config records the new size, and
            variants sized by the model's positions (Linformer's `max_length`) get it. See
            `hf_reshape.positions`.
        image_size (`int`, *optional*): the same for ViT: the side of the larger square images to read; the grid
            of patch positions is interpolated as transformers' `interpolate_pos_encoding` does, once, and saved.
        **params: the variant's parameters (with a method name). A parameter left at its default that does not fit
            the model is adapted to it (Linformer's `proj_len`, 128, becomes the model's positions when fewer);
            the model's `config.hf_reshape` records the value used. A value you give is never changed.

    Returns:
        The same `model`. Its `config.hf_reshape` records the variant, so `save_pretrained` keeps it, and a
        second call replaces the first. Cross-attention is never touched. The model gets its own copy of its
        config (another model built from the same config object is left as it was).

    A reshaped model runs only through hf_reshape's attention function: if its attention implementation is
    switched afterwards (`model.set_attn_implementation("sdpa")`, `config._attn_implementation = ...`), its
    forward raises `AttentionImplementationError` instead of silently running softmax; use
    `hf_reshape.unreshape(model)` to get exact attention back.

    Raises:
        `UnknownVariantError`, `UnsupportedModelError` (also: a layer whose attention call gets an argument the
        variant cannot serve, such as `softcap`, `s_aux`, `position_bias` or the model's own `sliding_window`; the
        message names it and the variants that can), `NotCausalError` (a bidirectional-only variant on a causal
        model), `InvalidParameterError` (also: `max_positions`/`image_size` smaller than the model's, or the
        keyword of the other modality). A refused call changes nothing.
    """
    cfg = _as_config(method_or_config, layers, params)
    target = _transformers_model(model)
    plan = _plan(target, cfg, max_positions=max_positions, image_size=image_size)
    _apply(target, plan)
    if is_peft_model(model):  # PEFT trains adapters only: the variant's own parameters stay frozen, as base weights do
        freeze_variant_state(target)
    return model


def _plan(model: nn.Module, cfg: ReshapeConfig, max_positions=None, image_size=None) -> _Plan:
    arch = get_architecture(model)
    facts = model_facts(model, arch)
    extension = positions.plan_extension(model, max_positions=max_positions, image_size=image_size)
    if extension is not None:  # variants sized by the model's positions see the extended model
        facts = dataclasses.replace(facts, max_positions=extension.positions)
    every = attention_modules(model)
    _check_known_arguments(model, every)
    self_attention = [f for f in every if not f.cross]
    available = sorted({f.index for f in self_attention})
    assigned = _assign_layers(model, cfg, self_attention, available)
    for part, targets in assigned:  # every part is checked on every one of its layers before anything is built
        spec = part.spec
        for layer in targets:
            try:
                check_form(spec, layer.causal)
            except NotCausalError as err:
                form = "causal" if layer.causal else "bidirectional"
                raise NotCausalError(
                    f"{_part_name(cfg, part)}{type(model).__name__} ({layer.name}) runs {form} attention: {err}"
                ) from None
            _check_layer_arguments(model, layer, part.method, available, self_attention)
    can_switch = getattr(type(model), "_can_set_attn_implementation", None)
    if not callable(getattr(model, "set_attn_implementation", None)) or (can_switch is not None and not can_switch()):
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot switch its attention implementation (transformers' "
            "`set_attn_implementation` and AttentionInterface), which hf_reshape relies on"
        )
    fitted, holders = [], []
    for part, targets in assigned:
        part = _fit_to_model(part, facts)
        fitted.append(part)
        holders.extend(_build_holders(part, targets, facts))
    if cfg.is_hybrid:  # the record keeps each part's `layers` as given (None: the rest) and the values used
        cfg = ReshapeConfig.hybrid(fitted)
    else:
        cfg = fitted[0]
    forms = [(f.module, f.causal) for f in every if not f.cross and f.causal != bool(getattr(f.module, "is_causal", False))]
    return _Plan(cfg, holders, extension, forms)


def _part_name(cfg: ReshapeConfig, part: ReshapeConfig) -> str:
    """``"hybrid part 1 ('linear'): "`` for a hybrid's part, to start its error messages; empty otherwise."""
    if not cfg.is_hybrid:
        return ""
    index = next(i for i, p in enumerate(cfg.parts) if p is part)
    return f"hybrid part {index} ({part.method!r}): "


def _assign_layers(model: nn.Module, cfg: ReshapeConfig, self_attention, available: list[int]):
    """Each part of ``cfg`` (one for a single variant) with the self-attention modules it reshapes: its
    ``layers``, or, left out, every layer the other parts do not name. Layers that do not exist, and a part
    left with no layer, are refused."""
    assigned = []
    named = {i for part in cfg.parts for i in (part.layers or ())}
    for part in cfg.parts:
        if part.layers is not None:
            bad = sorted(set(part.layers) - set(available))
            if bad:
                raise InvalidParameterError(
                    f"{_part_name(cfg, part)}layers {bad} do not exist; {type(model).__name__} has layers {available}"
                )
            chosen = set(part.layers)
        else:
            chosen = set(available) - named
            if not chosen and cfg.is_hybrid:
                raise InvalidParameterError(
                    f"{_part_name(cfg, part)}leaves `layers` out, so it takes the layers no other part names, but the "
                    f"other parts name every layer of {type(model).__name__} ({available}): give it `layers` or drop it"
                )
        assigned.append((part, [f for f in self_attention if f.index in chosen]))
    return assigned


def _fit_to_model(part: ReshapeConfig, facts) -> ReshapeConfig:
    """``part`` with the parameters it left at their default fitted to the model, and model-dependent ones filled
    (``VariantSpec.fit_defaults`` and ``prepare_params``)."""
    spec = part.spec
    if spec.fit_defaults is not None and part.defaulted:
        given = {k: v for k, v in part.params.to_dict().items() if k not in part.defaulted}
        fitted = spec.fit_defaults(field_defaults(spec.params_cls), given, facts)
        if fitted:
            part = part.with_params(make_params(spec, {**part.params.to_dict(), **fitted}))
    if spec.prepare_params is not None:
        part = part.with_params(spec.prepare_params(part.params, facts))
    return part


def _build_holders(part: ReshapeConfig, targets, facts) -> list[tuple[nn.Module, ReshapedAttention]]:
    """One :class:`ReshapedAttention` (the variant's parameters and per-layer state) for each module of ``targets``."""
    spec = part.spec
    holders = []
    for layer in targets:
        module = layer.module
        state = {}
        if spec.init_state is not None:
            # sized by this layer's query heads: grouped key/value heads reach the variant repeated (integration)
            state = spec.init_state(part.params, num_heads=layer.num_heads or facts.num_heads,
                                    head_dim=layer.head_dim or facts.head_dim, layer_index=layer.index)
        params = part.params
        if isinstance(layer.sliding_window, int):  # the model's own window, composed with the variant's
            params = compose_window(part.method, params, layer.sliding_window)
        holder = ReshapedAttention(part.method, params, state)
        holder.train(module.training)  # a new module trains by default: follow the model's mode (eval: no redraws)
        ref = next(module.parameters(), None)
        if ref is not None:
            holder = holder.to(device=ref.device, dtype=ref.dtype)
        holders.append((module, holder))
    return holders


def _check_known_arguments(model: nn.Module, modules) -> None:
    """Refuse a model whose attention calls pass an argument hf_reshape does not know (its attention function would
    refuse it at every call, reshaped layer or not)."""
    for layer in modules:
        if layer.unknown:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({layer.name}) passes its attention function {sorted(layer.unknown)}, which "
                f"hf_reshape does not know how to apply (it applies `sliding_window` and, in exact layers, "
                f"{sorted(EXACT_ONLY_ARGUMENTS)}); running without them would compute another attention"
            )


def _check_layer_arguments(model: nn.Module, layer, method: str, available: list[int], layers) -> None:
    """Refuse, before anything changes, a layer whose attention call receives an argument the variant cannot serve:
    one only exact attention applies (soft-capping, sinks, a relative position bias), or the model's own sliding
    window under a variant that cannot compose it. The message names the argument, the variants that serve it and
    the layers that do not receive it."""

    def without(name: str) -> list[int]:
        return sorted({f.index for f in layers if name not in f.extras and not (
            name == "sliding_window" and f.sliding_window is not None)})

    for name, value in layer.extras.items():
        shown = "" if value == "given" or not isinstance(value, (int, float, str)) else f"={value}"
        raise UnsupportedModelError(
            f"{type(model).__name__} ({layer.name}) gets `{name}{shown}` in its attention call "
            f"({EXACT_ONLY_ARGUMENTS[name]}), which no hf_reshape variant applies (variants that can serve it: none). "
            f"Layers without it, which `layers=[...]` can reshape: {without(name)}"
        )
    if layer.sliding_window is not None and method not in WINDOW_VARIANTS:
        shown = "" if layer.sliding_window == "given" else f"={layer.sliding_window}"
        raise UnsupportedModelError(
            f"{type(model).__name__} ({layer.name}) gets `sliding_window{shown}` in its attention call (its own sliding "
            f"window), which {method!r} cannot apply; variants that can serve it: {list(WINDOW_VARIANTS)} (composed "
            f"with the model's window). Layers without a window, which `layers=[...]` can reshape: "
            f"{without('sliding_window')}; or drop the model's window first (`config.sliding_window = None`, which "
            "changes the model beyond that many tokens)"
        )


def _apply(model: nn.Module, plan: _Plan) -> None:
    before = _Snapshot(model)
    undo_extension = None
    try:
        before.copies = _own_config(model)
        if plan.extension is not None:
            undo_extension = plan.extension.apply(model)  # on the model's own config
        _strip(model)
        for module, holder in plan.holders:
            setattr(module, STATE_ATTR, holder)
            install_guard(module)
        for module, causal in plan.forms:  # read by hf_reshape's attention function before `is_causal`
            module.__dict__[CAUSAL_ATTR] = causal
        if not hasattr(model, _ORIGINAL_ATTR):
            setattr(model, _ORIGINAL_ATTR, model.config._attn_implementation)
        record = plan.config.to_dict()
        extended = positions.provenance(model)  # this call's extension, or an earlier one (kept across reshapes)
        if extended is not None:
            record[positions.RECORD_KEY] = extended
        setattr(model.config, MODEL_CONFIG_KEY, record)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        sync_attention_configs(model, ATTN_IMPLEMENTATION)  # configs set_attn_implementation misses (EncoderDecoderModel)
        install_generation_hook(model)  # generate() then picks a ReshapeCache (hf_reshape.cache) by itself
    except BaseException:
        if undo_extension is not None:
            undo_extension()
        before.restore(model)
        raise


class _Snapshot:
    """What ``reshape`` changes on a model, to put back if switching it fails half-way."""

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.holders = {m: getattr(m, STATE_ATTR) for m in model.modules() if _holder_of(m) is not None}
        self.attrs = {k: model.__dict__[k] for k in (_ORIGINAL_ATTR, HOOK_ATTR) if k in model.__dict__}
        self.copies: list[tuple[Any, Any]] = []  # (original config, its copy), once _own_config ran

    def restore(self, model: nn.Module) -> None:
        _repoint_configs(model, {id(new): old for old, new in self.copies})
        _strip(model)
        for module, holder in self.holders.items():
            setattr(module, STATE_ATTR, holder)
            install_guard(module)
        for key in (_ORIGINAL_ATTR, HOOK_ATTR):
            model.__dict__.pop(key, None)
        model.__dict__.update(self.attrs)


def _holder_of(module: nn.Module) -> ReshapedAttention | None:
    holder = getattr(module, STATE_ATTR, None)
    return holder if isinstance(holder, ReshapedAttention) else None


def _own_config(model: nn.Module) -> list[tuple[Any, Any]]:
    """Give ``model`` and every submodule that refers to its config (attention modules keep ``self.config``) a
    copy of it, sub-configs included: what reshape writes into it never reaches another model built from the
    same config object. Returns the ``(original, copy)`` pairs."""
    from transformers import PretrainedConfig

    held = {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, PretrainedConfig)}
    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)
    pairs = [(old, memo[key]) for key, old in held.items() if key in memo]
    # a config held only by submodules (an EncoderDecoderModel's attention modules keep their tower's first config)
    pairs += [(old, copy.deepcopy(old)) for key, old in held.items() if key not in memo]
    _repoint_configs(model, {id(old): new for old, new in pairs})
    return pairs


def _repoint_configs(model: nn.Module, copies: dict[int, Any]) -> None:
    """Replace, in ``model`` and its submodules, each attribute holding a config whose ``id`` is a key of
    ``copies`` by the matching value."""
    from transformers import PretrainedConfig

    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig) and id(value) in copies:
                module.__dict__[name] = copies[id(value)]


def _strip(model: nn.Module) -> None:
    for module in list(model.modules()):
        if _holder_of(module) is not None:
            delattr(module, STATE_ATTR)
        remove_guard(module)


def unreshape(model: nn.Module) -> nn.Module:
    """Remove every reshaped attention and restore the attention implementation the model had before (on the
    model's own copy of its config). A `SentenceTransformer` is unreshaped through its transformers model.

    Extended positions (`max_positions=`, `image_size=`) are kept: the model keeps its longer table and its config
    the new size, so it is a plain transformers model that reads long inputs with exact attention (and saves and
    loads with transformers alone); inputs that fit the trained table give the outputs they gave before the
    extension. Reload the original checkpoint to get the trained size back."""
    target = _transformers_model(model)
    extended = positions.provenance(target)
    if extended is not None:  # a later reshape records it again
        target.__dict__[positions.PROVENANCE_ATTR] = extended
    if hasattr(target.config, MODEL_CONFIG_KEY) or target.config._attn_implementation == ATTN_IMPLEMENTATION:
        _own_config(target)
    _strip(target)
    for module in target.modules():
        module.__dict__.pop(CAUSAL_ATTR, None)
    remove_generation_hook(target)
    original = getattr(target, _ORIGINAL_ATTR, None) or "sdpa"
    if hasattr(target, _ORIGINAL_ATTR):
        delattr(target, _ORIGINAL_ATTR)
    if hasattr(target.config, MODEL_CONFIG_KEY):
        delattr(target.config, MODEL_CONFIG_KEY)
    if target.config._attn_implementation == ATTN_IMPLEMENTATION:
        target.set_attn_implementation(original)
    sync_attention_configs(target, original, only_from=ATTN_IMPLEMENTATION)
    return model


def extend_positions(model: nn.Module, *, max_positions: int | None = None, image_size: int | None = None):
    """Extend a model's learned absolute positions without (or after) a reshape, in place: `max_positions=` for
    BERT and GPT-2, `image_size=` for ViT (see `hf_reshape.positions`). A plain model stays a plain transformers
    model (exact attention, saves and loads with transformers alone); a reshaped one records the extension in its
    `config.hf_reshape`. The model gets its own copy of its config. Returns the model.

    Raises:
        `UnsupportedModelError`, `InvalidParameterError` (no size given, a size smaller than the model's, the
        keyword of the other modality). A refused call changes nothing.
    """
    if max_positions is None and image_size is None:
        raise InvalidParameterError("give `max_positions=` (BERT, GPT-2) or `image_size=` (ViT)")
    target = _transformers_model(model)
    get_architecture(target)
    extension = positions.plan_extension(target, max_positions=max_positions, image_size=image_size)
    if extension is None:
        return model
    copies, undo = _own_config(target), None
    try:
        undo = extension.apply(target)
        record = getattr(target.config, MODEL_CONFIG_KEY, None)
        if isinstance(record, dict):
            setattr(target.config, MODEL_CONFIG_KEY, {**record, positions.RECORD_KEY: positions.provenance(target)})
    except BaseException:
        if undo is not None:
            undo()
        _repoint_configs(target, {id(new): old for old, new in copies})
        raise
    return model


def get_reshape_config(model: nn.Module) -> ReshapeConfig | None:
    """The `ReshapeConfig` a model (or a `SentenceTransformer`'s transformers model) was reshaped with, or None."""
    target = _transformers_model(model)
    record = getattr(getattr(target, "config", None), MODEL_CONFIG_KEY, None)
    return None if record is None else ReshapeConfig.from_dict(record)


def _variant_tensors(path_or_repo_id, hub_kwargs, subfolder: str = "") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    def resolve(name):
        return resolve_file(path_or_repo_id, f"{subfolder}/{name}" if subfolder else name, hub_kwargs)

    single = resolve("model.safetensors")
    if single is not None:
        files = [single]
    else:
        index = resolve("model.safetensors.index.json")
        if index is None:
            where = f"{str(path_or_repo_id)!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise FileNotFoundError(f"no model.safetensors (or its index) at {where}")
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [resolve(s) for s in shards]
    tensors = {}
    marker = f".{STATE_ATTR}."
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if marker in key:
                    tensors[key] = f.get_tensor(key)
    return tensors


def from_pretrained(path_or_repo_id: str | os.PathLike, model_class=None, **kwargs):
    """Reload a reshaped model saved with `save_pretrained`, bit-identical (variant state included).

    Args:
        path_or_repo_id: a local folder or a Hub repo id.
        model_class (*optional*): e.g. `AutoModelForSequenceClassification`; defaults to the class named in
            `config.architectures`. A class without `from_pretrained` is built as `model_class(path, **kwargs)`,
            the sentence-transformers convention: `from_pretrained(folder, model_class=SentenceTransformer)`
            reloads a reshaped `SentenceTransformer` saved with its `save`, each transformers model inside it
            reshaped from the record in its own `config.json`.
        **kwargs: passed to `model_class.from_pretrained` (`revision`, `cache_dir`, `token`, ... also select the
            files read for the variant state).

    A plain `transformers` `from_pretrained` (or `SentenceTransformer(path)`) of a reshaped checkpoint runs exact
    attention; with hf_reshape imported it logs a warning that points here.
    """
    if model_class is not None and not hasattr(model_class, "from_pretrained"):
        return _load_wrapper(path_or_repo_id, model_class, kwargs)
    import transformers
    from transformers import AutoConfig

    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    folder = os.fspath(path_or_repo_id)
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
            os.path.join(folder, "adapter_config.json")):
        raise ValueError(
            f"{str(path_or_repo_id)!r} holds a PEFT adapter (adapter_config.json), not a model: load the reshaped base "
            "model (hf_reshape.from_pretrained(base_folder), or reshape the base with the ReshapeConfig saved next to "
            "the adapter), then peft.PeftModel.from_pretrained(base, adapter_folder)"
        )
    config = AutoConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
    record = getattr(config, MODEL_CONFIG_KEY, None)
    if record is None:
        raise ValueError(
            f"{str(path_or_repo_id)!r} has no `{MODEL_CONFIG_KEY}` record in its config.json: it is not a reshaped "
            "model; load it with transformers, then call hf_reshape.reshape()"
        )
    cfg = ReshapeConfig.from_dict(record)  # a malformed record is refused before any weight is read
    positions.check_record(config, record, str(path_or_repo_id))
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise ValueError(f"cannot tell the model class from config.architectures={names!r}; pass `model_class`")
        model_class = getattr(transformers, names[0])
    with _quiet_load():
        model = model_class.from_pretrained(path_or_repo_id, **kwargs)
    _restore_variant(model, cfg, path_or_repo_id, hub_kwargs)
    return model


class _quiet_load:
    """Load a reshaped checkpoint with transformers: the variant's tensors are not parameters of the plain model
    (silence the expected 'unexpected keys' report), and the model is reshaped right after (no warning)."""

    def __enter__(self):
        import transformers

        self.verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        self.context = reshaping_after_load()
        self.context.__enter__()

    def __exit__(self, *exc):
        import transformers

        self.context.__exit__(*exc)
        transformers.logging.set_verbosity(self.verbosity)


def _restore_variant(model: nn.Module, cfg: ReshapeConfig, path_or_repo_id, hub_kwargs, subfolder: str = "") -> None:
    reshape(model, cfg)
    names = _names_in_checkpoint(model)
    if names:
        tensors = _variant_tensors(path_or_repo_id, hub_kwargs, subfolder)
        missing = sorted(saved for saved in names.values() if saved not in tensors)
        if missing:
            raise ValueError(f"the checkpoint lacks the variant state {missing[:4]}{'...' if len(missing) > 4 else ''}")
        model.load_state_dict({key: tensors[saved] for key, saved in names.items()}, strict=False)


def _load_wrapper(path_or_repo_id, model_class, kwargs):
    """A wrapper saved with its own `save` (a `SentenceTransformer`): build it, then reshape each transformers model
    inside it from the record its loader read, with the variant state from that model's folder (`modules.json`
    maps sentence-transformers' modules to subfolders)."""
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    with _quiet_load():
        wrapper = model_class(str(path_or_repo_id), **kwargs)
    folders = {}
    modules_json = resolve_file(path_or_repo_id, "modules.json", hub_kwargs)
    if modules_json is not None:
        with open(modules_json, encoding="utf-8") as f:
            folders = {str(entry.get("name")): entry.get("path", "") for entry in json.load(f)}
    restored = 0
    children = dict(wrapper.named_children())
    for name, child in children.items():
        for inner in _inner_models(child):
            record = getattr(inner.config, MODEL_CONFIG_KEY, None)
            if record is not None:
                _restore_variant(inner, ReshapeConfig.from_dict(record), path_or_repo_id, hub_kwargs,
                                 folders.get(name, ""))
                restored += 1
    if not restored:
        raise ValueError(
            f"{str(path_or_repo_id)!r}: no transformers model in this {type(wrapper).__name__} has a "
            f"`{MODEL_CONFIG_KEY}` record in its config.json; it is not a reshaped model"
        )
    return wrapper


def _names_in_checkpoint(model: nn.Module) -> dict[str, str]:
    """Map each variant-state key of `model` to its name in a saved checkpoint. transformers 5 renames some
    architectures' keys on save (ViT: `layers.0` -> `encoder.layer.0`); replay that renaming on our keys."""
    state = {k: v for k, v in model.state_dict().items() if f".{STATE_ATTR}." in k}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(state))
    except ImportError:  # older or newer transformers without this helper: names are kept as they are
        reverted = state
    by_tensor = {id(t): k for k, t in state.items()}
    return {by_tensor[id(t)]: saved for saved, t in reverted.items()}
