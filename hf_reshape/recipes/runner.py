"""The recipe runner: softmax baseline, then every variant through the same stages and the same schedule.

For each run folder ``DIR``:

1. (``model: local:<name>`` only) train the small model here with softmax attention: ``DIR/pretrained/``.
2. Baseline: fine-tune the model with softmax attention on the recipe's schedule: ``DIR/baseline/model``.
3. Per variant, per stage, score the model, time it at the task's length and at a long length, and measure its
   peak memory at the long length. The stages:

   * ``none``: the softmax task model (the baseline) with its attention swapped, no training;
   * ``transfer``: the same, then attention transfer (the baseline, frozen, is the teacher);
   * ``finetune``: the model the baseline started from, attention swapped, then the baseline's own schedule
     (the whole model, or LoRA adapters with ``lora``), so it differs from the baseline by the attention only;
   * ``transfer+finetune``: as ``finetune``, with attention transfer (teacher: that same softmax model) before
     fine-tuning, as LoLCATs does.
4. ``results.json``, ``results.md``, ``pareto.png`` and one model folder per converted variant with its card.

Every finished row is written to ``DIR/rows/`` as it lands, so a run that is stopped and started again skips
what it finished; an interrupted fine-tune resumes from its last Trainer checkpoint. Training goes through
``transformers.Trainer``, so the same run works in several processes (``torchrun``, ``accelerate launch``): all
processes train, the main process measures and writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .spec import Recipe, RecipeError
from .tasks import Task, TaskData, make_task, resolve_model

RESULTS_VERSION = 1


# ---- distributed helpers ------------------------------------------------------------------------------------------
def _state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _log(msg: str) -> None:
    if _state().is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"[hf-reshape recipe] {msg}")


# ---- measurement --------------------------------------------------------------------------------------------------
def peak_memory_mib(fn) -> float | None:
    """Peak resident memory above the current level while ``fn`` runs (Linux: VmHWM reset through
    ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``), in MiB; None where it cannot be measured.
    The benchmark's ``PeakMemory`` is stricter (it changes glibc's mmap threshold for the whole process); a
    recipe keeps training afterwards, so it does not."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError, TypeError):
        return None
    from ..bench.timing import _status_kib

    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) / 1024


def latency_ms(model, inputs: dict, repeats: int) -> float:
    """Median wall time of a no-grad forward, after one warm-up call."""
    model.eval()
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def added_parameters(model) -> int:
    from ..integration import STATE_ATTR

    marker = f".{STATE_ATTR}."
    return int(sum(t.numel() for n, t in model.state_dict().items() if marker in f".{n}"))


# ---- training -----------------------------------------------------------------------------------------------------
def _Labelled(label: str):  # noqa: N802  (reads as a class at the call sites)
    from ..attention_transfer import labelled_progress

    return labelled_progress(label)


def _training_args(out: Path, schedule, *, steps=None, lr=None, batch_size=None, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), learning_rate=lr or schedule.lr, per_device_train_batch_size=batch_size or schedule.batch_size,
        per_device_eval_batch_size=schedule.batch_size, num_train_epochs=schedule.epochs,
        max_steps=steps if steps is not None else schedule.max_steps, weight_decay=schedule.weight_decay,
        lr_scheduler_type="linear", logging_steps=10, save_strategy="steps", save_steps=schedule.save_steps,
        save_total_limit=1, report_to="none", seed=schedule.seed, data_seed=schedule.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False, remove_unused_columns=False, **extra,
    )


def _warmup(args, n_train: int, ratio: float) -> None:
    world = max(1, args.world_size)
    per_epoch = math.ceil(n_train / (args.per_device_train_batch_size * world))
    total = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    args.warmup_steps = int(total * ratio)


def _remove_callbacks(trainer):
    from ..attention_transfer import _quiet_progress

    _quiet_progress(trainer, None)


def train(task: Task, model, data: TaskData, out: Path, label: str, *, steps=None, lr=None):
    """Fine-tune ``model`` on the task's training rows with the recipe's schedule (LoRA adapters through PEFT when
    the schedule says ``lora``); resumes from a checkpoint in ``out``. Returns ``(model, train samples/s)``."""
    from transformers import Trainer

    schedule = task.schedule
    if schedule.lora:
        model = _with_lora(model, schedule)
    args = _training_args(out, schedule, steps=steps, lr=lr)
    _warmup(args, len(data.train), schedule.warmup_ratio)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator)
    _remove_callbacks(trainer)
    trainer.add_callback(_Labelled(label))
    resume = any(out.glob("checkpoint-*")) if out.is_dir() else False
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    if schedule.lora:
        model = model.merge_and_unload()
    shutil.rmtree(out, ignore_errors=True) if _state().is_main_process else None
    return model, float(result.metrics.get("train_samples_per_second", float("nan")))


def _with_lora(model, schedule):
    from peft import LoraConfig, get_peft_model

    from ..integration import STATE_ATTR

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in ("query", "key", "value", "c_attn", "q_proj", "k_proj", "v_proj") if t in names]
    heads = [t for t in ("classifier", "score") if t in names]
    peft_model = get_peft_model(model, LoraConfig(r=schedule.lora_r, lora_alpha=2 * schedule.lora_r,
                                                  target_modules=targets, modules_to_save=heads or None))
    for n, p in peft_model.named_parameters():
        if f".{STATE_ATTR}." in n:
            p.requires_grad_(True)  # the variant's own parameters train beside the adapters
    return peft_model


def evaluate(task: Task, model, data: TaskData, out: Path) -> dict[str, float]:
    """The task metric on the eval rows (and on each extra eval set), through ``Trainer.evaluate``."""
    from transformers import Trainer

    args = _training_args(out, task.schedule)
    trainer = Trainer(model=model, args=args, data_collator=data.collator, compute_metrics=task.compute_metrics)
    _remove_callbacks(trainer)
    scores = {"metric": task.metric(trainer.evaluate(data.eval))}
    for name, ds in data.extra_eval.items():
        scores[name] = task.metric(trainer.evaluate(ds))
    shutil.rmtree(out, ignore_errors=True) if _state().is_main_process else None
    return scores


# ---- the run ------------------------------------------------------------------------------------------------------
def _variants(recipe: Recipe, model, only: list[str] | None) -> list[tuple[str, str, dict]]:
    """``(label, variant name, params)`` to run: the recipe's list (default: every registered variant that fits the
    model's form), limited to ``only`` (names or labels). A name listed twice is labelled with its parameters."""
    from ..registry import get_variant, list_variants

    causal = recipe.task == "causal-lm"
    if recipe.variants is not None:
        chosen = [(v.name, v.params) for v in recipe.variants]
    else:
        chosen = [(n, {}) for n in list_variants()]
    counts = {n: sum(1 for m, _ in chosen if m == n) for n, _ in chosen}
    labelled = [(n if counts[n] == 1 else "_".join([n, *(str(v) for v in p.values())]), n, p) for n, p in chosen]
    if only:
        unknown = [o for o in only if o not in list_variants() and o not in {lab for lab, _, _ in labelled}]
        if unknown:
            raise RecipeError(f"unknown variant(s) {unknown}; registered: {list_variants()}, in this recipe: "
                              f"{[lab for lab, _, _ in labelled]}")
        picked = [t for t in labelled if t[0] in only or t[1] in only]
        picked += [(o, o, {}) for o in only if o in list_variants() and not any(t[1] == o for t in labelled)]
        labelled = picked
    fits = [t for t in labelled if (get_variant(t[1]).causal if causal else get_variant(t[1]).bidirectional)]
    refused = sorted({t[0] for t in labelled} - {t[0] for t in fits})
    if refused:
        form = "causal" if causal else "bidirectional"
        _log(f"skipping {refused}: the model runs {form} attention, which they do not support")
    return fits


def _row_path(out: Path, variant: str, stage: str) -> Path:
    return out / "rows" / f"{variant}__{stage.replace('+', '_')}.json"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("hf-reshape", "torch", "transformers", "accelerate", "datasets", "peft", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    variants: list[str] | None = None,
    command: str | None = None,
    cards: bool = True,
) -> dict[str, Any]:
    """Run ``recipe`` into the folder ``out`` (see the module docstring); returns the results (also in
    ``out/results.json``). ``variants`` limits the run to these names (default: the recipe's list, or every
    registered variant that fits the model's form)."""
    import hf_reshape
    from transformers import set_seed

    from ..attention_transfer import NothingToTransferError, transfer
    from . import report

    import datasets

    datasets.disable_progress_bars()  # row mapping is quick; the bars that matter name the variant and stage
    state = _state()
    out = Path(out)
    main = state.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "recipe.json", recipe.to_dict())
    state.wait_for_everyone()
    task = make_task(recipe)
    schedule = recipe.schedule
    set_seed(schedule.seed)
    work = out / "work"
    data = task.prepare(out)
    started = time.time()

    # 1. the softmax model (pretrained here when no checkpoint can be had)
    model_label = task.model_label()
    if task.needs_pretraining():
        source = out / "pretrained"
        model_label = f"{recipe.model[len('local:'):]}: {recipe.description or 'trained here'}"
        if not (source / "config.json").is_file():
            _log(f"pretraining {model_label} with softmax attention ({recipe.pretrain.steps} steps)")
            model = task.pretrain_model(data)
            pre = recipe.pretrain
            model, _ = train(task, model, data, work / "pretrain", "pretrain softmax", steps=pre.steps, lr=pre.lr)
            if main:
                model.save_pretrained(str(source))
                if data.processor is not None:
                    data.processor.save_pretrained(str(source))
            state.wait_for_everyone()
        source = str(source)
    else:
        source = resolve_model(recipe.model)[0]

    # 2. the softmax baseline, fine-tuned on the schedule
    base_dir = out / "baseline" / "model"
    base_row_path = _row_path(out, "softmax", "finetune")
    if not base_row_path.is_file():
        set_seed(schedule.seed)
        model = task.load_model(source, data)
        t0 = time.time()
        model, sps = train(task, model, data, work / "baseline", "softmax / finetune")
        row = _measure(task, model, data, out, "softmax", {}, "finetune", sps, None)
        row["label"] = "softmax"
        row["wall_s"] = round(time.time() - t0, 1)
        if main:
            model.save_pretrained(str(base_dir))
            if data.processor is not None:
                data.processor.save_pretrained(str(base_dir))
            _write_json(base_row_path, row)
        state.wait_for_everyone()
    baseline = json.loads(base_row_path.read_text())

    # 3. variants x stages
    probe = task.load_model(str(base_dir), data)
    chosen = _variants(recipe, probe, variants)
    del probe
    skipped = []
    for label, name, params in chosen:
        for stage in recipe.stages:
            path = _row_path(out, label, stage)
            if path.is_file():
                continue
            set_seed(schedule.seed)
            t0 = time.time()
            needs_transfer = "transfer" in stage
            # no fine-tuning: convert the softmax task model; fine-tuning: convert the model the baseline started
            # from and give it the baseline's schedule, so the two rows differ by the attention only
            model = task.load_model(source if "finetune" in stage else str(base_dir), data)
            hf_reshape.reshape(model, name, **params)
            sps, transfer_report = None, None
            if needs_transfer:
                try:
                    transfer_report = transfer(
                        model, _without_labels(data.train), steps=schedule.transfer_steps, lr=schedule.transfer_lr,
                        batch_size=schedule.transfer_batch_size, data_collator=data.collator, seed=schedule.seed,
                        output_dir=str(work / label / "transfer"), progress=f"{label} / transfer",
                    )
                except NothingToTransferError as err:
                    reason = f"{label}: {stage} skipped: {err}"
                    _log(reason)
                    skipped.append({"variant": name, "label": label, "stage": stage, "reason": str(err)})
                    if main:
                        _write_json(path, {"variant": name, "label": label, "stage": stage, "reason": str(err),
                                           "skipped": True})
                    continue
            if "finetune" in stage:
                model, sps = train(task, model, data, work / label / stage, f"{label} / {stage}")
            row = _measure(task, model, data, out, name, params, stage, sps, transfer_report)
            row["label"] = label
            row["wall_s"] = round(time.time() - t0, 1)
            row["retained"] = _retained(task, row["metric"]["value"], baseline["metric"]["value"])
            if main:
                if stage in ("finetune", "transfer+finetune"):
                    model.save_pretrained(str(out / "models" / f"{label}-{stage.replace('+', '-')}"))
                    if data.processor is not None:
                        data.processor.save_pretrained(str(out / "models" / f"{label}-{stage.replace('+', '-')}"))
                _write_json(path, row)
            state.wait_for_everyone()
            _log(f"{label} / {stage}: {row['metric']['name']} {row['metric']['value']:.4f} "
                 f"(retained {row['retained']:.3f}) in {row['wall_s']:.0f} s")

    # 4. speed and memory, side by side (also what a finished run redoes when started again)
    speed = speed_pass(task, data, base_dir, chosen, schedule.latency_repeats) if main else {}

    # 5. results
    results = {
        "results_version": RESULTS_VERSION,
        "recipe": recipe.name,
        "model": model_label,
        "model_source": recipe.model,
        "dataset": data.dataset_label,
        "data_notes": data.info,
        "metric": task_metric_name(task),
        "higher_is_better": task.metric_higher_is_better,
        "schedule": recipe.to_dict()["schedule"],
        "seed": schedule.seed,
        "world_size": int(state.num_processes),
        "machine": _machine(),
        "versions": _versions(),
        "command": command or " ".join(sys.argv),
        "wall_s_this_invocation": round(time.time() - started, 1),
        "speed_method": "forward latency (no grad), median over rounds of softmax and every variant run side by "
        "side in rotating order, after all training; peak memory: resident-set high-water mark above the inputs "
        "during one long-input forward",
        "rows": [],
        "skipped": [],
    }
    rows_dir = out / "rows"
    for label in ["softmax"] + [t[0] for t in chosen]:
        for stage in (["finetune"] if label == "softmax" else recipe.stages):
            p = _row_path(out, label, stage)
            if p.is_file():
                r = json.loads(p.read_text())
                if "skipped" in r:
                    results["skipped"].append(r)
                    continue
                r.update(speed.get(label, {}))
                results["rows"].append(r)
    if main:
        _write_json(out / "results.json", results)
        report.write_markdown(results, out / "results.md")
        report.pareto_plot(results, out / "pareto.png")
        if cards:
            from .cards import write_cards

            write_cards(out)
    state.wait_for_everyone()
    del rows_dir
    return results


def task_metric_name(task: Task) -> str:
    return {"text-classification": "accuracy", "causal-lm": "perplexity", "image-classification": "accuracy"}[task.name]


def _retained(task: Task, value: float, base: float) -> float:
    if task.metric_higher_is_better:
        return value / base if base else float("nan")
    return base / value if value else float("nan")  # perplexity: inverted so that higher is better


def _ratio(base, value):
    return None if not base or not value else base / value


def _without_labels(ds):
    cols = [c for c in getattr(ds, "column_names", []) or [] if c in ("labels", "label")]
    return ds.remove_columns(cols) if cols and not getattr(ds, "format", {}).get("type") == "custom" else ds


def _measure(task, model, data, out, variant, params, stage, sps, transfer_report) -> dict[str, Any]:
    """The row's accuracy figures; speed and memory come from :func:`speed_pass`, side by side."""
    scores = evaluate(task, model, data, out / "work" / "eval")
    row: dict[str, Any] = {
        "variant": variant, "params": dict(params), "stage": stage,
        "metric": {"name": task_metric_name(task), "value": scores.pop("metric")},
        "extra_metrics": scores, "retained": 1.0 if variant == "softmax" else None,
        "train_samples_per_s": sps, "added_params": added_parameters(model),
    }
    if transfer_report is not None:
        row["transfer"] = {k: transfer_report[k] for k in ("steps", "trainable_params", "initial_loss", "final_loss")}
    return row


def speed_pass(task: Task, data: TaskData, base_dir: Path, chosen, repeats: int) -> dict[str, dict[str, Any]]:
    """Forward latency of softmax and every variant at the task's length and at the long length, timed side by side
    (one call each per round, the order rotating each round: ``hf_reshape.bench.timing.interleaved``), then the
    peak memory of each at the long length. Speed does not depend on the weights' values, so one model per
    variant serves all its stages. Runs on the main process only; returns label -> figures."""
    import hf_reshape

    from ..bench.timing import interleaved

    models = {"softmax": task.load_model(str(base_dir), data).eval()}
    for label, name, params in chosen:
        models[label] = hf_reshape.reshape(task.load_model(str(base_dir), data).eval(), name, **params)
    figures: dict[str, dict[str, Any]] = {label: {} for label in models}
    for key, long in (("latency_ms", False), ("latency_long_ms", True)):
        calls, desc = {}, None
        for label, model in models.items():
            inputs, desc = task.latency_inputs(model, data, long=long)
            calls[label] = (lambda m=model, x=inputs: m(**x))
            figures[label].setdefault("latency_inputs", {})["long" if long else "task"] = desc
        with torch.no_grad():
            timings = interleaved(calls, rounds=max(1, repeats), warmup=1,
                                  label=f"speed side by side ({'long' if long else 'task'} length)")
        for label, t in timings.items():
            figures[label][key] = None if t.median is None else round(1000 * t.median, 2)
            if t.error:
                figures[label]["long_refused" if long else "task_refused"] = t.error
                _log(f"{label}: no {'long-input' if long else 'task-length'} figures: {t.error}")
    for label, model in models.items():
        if figures[label].get("latency_long_ms") is None:
            figures[label]["peak_mem_mib"] = None
            continue
        inputs, _ = task.latency_inputs(model, data, long=True)
        with torch.no_grad():
            mem = peak_memory_mib(lambda: model(**inputs))
        figures[label]["peak_mem_mib"] = None if mem is None else round(mem, 1)
    base = figures["softmax"]
    for f in figures.values():
        f["speedup_long"] = _ratio(base.get("latency_long_ms"), f.get("latency_long_ms"))
        f["speedup_task"] = _ratio(base.get("latency_ms"), f.get("latency_ms"))
    return figures
