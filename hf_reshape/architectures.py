"""Discovery: the self-attention modules of any model whose attention goes through transformers' attention
interface (``ALL_ATTENTION_FUNCTIONS``), and the facts a variant needs about each one, without a row per model.

A module is an attention module when a method of its class looks up ``ALL_ATTENTION_FUNCTIONS`` (the dispatch every
transformers 5 modeling file writes as ``attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(...)``; e.g.
``LlamaAttention.forward`` in transformers/models/llama/modeling_llama.py). Such a module passes itself as the
attention function's ``module`` argument, so the variant state hf_reshape hangs on it is what the attention call
finds. Cross-attention modules are told apart and skipped: ``is_cross_attention`` (GPT-2), a class named ``*Cross*``
(``BertCrossAttention``), an attribute name such as ``encoder_attn`` / ``crossattention`` / ``EncDecAttention``
(BART, Whisper, T5), or a model's ``_can_record_outputs["cross_attentions"]`` entry.

The facts of each module (:class:`LayerFacts`) come from the module's own attributes first (``num_heads``,
``head_dim``, ``num_key_value_groups``, ``is_causal``, ``sliding_window``, ``layer_idx``), then from its config
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``max_position_embeddings``, ...). The keyword
arguments the module passes to the attention call are read from its source (the ``attention_interface(...)`` call)
and evaluated where they are plain attributes of the module or its config (``sliding_window=self.sliding_window``,
``softcap=self.attn_logit_softcapping``, ``s_aux=self.sinks``); one that cannot be evaluated (``position_bias``,
computed per call) counts as given. :data:`OVERRIDES` keeps the few models whose facts are not where the rule looks.

This and :mod:`hf_reshape.integration` are the only places that know transformers' model internals.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import UnsupportedModelError

INTERFACE = "ALL_ATTENTION_FUNCTIONS"



def _transformers_kwargs() -> frozenset[str]:
    """The keywords transformers threads from a model's forward down to its attention calls (``TransformersKwargs``
    in transformers/utils/generic.py: output flags, packed-sequence hints, ``position_ids``, ...)."""
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:
        return frozenset()
    return frozenset(getattr(TransformersKwargs, "__annotations__", {}))


# keyword arguments of the attention call that change no maths hf_reshape does (or that the mask function and the
# attention function already carry): hints for flash kernels, output flags, ids the mask was built from. The
# attention function refuses packed sequences (``cu_seq_lens_*`` given) on its own.
NEUTRAL_ARGUMENTS = frozenset({
    "module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal", "output_attentions",
    "output_hidden_states", "use_cache", "return_dict", "position_ids", "cache_position", "deterministic",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
}) | _transformers_kwargs()
WINDOW_ARGUMENT = "sliding_window"
# arguments exact (softmax) attention applies in hf_reshape's attention function, which no registered variant takes:
# a layer that receives one can stay exact (``layers=[...]``), it cannot be reshaped
EXACT_ONLY_ARGUMENTS = {
    "softcap": "logit soft-capping, scores -> softcap * tanh(scores / softcap) (Gemma 2)",
    "s_aux": "learned attention sinks, one extra logit per head in the softmax (gpt-oss)",
    "position_bias": "a relative position bias added to the scores (T5 and its kin)",
}
_CROSS_NAME = re.compile(r"cross|encoder_?attn|enc_?dec|encdecattention", re.IGNORECASE)


@dataclass(frozen=True)
class Architecture:
    """What discovery found in one model: its ``model_type`` and the classes of its self-attention modules."""

    model_type: str
    self_attention_classes: tuple[str, ...]
    max_positions: Callable[[object], int | None]
    modality: str


@dataclass(frozen=True)
class ModelFacts:
    """What a variant may need to know about the model at reshape time (``VariantSpec.fit_defaults`` and
    ``prepare_params``): the longest sequence its reshaped layers read (None where the model has no such bound),
    and the heads of a reshaped layer."""

    max_positions: int | None
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: as many as query heads


@dataclass(frozen=True)
class LayerFacts:
    """One attention module and what its attention call does.

    ``sliding_window`` is the model's own window, as the attention call's ``sliding_window`` argument gives it (the
    flash-attention convention of transformers: a query sees the keys ``j`` with ``0 <= i - j < W``, ``|i - j| < W``
    when bidirectional), or None. ``extras`` maps each other argument that changes the maths to what it is, and
    ``unknown`` lists the arguments hf_reshape does not know; their value is the static value when one could be
    read, else ``"given"``."""

    index: int
    name: str
    module: nn.Module = field(compare=False, repr=False)
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    causal: bool
    max_positions: int | None
    sliding_window: int | str | None = None
    extras: dict = field(default_factory=dict)
    unknown: dict = field(default_factory=dict)
    cross: bool = False


@dataclass(frozen=True)
class Override:
    """Facts of an odd model, keyed in :data:`OVERRIDES` by the ``model_type`` of the attention module's config (or
    of the model's): ``causal`` the form its self-attention runs, ``max_positions(config)`` its longest sequence,
    ``refuse`` a reason hf_reshape cannot serve it."""

    causal: bool | None = None
    max_positions: Callable[[object], int | None] | None = None
    refuse: str | None = None
    causal_names: str | None = None  # a regex: self-attention modules whose qualified name matches run causal
    refuse_if: Callable[[object], bool] | None = None  # refuse (with `refuse`) only when this holds for the config

    def refusal(self, config) -> str | None:
        if not self.refuse:
            return None
        return self.refuse if self.refuse_if is None or self.refuse_if(config) else None


_RELATIVE_BIAS_IN_MASK = (
    "its attention adds a relative position bias through the attention mask argument (a float [.., T, T] tensor "
    "the model builds itself), which no hf_reshape variant applies"
)
_SHIFTED_WINDOWS = _RELATIVE_BIAS_IN_MASK + ", with its shifted-window pattern (Swin)"


def _relative_bias(config) -> bool:
    return bool(getattr(config, "use_relative_position_bias", False) or
                getattr(config, "use_shared_relative_position_bias", False))


OVERRIDES: dict[str, Override] = {
    # text towers that share their attention class with a vision tower (``is_causal = False``) and run causal: the
    # text transformer passes ``is_causal=True`` at call time (transformers/models/clip/modeling_clip.py,
    # CLIPTextTransformer.forward)
    **{t: Override(causal=True) for t in (
        "clip_text_model", "clipseg_text_model", "groupvit_text_model", "metaclip_2_text_model", "owlv2_text_model",
        "owlvit_text_model", "x_clip_text_model",
    )},
    # the decoder's self-attention is built without `is_causal=True`; causality comes only from the 4D mask
    # transformers builds for eager attention (transformers/models/nllb_moe/modeling_nllb_moe.py, NllbMoeDecoderLayer)
    "nllb-moe": Override(causal_names=r"(^|\.)decoder\."),
    # found by `python -m hf_reshape.bench.walk`: what these models pass their attention calls is more than
    # hf_reshape's attention function can honour in a reshaped layer; refused up front rather than at the first call
    **{t: Override(refuse=_SHIFTED_WINDOWS) for t in ("swin", "swinv2", "donut-swin")},
    **{t: Override(refuse=_RELATIVE_BIAS_IN_MASK, refuse_if=_relative_bias) for t in ("beit", "data2vec-vision")},
    "doge": Override(refuse="its attention adds a learned dynamic mask to the scores through the attention mask "
                            "argument, which no hf_reshape variant applies"),
    "segformer": Override(refuse="its efficient self-attention pools keys and values to fewer positions than the "
                                 "queries (`sr_ratios`), a reduction the variants do not take as self-attention"),
    "t5gemma2": Override(refuse="its decoder merges self- and cross-attention in one attention call (the keys are "
                                "its own and the encoder's), which the variants do not serve"),
}


# ---------- which classes are attention modules ----------


def _code_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def _own_functions(cls: type) -> list[Callable]:
    """Functions defined by ``cls`` and its bases below ``nn.Module`` (decorators unwrapped)."""
    found = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                found.append(value)
                unwrapped = inspect.unwrap(value)
                if unwrapped is not value:
                    found.append(unwrapped)
    return found


@functools.lru_cache(maxsize=None)
def uses_attention_interface(cls: type) -> bool:
    """Whether a method of ``cls`` looks up transformers' ``ALL_ATTENTION_FUNCTIONS`` (a model class, which looks it
    up to switch implementations, is not an attention module)."""
    from transformers import PreTrainedModel

    if issubclass(cls, PreTrainedModel):
        return False
    return any(INTERFACE in _code_names(fn.__code__) for fn in _own_functions(cls))


# ---------- the keyword arguments of the attention call, read from the source ----------


@functools.lru_cache(maxsize=None)
def _interface_calls(cls: type) -> tuple[tuple[tuple[str, ast.expr], ...], ...] | None:
    """The keyword arguments of each attention-interface call in ``cls``'s methods, as ``(name, expression)``
    pairs; None when the source cannot be read."""
    calls = []
    for fn in _own_functions(cls):
        if INTERFACE not in _code_names(fn.__code__):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return None
        dispatch = {INTERFACE}
        for node in ast.walk(tree):
            value = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and value is not None and _mentions(value, dispatch):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                dispatch |= {t.id for t in targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _mentions(node.func, dispatch):
                calls.append(tuple((kw.arg, kw.value) for kw in node.keywords if kw.arg is not None))
    return tuple(calls)


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


_UNKNOWN = object()


def _static_value(node: ast.expr, module: nn.Module) -> Any:
    """The value of a keyword expression where it is a constant, ``self.a.b`` or ``getattr(self.a, "b", d)``;
    :data:`_UNKNOWN` otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute):
        owner = _static_value(node.value, module)
        return _UNKNOWN if owner is _UNKNOWN else getattr(owner, node.attr, _UNKNOWN)
    if isinstance(node, ast.Name):
        return module if node.id == "self" else _UNKNOWN
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        args = [_static_value(a, module) for a in node.args]
        if len(args) in (2, 3) and _UNKNOWN not in args and isinstance(args[1], str):
            return getattr(args[0], args[1], *args[2:]) if len(args) == 3 else getattr(args[0], args[1], _UNKNOWN)
        return _UNKNOWN
    if isinstance(node, ast.IfExp):
        a, b = _static_value(node.body, module), _static_value(node.orelse, module)
        return a if a is b or (a is not _UNKNOWN and b is not _UNKNOWN and _same(a, b)) else _UNKNOWN
    return _UNKNOWN


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and the like: not statically comparable
        return False


def call_arguments(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments ``module`` passes to the attention function, each with its static value where one can be
    read (:func:`_static_value`), else the string ``"given"``. Arguments whose value is None in every call are left
    out; so is everything when the source cannot be read (the attention function still refuses, at call time, an
    argument it does not know)."""
    calls = _interface_calls(type(module))
    out: dict[str, Any] = {}
    for call in calls or ():
        for name, expr in call:
            value = _static_value(expr, module)
            if value is None:
                continue
            out[name] = "given" if value is _UNKNOWN else value
    return out


# ---------- cross-attention ----------


def _cross_by_recorders(model: nn.Module) -> tuple[set[type], list[str]]:
    """Classes and qualified-name fragments the model's ``_can_record_outputs`` lists as cross-attention."""
    classes, names = set(), []
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(recorders, dict):
            continue
        entry = recorders.get("cross_attentions")
        for item in entry if isinstance(entry, (list, tuple)) else [entry]:
            if isinstance(item, type):
                classes.add(item)
            elif item is not None and getattr(item, "layer_name", None):
                names.append(item.layer_name.strip("."))
            elif item is not None and isinstance(getattr(item, "target_class", None), type):
                classes.add(item.target_class)
    return classes, names


def _is_cross(name: str, module: nn.Module, cross_classes: set[type], cross_names: list[str], self_classes) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    if "cross" in type(module).__name__.lower():
        return True
    if _CROSS_NAME.search(name.rsplit(".", 1)[-1]):
        return True
    if any(f".{fragment}" in f".{name}" and (name.endswith(fragment)) for fragment in cross_names):
        return True
    return type(module) in cross_classes and type(module) not in self_classes


def _self_classes_by_recorders(model: nn.Module) -> set[type]:
    classes = set()
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None)
        if isinstance(recorders, dict):
            entry = recorders.get("attentions")
            for item in entry if isinstance(entry, (list, tuple)) else [entry]:
                if isinstance(item, type) and not getattr(item, "layer_name", None):
                    classes.add(item)
    return classes


# ---------- facts ----------


def _int_attr(obj, names) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _module_config(model: nn.Module, module: nn.Module):
    from transformers import PretrainedConfig

    config = getattr(module, "config", None)
    return config if isinstance(config, PretrainedConfig) else model.config


def _override(model: nn.Module, config) -> Override | None:
    for owner in (config, model.config):
        found = OVERRIDES.get(getattr(owner, "model_type", None))
        if found is not None:
            return found
    return None


def _heads(module: nn.Module, config) -> tuple[int | None, int | None, int | None]:
    heads = _int_attr(module, ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    heads = heads or _int_attr(config, ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads"))
    head_dim = _int_attr(module, ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv"))
    hidden = _int_attr(config, ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"))
    head_dim = head_dim or _int_attr(config, ("head_dim",)) or (hidden // heads if hidden and heads else None)
    kv = None
    groups = _int_attr(module, ("num_key_value_groups",))
    if groups and heads:
        kv = heads // groups
    kv = kv or _int_attr(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    kv = kv or _int_attr(config, ("num_key_value_heads",))
    return heads, kv or heads, head_dim


def _vision_patches(config) -> int | None:
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    sizes = size if isinstance(size, (list, tuple)) else (size, size)
    patches = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    if not all(isinstance(v, int) and v > 0 for v in (*sizes, *patches)) or len(sizes) != len(patches):
        return None
    return math.prod(s // p for s, p in zip(sizes, patches))


def _position_table(model: nn.Module, name: str) -> int | None:
    """Length of the learned position table nearest to the module ``name`` (its tower's): an ``nn.Embedding``
    named ``*position*`` / ``wpe``, or a ``[1, N, D]`` / ``[N, D]`` parameter named ``*position*``."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        try:
            ancestor = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        lengths = []
        for sub_name, sub in ancestor.named_modules():
            leaf = sub_name.rsplit(".", 1)[-1]
            if isinstance(sub, nn.Embedding) and ("position" in leaf or leaf in ("wpe", "embed_positions")):
                lengths.append(sub.num_embeddings)
        for param_name, param in ancestor.named_parameters(recurse=True):
            leaf = param_name.rsplit(".", 1)[-1]
            if "position" in leaf and param.dim() in (2, 3) and (param.dim() == 2 or param.shape[0] == 1):
                lengths.append(param.shape[-2])
        if lengths:
            return max(lengths)
    return None


def _max_positions(model: nn.Module, name: str, config, causal: bool, override: Override | None) -> int | None:
    if override is not None and override.max_positions is not None:
        return override.max_positions(config)
    patches = _vision_patches(config)
    if patches is not None:
        table = _position_table(model, name)
        return table if table is not None and table >= patches else patches + 1
    fields = ("max_position_embeddings", "n_positions", "max_target_positions" if causal else "max_source_positions",
              "n_ctx", "max_seq_len", "max_sequence_length")
    found = _int_attr(config, fields)
    return found if found is not None else _position_table(model, name)


def _layer_index(name: str, module: nn.Module) -> int:
    layer = getattr(module, "layer_idx", None)
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else 0


def _facts(model: nn.Module, name: str, module: nn.Module, cross: bool) -> LayerFacts:
    config = _module_config(model, module)
    override = _override(model, config)
    arguments = call_arguments(module)
    causal = arguments.get("is_causal")
    if not isinstance(causal, bool):
        causal = override.causal if override is not None and override.causal is not None else None
        if override is not None and override.causal_names and re.search(override.causal_names, name):
            causal = True
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    window = arguments.get(WINDOW_ARGUMENT)
    if WINDOW_ARGUMENT not in arguments:
        attr = getattr(module, WINDOW_ARGUMENT, None)
        window = attr if isinstance(attr, int) and not isinstance(attr, bool) else None
    extras = {k: v for k, v in arguments.items() if k in EXACT_ONLY_ARGUMENTS}
    unknown = {k: v for k, v in arguments.items()
               if k not in NEUTRAL_ARGUMENTS and k not in EXACT_ONLY_ARGUMENTS and k != WINDOW_ARGUMENT}
    heads, kv, head_dim = _heads(module, config)
    return LayerFacts(
        index=_layer_index(name, module), name=name, module=module, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, causal=causal, max_positions=_max_positions(model, name, config, causal, override),
        sliding_window=window, extras=extras, unknown=unknown, cross=cross,
    )


def attention_modules(model: nn.Module) -> list[LayerFacts]:
    """Every module of ``model`` that calls the attention interface, self- and cross-attention, with its facts."""
    cross_classes, cross_names = _cross_by_recorders(model)
    self_classes = _self_classes_by_recorders(model)
    found = []
    for name, module in model.named_modules():
        if not uses_attention_interface(type(module)):
            continue
        cross = _is_cross(name, module, cross_classes, cross_names, self_classes)
        found.append(_facts(model, name, module, cross))
    return found


def foreign_attention(model: nn.Module) -> list[str]:
    """Names of modules that compute attention outside the interface yet take an ``attention_mask`` (GIT's text
    ``GitSelfAttention``): once the model's implementation is hf_reshape's, the masks transformers builds for them
    come from hf_reshape's mask function (2D key padding, no causality), so the model cannot be reshaped."""
    interface = {name for name, m in model.named_modules() if uses_attention_interface(type(m))}
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if "attention" not in cls.__name__.lower() or cls.__module__.startswith("torch.") or name in interface:
            continue
        if any(other.startswith(f"{name}.") or not name for other in interface):
            continue  # a wrapper of an interface module (BertAttention around BertSelfAttention)
        try:
            takes_mask = "attention_mask" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            takes_mask = False
        if takes_mask:
            found.append(name)
    return found


# ---------- the API reshape and the cache use ----------


def get_architecture(model: nn.Module) -> Architecture:
    """Refuse a model hf_reshape cannot serve, with the reason; else say what discovery found."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}: hf_reshape reshapes transformers models (and wrappers holding "
            "one, such as a SentenceTransformer) whose attention goes through transformers' attention interface"
        )
    override = OVERRIDES.get(model_type)
    if override is not None and override.refusal(config):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported: {override.refusal(config)}")
    layers = [f for f in attention_modules(model) if not f.cross]
    if not layers:
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}): none of its modules calls "
            f"transformers' attention interface ({INTERFACE}), so there is no self-attention hf_reshape can swap; "
            "supported: any model whose attention goes through that interface (Llama, Qwen, Mistral, BERT, "
            "RoBERTa, GPT-2, ViT, CLIP, Whisper, BART, ...)"
        )
    foreign = foreign_attention(model)
    if foreign:
        classes = sorted({type(model.get_submodule(n)).__name__ for n in foreign})
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported: its {classes} ({foreign[0]}, ...) "
            "compute attention outside transformers' attention interface, from masks transformers builds for the "
            "model's attention implementation; under hf_reshape's those masks are 2D key padding, which these modules "
            "would misread"
        )
    for layer in layers:
        layer_config = _module_config(model, layer.module)
        layer_override = _override(model, layer_config)
        if layer_override is not None and layer_override.refusal(layer_config):
            raise UnsupportedModelError(
                f"{type(model).__name__} ({layer.name}) is not supported: {layer_override.refusal(layer_config)}")
    classes = tuple(sorted({type(f.module).__name__ for f in layers}))
    patches = _vision_patches(config)
    return Architecture(
        model_type=str(model_type),
        self_attention_classes=classes,
        max_positions=lambda _config: model_facts(model).max_positions,
        modality="image" if patches is not None else "text",
    )


def _largest(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def self_attention_modules(model: nn.Module, arch: Architecture | None = None) -> list[tuple[int, str, nn.Module]]:
    """``(layer index, qualified name, module)`` of every self-attention module; cross-attention is skipped."""
    found = [(f.index, f.name, f.module) for f in layer_facts(model)]
    if not found:
        raise UnsupportedModelError(f"found no self-attention module in {type(model).__name__}")
    return found


def layer_facts(model: nn.Module, arch: Architecture | None = None) -> list[LayerFacts]:
    """:class:`LayerFacts` of every self-attention module of ``model`` (cross-attention skipped)."""
    return [f for f in attention_modules(model) if not f.cross]


def model_facts(model: nn.Module, arch: Architecture | None = None, layers: list[LayerFacts] | None = None) -> ModelFacts:
    """Model-level facts for the variant's parameters: the longest sequence any of ``layers`` (default: every
    self-attention layer) reads, and the heads of the first of them."""
    layers = layer_facts(model) if layers is None else layers
    if not layers:
        raise UnsupportedModelError(f"found no self-attention module in {type(model).__name__}")
    first = layers[0]
    config = model.config
    heads = first.num_heads or getattr(config, "num_attention_heads", None)
    head_dim = first.head_dim or (config.hidden_size // heads if heads and hasattr(config, "hidden_size") else None)
    return ModelFacts(
        max_positions=_largest(f.max_positions for f in layers), num_heads=heads, head_dim=head_dim,
        num_kv_heads=first.num_kv_heads,
    )
