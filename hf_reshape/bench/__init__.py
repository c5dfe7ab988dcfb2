"""``hf-reshape bench``: speed and memory of every registered variant against torch SDPA, at op and model level.

```bash
hf-reshape bench --quick --out bench_quick                # seconds: tiny sizes, every code path
hf-reshape bench --out bench_out                          # op level, T = 512 .. 16384 (memory to 32768)
hf-reshape bench --level model --out bench_model          # BERT / ViT / GPT-2 shaped models
hf-reshape bench --level model --models llama --out bench_llama   # Llama-shaped decoder (GQA, RoPE), T=8192 + generate
hf-reshape bench --peers-python peers-venv/bin/python     # + lucidrains' packages (docs/bench/README.md)
```

**Op level** (:mod:`hf_reshape.bench.op`): :func:`hf_reshape.functional.attention` of each variant on
``[B=1, H=12, T, D=64]`` fp32 inputs, bidirectional and causal where the variant has the form, forward (under
``no_grad``) and forward+backward (``torch.autograd.grad`` of ``q, k, v`` and learned state), against
``torch.nn.functional.scaled_dot_product_attention`` (``is_causal=True`` for the causal form) and eager
attention (materialised ``softmax(Q K^T) V``). Variant settings: ``sliding_window(window=256)``,
``linformer(proj_len=256, max_length=T)``, ``nystrom(num_landmarks=64)``, ``linear(feature_map="elu")``,
``topk(top_k=64)``, ``svd(rank=32)``; quadratic candidates stop at ``--quadratic-max-T`` and at the per-candidate
caps of :data:`hf_reshape.bench.op.DEFAULT_CAPS` (eager 4096, topk 2048, svd 512).

**Timing**: every candidate of a (T, form, mode) group runs once per round, in an order that rotates from round to
round, after one untimed warm-up call; reported are the median time and the median over rounds of SDPA's time
divided by the candidate's (paired, so load from other processes on a shared machine cancels). Achieved GFLOP/s
counts each method's useful FLOPs analytically and is set against the machine's fp32 matmul peak, measured at
start. See :mod:`hf_reshape.bench.timing` for details.

**Peak memory**: measured after all timing, one call per candidate and size: on CPU the peak resident set size
during the call minus the resident size just before it (the kernel's high-water mark is reset through
``/proc/self/clear_refs``, free heap pages are returned with ``malloc_trim`` and glibc is told to give every
allocation of 64 KiB or more its own mapping, so the number is the peak of live tensor memory above the inputs);
on CUDA ``torch.cuda.max_memory_allocated``. The op level also measures memory at ``--memory-max-T`` (default
2 x ``--max-T``) for the non-quadratic candidates. See :class:`hf_reshape.bench.timing.PeakMemory`.

**Model level** (``--level model``, :mod:`hf_reshape.bench.model`): a 2-layer BERT-base-shaped encoder at
T = 1024, 4096, 16384; a 2-layer ViT-B/16-shaped encoder on a 2048 x 2048 image (16385 tokens,
``interpolate_pos_encoding=True``); GPT-2-small-shaped greedy generation of 32 tokens after a 1024-token prompt; with ``--models llama`` (not run by
default) a Llama-shaped decoder with random weights (grouped-query attention, RoPE): a forward at T = 8192 and
greedy generation of 256 tokens after a 4,000-token prompt, each against SDPA, with the cache's bytes at the end.

**Peers** (``--peers-python``, :mod:`hf_reshape.bench.peer_client`): ``peers.py`` runs lucidrains'
performer-pytorch, linformer, nystrom-attention and local-attention in their own environment; each peer call
alternates with hf_reshape's call of the same shape within each round.

Outputs in ``--out``: ``bench.json`` (everything, including every round's time), ``bench.md`` (tables and
the issue's goals checked), ``op.png`` (log-log time and memory against T).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..registry import list_variants
from . import model as model_bench
from . import op as op_bench
from . import peer_client, report
from .timing import PeakMemory, matmul_peak_gflops

__all__ = ["main", "run"]


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, t = [], lo
    while t <= hi:
        out.append(t)
        t *= 2
    return tuple(out)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> str:
    """Commit of the hf_reshape checkout and whether its tracked files differ from it (best effort)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    changed = sorted({line[3:] for line in dirty.splitlines() if line.strip()})
    return head + (" with uncommitted changes to " + ", ".join(changed) if changed else "")


def _parser() -> argparse.ArgumentParser:
    from ..cli import DefaultsOnceHelpFormatter  # "(default: ...)" once per option

    p = argparse.ArgumentParser(prog="hf-reshape bench", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--level", choices=["op", "model", "all"], default="op", help="op level, model level, or both")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke run of every code path")
    p.add_argument("--out", default="bench_out", help="output folder (bench.json, bench.md, op.png)")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {list_variants()} (default: all)")
    p.add_argument("--min-T", type=int, default=512, help="smallest op-level T (powers of two up to --max-T)")
    p.add_argument("--max-T", type=int, default=16384, help="largest op-level T")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="explicit op-level sizes (overrides min/max)")
    p.add_argument("--quadratic-max-T", type=int, default=8192,
                   help="largest T for quadratic-time candidates (SDPA, eager, topk, svd)")
    p.add_argument("--cap", action="append", default=[], metavar="NAME=T",
                   help="largest T for one candidate, e.g. --cap topk=4096 (defaults: eager=4096, topk=2048, svd=512)")
    p.add_argument("--memory-max-T", type=int, default=None,
                   help="op level: also measure memory of the non-quadratic candidates up to here (default 2 x max-T)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    p.add_argument("--forms", nargs="+", choices=["bidirectional", "causal"], default=["bidirectional", "causal"],
                   help="attention forms to time (a variant runs only the forms it has)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"],
                   help="forward only (under no_grad), and/or forward + backward")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peers-python", default=peer_client.default_python(),
                   help="Python with the peer packages (env HF_RESHAPE_PEERS_PYTHON); unset: peers are skipped")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N single-threaded busy-loop processes beside the whole benchmark (N = cores: how the "
                        "ratios hold on a shared machine; hf_reshape.bench.load)")
    p.add_argument("--peers-max-T", type=int, default=4096, help="largest T for the peer comparison")
    g = p.add_argument_group("model level")
    g.add_argument("--models", nargs="+", choices=["bert", "vit", "gpt2", "llama"], default=["bert", "vit", "gpt2"],
                   help="BERT-base-shaped encoder, ViT-B/16-shaped encoder, GPT-2-small-shaped generation; "
                        "llama (not by default): a Llama-shaped decoder with random weights (GQA, RoPE)")
    g.add_argument("--bert-T", type=int, nargs="+", default=None, help="BERT lengths (default 1024 4096 16384)")
    g.add_argument("--bert-layers", type=int, default=2, help="BERT layers (BERT-base has 12)")
    g.add_argument("--vit-image", type=int, default=2048, help="ViT image side (pixels); 2048 -> 16385 tokens")
    g.add_argument("--vit-layers", type=int, default=2, help="ViT layers (ViT-B has 12)")
    g.add_argument("--gpt2-prompt", type=int, default=4000, help="GPT-2 prompt tokens before generation")
    g.add_argument("--gpt2-new", type=int, default=256, help="GPT-2 tokens generated (greedy)")
    g.add_argument("--gpt2-short-prompt", type=int, default=100,
                   help="also time decoding after this many prompt tokens (latency growth); 0: skip")
    g.add_argument("--gpt2-layers", type=int, default=12, help="GPT-2 layers (GPT-2 small has 12)")
    g.add_argument("--llama-T", type=int, default=8192, help="Llama forward length")
    g.add_argument("--llama-prompt", type=int, default=4000, help="Llama prompt tokens before generation")
    g.add_argument("--llama-new", type=int, default=256, help="Llama tokens generated (greedy)")
    g.add_argument("--llama-layers", type=int, default=4, help="Llama layers")
    g.add_argument("--llama-kv-heads", type=int, default=4,
                   help="Llama key/value heads (grouped-query attention; the query heads are the model's 12)")
    return p


def _progress(start: float):
    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def run(args: argparse.Namespace, command: str = "hf-reshape bench") -> dict:
    """Run the benchmark described by parsed ``args``; returns the results dictionary (also written to disk)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    say = _progress(start)
    caps = {}
    for item in args.cap:
        name, _, value = item.partition("=")
        caps[name.strip()] = int(value)
    rounds = args.rounds or (1 if args.quick else 3)
    variants = tuple(args.variants) if args.variants else None
    unknown = sorted(set(variants or ()) - set(list_variants()))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; registered: {list_variants()}")
    if args.quick:
        sizes = tuple(args.sizes or (32, 64))
        memory_sizes = (128,)
    else:
        sizes = tuple(args.sizes or _powers_of_two(args.min_T, args.max_T))
        top = args.memory_max_T or 2 * max(sizes)
        memory_sizes = tuple(t for t in _powers_of_two(2 * max(sizes), top))
    matmul_n = 256 if args.quick else 2048
    say(f"measuring the fp32 matmul peak ({matmul_n}^3)")
    peak = matmul_peak_gflops(matmul_n, repeats=3 if args.quick else 5)
    import transformers

    results = {
        "command": command,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "code": _git_state(),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu",
                    "python": platform.python_version(), "matmul_peak_gflops": peak, "matmul_n": matmul_n,
                    "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-",
                    "competing_processes": getattr(args, "load", 0)},
        "settings": {"quick": args.quick, "rounds": rounds, "warmup": args.warmup, "variants": variants,
                     "quadratic_max_T": args.quadratic_max_T, "caps": {**op_bench.DEFAULT_CAPS, **caps}},
    }
    ocfg = op_bench.OpConfig(sizes=sizes, memory_sizes=memory_sizes, quadratic_max_t=args.quadratic_max_T,
                             caps=caps, variants=variants, forms=tuple(args.forms), modes=tuple(args.modes),
                             rounds=rounds, warmup=args.warmup, quick=args.quick)
    memory_jobs = []
    if args.level in ("op", "all"):
        results["op"] = {"shape": {"B": ocfg.batch, "H": ocfg.heads, "D": ocfg.head_dim}, "sizes": list(sizes),
                         **op_bench.run_timing(ocfg, say)}
        peer_sizes = [t for t in sizes if args.quick or t <= args.peers_max_T]
        log = Path(tempfile.gettempdir()) / "hf_reshape_bench_peers.log"
        results["peers"], peer_jobs = peer_client.run(args.peers_python, ocfg, peer_sizes, log, say)
    if args.level in ("model", "all"):
        if args.quick:
            mcfg = model_bench.quick_config(models=tuple(args.models), variants=variants, caps=caps,
                                            rounds=rounds, warmup=args.warmup)
        else:
            mcfg = model_bench.ModelConfig(
                models=tuple(args.models), bert_sizes=tuple(args.bert_T or (1024, 4096, 16384)),
                bert_layers=args.bert_layers, vit_image=args.vit_image, vit_layers=args.vit_layers,
                gpt2_prompt=args.gpt2_prompt, gpt2_new=args.gpt2_new, gpt2_short_prompt=args.gpt2_short_prompt,
                gpt2_layers=args.gpt2_layers, llama_T=args.llama_T, llama_prompt=args.llama_prompt,
                llama_new=args.llama_new, llama_layers=args.llama_layers, llama_kv_heads=args.llama_kv_heads,
                variants=variants, caps=caps, quadratic_max_t=1 << 30,  # stock SDPA is the baseline: no cap
                rounds=rounds, warmup=args.warmup)
        results["model"], memory_jobs = model_bench.run_timing(mcfg, say)
    if args.no_memory:
        results["memory_method"] = "not measured (--no-memory)"
        if "peers" in results:
            peer_client.close(results["peers"])
    else:
        meter = PeakMemory().enable()
        results["memory_method"] = meter.method
        if "op" in results:
            results["op"]["memory"] = op_bench.run_memory(ocfg, meter, say)
            peer_client.run_memory(results["peers"], peer_jobs, ocfg, say)
        if "model" in results:
            results["model"]["memory"] = model_bench.run_memory(memory_jobs, meter, say)
    if "op" in results:
        results["goals"] = report.goals(results)
    results["wall_s"] = time.perf_counter() - start
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "bench.md").write_text(_markdown(results) + "\n")
        if "op" in results:
            report.plot(results, out / "op.png")
        say(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'op.png'}" if "op" in results else ""))
    return results


def _markdown(results: dict) -> str:
    llama = model_bench.llama_markdown(results)
    return report.to_markdown(results) + ("\n\n" + llama if llama else "")


def main(argv=None) -> None:
    """Entry point of ``hf-reshape bench`` (``hf_reshape.cli`` dispatches here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from .load import competing_load

    with competing_load(args.load):
        results = run(args, command="hf-reshape bench " + " ".join(shlex.quote(a) for a in argv))
    print(_markdown(results))
