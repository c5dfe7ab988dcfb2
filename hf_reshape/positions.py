"""Position extension: let a pretrained model with learned absolute positions read longer inputs, in the same call
as the reshape (``hf_reshape.reshape(model, "sliding_window", window=256, max_positions=4096)``) or alone
(:func:`hf_reshape.extend_positions`).

* **Text** (``max_positions=N``; BERT and BERT-architecture checkpoints such as MiniLM, GPT-2): the position table
  grows to ``N`` rows by copying the table the model has, row ``p`` taking row ``p mod n``: Longformer's
  initialisation (Beltagy et al. 2020, section 5: "we initialize them by copying the 512 position embeddings from
  RoBERTa multiple times"), which keeps the local structure of the trained positions across every copy. The first
  ``n`` rows are the trained rows themselves, so an input that fits the trained table gives bit-identical outputs.
  BERT's ``position_ids`` and ``token_type_ids`` buffers grow with it.
* **Vision** (``image_size=S``; ViT): the grid of patch positions is resized to the larger image by bicubic
  interpolation, the class token's position kept: the computation transformers' ``ViTEmbeddings.
  interpolate_pos_encoding`` does at every forward (after DINO, Caron et al. 2021), done once and saved with the
  model. The extended model on an ``S x S`` image gives bit-identical outputs to the model before extension run
  with ``interpolate_pos_encoding=True`` on that image.

The model's config records the new size (``max_position_embeddings`` / ``n_positions`` / ``image_size``), so
``save_pretrained`` writes a config.json whose shapes match the saved table and any loader (transformers',
:func:`hf_reshape.from_pretrained`, the Hub) builds the right shapes before it reads the weights. A reshaped
model's ``config.hf_reshape`` record also says what was extended (``"positions"``: the keyword, the trained size,
the extended size, the initialisation); :func:`hf_reshape.from_pretrained` refuses a config.json whose size
disagrees with its record (a hand edit: the weights hold one of them).

An extension is planned (checked, new tensors built) before anything changes, and applied with an undo, so a
refused call changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODEL_CONFIG_KEY
from .errors import InvalidParameterError, UnsupportedModelError

RECORD_KEY = "positions"  # entry of the `hf_reshape` record in a reshaped model's config.json
PROVENANCE_ATTR = "_hf_reshape_positions"  # the same record on a model extended before (or without) a reshape


@dataclass(frozen=True)
class PositionTable:
    """How one architecture stores its learned absolute positions."""

    keyword: str  # the argument that extends it: "max_positions" or "image_size"
    config_field: str  # the config attribute holding the size
    init: str  # how new positions are initialised
    plan: Callable[[nn.Module, Any], list]  # (model, new size) -> [(owner, attribute, new value), ...]


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _copied_rows(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """``rows`` rows, row ``p`` a copy of ``weight[p mod n]`` (Longformer's initialisation)."""
    with torch.no_grad():
        index = torch.arange(rows, device=weight.device) % weight.shape[0]
        grown = weight.detach()[index].clone()
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


def _embedding_changes(embedding: nn.Embedding, rows: int) -> list:
    return [(embedding, "weight", _copied_rows(embedding.weight, rows)), (embedding, "num_embeddings", rows)]


def _bert_plan(model: nn.Module, rows: int) -> list:
    emb = _base(model).embeddings
    changes = _embedding_changes(emb.position_embeddings, rows)
    old = emb.position_ids.shape[-1]
    # the buffers the embeddings slice for default position and token type ids (BertEmbeddings.forward)
    position_ids = torch.arange(rows, dtype=emb.position_ids.dtype, device=emb.position_ids.device).expand((1, -1))
    changes.append((emb, "position_ids", position_ids))
    if isinstance(getattr(emb, "token_type_ids", None), torch.Tensor):
        types = emb.token_type_ids
        tail = types.new_zeros(*types.shape[:-1], rows - old)
        changes.append((emb, "token_type_ids", torch.cat([types, tail], dim=-1)))
    return changes


def _gpt2_plan(model: nn.Module, rows: int) -> list:
    return _embedding_changes(_base(model).wpe, rows)


def _vit_grid(positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Class position plus the patch grid resized to ``height x width`` patches: the same operations, in the same
    order, as transformers' ``ViTEmbeddings.interpolate_pos_encoding`` (bicubic, ``align_corners=False``)."""
    class_pos, patch_pos = positions[:, :1], positions[:, 1:]
    dim = positions.shape[-1]
    side = int(math.isqrt(patch_pos.shape[1]))
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos, patch_pos), dim=1)


def _vit_plan(model: nn.Module, size: int) -> list:
    emb = _base(model).embeddings
    patches = emb.patch_embeddings
    ph, pw = patches.patch_size
    old = emb.position_embeddings
    with torch.no_grad():
        grown = _vit_grid(old.detach(), size // ph, size // pw).clone()
    return [
        (emb, "position_embeddings", nn.Parameter(grown, requires_grad=old.requires_grad)),
        (patches, "image_size", (size, size)),
        (patches, "num_patches", (size // ph) * (size // pw)),
        (emb, "image_size", (size, size)),
    ]


TABLES: dict[str, PositionTable] = {
    "bert": PositionTable("max_positions", "max_position_embeddings", "copy", _bert_plan),
    "gpt2": PositionTable("max_positions", "n_positions", "copy", _gpt2_plan),
    "vit": PositionTable("image_size", "image_size", "bicubic", _vit_plan),
}
KEYWORDS = ("max_positions", "image_size")


@dataclass
class Extension:
    """A planned extension: the new tensors and values, built and checked, not yet in the model."""

    table: PositionTable
    old: int
    new: int
    positions: int  # tokens the extended model reads (ViT: patches + the class token)
    changes: list = field(default_factory=list)

    def apply(self, model: nn.Module) -> Callable[[], None]:
        """Put the new tensors and sizes in ``model`` (and its config: call on a model that owns its config).
        Returns the undo."""
        done: list[tuple[Any, str, Any]] = []

        def undo() -> None:
            for owner, name, value in reversed(done):
                if value is _ABSENT:
                    owner.__dict__.pop(name, None)
                else:
                    setattr(owner, name, value)

        try:
            previous = provenance(model)
            for owner, name, value in [*self.changes, (model.config, self.table.config_field, self.new)]:
                done.append((owner, name, getattr(owner, name)))
                setattr(owner, name, value)
            done.append((model, PROVENANCE_ATTR, model.__dict__.get(PROVENANCE_ATTR, _ABSENT)))
            model.__dict__[PROVENANCE_ATTR] = self.record(previous)
        except BaseException:
            undo()
            raise
        return undo

    def record(self, previous: dict | None) -> dict:
        trained = previous["trained"] if previous and previous.get("keyword") == self.table.keyword else self.old
        return {"keyword": self.table.keyword, "trained": trained, "extended": self.new, "init": self.table.init}


_ABSENT = object()


def current_size(model: nn.Module, table: PositionTable) -> int:
    """The size the model reads now: rows of its table, or the side of its (square) image."""
    if table.keyword == "image_size":
        height, width = _base(model).embeddings.patch_embeddings.image_size
        if height != width:
            raise UnsupportedModelError(
                f"{type(model).__name__} reads {height}x{width} images: image_size= extends square images only"
            )
        return int(height)
    return int(getattr(model.config, table.config_field))


def plan_extension(model: nn.Module, *, max_positions=None, image_size=None) -> Extension | None:
    """Check the request against the model and build the new tensors; ``None`` when there is nothing to do (no
    keyword given, or the size the model already has). Changes nothing.

    Raises:
        `UnsupportedModelError`: the model has no learned absolute positions hf_reshape can extend.
        `InvalidParameterError`: the keyword of the other modality (`image_size=` on a text model,
            `max_positions=` on ViT), a value that is not an integer, or a size smaller than the model's.
    """
    if max_positions is None and image_size is None:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = TABLES.get(model_type)
    if table is None:
        by = {kw: [k for k, t in TABLES.items() if t.keyword == kw] for kw in KEYWORDS}
        raise UnsupportedModelError(
            f"cannot extend the positions of {type(model).__name__} (model_type={model_type!r}): supported model "
            f"types {sorted(TABLES)} (max_positions= for {by['max_positions']}, image_size= for {by['image_size']})"
        )
    given = {"max_positions": max_positions, "image_size": image_size}
    wrong = [k for k in KEYWORDS if k != table.keyword and given[k] is not None]
    if wrong:
        raise InvalidParameterError(
            f"{type(model).__name__} ({model_type}) takes `{table.keyword}=` to read longer inputs, not `{wrong[0]}=`"
        )
    value = given[table.keyword]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "the side of the square images" if table.keyword == "image_size" else "the number of positions"
        raise InvalidParameterError(f"`{table.keyword}` must be an integer >= 1 ({what} to read), got {value!r}")
    old = current_size(model, table)
    if value < old:
        raise InvalidParameterError(
            f"`{table.keyword}={value}` is smaller than the {old} {type(model).__name__} already reads: extension "
            f"only grows the positions (give {table.keyword} >= {old})"
        )
    if value == old:
        return None
    if table.keyword == "image_size":
        patch = _base(model).embeddings.patch_embeddings.patch_size
        positions = (value // patch[0]) * (value // patch[1]) + 1
        grid = _base(model).embeddings.position_embeddings.shape[1] - 1
        if math.isqrt(grid) ** 2 != grid:
            raise UnsupportedModelError(f"{type(model).__name__}'s {grid} patch positions are not a square grid")
    else:
        positions = value
    return Extension(table, old, value, positions, table.plan(model, value))


def provenance(model: nn.Module) -> dict | None:
    """What was extended on this model: set by an extension, else read from its config's ``hf_reshape`` record
    (a reloaded model). None if nothing was."""
    record = model.__dict__.get(PROVENANCE_ATTR)
    if record is None:
        saved = getattr(getattr(model, "config", None), MODEL_CONFIG_KEY, None)
        record = saved.get(RECORD_KEY) if isinstance(saved, dict) else None
    return record


def check_record(config, record: dict, where: str) -> None:
    """Refuse, before any weight is read, a saved ``positions`` record that is malformed or that disagrees with the
    config's size (config.json or the record was edited by hand: the saved table has one of the two sizes)."""
    entry = record.get(RECORD_KEY) if isinstance(record, dict) else None
    if entry is None:
        return
    table = TABLES.get(getattr(config, "model_type", None))
    sizes = [entry.get(k) for k in ("trained", "extended")] if isinstance(entry, dict) else [None]
    ok = (isinstance(entry, dict) and table is not None and entry.get("keyword") == table.keyword
          and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes))
    if not ok:
        raise InvalidParameterError(
            f"{where}: the `hf_reshape` record's {RECORD_KEY!r} entry is malformed ({entry!r}); a saved one reads like "
            "{'keyword': 'max_positions', 'trained': 512, 'extended': 4096, 'init': 'copy'}"
        )
    size = getattr(config, table.config_field, None)
    if size != entry["extended"]:
        raise InvalidParameterError(
            f"{where}: config.json says {table.config_field}={size!r}, but its `hf_reshape` record says the positions "
            f"were extended to {entry['extended']} ({table.keyword}): one of the two was edited; the saved weights "
            f"hold the size the model was saved with. Set {table.config_field} in config.json to that size."
        )
