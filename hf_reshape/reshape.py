"""``reshape`` / ``unreshape`` / ``from_pretrained``: swap a model's self-attention in place, and reload.

``reshape`` checks everything (variant, parameters, form, layers, model, the variant's state) before it changes
anything, so a refused call leaves the model as it was; if switching the attention implementation itself fails,
the model is put back. A reshaped model gets its own copy of its config, so models built from one shared config
object (``BertModel(other.config)``) are not reshaped with it. A wrapper that holds one transformers model (a
``SentenceTransformer``) is reshaped through that model.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import get_architecture, model_facts, self_attention_modules
from .cache import HOOK_ATTR, install_generation_hook, remove_generation_hook
from .config import MODEL_CONFIG_KEY, ReshapeConfig, resolve_file
from .errors import InvalidParameterError, NotCausalError, UnsupportedModelError
from .functional import check_form
from .integration import (
    ATTN_IMPLEMENTATION,
    STATE_ATTR,
    ReshapedAttention,
    install_guard,
    remove_guard,
    reshaping_after_load,
)
from .registry import field_defaults, make_params

_ORIGINAL_ATTR = "_hf_reshape_original_attn_implementation"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def _as_config(method_or_config, layers, params) -> ReshapeConfig:
    if isinstance(method_or_config, (ReshapeConfig, dict)):
        if params or layers is not None:
            raise InvalidParameterError(
                "pass either a ReshapeConfig (or its dict) or a method name with parameters, not both"
            )
        if isinstance(method_or_config, dict):
            return ReshapeConfig.from_dict(method_or_config)
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


def reshape(model: nn.Module, method_or_config: str | ReshapeConfig, *, layers: list[int] | None = None, **params: Any):
    """Swap the self-attention of `model` for a registered variant, in place.

    Args:
        model: a `BertModel`/`BertFor*`, `GPT2Model`/`GPT2LMHeadModel`/`GPT2For*` or `ViTModel`/`ViTFor*`, or a
            wrapper holding one of them (a `SentenceTransformer`: its transformers model is reshaped, and
            `SentenceTransformer.save` keeps the variant; reload with
            `hf_reshape.from_pretrained(path, model_class=SentenceTransformer)`).
        method_or_config: a variant name from `hf_reshape.list_variants()` or a `ReshapeConfig`.
        layers (`list[int]`, *optional*): reshape only these layers; the others keep exact attention.
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
        `UnknownVariantError`, `UnsupportedModelError`, `NotCausalError` (a bidirectional-only variant on a causal
        model), `InvalidParameterError`. A refused call changes nothing.
    """
    cfg = _as_config(method_or_config, layers, params)
    target = _transformers_model(model)
    plan = _plan(target, cfg)
    _apply(target, plan)
    return model


def _plan(model: nn.Module, cfg: ReshapeConfig) -> _Plan:
    arch = get_architecture(model)
    facts = model_facts(model, arch)
    spec = cfg.spec
    targets = self_attention_modules(model, arch)
    available = sorted({i for i, _, _ in targets})
    if cfg.layers is not None:
        bad = sorted(set(cfg.layers) - set(available))
        if bad:
            raise InvalidParameterError(f"layers {bad} do not exist; {type(model).__name__} has layers {available}")
        targets = [t for t in targets if t[0] in cfg.layers]
    for _, name, module in targets:
        causal = bool(getattr(module, "is_causal", False))
        try:
            check_form(spec, causal)
        except NotCausalError as err:
            form = "causal" if causal else "bidirectional"
            raise NotCausalError(f"{type(model).__name__} ({name}) runs {form} attention: {err}") from None
    can_switch = getattr(type(model), "_can_set_attn_implementation", None)
    if not callable(getattr(model, "set_attn_implementation", None)) or (can_switch is not None and not can_switch()):
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot switch its attention implementation (transformers' "
            "`set_attn_implementation` and AttentionInterface), which hf_reshape relies on"
        )
    if spec.fit_defaults is not None and cfg.defaulted:
        given = {k: v for k, v in cfg.params.to_dict().items() if k not in cfg.defaulted}
        fitted = spec.fit_defaults(field_defaults(spec.params_cls), given, facts)
        if fitted:
            cfg = cfg.with_params(make_params(spec, {**cfg.params.to_dict(), **fitted}))
    if spec.prepare_params is not None:
        cfg = cfg.with_params(spec.prepare_params(cfg.params, facts))
    holders = []
    for _, _, module in targets:
        state = {}
        if spec.init_state is not None:
            state = spec.init_state(cfg.params, num_heads=facts.num_heads, head_dim=facts.head_dim)
        holder = ReshapedAttention(cfg.method, cfg.params, state)
        ref = next(module.parameters(), None)
        if ref is not None:
            holder = holder.to(device=ref.device, dtype=ref.dtype)
        holders.append((module, holder))
    return _Plan(cfg, holders)


def _apply(model: nn.Module, plan: _Plan) -> None:
    before = _Snapshot(model)
    try:
        before.copies = _own_config(model)
        _strip(model)
        for module, holder in plan.holders:
            setattr(module, STATE_ATTR, holder)
            install_guard(module)
        if not hasattr(model, _ORIGINAL_ATTR):
            setattr(model, _ORIGINAL_ATTR, model.config._attn_implementation)
        setattr(model.config, MODEL_CONFIG_KEY, plan.config.to_dict())
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        install_generation_hook(model)  # generate() then picks a ReshapeCache (hf_reshape.cache) by itself
    except BaseException:
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
    model's own copy of its config). A `SentenceTransformer` is unreshaped through its transformers model."""
    target = _transformers_model(model)
    if hasattr(target.config, MODEL_CONFIG_KEY) or target.config._attn_implementation == ATTN_IMPLEMENTATION:
        _own_config(target)
    _strip(target)
    remove_generation_hook(target)
    original = getattr(target, _ORIGINAL_ATTR, None) or "sdpa"
    if hasattr(target, _ORIGINAL_ATTR):
        delattr(target, _ORIGINAL_ATTR)
    if hasattr(target.config, MODEL_CONFIG_KEY):
        delattr(target.config, MODEL_CONFIG_KEY)
    if target.config._attn_implementation == ATTN_IMPLEMENTATION:
        target.set_attn_implementation(original)
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
    config = AutoConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
    record = getattr(config, MODEL_CONFIG_KEY, None)
    if record is None:
        raise ValueError(
            f"{str(path_or_repo_id)!r} has no `{MODEL_CONFIG_KEY}` record in its config.json: it is not a reshaped "
            "model; load it with transformers, then call hf_reshape.reshape()"
        )
    cfg = ReshapeConfig.from_dict(record)  # a malformed record is refused before any weight is read
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
