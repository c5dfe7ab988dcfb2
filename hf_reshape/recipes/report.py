"""A recipe run's table (``results.md``) and its Pareto plot (``pareto.png``: metric retained against speed-up at
the long length, one point per variant and stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(x, digits=2, suffix=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per variant and stage; extra metrics (e.g. perplexity on another corpus) as extra columns."""
    rows = results["rows"]
    metric = results["metric"]
    extra = sorted({k for r in rows for k in r.get("extra_metrics", {})})
    lines = [
        f"| variant | params | stage | {metric} | retained | "
        + "".join(f"{k} | " for k in extra)
        + "train samples/s | latency ms (task) | latency ms (long) | x softmax (long) | peak MiB (long) | added params |",
        "|---" * (11 + len(extra)) + "|",
    ]
    for r in rows:
        speed = r.get("speedup_long") if r["variant"] != "softmax" else 1.0
        lines.append(
            f"| {r.get('label', r['variant'])} | {_params(r['params']) if r['variant'] != 'softmax' else '-'} "
            f"| {r['stage']} | {_fmt(r['metric']['value'], 4)} | {_fmt(r.get('retained'), 3)} | "
            + "".join(f"{_fmt(r.get('extra_metrics', {}).get(k), 2)} | " for k in extra)
            + f"{_fmt(r.get('train_samples_per_s'), 1)} | {_fmt(r.get('latency_ms'), 1)} "
            f"| {_fmt(r.get('latency_long_ms'), 1)} | {_fmt(speed, 2)} | {_fmt(r.get('peak_mem_mib'), 0)} "
            f"| {r.get('added_params', 0):,} |"
        )
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    inputs = next((r.get("latency_inputs") for r in results["rows"] if r.get("latency_inputs")), {}) or {}
    sched = results["schedule"]
    lines = [
        f"# Recipe `{results['recipe']}`",
        "",
        f"- Model: {results['model']}",
        f"- Data: {results['dataset']}" + (f" ({results['data_notes'].get('split')})" if results.get("data_notes") else ""),
        f"- Metric: {results['metric']} ({'higher' if results['higher_is_better'] else 'lower'} is better); "
        "`retained` is the variant's metric over the softmax baseline's on the same schedule"
        + ("" if results["higher_is_better"] else " (inverted: baseline / variant, so higher is better)"),
        f"- Schedule: seed {sched['seed']}, {sched['epochs']} epoch(s)"
        + (f" / {sched['max_steps']} steps" if sched.get("max_steps", -1) > 0 else "")
        + f", batch {sched['batch_size']}, lr {sched['lr']}, train rows {sched['max_train_samples'] or 'all'}, "
        f"eval rows {sched['max_eval_samples'] or 'all'}, transfer {sched['transfer_steps']} steps at lr "
        f"{sched['transfer_lr']}" + (", LoRA adapters" if sched.get("lora") else ", full fine-tuning"),
        f"- Latency inputs: task = {inputs.get('task', '-')}, long = {inputs.get('long', '-')}; median of "
        f"{sched['latency_repeats']} rounds of no-grad forwards, softmax and every variant side by side in rotating order",
        f"- Machine: {results['machine']['processor']}, {results['machine']['cpu_count']} CPU cores, "
        f"{results['machine']['torch_threads']} torch threads, accelerator {results['machine']['accelerator']}; "
        f"world size {results['world_size']}",
        f"- Command: `{results['command']}`",
        "",
        markdown_table(results),
    ]
    if results.get("skipped"):
        lines += ["", "Skipped:"] + [f"- {s.get('label', s['variant'])} / {s['stage']}: {s['reason']}"
                                     for s in results["skipped"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pareto_plot(results: dict[str, Any], path: Path) -> bool:
    """Metric retained (y) against speed-up over softmax at the long length (x, log scale). Returns False when
    matplotlib is not installed (the table and JSON are still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r.get("retained") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"none": "o", "transfer": "s", "finetune": "^", "transfer+finetune": "D"}
    variants = sorted({r.get("label", r["variant"]) for r in rows})
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    for r in rows:
        x = 1.0 if r["variant"] == "softmax" else r.get("speedup_long")
        if x is None:
            continue
        ax.scatter(x, r["retained"], marker=markers.get(r["stage"], "o"), color=colours[r.get("label", r["variant"])], s=50)
        ax.annotate(f"{r.get('label', r['variant'])} ({r['stage']})", (x, r["retained"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    inputs = next((r.get("latency_inputs", {}).get("long") for r in rows if r.get("latency_inputs")), "long input")
    ax.set_xlabel(f"speed-up over softmax at {inputs} (x, log)")
    ax.set_ylabel(f"{results['metric']} retained (variant / softmax{'' if results['higher_is_better'] else ', inverted'})")
    ax.set_title(f"{results['recipe']}: {results['model']}", fontsize=9)
    for stage, m in markers.items():
        ax.scatter([], [], marker=m, color="black", label=stage)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
