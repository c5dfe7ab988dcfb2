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
from dataclasses import dataclass, replace
from pathlib import Path

from .spec import DataSpec, RecipeError

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


PACKED = "packed:"  # a source of sentences packed into long documents (see PackSpec)


def resolve_source(source: str) -> str:
    """A ``shared:`` source as a local path (FileNotFoundError if the offline data folder lacks it); a ``packed:``
    source resolves to its sentences' source."""
    if source.startswith(PACKED):
        source = source[len(PACKED):]
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


# ---- long documents packed from short labelled sentences -----------------------------------------------------------
FILLERS = ("any", "same_label")


@dataclass(frozen=True)
class PackSpec:
    """How ``packed:<source>`` builds long documents from a file of short labelled sentences (SST-2): each document
    is sentences drawn at random from the split's rows, joined with spaces until it holds about ``doc_tokens``
    tokens, with one of them (at a random place) wrapped in ``marker``; the document's label is the label of that
    marked sentence, so a model must find it wherever it is. Deterministic from the recipe's seed; evaluation
    documents are built from the evaluation rows only (their marked sentences and their filler). Written in a
    recipe as ``data: {train: packed:shared:sst2/train.tsv, eval: packed:shared:sst2/dev.tsv, pack: {...}}``;
    a plain long-text file (``--dataset docs.csv``, ``text``/``label`` columns) needs no packing."""

    doc_tokens: int = 2048  # tokens per evaluation document (special tokens included)
    train_doc_tokens: int | None = None  # tokens per training document (None: doc_tokens)
    train_docs: int = 256
    eval_docs: int = 128
    marker: str = "@@"
    # "any": filler sentences of either label, so only the marked sentence tells the label (a retrieval task);
    # "same_label": every sentence of a document shares the marked one's label (a long review of one sentiment)
    filler: str = "any"

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "data: pack") -> "PackSpec":
        from dataclasses import fields as _fields

        data = dict(data or {})
        accepted = [f.name for f in _fields(cls)]
        unknown = sorted(set(data) - set(accepted))
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {unknown}; accepted: {accepted}")
        spec = cls(**data)
        for name in ("doc_tokens", "train_docs", "eval_docs", "train_doc_tokens"):
            value = getattr(spec, name)
            if name == "train_doc_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (16 if "tokens" in name else 1):
                low = 16 if "tokens" in name else 1
                raise RecipeError(f"{where}: `{name}` must be an integer >= {low}, got {value!r}")
        if spec.filler not in FILLERS:
            raise RecipeError(f"{where}: `filler` must be one of {list(FILLERS)}, got {spec.filler!r}")
        if not isinstance(spec.marker, str) or not spec.marker.strip():
            raise RecipeError(f"{where}: `marker` must be a non-empty string, got {spec.marker!r}")
        return spec


def pack_documents(sentences: list[str], labels: list, lengths: list[int], *, n_docs: int, doc_tokens: int,
                   marker: str, marker_tokens: int, seed: int, special_tokens: int = 2,
                   filler: str = "any") -> dict[str, list]:
    """``n_docs`` documents (``{"text": [...], "label": [...], "marked_token": [...], "tokens": [...]}``): each
    holds sentences drawn with a seeded ``random.Random`` until one more would pass ``doc_tokens`` (``lengths``
    are the sentences' token counts without special tokens; ``special_tokens`` are added once per document), one
    of them wrapped in ``marker`` at a random place. The marked sentences are distinct while the rows last.
    ``marked_token``: where the marked sentence starts, in tokens after the first special token. ``filler="same_label"``
    draws the other sentences only among those with the marked sentence's label."""
    import random

    if len(sentences) < 2:
        raise RecipeError(f"packing documents needs at least 2 sentences, got {len(sentences)}")
    rng = random.Random(seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    budget = doc_tokens - special_tokens
    out: dict[str, list] = {"text": [], "label": [], "marked_token": [], "tokens": []}
    for d in range(n_docs):
        target = order[d % len(order)]
        if lengths[target] + 2 * marker_tokens > budget:
            raise RecipeError(f"a sentence of {lengths[target]} tokens does not fit a document of {doc_tokens} tokens")
        used = lengths[target] + 2 * marker_tokens
        chosen = []
        while True:
            j = rng.randrange(len(sentences))
            if j == target or (filler == "same_label" and labels[j] != labels[target]):
                continue
            if used + lengths[j] > budget:
                break
            chosen.append(j)
            used += lengths[j]
        place = rng.randint(0, len(chosen))
        parts = [sentences[j] for j in chosen[:place]]
        start = sum(lengths[j] for j in chosen[:place])
        parts.append(f"{marker} {sentences[target]} {marker}")
        parts += [sentences[j] for j in chosen[place:]]
        out["text"].append(" ".join(parts))
        out["label"].append(labels[target])
        out["marked_token"].append(start)
        out["tokens"].append(used + special_tokens)
    return out
