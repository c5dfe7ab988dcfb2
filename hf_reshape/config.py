"""``ReshapeConfig``: which variant, with which parameters, on which layers. JSON beside the model, loadable
from a folder or a Hub repo id (after PEFT's ``PeftConfig``)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import Any

from .errors import InvalidParameterError
from .registry import VariantParams, get_variant, make_params

logger = logging.getLogger(__name__)

CONFIG_NAME = "reshape_config.json"
MODEL_CONFIG_KEY = "hf_reshape"  # key of the record inside a model's config.json
_META_KEYS = ("method", "layers", "hf_reshape_version")


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
            accepted ones.

    Example:

    ```python
    >>> cfg = ReshapeConfig(method="sliding_window", window=64)
    >>> cfg.window
    64
    ```
    """

    def __init__(self, method: str, layers: list[int] | None = None, **params: Any):
        spec = get_variant(method)
        if layers is not None:
            layers = list(layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise InvalidParameterError(f"`layers` must be None or a non-empty list of layer indices >= 0, got {layers!r}")
        self.method = method
        self.layers = layers
        self.params: VariantParams = make_params(spec, params)

    @property
    def spec(self):
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
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.to_dict().items())
        layers = "" if self.layers is None else f", layers={self.layers}"
        return f"ReshapeConfig(method={self.method!r}{layers}, {args})"

    def with_params(self, params: VariantParams) -> "ReshapeConfig":
        new = ReshapeConfig(self.method, layers=self.layers)
        new.params = replace(params)
        return new

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": self.layers, **self.params.to_dict(), "hf_reshape_version": _version()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReshapeConfig":
        """Build from a dict; keys the variant does not know are dropped with a warning."""
        if "method" not in data:
            raise InvalidParameterError(f"a reshape config needs a `method`; got keys {sorted(data)}")
        spec = get_variant(data["method"])
        accepted = spec.params_cls.field_names()
        unknown = sorted(set(data) - set(accepted) - set(_META_KEYS))
        if unknown:
            logger.warning(
                "ignoring unknown key(s) %s in the %r reshape config; accepted: %s", unknown, data["method"], accepted
            )
        params = {k: v for k, v in data.items() if k in accepted}
        return cls(data["method"], layers=data.get("layers"), **params)

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
        data = _read_json(path_or_repo_id, CONFIG_NAME, hub_kwargs)
        if data is None:
            model_config = _read_json(path_or_repo_id, "config.json", hub_kwargs)
            data = (model_config or {}).get(MODEL_CONFIG_KEY)
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


def resolve_file(path_or_repo_id, filename: str, hub_kwargs: dict) -> str | None:
    """Local path of `filename` in a folder, or in a Hub repo (downloaded or cached); None if it is absent."""
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(str(path_or_repo_id), filename, **hub_kwargs)
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        # offline (or unreachable) and this file is not in the cache
        return None


def _read_json(path_or_repo_id, filename, hub_kwargs):
    path = resolve_file(path_or_repo_id, filename, hub_kwargs)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
