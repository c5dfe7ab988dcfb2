"""The variant registry: one :class:`VariantSpec` per attention variant, added with :func:`register_variant`.

Built-in variants register themselves when :mod:`hf_reshape.variants` is imported; tests and the benchmark are
parametrized straight from :func:`list_variants`. (Pattern after timm's ``@register_model`` and PEFT's
``register_peft_method``.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import InvalidParameterError, UnknownVariantError

FAMILIES = ("sparse", "low_rank", "linear")
# the named decode-cache layers a spec may declare (``VariantSpec.cache_layer``; built in hf_reshape.cache)
CACHE_LAYERS = ("linear_state", "window", "sink_window", "dynamic")
# names transformers treats specially when they appear in an attention implementation name
HYBRID = "hybrid"  # the method name of a per-layer hybrid config (hf_reshape.config.ReshapeConfig.hybrid)
_RESERVED = ("flash", "sdpa", "flex_attention", "eager", "paged")


@dataclass
class VariantParams:
    """Base class of every variant's parameters: a dataclass whose ``__post_init__`` validates each field."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:  # overridden by variants
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise InvalidParameterError(f"`{name}` must be {accepted}, got {value!r}")


def check_float(name: str, value: Any, low: float = 0.0, low_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if low_inclusive else value > low)
    if not ok:
        raise InvalidParameterError(f"`{name}` must be a number {'>=' if low_inclusive else '>'} {low}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise InvalidParameterError(f"`{name}` must be one of {sorted(choices)}, got {value!r}")


@dataclass(frozen=True)
class VariantSpec:
    """Everything hf_reshape knows about one variant.

    Args:
        name: registry key, lowercase ``[a-z0-9_]``.
        family: one of ``"sparse"``, ``"low_rank"``, ``"linear"``.
        params_cls: a :class:`VariantParams` dataclass (fields, defaults, validation, help metadata).
        forward: fast path, ``forward(q, k, v, *, mask, causal, scaling, params, dropout, training, **state)``
            returning ``[B, H, T_q, D_v]``.
        reference: materialised reference with the same signature minus ``dropout``/``training``.
        causal / bidirectional: which forms the variant supports.
        init_state: ``init_state(params, *, num_heads, head_dim, layer_index) -> dict[str, Tensor]`` for per-layer
            state (``layer_index``: the layer's index in the model, 0 outside a model, so random state can differ
            per layer; an ``init_state`` without that keyword, nor ``**kwargs``, is called without it);
            ``nn.Parameter`` values are learned, plain tensors become (saved) buffers.
        state_names: the keyword tensors ``forward`` expects.
        degenerate: ``degenerate(T) -> dict`` of parameters under which the variant equals exact softmax at
            length ``T`` (``None`` if there is no such setting).
        prepare_params: ``prepare_params(params, model_facts) -> params`` fills model-dependent defaults
            (e.g. Linformer's ``max_length``) at reshape time.
        complexity: time complexity as shown in the README.
        quadratic: whether the fast path materialises a ``T x T`` tensor.
        small_params: parameters that make the variant non-trivial on short sequences (tests, smoke runs).
        weights: ``weights(q, k, v, *, mask, causal, scaling, params, **state) -> Tensor``, the same signature as
            ``reference``: the matrix ``W`` the variant multiplies the values by, ``[B, H, T_q, T_k]``, so that the
            output is ``W @ v`` (``output_attentions=True`` returns it; attention transfer compares it with
            softmax). For ``topk`` and ``sliding_window`` these are softmax probabilities over the keys kept
            (rows of queries with no allowed key are zeros); for ``svd`` the truncated matrix, which is not a
            distribution (entries may be negative). A variant that attends over other positions returns them in
            the last axis: Linformer gives ``[B, H, T_q, proj_len]`` probabilities over its *projected* keys (the
            output is ``W @ (F v)``) and sets ``weights_over_keys=False``. ``None`` (``linear``, ``nystrom``): the
            variant has no such matrix.
        weights_over_keys: whether the last axis of ``weights`` is the keys (compare with softmax only then; a
            shape check is not enough: Linformer's ``proj_len`` may equal ``T``).
        fit_defaults: ``fit_defaults(defaults, given, facts) -> dict`` gives values for parameters the user left at
            their default (not in ``given``) where the default does not fit the other parameters or the model
            (``facts``: :class:`~hf_reshape.architectures.ModelFacts`, or ``None`` before a model is known); e.g.
            :func:`capped_default`. A value the user gave is never changed: if it does not fit, it is an error.
        features: for a linearized variant whose attention is ``phi(q_i) . phi(k_j)`` normalised over the allowed keys
            (denominator at least ``params.eps``; ``params.chunk_size`` the causal chunk), ``features(q, k, *,
            params, scaling, q_offset, k_offset, **state) -> (phi(q), phi(k))``: the feature maps ``[B, H, T, F]`` of
            queries at absolute positions ``q_offset + i`` and keys at ``k_offset + j``. With it, causal generation
            keeps an O(1) running state of ``F x D_v`` sums (:class:`hf_reshape.cache.LinearRecurrentLayer`)
            instead of every key and value.
        cache_layer: the decode-cache layer a causal layer of this variant gets in ``model.generate`` (see
            :class:`hf_reshape.cache.ReshapeCache`): ``"linear_state"`` (the O(1) running sums of
            :class:`~hf_reshape.cache.LinearRecurrentLayer`; needs ``features``), ``"window"`` (the last
            ``params.window`` keys, :class:`~hf_reshape.cache.SlidingWindowLayer`; needs a ``window`` parameter),
            ``"sink_window"`` (sinks plus window, :class:`~hf_reshape.cache.SinkWindowLayer`), ``"dynamic"``
            (transformers' ``DynamicLayer``: every key and value), or a callable ``cache_layer(attention_module) ->
            CacheLayerMixin`` building the layer (the module's ``hf_reshape`` submodule holds the variant's
            parameters and state). ``None`` (the default) means ``"linear_state"`` for a variant that declares
            ``features`` and ``"dynamic"`` otherwise; :func:`register_variant` stores the resolved value.
        flops: ``flops(*, t, head_dim, num_heads, batch, causal, params) -> float | None``: useful forward matmul
            FLOPs of one fast-path call on ``[batch, num_heads, t, head_dim]`` inputs (multiply-add = 2 FLOPs;
            causal: the allowed pairs only; ``params`` the validated :class:`VariantParams`, defaults filled), as
            ``hf-reshape bench`` counts them (:mod:`hf_reshape.bench.op`). ``None``, or a ``None`` result: no
            analytic count (the bench shows "n/a").
        bench_params: parameters of ``hf-reshape bench`` at full size (``T`` in the thousands); ``{}``: the
            defaults. A ``max_length`` parameter left unset is set to ``T`` by the bench.
        quick_params: parameters of ``hf-reshape bench --quick`` and smoke runs (a few dozen tokens); ``None``:
            ``small_params``.
        demo_params: parameters of ``hf-reshape demo`` (a real BERT on sentences of ~10-50 tokens and on 512-token
            rows), chosen so the variant approximates rather than equals softmax there; ``{}``: the defaults.
    """

    name: str
    family: str
    params_cls: type
    forward: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    causal: bool = True
    bidirectional: bool = True
    init_state: Callable[..., dict] | None = None
    state_names: tuple[str, ...] = ()
    degenerate: Callable[[int], dict] | None = None
    prepare_params: Callable[..., Any] | None = None
    complexity: str = ""
    quadratic: bool = True
    description: str = ""
    paper: str = ""
    small_params: dict = field(default_factory=dict)
    weights: Callable[..., torch.Tensor] | None = None
    weights_over_keys: bool = True
    fit_defaults: Callable[..., dict] | None = None
    features: Callable[..., tuple] | None = None
    cache_layer: str | Callable[..., Any] | None = None
    flops: Callable[..., float | None] | None = None
    bench_params: dict = field(default_factory=dict)
    quick_params: dict | None = None
    demo_params: dict = field(default_factory=dict)

    def quick(self) -> dict:
        """``quick_params``, else ``small_params``."""
        return dict(self.small_params if self.quick_params is None else self.quick_params)


def field_defaults(params_cls: type) -> dict[str, Any]:
    """Default value of each field of a :class:`VariantParams` dataclass that has one."""
    out = {}
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def capped_default(name: str, *, by: str, fact: str | None = None) -> Callable[..., dict]:
    """A ``fit_defaults`` for a parameter whose default may exceed a bound: when ``name`` is not given, it becomes
    ``min(default, bound)``, the bound being the given parameter ``by``, else (when ``by`` is unset too and the
    model is known) the model fact ``fact``. E.g. Linformer's ``proj_len`` (default 128) on a ViT of 17 positions:
    ``capped_default("proj_len", by="max_length", fact="max_positions")`` gives 17."""

    def fit(defaults: dict[str, Any], given: dict[str, Any], facts) -> dict[str, Any]:
        if name in given or name not in defaults:
            return {}
        bound = given.get(by)
        if bound is None and facts is not None and fact is not None:
            bound = getattr(facts, fact)
        default = defaults[name]
        if not _is_count(bound) or not _is_count(default) or default <= bound:
            return {}  # nothing to fit (a malformed bound is left for validation to report)
        return {name: bound}

    return fit


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_REGISTRY: dict[str, VariantSpec] = {}


def register_variant(spec: VariantSpec | None = None, /, **kwargs) -> VariantSpec:
    """Add a variant to the registry, from a :class:`VariantSpec` or its keyword arguments.

    Raises ``ValueError`` on a malformed or reserved name, an unknown family, a duplicate, or a params class that
    is not a :class:`VariantParams` dataclass.
    """
    if spec is None:
        spec = VariantSpec(**kwargs)
    elif kwargs:
        raise TypeError("pass either a VariantSpec or its keyword arguments, not both")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name) or any(r in spec.name for r in _RESERVED):
        raise ValueError(
            f"variant name {spec.name!r} must match [a-z][a-z0-9_]* and not contain any of {list(_RESERVED)}"
        )
    if spec.name == HYBRID:
        raise ValueError(f"variant name {HYBRID!r} is taken by per-layer hybrid configs (ReshapeConfig.hybrid)")
    if spec.name in _REGISTRY:
        raise ValueError(f"variant {spec.name!r} is already registered; registered variants: {list_variants()}")
    if spec.family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {spec.family!r}")
    if not (isinstance(spec.params_cls, type) and issubclass(spec.params_cls, VariantParams)):
        raise ValueError("params_cls must be a subclass of hf_reshape.registry.VariantParams")
    if not (spec.causal or spec.bidirectional):
        raise ValueError("a variant must support the causal form, the bidirectional form, or both")
    spec = _resolved(spec)
    _REGISTRY[spec.name] = spec
    return spec


def _resolved(spec: VariantSpec) -> VariantSpec:
    """Check the declarations the tools read, and fill the defaults that depend on other fields: the cache layer
    (``"linear_state"`` for a variant with ``features``, else ``"dynamic"``) and an ``init_state`` that takes
    ``layer_index``."""
    layer = spec.cache_layer
    if layer is None:
        layer = "linear_state" if spec.features is not None else "dynamic"
    if not callable(layer) and layer not in CACHE_LAYERS:
        raise ValueError(
            f"cache_layer must be one of {list(CACHE_LAYERS)}, a callable building a transformers CacheLayerMixin, "
            f"or None; got {layer!r}"
        )
    if layer == "linear_state" and spec.features is None:
        raise ValueError(
            f"variant {spec.name!r} declares cache_layer='linear_state' but no `features` (the running sums are "
            "sums of phi(k) v^T): declare `features`, or another cache_layer"
        )
    if layer == "window" and "window" not in spec.params_cls.field_names():
        raise ValueError(f"variant {spec.name!r} declares cache_layer='window' but has no `window` parameter")
    if spec.flops is not None and not callable(spec.flops):
        raise ValueError(f"flops must be a callable or None, got {spec.flops!r}")
    for name in ("bench_params", "quick_params", "demo_params", "small_params"):
        value = getattr(spec, name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict of parameters, got {value!r}")
        unknown = sorted(set(value or {}) - set(spec.params_cls.field_names()))
        if unknown:
            raise ValueError(
                f"{name} of variant {spec.name!r} names unknown parameter(s) {unknown}; accepted: "
                f"{spec.params_cls.field_names()}"
            )
    init_state = spec.init_state
    if init_state is not None and not _takes_keyword(init_state, "layer_index"):
        init_state = _without_layer_index(init_state)
    return dataclasses.replace(spec, cache_layer=layer, init_state=init_state)


def _takes_keyword(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume it takes what it is given
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in parameters)


def _without_layer_index(init_state: Callable) -> Callable:
    @functools.wraps(init_state)
    def call(params, *, layer_index: int = 0, **kwargs):
        return init_state(params, **kwargs)

    return call


def unregister_variant(name: str) -> None:
    get_variant(name)
    del _REGISTRY[name]


def list_variants() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(_REGISTRY)


def get_variant(name: str) -> VariantSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownVariantError(f"unknown variant {name!r}; registered variants: {list_variants()}") from None


def make_params(spec: VariantSpec, params: dict[str, Any]) -> VariantParams:
    """Build validated parameters, refusing unknown names with the list of accepted ones."""
    accepted = spec.params_cls.field_names()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidParameterError(f"unknown parameter(s) {unknown} for variant {spec.name!r}; accepted: {accepted}")
    return spec.params_cls(**params)
