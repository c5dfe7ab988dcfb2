"""Rows for a recipe, as ``datasets.Dataset``: from a Hub dataset id, a local CSV/TSV/JSON/JSONL/parquet/text file,
the MNIST idx files, or ``shared:<path>`` in the offline data folder (``hf_reshape.data.data_dir()``).

Labels of any type (strings, 1-based integers, ...) map to class ids ``0..n-1`` in sorted order, and the map is
returned so the model's ``id2label`` records it. Missing columns and empty files are errors that name what was
found.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import replace
from pathlib import Path

from .spec import DataSpec, RecipeError

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def resolve_source(source: str) -> str:
    """A ``shared:`` source as a local path (FileNotFoundError if the offline data folder lacks it)."""
    if not source.startswith("shared:"):
        return source
    from ..data import data_dir

    root = data_dir()
    rel = source[len("shared:"):]
    if root is None or not (root / rel).exists():
        raise FileNotFoundError(
            f"{source}: the offline data folder was not found (set HF_RESHAPE_DATA to the folder that holds {rel})"
        )
    return str(root / rel)


def with_fallback(spec: DataSpec) -> tuple[DataSpec, str]:
    """``spec`` itself when its ``shared:`` files exist, else its ``hub_fallback`` (a user online); and a label
    saying which one is used."""
    try:
        for src in (spec.train, spec.eval):
            if src:
                resolve_source(src)
        return spec, spec.train + (f" (eval: {spec.eval})" if spec.eval else "")
    except FileNotFoundError as err:
        if not spec.hub_fallback:
            raise
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise FileNotFoundError(
                f"{err}; offline (HF_HUB_OFFLINE=1), so the Hub fallback {spec.hub_fallback.get('train')!r} cannot "
                "be used either"
            ) from None
        fb = replace(spec, **spec.hub_fallback, hub_fallback=None)
        return fb, fb.train + " (Hub)"


def load_source(source: str, split: str = "train"):
    """One ``datasets.Dataset`` from a source string (see the module docstring)."""
    import datasets

    path = resolve_source(source)
    p = Path(path)
    if p.is_file():
        if p.stat().st_size == 0:
            raise RecipeError(f"{source}: the file is empty")
        if p.name.endswith("-idx3-ubyte.gz") or p.name.endswith("-idx3-ubyte"):
            return _read_idx_images(p)
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise RecipeError(f"{source}: unknown file type {p.suffix!r}; accepted: {sorted(_FILE_BUILDERS)} or MNIST idx")
        kwargs = {"delimiter": "\t", "quoting": 3} if p.suffix.lower() == ".tsv" else {}
        if builder == "text":
            kwargs["sample_by"] = "document"
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
    elif p.exists():
        raise RecipeError(f"{source}: a folder; pass a data file inside it or a Hub dataset id")
    else:
        name, _, config = path.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
    if len(ds) == 0:
        raise RecipeError(f"{source}: no rows (columns found: {ds.column_names})")
    return ds


def _read_idx_images(images: Path):
    """MNIST idx files (images and the matching ``-labels-idx1-ubyte`` beside them) as a Dataset with an
    ``image`` column (uint8 ``[28, 28]`` lists) and a ``label`` column."""
    import datasets
    import numpy as np

    labels = images.with_name(images.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
    opener = gzip.open if images.suffix == ".gz" else open
    with opener(images, "rb") as f:
        _, n, rows, cols = struct.unpack(">IIII", f.read(16))
        pixels = np.frombuffer(f.read(), dtype=np.uint8).reshape(n, rows, cols)
    with opener(labels, "rb") as f:
        f.read(8)
        ys = np.frombuffer(f.read(), dtype=np.uint8)
    return datasets.Dataset.from_dict({"image": pixels, "label": ys.astype(np.int64)})


def check_columns(ds, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise RecipeError(
            f"{source}: no column(s) {missing}; columns found: {ds.column_names} (name them with --text-column / "
            "--label-column)"
        )


def label_map(*datasets_, column: str) -> tuple[dict, dict[int, str]]:
    """``value -> class id`` over the labels found in all datasets, and ``id2label``."""
    values = set()
    for ds in datasets_:
        values.update(ds.unique(column))
    values.discard(None)
    if len(values) < 2:
        raise RecipeError(f"label column {column!r} has {len(values)} distinct value(s); classification needs 2 or more")
    ordered = sorted(values, key=lambda v: (isinstance(v, str), v))
    return {v: i for i, v in enumerate(ordered)}, {i: str(v) for i, v in enumerate(ordered)}


def split_rows(ds, fraction: float, seed: int):
    """A seeded train/eval split of one file (``fraction`` of its rows held out)."""
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def text_split(text: str, fraction: float) -> tuple[str, str]:
    """First ``1 - fraction`` of the characters for training, the rest held out (nanoGPT's split)."""
    cut = int(len(text) * (1 - fraction))
    return text[:cut], text[cut:]


def read_text(source: str) -> str:
    path = resolve_source(source)
    if os.path.isfile(path):
        text = Path(path).read_text(encoding="utf-8")
    else:
        ds = load_source(source)
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        text = "\n".join(ds[column])
    if not text.strip():
        raise RecipeError(f"{source}: no text")
    return text
