"""Where the offline evaluation data lives, and small readers for it.

The data is never copied into the project: it is read from ``$HF_RESHAPE_DATA`` or from ``../shared/data``
next to the working directory or the source checkout (see that folder's README for provenance).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


def data_dir() -> Path | None:
    """``$HF_RESHAPE_DATA`` when set (any folder), else the first ``../shared/data`` (recognised by its
    ``README.md``) beside the working directory or the source checkout, else ``None``."""
    env = os.environ.get("HF_RESHAPE_DATA")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent
    for c in (Path.cwd() / ".." / "shared" / "data", here.parent.parent / "shared" / "data"):
        if (c / "README.md").is_file():
            return c.resolve()
    return None


def read_sst2(split: str = "dev", limit: int | None = None, path: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """GLUE SST-2 rows ``(sentence, label)`` from a TSV file (tab-separated, header, no quoting)."""
    if path is None:
        root = data_dir()
        if root is None:
            raise FileNotFoundError("SST-2 not found: set HF_RESHAPE_DATA to the folder holding sst2/")
        path = root / "sst2" / f"{split}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"SST-2 not found: no sst2/{split}.tsv in the data folder {root} "
                                    "(HF_RESHAPE_DATA, or ../shared/data)")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for sentence, label in reader:
            rows.append((sentence.strip(), int(label)))
            if limit is not None and len(rows) >= limit:
                break
    return rows
