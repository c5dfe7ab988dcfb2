"""Attention transfer: train only a reshaped model's new attention parameters to reproduce the softmax attention
it replaced, layer by layer, before any fine-tuning.

The teacher is the model's own exact attention on the same queries, keys and values (the default, ``teacher=None``:
the model's projections are frozen during transfer, so the softmax model *is* the frozen teacher), or a separate
teacher model of the same architecture. Through the observer seam (:mod:`hf_reshape.observe`) each reshaped layer's
output is compared with the teacher's, and the teacher's output is what the model continues with, so every layer
learns on the teacher's hidden states, not on the drift of the layers below it.

Losses, per reshaped layer, averaged over layers:

* output matching: ``||o_student - o_teacher||^2 / ||o_teacher||^2`` (a relative MSE, so layers of different
  scale weigh alike), as LoLCATs' attention transfer (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of
  Large Language Models") matches attention outputs;
* distribution matching, where the variant exposes attention weights over the same keys as softmax
  (``VariantSpec.weights``): the soft cross-entropy ``-sum_j p_teacher log p_student`` minus the teacher's entropy,
  i.e. ``KL(p_teacher || p_student)``, as in Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine").

Only parameters that the variant registered on each layer train (Linformer's projections, learned feature maps);
a variant without any is refused with a message that says so (:class:`NothingToTransferError`). Training goes
through :class:`transformers.Trainer`, so the same call runs in several processes under ``torchrun`` / ``accelerate``.

```python
>>> report = hf_reshape.transfer(model, train_dataset, steps=200, lr=1e-3)   # a reshaped model, tokenized rows
>>> report["final_loss"] < report["initial_loss"]
True
```
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import torch
from torch import nn

from . import observe
from .errors import ReshapeError
from .integration import STATE_ATTR, ReshapedAttention, exact_attention
from .registry import get_variant

__all__ = ["AttentionTransferLoss", "NothingToTransferError", "attention_parameters", "transfer"]


class NothingToTransferError(ReshapeError):
    """The model's variant has no parameters of its own, so attention transfer has nothing to train."""


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that reshaped attention layers registered (``...hf_reshape.<name>``), by qualified name."""
    marker = f".{STATE_ATTR}."
    return {n: p for n, p in model.named_parameters() if marker in f".{n}"}


def _holders(model: nn.Module) -> list[ReshapedAttention]:
    return [m for m in model.modules() if isinstance(m, ReshapedAttention)]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP wrapper (Trainer wraps it when several processes train)."""
    return getattr(model, "module", model)


class AttentionTransferLoss:
    """An observer (see :mod:`hf_reshape.observe`) that accumulates the transfer loss of one forward pass and
    hands the teacher's attention output back to the model.

    Args:
        kl_weight: weight of the attention-distribution term where the variant has weights (0 turns it off).
        teacher_outputs: per-call teacher outputs recorded from a separate teacher model, in call order; None
            computes the teacher as exact softmax on the student's own queries, keys and values.
    """

    def __init__(self, kl_weight: float = 1.0, teacher_outputs: list[torch.Tensor] | None = None):
        self.kl_weight = kl_weight
        self.teacher_outputs = teacher_outputs
        self.mse_terms: list[torch.Tensor] = []
        self.kl_terms: list[torch.Tensor] = []
        self._calls = 0

    def __call__(self, call: observe.AttentionCall) -> torch.Tensor | None:
        if self.teacher_outputs is not None:
            teacher = self.teacher_outputs[self._calls].to(call.output.dtype)
        else:
            with torch.no_grad():
                teacher = exact_attention(
                    call.query, call.key, call.value, call.mask, call.causal, call.scaling
                )
        self._calls += 1
        if call.holder is None:  # an exact layer (left out of the reshape): nothing to learn, keep its output
            return None
        out, ref = call.output.float(), teacher.float()
        self.mse_terms.append((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))
        if self.kl_weight:
            kl = self._kl(call)
            if kl is not None:
                self.kl_terms.append(kl)
        return teacher

    def _kl(self, call: observe.AttentionCall) -> torch.Tensor | None:
        spec = get_variant(call.holder.method)
        weights_fn = spec.weights
        if weights_fn is None or not spec.weights_over_keys:
            return None  # no weights, or weights over other positions (Linformer's projected keys): outputs only
        state = {name: getattr(call.holder, name) for name in call.holder.state_names}
        student = weights_fn(
            call.query, call.key, call.value, mask=call.mask, causal=call.causal, scaling=call.scaling,
            params=call.holder.params, **state,
        )
        with torch.no_grad():
            teacher = _softmax_weights(call)
        log_s = student.float().clamp_min(1e-12).log()
        log_t = teacher.clamp_min(1e-12).log()
        rows = teacher.sum(-1).gt(0)  # fully padded rows carry no distribution
        kl = (teacher * (log_t - log_s)).sum(-1)
        return kl[rows].mean() if rows.any() else kl.sum() * 0.0

    @property
    def loss(self) -> torch.Tensor:
        if not self.mse_terms:
            raise NothingToTransferError("no reshaped attention layer ran during the forward pass")
        loss = torch.stack(self.mse_terms).mean()
        if self.kl_terms:
            loss = loss + self.kl_weight * torch.stack(self.kl_terms).mean()
        return loss


def _softmax_weights(call: observe.AttentionCall) -> torch.Tensor:
    from .ops.common import allowed_mask, masked_softmax

    q, k = call.query.float(), call.key.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scaling
    allowed = allowed_mask(call.mask, q.shape[-2], k.shape[-2], call.causal, q.device)
    return masked_softmax(scores, allowed)


def _record_teacher(teacher: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """Each attention call's exact output in ``teacher`` (run through hf_reshape's dispatch for the seam)."""
    from .integration import ATTN_IMPLEMENTATION

    recorded: list[torch.Tensor] = []

    def record(call):
        recorded.append(call.output.detach())

    before = teacher.config._attn_implementation
    if before != ATTN_IMPLEMENTATION:
        teacher.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        with torch.no_grad(), observe.observe(record):
            teacher(**inputs)
    finally:
        if before != ATTN_IMPLEMENTATION:
            teacher.set_attn_implementation(before)
    return recorded


def _transfer_trainer_class():
    from transformers import Trainer

    class AttentionTransferTrainer(Trainer):
        """``Trainer`` whose loss is the attention-transfer loss (labels are ignored)."""

        def __init__(self, *args, teacher=None, kl_weight=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.kl_weight = kl_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
            recorded = None
            if self.teacher is not None:
                self.teacher.to(next(model.parameters()).device).eval()
                recorded = _record_teacher(self.teacher, inputs)
            collector = AttentionTransferLoss(self.kl_weight, recorded)
            with observe.observe(collector):
                outputs = model(**inputs)
            loss = collector.loss
            return (loss, outputs) if return_outputs else loss

    return AttentionTransferTrainer


def labelled_progress(label: str):
    """A Trainer progress callback whose bar says what is training and shows the loss (no printed log dicts)."""
    from transformers.trainer_callback import ProgressCallback

    class LabelledProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if getattr(self, "training_bar", None) is not None:
                self.training_bar.set_description(label)

        def on_log(self, args, state, control, logs=None, **kwargs):
            bar = getattr(self, "training_bar", None)
            if bar is not None and logs and "loss" in logs:
                bar.set_postfix(loss=f"{float(logs['loss']):.4g}")

    return LabelledProgress()


def _quiet_progress(trainer, label: str | None) -> None:
    """Replace Trainer's bar (or its printed log lines) by :func:`labelled_progress`, or by nothing."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
    if label is not None and not any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(labelled_progress(label))


def transfer(
    model: nn.Module,
    train_dataset,
    *,
    teacher: nn.Module | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    data_collator=None,
    kl_weight: float = 1.0,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    callbacks: list | None = None,
    progress: str | None = "attention transfer",
    **training_args: Any,
) -> dict[str, Any]:
    """Attention transfer on a reshaped model, in place: only the variant's own parameters train.

    Args:
        model: a model reshaped with :func:`hf_reshape.reshape` whose variant registers parameters.
        train_dataset: rows the model takes as keyword arguments (e.g. a tokenized ``datasets.Dataset`` with
            ``input_ids``/``attention_mask``, or ``pixel_values``); labels are ignored.
        teacher: a softmax model of the same architecture; ``None`` uses the model's own exact attention on the
            same queries/keys/values (its projections are frozen here, so that *is* the softmax model).
        steps, lr, batch_size: optimisation schedule (AdamW, linear decay after a 10% warm-up).
        data_collator: batches rows (default: transformers' ``default_data_collator``; pass a padding collator for
            rows of different lengths).
        kl_weight: weight of the attention-distribution KL where the variant exposes weights over the same keys.
        output_dir: Trainer's folder (checkpoints are not saved); a temporary folder by default.
        progress: the progress bar's label (the loss shows on the bar); None for no bar and no log lines.
        **training_args: more `transformers.TrainingArguments` fields.

    Returns:
        A report: ``steps``, ``trainable_params``, ``initial_loss``, ``final_loss`` (mean over the first/last 10%
        of logged steps), ``losses`` and ``world_size``.

    Raises:
        `NothingToTransferError` when the variant has no parameters of its own (elu/relu linear, top-k, window):
        fine-tune those instead.
    """
    from transformers import TrainingArguments, default_data_collator

    from .reshape import get_reshape_config

    cfg = get_reshape_config(model)
    params = attention_parameters(model)
    if cfg is None:
        raise NothingToTransferError("the model is not reshaped: call hf_reshape.reshape(model, ...) first")
    if not params:
        what = (f"variant {cfg.method!r} has" if not cfg.is_hybrid
                else f"none of the hybrid's variants {[p.method for p in cfg.parts]} has")
        raise NothingToTransferError(
            f"{what} no parameters of its own: attention transfer has nothing to train (fine-tune the model instead)"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory()
        output_dir = tmp.name
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.0, save_strategy="no",
        logging_steps=1, report_to="none", seed=seed, data_seed=seed, remove_unused_columns=False,
        disable_tqdm=progress is None, **{"dataloader_pin_memory": torch.cuda.is_available(), **training_args},
    )
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        trainer = _transfer_trainer_class()(
            model=model, args=args, train_dataset=train_dataset, data_collator=data_collator or default_data_collator,
            teacher=teacher, kl_weight=kl_weight, callbacks=callbacks,
        )
        _quiet_progress(trainer, progress)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        model.train(was_training)
        if tmp is not None:
            tmp.cleanup()
    k = max(1, math.ceil(len(losses) / 10))
    return {
        "steps": steps,
        "trainable_params": int(sum(p.numel() for p in params.values())),
        "initial_loss": float(sum(losses[:k]) / k) if losses else None,
        "final_loss": float(sum(losses[-k:]) / k) if losses else None,
        "losses": losses,
        "world_size": int(args.world_size),
    }
