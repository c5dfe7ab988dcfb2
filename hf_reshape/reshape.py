"""``reshape`` / ``unreshape`` / ``from_pretrained``: swap a model's self-attention in place, and reload."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .architectures import get_architecture, model_facts, self_attention_modules
from .cache import install_generation_hook, remove_generation_hook
from .config import MODEL_CONFIG_KEY, ReshapeConfig, resolve_file
from .errors import InvalidParameterError, NotCausalError
from .functional import check_form
from .integration import ATTN_IMPLEMENTATION, STATE_ATTR, ReshapedAttention

_ORIGINAL_ATTR = "_hf_reshape_original_attn_implementation"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def _as_config(method_or_config, layers, params) -> ReshapeConfig:
    if isinstance(method_or_config, ReshapeConfig):
        if params or layers is not None:
            raise InvalidParameterError("pass either a ReshapeConfig or a method name with parameters, not both")
        return method_or_config
    if isinstance(method_or_config, dict):
        return ReshapeConfig.from_dict(method_or_config)
    return ReshapeConfig(method_or_config, layers=layers, **params)


def reshape(model: nn.Module, method_or_config: str | ReshapeConfig, *, layers: list[int] | None = None, **params: Any):
    """Swap the self-attention of `model` for a registered variant, in place.

    Args:
        model: a `BertModel`/`BertFor*`, `GPT2Model`/`GPT2LMHeadModel`/`GPT2For*` or `ViTModel`/`ViTFor*`.
        method_or_config: a variant name from `hf_reshape.list_variants()` or a `ReshapeConfig`.
        layers (`list[int]`, *optional*): reshape only these layers; the others keep exact attention.
        **params: the variant's parameters (with a method name).

    Returns:
        The same `model`. Its `config.hf_reshape` records the variant, so `save_pretrained` keeps it, and a
        second call replaces the first. Cross-attention is never touched.

    Raises:
        `UnknownVariantError`, `UnsupportedModelError`, `NotCausalError` (a bidirectional-only variant on a causal
        model), `InvalidParameterError`.
    """
    cfg = _as_config(method_or_config, layers, params)
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
    if spec.prepare_params is not None:
        cfg = cfg.with_params(spec.prepare_params(cfg.params, facts))
    _strip(model)
    for _, _, module in targets:
        ref = next(module.parameters())
        state = {}
        if spec.init_state is not None:
            state = spec.init_state(cfg.params, num_heads=facts.num_heads, head_dim=facts.head_dim)
        holder = ReshapedAttention(cfg.method, cfg.params, state).to(device=ref.device, dtype=ref.dtype)
        setattr(module, STATE_ATTR, holder)
    if not hasattr(model, _ORIGINAL_ATTR):
        setattr(model, _ORIGINAL_ATTR, model.config._attn_implementation)
    setattr(model.config, MODEL_CONFIG_KEY, cfg.to_dict())
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    install_generation_hook(model)  # generate() then picks a ReshapeCache (hf_reshape.cache) by itself
    return model


def _strip(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(getattr(module, STATE_ATTR, None), ReshapedAttention):
            delattr(module, STATE_ATTR)


def unreshape(model: nn.Module) -> nn.Module:
    """Remove every reshaped attention and restore the attention implementation the model had before."""
    _strip(model)
    remove_generation_hook(model)
    original = getattr(model, _ORIGINAL_ATTR, None) or "sdpa"
    if hasattr(model, _ORIGINAL_ATTR):
        delattr(model, _ORIGINAL_ATTR)
    if hasattr(model.config, MODEL_CONFIG_KEY):
        delattr(model.config, MODEL_CONFIG_KEY)
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        model.set_attn_implementation(original)
    return model


def get_reshape_config(model: nn.Module) -> ReshapeConfig | None:
    """The `ReshapeConfig` a model was reshaped with, or None."""
    record = getattr(model.config, MODEL_CONFIG_KEY, None)
    return None if record is None else ReshapeConfig.from_dict(record)


def _variant_tensors(path_or_repo_id, hub_kwargs) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    single = resolve_file(path_or_repo_id, "model.safetensors", hub_kwargs)
    if single is not None:
        files = [single]
    else:
        index = resolve_file(path_or_repo_id, "model.safetensors.index.json", hub_kwargs)
        if index is None:
            raise FileNotFoundError(f"no model.safetensors (or its index) at {str(path_or_repo_id)!r}")
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [resolve_file(path_or_repo_id, s, hub_kwargs) for s in shards]
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
            `config.architectures`.
        **kwargs: passed to `model_class.from_pretrained` (`revision`, `cache_dir`, `token`, ... also select the
            files read for the variant state).
    """
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
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise ValueError(f"cannot tell the model class from config.architectures={names!r}; pass `model_class`")
        model_class = getattr(transformers, names[0])
    # the variant's tensors are not parameters of the plain model: silence the expected 'unexpected keys' report
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(path_or_repo_id, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    reshape(model, ReshapeConfig.from_dict(record))
    names = _names_in_checkpoint(model)
    if names:
        tensors = _variant_tensors(path_or_repo_id, hub_kwargs)
        missing = sorted(saved for saved in names.values() if saved not in tensors)
        if missing:
            raise ValueError(f"the checkpoint lacks the variant state {missing[:4]}{'...' if len(missing) > 4 else ''}")
        model.load_state_dict({key: tensors[saved] for key, saved in names.items()}, strict=False)
    return model


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
