"""Sparse variants side by side with PyTorch's compiled ``flex_attention`` given the *same* pattern.

``torch.nn.attention.flex_attention`` (PyTorch >= 2.5) is the general tool for sparse attention patterns: it skips
the key blocks a :func:`~torch.nn.attention.flex_attention.create_block_mask` marks empty and applies the pattern
inside partly filled blocks. This script asks whether hf_reshape's hand-written sparse paths are at least as fast
as flex on the pattern each variant computes, forward only (flex has no CPU backward in PyTorch 2.13)::

    python -m hf_reshape.bench.flex                                   # T=8192, every sparse variant, both forms
    python -m hf_reshape.bench.flex --T 4096 --variants strided --forms causal --rounds 5
    python -m hf_reshape.bench.flex --T 256 --no-compile --rounds 1   # smoke run: eager flex, seconds

How the pattern reaches flex: the variant's own ``weights`` (the matrix ``W`` its output is ``W @ v`` of,
:class:`~hf_reshape.registry.VariantSpec`) is evaluated once on all-zero queries and keys, where every allowed key
gets the same nonzero weight, so ``W != 0`` is exactly the set of keys the variant lets each query see. That
``[T, T]`` boolean table is handed to flex as its ``mask_mod`` (a lookup), the block mask is built from it with the
variant's own block size where it has one (``block_size``; flex's default of 128 otherwise), and before timing the
two outputs are compared on random inputs (``--check``): a mismatch stops the run, so the ratio is never one of
two different attentions. Parameters are the op benchmark's (:func:`hf_reshape.bench.op.variant_params`).

Timing: SDPA (dense, the usual baseline), the hf_reshape variant and compiled flex run once per round, the order
rotating each round (:func:`hf_reshape.bench.timing.interleaved`); ratios are medians of per-round ratios. The
first flex call compiles (tens of seconds) and is an untimed warm-up. Results go to ``flex.json`` and ``flex.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import functional
from ..registry import get_variant, list_variants, make_params
from .op import variant_params
from .load import competing_load
from .timing import interleaved, paired_ratio

HEADS, HEAD_DIM = 12, 64


def sparse_variants() -> list[str]:
    """Registered variants of the sparse family whose pattern does not depend on the data (``topk``'s does)."""
    return [n for n in list_variants() if get_variant(n).family == "sparse" and n != "topk"]


def allowed_keys(name: str, params: dict, t: int, causal: bool) -> torch.Tensor:
    """``[T, T]`` bool: key ``j`` is in the pattern of query ``i`` (see the module docstring)."""
    spec = get_variant(name)
    if spec.weights is None or not spec.weights_over_keys:
        raise ValueError(f"variant {name!r} declares no weights over the keys, so its pattern cannot be read")
    z = torch.zeros(1, 1, t, 1)
    built = functional.init_state(name, num_heads=1, head_dim=1, **params)
    p = make_params(spec, dict(params))
    with torch.no_grad():
        w = spec.weights(z, z, z, mask=None, causal=causal, scaling=1.0, params=p, **built)
    return w[0, 0] != 0


def flex_call(allowed: torch.Tensor, block_size: int, compile_: bool):
    """``(q, k, v) -> out`` running flex_attention with ``allowed`` as its mask, and the block mask's density."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = allowed.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, None, t, t, device="cpu", BLOCK_SIZE=block_size)
    fn = torch.compile(flex_attention) if compile_ else flex_attention
    density = 1.0 - float(block_mask.sparsity()) / 100.0

    def call(q, k, v):
        return fn(q, k, v, block_mask=block_mask)

    return call, density


def run(t: int, names: list[str], forms: list[str], rounds: int, compile_: bool = True, check: bool = True,
        progress: bool = True) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, t, HEAD_DIM, generator=g) for _ in range(3))
    for name in names:
        for form in forms:
            causal = form == "causal"
            spec = get_variant(name)
            if (causal and not spec.causal) or (not causal and not spec.bidirectional):
                continue
            params = variant_params(name, t)
            allowed = allowed_keys(name, params, t, causal)
            block = int(params.get("block_size", 128))
            flex, density = flex_call(allowed, block, compile_)
            ours = lambda: functional.attention(q, k, v, name, is_causal=causal, **params)  # noqa: E731
            if check:
                with torch.no_grad():
                    a, b = ours(), flex(q, k, v)
                err = float((a - b).abs().max())
                if not err < 1e-3:
                    raise RuntimeError(f"{name} ({form}): flex_attention with the variant's pattern differs from the "
                                       f"variant by {err:.3g}; the comparison would not be of the same attention")
            calls = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                name: ours,
                "flex": lambda: flex(q, k, v),
            }
            with torch.no_grad():
                tm = interleaved(calls, rounds=rounds, warmup=1, label=f"T={t} {name} {form}" if progress else None)
            for cand, timing in tm.items():
                if timing.error:
                    raise RuntimeError(f"{cand} failed: {timing.error}")
            rows.append({
                "variant": name, "form": form, "T": t, "params": params, "flex_block_size": block,
                "pattern_density": float(allowed.float().mean()), "flex_block_density": density,
                "ms": {c: tm[c].median * 1e3 for c in tm},
                "variant_vs_sdpa": paired_ratio(tm["sdpa"], tm[name]),
                "flex_vs_sdpa": paired_ratio(tm["sdpa"], tm["flex"]),
                "variant_vs_flex": paired_ratio(tm["flex"], tm[name]),
                "compiled": compile_,
            })
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Sparse variants against compiled flex_attention with the same pattern (forward)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"fp32, B=1, H={HEADS}, D={HEAD_DIM}; {meta['threads']} threads; load average before the run "
        f"{meta['load_avg']}; {meta['competing_processes']} competing busy-loop processes; torch {meta['torch']}; "
        f"{meta['rounds']} rounds, medians; ratios are medians of "
        "per-round ratios (> 1: the first is slower). flex is "
        + ("compiled (`torch.compile(flex_attention)`)" if meta["compiled"] else "**eager (not compiled)**") + ".",
        "",
        "| variant | form | T | params | pattern density | flex block density | SDPA ms | variant ms | flex ms "
        "| variant x SDPA | flex x SDPA | variant x flex |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(
            f"| {r['variant']} | {r['form']} | {r['T']} | {p} | {r['pattern_density']:.3f} | "
            f"{r['flex_block_density']:.3f} | {r['ms']['sdpa']:.1f} | {r['ms'][r['variant']]:.1f} | "
            f"{r['ms']['flex']:.1f} | {r['variant_vs_sdpa']:.2f}x | {r['flex_vs_sdpa']:.2f}x | "
            f"{r['variant_vs_flex']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hf_reshape.bench.flex",
        description="Time hf_reshape's sparse variants against compiled flex_attention given the same pattern "
                    "(read from the variant), and against SDPA, forward only. Example: "
                    "python -m hf_reshape.bench.flex --T 8192 --out docs/bench/flex",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--T", type=int, nargs="+", default=[8192], help="sequence lengths")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"sparse variants (default: every one with a fixed pattern, now {sparse_variants()})")
    p.add_argument("--forms", nargs="+", choices=["bidirectional", "causal"], default=["bidirectional", "causal"])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per candidate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="eager flex (smoke runs only: not a fair comparison)")
    p.add_argument("--no-check", action="store_true", help="skip the output comparison before timing")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N busy-loop processes beside the benchmark (N = cores: a shared machine)")
    p.add_argument("--out", default="bench_out/flex", help="folder for flex.json and flex.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants or sparse_variants()
    for n in names:
        get_variant(n)  # unknown names are refused with the list of registered ones
    meta = {
        "command": "python -m hf_reshape.bench.flex " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
        "compiled": not args.no_compile, "machine": platform.machine(),
        "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-",
    }
    meta["competing_processes"] = args.load
    t0 = time.time()
    rows = []
    with competing_load(args.load):
        for t in args.T:
            rows += run(t, names, args.forms, args.rounds, compile_=not args.no_compile, check=not args.no_check)
    meta["wall_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flex.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(rows, meta)
    (out / "flex.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
