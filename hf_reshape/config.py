"""``ReshapeConfig``: which variant, with which parameters, on which layers. JSON beside the model, loadable
from a folder or a Hub repo id (after PEFT's ``PeftConfig``)."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace
from typing import Any

from .errors import InvalidParameterError, ReshapeError
from .registry import HYBRID, VariantParams, field_defaults, get_variant, make_params  # HYBRID: a hybrid's `method`

logger = logging.getLogger(__name__)

CONFIG_NAME = "reshape_config.json"
MODEL_CONFIG_KEY = "hf_reshape"  # key of the record inside a model's config.json
_META_KEYS = ("method", "layers", "hf_reshape_version", "positions")  # "positions": hf_reshape.positions
_HYBRID_KEYS = ("method", "parts", "hf_reshape_version", "positions")  # the keys of a hybrid's record


def _version() -> str:
    from . import __version__

    return __version__


class ReshapeConfig:
    """Configuration of a reshaped attention.

    Args:
        method (`str`): a registered variant name (see `hf_reshape.list_variants()`).
        layers (`list[int]`, *optional*): indices of the layers to reshape; the others keep exact attention.
            `None` reshapes every self-attention layer.
        **params: the variant's parameters (e.g. `window=64`); unknown names raise an error listing the
            accepted ones. A parameter left out takes its default, and a default that does not fit is adapted:
            to the other parameters here (Linformer's `proj_len` to a given `max_length`), to the model at
            `reshape` time (`proj_len` to the model's positions; the model's record holds the value used). A value
            you give is never changed: if it does not fit, it is an error.

    Per-layer hybrids: `ReshapeConfig.hybrid(parts)` (or `ReshapeConfig("hybrid", parts=[...])`) gives each part
    its own variant, parameters and layers; layers no part names keep exact attention, and at most one part may
    leave `layers` out (it takes every layer the other parts do not name). See :meth:`hybrid`.

    Example:

    ```python
    >>> cfg = ReshapeConfig(method="sliding_window", window=64)
    >>> cfg.window
    64
    ```
    """

    def __init__(self, method: str, layers: list[int] | None = None, **params: Any):
        if method == HYBRID:
            self._init_hybrid(layers, params)
            return
        spec = get_variant(method)
        layers = _check_layers(layers)
        fitted = spec.fit_defaults(field_defaults(spec.params_cls), params, None) if spec.fit_defaults else {}
        self.method = method
        self.layers = layers
        self.params: VariantParams = make_params(spec, {**fitted, **params})
        # parameters the user did not give: reshape may adapt them to the model (VariantSpec.fit_defaults)
        self._defaulted = frozenset(spec.params_cls.field_names()) - set(params)

    # ---- per-layer hybrids -----------------------------------------------------------------------------------
    @classmethod
    def hybrid(cls, parts) -> "ReshapeConfig":
        """A per-layer hybrid: each part is one variant on its own layers; layers that no part names keep exact
        softmax attention.

        Args:
            parts: a list of single-variant `ReshapeConfig`s (or of dicts `{"method": name, "layers": [...],
                **params}`), or a mapping `{variant name: {"layers": [...], **params}}` (a variant once each; use
                the list to give one variant two parameter sets). At most one part may leave `layers` out: it takes
                every self-attention layer the other parts do not name (resolved against the model by `reshape`).

        Raises:
            `InvalidParameterError` (no part, a part that is not a config/dict, parts sharing a layer, two parts
            without `layers`, a nested hybrid, a part's invalid parameter or layers), `UnknownVariantError` (a part's
            variant); each message names the part.

        Example:

        ```python
        >>> cfg = ReshapeConfig.hybrid(
        ...     {"sliding_window": {"window": 64, "layers": [0, 5]}, "hedgehog": {"layers": [1, 2, 3, 4]}}
        ... )
        >>> [(p.method, p.layers) for p in cfg.parts]
        [('sliding_window', [0, 5]), ('hedgehog', [1, 2, 3, 4])]
        ```
        """
        return cls(HYBRID, parts=parts)

    def _init_hybrid(self, layers, params: dict[str, Any]) -> None:
        accepted = "a hybrid takes `parts` only, e.g. ReshapeConfig.hybrid([ReshapeConfig('hedgehog', layers=[1]), " \
                   "ReshapeConfig('sliding_window', window=64, layers=[0])])"
        if layers is not None:
            raise InvalidParameterError(
                f"{accepted}: give `layers` inside each part, not to the hybrid; got layers={_short(layers)}"
            )
        unknown = sorted(set(params) - {"parts"})
        if unknown:
            raise InvalidParameterError(f"unknown parameter(s) {unknown} for a hybrid; {accepted}")
        parts = params.get("parts")
        if isinstance(parts, dict):
            parts = [_mapping_part(name, value) for name, value in parts.items()]
        if isinstance(parts, (str, bytes)) or not isinstance(parts, (list, tuple)) or not parts:
            raise InvalidParameterError(
                f"a hybrid's `parts` must be a non-empty list of ReshapeConfigs (or of dicts {{'method': name, "
                f"'layers': [...], **params}}), or a mapping {{variant: {{'layers': [...], **params}}}}; "
                f"got {_short(parts)}"
            )
        built = [_hybrid_part(i, part) for i, part in enumerate(parts)]
        _check_disjoint(built)
        self.method = HYBRID
        self._parts = tuple(built)
        explicit = [p for p in built if p.layers is not None]
        self.layers = None if len(explicit) < len(built) else sorted(i for p in explicit for i in p.layers)
        self.params = None
        self._defaulted = frozenset()

    @property
    def is_hybrid(self) -> bool:
        """Whether this config assigns several variants per layer (`method == "hybrid"`)."""
        return self.__dict__.get("method") == HYBRID

    @property
    def parts(self) -> tuple["ReshapeConfig", ...]:
        """The single-variant configs that make this one: a hybrid's parts, or `(self,)`."""
        return self.__dict__["_parts"] if self.is_hybrid else (self,)

    @property
    def defaulted(self) -> frozenset[str]:
        """Names of the parameters left at their default (not given by the user); `reshape` adapts those that do
        not fit the model. Not part of `to_dict`: a saved record holds the values used, all of them explicit."""
        return self.__dict__.get("_defaulted", frozenset())

    @property
    def spec(self):
        if self.is_hybrid:
            raise InvalidParameterError("a hybrid config has one variant per part: use `cfg.parts[i].spec`")
        return get_variant(self.method)

    def __getattr__(self, name: str):
        # only called when normal lookup fails: expose the variant's parameters as attributes
        params = self.__dict__.get("params")
        if params is not None and name in params.field_names():
            return getattr(params, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, ReshapeConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        if self.is_hybrid:
            return f"ReshapeConfig.hybrid([{', '.join(map(repr, self.parts))}])"
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.to_dict().items())
        layers = "" if self.layers is None else f", layers={self.layers}"
        return f"ReshapeConfig(method={self.method!r}{layers}, {args})"

    def with_params(self, params: VariantParams) -> "ReshapeConfig":
        if self.is_hybrid:
            raise InvalidParameterError("a hybrid config has one variant per part: call `with_params` on a part")
        new = ReshapeConfig(self.method, layers=self.layers)
        new.params = replace(params)
        new._defaulted = self.defaulted
        return new

    def to_dict(self) -> dict[str, Any]:
        if self.is_hybrid:  # {"method": "hybrid", "parts": [{"method": ..., "layers": ..., **params}, ...], version}
            parts = [{k: v for k, v in p.to_dict().items() if k != "hf_reshape_version"} for p in self.parts]
            return {"method": HYBRID, "parts": parts, "hf_reshape_version": _version()}
        return {"method": self.method, "layers": self.layers, **self.params.to_dict(), "hf_reshape_version": _version()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReshapeConfig":
        """Build from a record (`to_dict`'s output, the `hf_reshape` entry of a reshaped model's config.json, or
        a `reshape_config.json`).

        A record lists every parameter of its variant (`to_dict` writes them all), so a name the variant does not
        know (a misspelling) or a parameter that is missing (a hand-edited or truncated record) is an
        `InvalidParameterError` naming them: loading it with a default in their place would silently run another
        attention. Only a record written by a newer hf_reshape (`hf_reshape_version` above this one's) may carry
        names this version does not know: they are ignored with a warning.
        """
        if not isinstance(data, dict):
            raise InvalidParameterError(
                "a reshape record must be a dict (a JSON object) such as {'method': 'topk', 'top_k': 64, 'layers': "
                f"None, 'hf_reshape_version': '{_version()}'}}; got a {type(data).__name__}: {_short(data)}"
            )
        if "method" not in data:
            raise InvalidParameterError(f"a reshape record needs a `method`; got keys {sorted(map(str, data))}")
        method = data["method"]
        if method == HYBRID:
            return cls._hybrid_from_dict(data)
        spec = get_variant(method)
        accepted = spec.params_cls.field_names()
        unknown = sorted(set(data) - set(accepted) - set(_META_KEYS))
        missing = [name for name in accepted if name not in data]
        written_by = data.get("hf_reshape_version")
        if unknown:
            if _is_newer(written_by):
                logger.warning(
                    "the %r reshape record was written by hf_reshape %s (this is %s): ignoring the parameter(s) %s "
                    "this version does not know; accepted: %s", method, written_by, _version(), unknown, accepted,
                )
            else:
                raise InvalidParameterError(
                    f"unknown parameter(s) {unknown} in the {method!r} reshape record; accepted: {accepted}"
                )
        if missing:
            defaults = field_defaults(spec.params_cls)
            raise InvalidParameterError(
                f"the {method!r} reshape record lacks the parameter(s) {missing}: a saved record lists every "
                f"parameter, so this one was edited or truncated; add them (defaults: "
                f"{ {name: defaults.get(name) for name in missing} })"
            )
        return cls(method, layers=data.get("layers"), **{name: data[name] for name in accepted})

    @classmethod
    def _hybrid_from_dict(cls, data: dict[str, Any]) -> "ReshapeConfig":
        """A hybrid's record: `parts` is a list of single-variant records (each as strict as `from_dict` is with a
        single one: every parameter listed, none unknown), and the record's other keys are its metadata."""
        written_by = data.get("hf_reshape_version")
        unknown = sorted(set(map(str, data)) - set(_HYBRID_KEYS))
        if unknown:
            if not _is_newer(written_by):
                raise InvalidParameterError(
                    f"unknown key(s) {unknown} in a hybrid reshape record; accepted: {list(_HYBRID_KEYS)}"
                )
            logger.warning("the hybrid reshape record was written by hf_reshape %s (this is %s): ignoring the key(s) "
                           "%s this version does not know", written_by, _version(), unknown)
        records = data.get("parts")
        if not isinstance(records, list) or not records:
            raise InvalidParameterError(f"a hybrid reshape record needs `parts`, a non-empty list of single-variant "
                                        f"records; got {_short(records)}")
        parts = []
        for i, record in enumerate(records):
            where = f"hybrid part {i}" + (f" ({record.get('method')!r})" if isinstance(record, dict) else "")
            if isinstance(record, dict):
                extra = sorted({"positions", "parts", "hf_reshape_version"} & set(record))
                if extra or record.get("method") == HYBRID:
                    raise InvalidParameterError(f"{where}: a part is one variant's record ({{'method': ..., 'layers': "
                                                f"..., **params}}); it cannot hold {extra or ['a nested hybrid']}")
                record = {**record, "hf_reshape_version": written_by}  # the part is as new as its record
            try:
                parts.append(cls.from_dict(record))
            except ReshapeError as err:
                raise type(err)(f"{where}: {err}") from None
        return cls(HYBRID, parts=parts)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `reshape_config.json` into `save_directory` (created if needed); returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> "ReshapeConfig":
        """Load from a local folder or a Hub repo id (through `hf_hub_download`, so the Hub cache and
        `HF_HUB_OFFLINE` apply). Reads `reshape_config.json`, or the `hf_reshape` record of a reshaped model's
        `config.json`. `hub_kwargs` (`revision`, `cache_dir`, `token`, ...) go to `hf_hub_download`."""
        unreachable = None  # the Hub's error when a file could be neither downloaded nor found in the cache
        try:
            data = _read_json(path_or_repo_id, CONFIG_NAME, hub_kwargs)
        except HubUnreachableError as err:
            data, unreachable = None, err
        if data is None:
            # a reshaped model's folder (or a cached Hub snapshot holding only the model files)
            try:
                model_config = _read_json(path_or_repo_id, "config.json", hub_kwargs)
            except HubUnreachableError as err:
                model_config, unreachable = None, unreachable or err
            data = model_config.get(MODEL_CONFIG_KEY) if isinstance(model_config, dict) else None
        if data is None and unreachable is not None:
            raise unreachable
        if data is None:
            raise FileNotFoundError(
                f"no {CONFIG_NAME} and no `{MODEL_CONFIG_KEY}` record in config.json at {str(path_or_repo_id)!r}"
            )
        return cls.from_dict(data)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload reshape config", **kwargs) -> str:
        """Upload `reshape_config.json` to a Hub repo (created if missing); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.pop("token", None))
        api.create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None))
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(tmp)
            info = api.upload_file(
                path_or_fileobj=path, path_in_repo=CONFIG_NAME, repo_id=repo_id, commit_message=commit_message, **kwargs
            )
        return str(info)


class HubUnreachableError(FileNotFoundError):
    """A file that is in no local folder could not be fetched from the Hub (offline, no connection, ...) and is
    not in the cache; the message keeps huggingface_hub's own explanation."""


def resolve_file(path_or_repo_id, filename: str, hub_kwargs: dict) -> str | None:
    """Local path of `filename` in a folder, or in a Hub repo (downloaded or cached); None if the folder or the
    repo has no such file.

    Raises:
        `FileNotFoundError`: `path_or_repo_id` is a local path (absolute, relative with `./`, `~`, several
            separators...) that does not exist: it says so.
        `HubUnreachableError` (a `FileNotFoundError`): a repo id whose file could not be fetched and is not
            cached, with huggingface_hub's message (offline mode, cannot connect, ...).
        huggingface_hub's own errors (repository not found, gated, ...) as they are.
    """
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, filename)
        return path if os.path.isfile(path) else None
    name = os.fspath(path_or_repo_id)
    if isinstance(path_or_repo_id, os.PathLike) or not _looks_like_repo_id(name):
        what = "is a file, not a folder" if os.path.exists(name) else "does not exist"
        raise FileNotFoundError(f"{name!r} {what}: pass a local folder or a Hub repo id ('name' or 'org/name')")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(name, filename, **hub_kwargs)
    except LocalEntryNotFoundError as err:
        # offline, or the Hub unreachable, and the file is not in the cache: keep huggingface_hub's explanation,
        # whose specific part (offline mode, the connection error) is in the exception it chains
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise HubUnreachableError(
            f"{name!r} is not a local folder, and {filename} could not be fetched from the Hub: {err}{cause}"
        ) from err
    except EntryNotFoundError:
        return None  # the repo has no such file


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("~", ".")) or os.path.isabs(name) or os.sep in name.replace("/", "") or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def _mapping_part(name, value) -> dict[str, Any]:
    """`{variant: {"layers": [...], **params}}`'s entry as a part dict."""
    if value is None:
        value = {}
    if not isinstance(value, dict) or "method" in value:
        raise InvalidParameterError(
            f"in a hybrid mapping {{variant: {{'layers': [...], **params}}}}, the value of {name!r} must be a dict of "
            f"its parameters (and `layers`), without `method`; got {_short(value)}"
        )
    return {"method": name, **value}


def _hybrid_part(index: int, part) -> ReshapeConfig:
    """A hybrid's part as a single-variant config of its own (a copy of a given one); errors name the part."""
    if isinstance(part, ReshapeConfig):
        if part.is_hybrid:
            raise InvalidParameterError(f"hybrid part {index} is itself a hybrid: give its parts in the outer list")
        own = copy.copy(part)  # the hybrid keeps its own parts: the caller's config may change afterwards
        own.layers = None if part.layers is None else list(part.layers)
        return own
    if not isinstance(part, dict) or "method" not in part:
        raise InvalidParameterError(
            f"hybrid part {index} must be a ReshapeConfig or a dict {{'method': name, 'layers': [...], **params}}; "
            f"got {_short(part)}"
        )
    params = dict(part)
    method, layers = params.pop("method"), params.pop("layers", None)
    if method == HYBRID:
        raise InvalidParameterError(f"hybrid part {index} is itself a hybrid: give its parts in the outer list")
    try:
        return ReshapeConfig(method, layers=layers, **params)
    except ReshapeError as err:
        raise type(err)(f"hybrid part {index} ({method!r}): {err}") from None


def _check_disjoint(parts: list[ReshapeConfig]) -> None:
    """Refuse parts that share a layer, or more than one part without `layers` (each would take the rest)."""
    owner: dict[int, int] = {}
    for i, part in enumerate(parts):
        for layer in sorted(set(part.layers or ())):
            if layer in owner:
                j = owner[layer]
                raise InvalidParameterError(
                    f"hybrid parts {j} ({parts[j].method!r}) and {i} ({part.method!r}) both name layer {layer}: each "
                    "layer takes one variant (parts' `layers` must not overlap)"
                )
            owner[layer] = i
    rest = [i for i, p in enumerate(parts) if p.layers is None]
    if len(rest) > 1:
        raise InvalidParameterError(
            f"hybrid parts {rest} all leave `layers` out; at most one may (it takes every layer the others do not "
            "name): give the others their `layers`"
        )


def _check_layers(layers) -> list[int] | None:
    if layers is None:
        return None
    accepted = "`layers` must be None (every layer) or a non-empty list of layer indices >= 0, such as [0, 1]"
    if isinstance(layers, (str, bytes, dict)) or not hasattr(layers, "__iter__"):
        raise InvalidParameterError(f"{accepted}; got {_short(layers)}")
    layers = list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise InvalidParameterError(f"{accepted}; got {_short(layers)}")
    return layers


def _is_newer(version) -> bool:
    """Whether a record's `hf_reshape_version` is above this hf_reshape's (an unreadable one is not)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)) > Version(_version())
    except InvalidVersion:
        return False


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path_or_repo_id, filename, hub_kwargs):
    path = resolve_file(path_or_repo_id, filename, hub_kwargs)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
