"""A recipe: which model, which data, which metric, which schedule, which variants and stages. Written as a YAML
or JSON file (the built-in ones are in the repository's ``recipes/`` folder and shipped inside the package);
command-line flags override its fields.

Every field is checked when the recipe is read: an unknown key, a wrong type or an unknown stage is an error that
names what is accepted, before anything runs.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError

TASKS = ("text-classification", "causal-lm", "image-classification")
STAGES = ("none", "transfer", "finetune", "transfer+finetune")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


class RecipeError(InvalidParameterError):
    """A recipe file or override that cannot be run; the message names the field and what is accepted."""


@dataclass
class Schedule:
    """The training schedule every row goes through (the softmax baseline and each variant alike)."""

    seed: int = 0
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128  # tokens per text example (causal-lm: block length)
    transfer_steps: int = 200
    transfer_lr: float = 1e-3
    transfer_batch_size: int = 16
    long_length: int = 512  # tokens (text) or image side in pixels (vision) for the long-input latency
    max_positions: int | None = None  # text: extend the learned positions to this many (hf_reshape.extend_positions)
    latency_repeats: int = 5  # rounds of the side-by-side speed pass
    lora: bool = False
    lora_r: int = 8
    save_steps: int = 200  # Trainer checkpoints, for resuming an interrupted stage


@dataclass
class DataSpec:
    """Where the rows come from. ``train``/``eval`` are a Hub dataset id (``name``, ``name:config``), a local
    CSV/TSV/JSON/JSONL/parquet file, or ``shared:<path>`` (a file of the offline data folder, ``../shared/data``
    here); ``hub_fallback`` is used when a ``shared:`` file is missing (a user online)."""

    train: str = ""
    eval: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    eval_fraction: float = 0.1  # seeded split of `train` when `eval` is not given
    hub_fallback: dict | None = None
    extra_eval: dict = field(default_factory=dict)  # name -> source, metric also reported on these
    pack: dict | None = None  # `packed:<source>` documents: see hf_reshape.recipes.data.PackSpec


@dataclass
class PretrainSpec:
    """For recipes whose model is trained here first (no pretrained checkpoint reachable): the architecture's size
    and the softmax schedule. Used only when ``model`` is ``local:<name>``."""

    config: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    vocab_size: int = 2048  # tokenizer trained on the training text (causal-lm)


@dataclass
class VariantEntry:
    name: str
    params: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    task: str
    model: str
    data: DataSpec
    metric: str = "accuracy"
    schedule: Schedule = field(default_factory=Schedule)
    variants: list[VariantEntry] | None = None  # None: every registered variant that fits the model's form
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    pretrain: PretrainSpec | None = None
    quick: dict = field(default_factory=dict)  # overrides applied by --quick
    description: str = ""

    # ---- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping of fields, got {type(data).__name__}")
        data = copy.deepcopy(data)
        _check_keys(data, cls, source)
        for required in ("name", "task", "model", "data"):
            if required not in data:
                raise RecipeError(f"{source}: missing field `{required}`; a recipe needs name, task, model and data")
        if data["task"] not in TASKS:
            raise RecipeError(f"{source}: unknown task {data['task']!r}; accepted: {list(TASKS)}")
        data["data"] = _build(DataSpec, data["data"], f"{source}: data")
        if data["data"].pack is not None:  # packed long documents: fields checked now (hf_reshape.recipes.data)
            from .data import PackSpec

            PackSpec.from_dict(data["data"].pack, f"{source}: data: pack")
        data["schedule"] = _build(Schedule, data.get("schedule") or {}, f"{source}: schedule")
        if data.get("pretrain") is not None:
            data["pretrain"] = _build(PretrainSpec, data["pretrain"], f"{source}: pretrain")
        if data.get("variants") is not None:
            data["variants"] = [_variant(v, source) for v in data["variants"]]
        stages = data.get("stages", list(STAGES))
        if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
            raise RecipeError(f"{source}: `stages` must be a non-empty list drawn from {list(STAGES)}, got {stages!r}")
        recipe = cls(**data)
        if recipe.quick:
            recipe.with_overrides(recipe.quick)  # validate the quick overrides now, not at --quick time
        return recipe

    @classmethod
    def load(cls, name_or_file: str | os.PathLike) -> "Recipe":
        """A built-in recipe by name (``bert-sst2``, ``gpt2-lm``, ``vit-mnist``) or a YAML/JSON file."""
        path = Path(name_or_file)
        if not path.is_file():
            builtin = {p.stem: p for p in BUILTIN_DIR.glob("*.yaml")}
            if str(name_or_file) not in builtin:
                raise RecipeError(
                    f"no recipe file {str(name_or_file)!r} and no built-in recipe of that name; built-in recipes: "
                    f"{sorted(builtin)} (or pass a .yaml/.json file)"
                )
            path = builtin[str(name_or_file)]
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # noqa: BLE001  (the parser's own message is the useful part)
            raise RecipeError(f"{path}: cannot parse it as {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
        return cls.from_dict(data, source=str(path.name))

    # ---- overriding --------------------------------------------------------------------------------------------
    def with_overrides(self, overrides: dict[str, Any]) -> "Recipe":
        """A copy with ``overrides`` applied: top-level fields, or nested ones as ``{"schedule": {"lr": ...}}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            if key not in data:
                raise RecipeError(f"cannot override unknown field `{key}`; fields: {sorted(data)}")
            if isinstance(value, dict) and isinstance(data[key], dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["quick"] = {}
        return Recipe.from_dict(data, source=f"{self.name} (overridden)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_keys(data: dict, cls, where: str) -> None:
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; accepted: {accepted}")


_NUMBER = (int, float)


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of fields, got {data!r}")
    _check_keys(data, cls, where)
    out = cls(**data)
    for f in fields(cls):
        value, default = getattr(out, f.name), getattr(cls(), f.name) if cls is not DataSpec else None
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, _NUMBER) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise RecipeError(f"{where}: `{f.name}` must be a {type(default).__name__}, got {value!r}")
    return out


def _variant(entry, source: str) -> VariantEntry:
    from ..registry import get_variant, make_params

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise RecipeError(f"{source}: each variant is a name or {{name: ..., params: {{...}}}}, got {entry!r}")
    _check_keys(entry, VariantEntry, f"{source}: variant {entry.get('name')!r}")
    spec = get_variant(entry["name"])
    make_params(spec, entry.get("params") or {})  # unknown or invalid parameters fail here, naming the accepted ones
    return VariantEntry(entry["name"], dict(entry.get("params") or {}))
