"""Markdown tables, goal checks and log-log plots of benchmark results (plots need matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections import defaultdict

MIB = 2**20
GIB = 2**30
GOAL_T = 8192
# The targets for the fast variants (speed-up over SDPA of the same form at T = GOAL_T)
SPEED_GOALS = [
    # variant, form, mode, at least x SDPA (issue 4 for the first six, issue 12 for the catalogue)
    ("linear", "bidirectional", "fwd", 20), ("linear", "bidirectional", "fwd+bwd", 10),
    ("linear", "causal", "fwd", 8), ("linear", "causal", "fwd+bwd", 5),
    ("sliding_window", "bidirectional", "fwd", 5), ("sliding_window", "bidirectional", "fwd+bwd", 3),
    ("sliding_window", "causal", "fwd", 5), ("sliding_window", "causal", "fwd+bwd", 3),
    ("linformer", "bidirectional", "fwd", 10), ("linformer", "bidirectional", "fwd+bwd", 5),
    ("nystrom", "bidirectional", "fwd", 10), ("nystrom", "bidirectional", "fwd+bwd", 5),
    *[(v, form, mode, x) for v in ("cosformer", "hedgehog", "t2r")
      for form, mode, x in (("bidirectional", "fwd", 20), ("bidirectional", "fwd+bwd", 10),
                            ("causal", "fwd", 8), ("causal", "fwd+bwd", 5))],
    ("performer", "bidirectional", "fwd", 8), ("performer", "causal", "fwd", 4),
    ("taylor", "bidirectional", "fwd", 2.5),
    *[(v, form, mode, x) for v in ("block_sparse", "strided") for form in ("bidirectional", "causal")
      for mode, x in (("fwd", 5), ("fwd+bwd", 3))],
]


def subquadratic() -> list[str]:
    """Registered variants whose fast path has no ``T x T`` tensor (``VariantSpec.quadratic`` false): their time
    exponent and memory at long T are goals too."""
    from ..registry import get_variant, list_variants

    return [n for n in list_variants() if not get_variant(n).quadratic]


EXPONENT_RANGE = (2048, 16384)
EXPONENT_MAX = 1.2
MEMORY_T = 32768
MEMORY_MAX = GIB


def _ms(s):
    return "-" if s is None else (f"{1e3 * s:.0f}" if s >= 1 else f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}")


def _vs_sdpa(row, key="speedup_vs_sdpa"):
    """A model-level row's ratio to SDPA as a table cell: blank for SDPA itself and where there is none."""
    return "" if row["candidate"] == "sdpa" or row.get(key) is None else f"{row[key]:.2f}x"


def _x(r):
    return "" if r is None else f" ({r:.2f}x)" if r < 10 else f" ({r:.1f}x)"


def _mib(b):
    return "-" if b is None else f"{b / MIB:.0f}" if b >= 10 * MIB else f"{b / MIB:.1f}"


def _params(p):
    return ", ".join(f"{k}={v}" for k, v in (p or {}).items() if k != "max_length") or "-"


def _competing(machine: dict) -> str:
    n = machine.get("competing_processes")
    return f"; {n} competing busy-loop processes ran beside it (`--load {n}`)" if n else ""


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def exponent(times: dict[int, float], lo: int, hi: int) -> float | None:
    """Slope of log(time) against log(T) between two sizes (1 = linear, 2 = quadratic)."""
    if times.get(lo) and times.get(hi):
        return math.log(times[hi] / times[lo]) / math.log(hi / lo)
    return None


def op_index(results: dict):
    """``{(form, mode): {candidate: {T: row}}}`` of the op timing rows."""
    idx = defaultdict(lambda: defaultdict(dict))
    for r in results.get("op", {}).get("rows", []):
        idx[(r["form"], r["mode"])][r["candidate"]][r["T"]] = r
    return idx


def memory_index(results: dict):
    idx = defaultdict(lambda: defaultdict(dict))
    for r in results.get("op", {}).get("memory", []) or []:
        idx[(r["form"], r["mode"])][r["candidate"]][r["T"]] = r
    return idx


def goals(results: dict) -> list[dict]:
    """Each of the issue's targets with what this run measured (``met`` is None when not measured)."""
    idx, mem = op_index(results), memory_index(results)
    out = []
    for variant, form, mode, target in SPEED_GOALS:
        row = idx[(form, mode)].get(variant, {}).get(GOAL_T)
        value = row and row.get("speedup_vs_sdpa")
        out.append({"goal": f"{variant} {form} {mode}: >= {target}x SDPA at T={GOAL_T}", "value": value,
                    "shown": "not measured" if value is None else f"{value:.2f}x",
                    "met": None if value is None else value >= target})
    lo, hi = EXPONENT_RANGE
    for form, mode in sorted(idx):
        for variant in subquadratic():
            times = {t: r["median_s"] for t, r in idx[(form, mode)].get(variant, {}).items()}
            if not times:
                continue
            e = exponent(times, lo, hi)
            out.append({"goal": f"{variant} {form} {mode}: time exponent T={lo}..{hi} <= {EXPONENT_MAX}",
                        "value": e, "shown": "not measured" if e is None else f"{e:.2f}",
                        "met": None if e is None else e <= EXPONENT_MAX})
    for form, mode in sorted(mem):
        for variant in subquadratic():
            rows = mem[(form, mode)].get(variant)
            if not rows:
                continue
            b = rows.get(MEMORY_T, {}).get("peak_bytes")
            out.append({"goal": f"{variant} {form} {mode}: peak memory at T={MEMORY_T} < 1 GiB above inputs",
                        "value": b, "shown": "not measured" if b is None else f"{b / MIB:.0f} MiB",
                        "met": None if b is None else b < MEMORY_MAX})
    return out


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# hf_reshape benchmark", "",
        f"`{results['command']}`", "",
        f"Machine: {m['cpu']} ({m['cores']} cores visible, {m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['device']}; measured fp32 matmul peak "
        f"**{m['matmul_peak_gflops']:.0f} GFLOP/s** ({m['matmul_n']}^3). Load average at start {m['load_avg']}"
        f"{_competing(m)}. "
        f"{results['date']}; code: {results.get('code', 'unknown')}.", "",
        f"Times are medians over {results['settings']['rounds']} rounds in which all candidates of a row group run "
        "one after the other in rotating order; `(Nx)` is the median over rounds of SDPA's time / the candidate's "
        f"(> 1: faster than SDPA). Memory: {results.get('memory_method', '-')}.", "",
    ]
    op = results.get("op")
    if op:
        shape = op["shape"]
        lines += [f"## Op level: `hf_reshape.functional.attention` on [B={shape['B']}, H={shape['H']}, T, "
                  f"D={shape['D']}] fp32", ""]
        idx = op_index(results)
        sizes = sorted({r["T"] for r in op["rows"]})
        params = {r["candidate"]: r["params"] for r in op["rows"]}
        for (form, mode) in sorted(idx, key=lambda k: (k[0] != "bidirectional", k[1] != "fwd")):
            cands = idx[(form, mode)]
            lines += [f"### {form}, {'forward' if mode == 'fwd' else 'forward + backward'}: ms (x SDPA)", ""]
            body = []
            for c, by_t in cands.items():
                cells = []
                for t in sizes:
                    r = by_t.get(t)
                    if r is None:
                        cells.append("")
                    elif r["median_s"] is None:
                        cells.append("error")
                    else:
                        cells.append(_ms(r["median_s"]) + (_x(r["speedup_vs_sdpa"]) if c != "sdpa" else ""))
                body.append([f"`{c}`", _params(params.get(c))] + cells)
            lines += _table(["candidate", "params"] + [f"T={t}" for t in sizes], body) + [""]
        errors = sorted({(r["candidate"], r["error"]) for r in op["rows"] if r.get("error")})
        if errors:
            lines += ["Errors: " + "; ".join(f"`{c}`: {e}" for c, e in errors), ""]
        mem = memory_index(results)
        if mem:
            msizes = sorted({r["T"] for r in op["memory"]})
            per_1k_tokens = 3 * shape["B"] * shape["H"] * shape["D"] * 4 * 1024
            for (form, mode) in sorted(mem, key=lambda k: (k[0] != "bidirectional", k[1] != "fwd")):
                lines += [f"### Peak memory above inputs, {form}, {mode}: MiB "
                          f"(the inputs q, k, v take {_mib(per_1k_tokens)} MiB per 1024 tokens)", ""]
                body = [[f"`{c}`"] + [_mib(by_t[t]["peak_bytes"]) if t in by_t else "" for t in msizes]
                        for c, by_t in mem[(form, mode)].items()]
                lines += _table(["candidate"] + [f"T={t}" for t in msizes], body) + [""]
        peak = m["matmul_peak_gflops"]
        lines += [f"### Achieved GFLOP/s (% of the {peak:.0f} GFLOP/s matmul peak), useful FLOPs of each method's "
                  "maths (see `hf_reshape/bench/op.py`)", ""]
        body = []
        for (form, mode) in sorted(idx, key=lambda k: (k[0] != "bidirectional", k[1] != "fwd")):
            for c, by_t in idx[(form, mode)].items():
                cells = []
                for t in sizes:
                    r = by_t.get(t, {})
                    g = r.get("gflops_per_s")
                    if r and r.get("flops") is None:  # the variant declares no FLOP count (VariantSpec.flops)
                        cells.append("n/a")
                    else:
                        cells.append("" if g is None else f"{g:.1f} ({100 * g / peak:.0f}%)")
                body.append([form, mode, f"`{c}`"] + cells)
        lines += _table(["form", "mode", "candidate"] + [f"T={t}" for t in sizes], body) + [""]
        lo, hi = EXPONENT_RANGE
        exps = []
        for (form, mode) in sorted(idx):
            for c, by_t in idx[(form, mode)].items():
                ts = sorted(t for t, r in by_t.items() if r["median_s"])
                if len(ts) >= 2:
                    a = max([t for t in ts if t <= lo] or [ts[0]])
                    b = ts[-1]
                    e = exponent({t: by_t[t]["median_s"] for t in ts}, a, b) if b > a else None
                    if e is not None:
                        exps.append([form, mode, f"`{c}`", f"{a}..{b}", f"{e:.2f}"])
        lines += ["### Time exponent: slope of log time against log T", ""]
        lines += _table(["form", "mode", "candidate", "T range", "exponent"], exps) + [""]
        checks = goals(results)
        if checks:
            lines += ["## Goals (targets from the issue; a snapshot of the ops at this commit)", ""]
            lines += _table(["goal", "measured", "met"], [[g["goal"], g["shown"],
                             "-" if g["met"] is None else ("yes" if g["met"] else "**no**")] for g in checks]) + [""]
    peers = results.get("peers")
    if peers:
        lines += ["## Peers side by side (same shapes, alternating within each round)", ""]
        if peers.get("status") != "ok":
            lines += [f"Peers: {peers.get('status')}", ""]
        if peers.get("packages"):
            lines += [", ".join(f"`{p}` {e.get('version', '')}" if e["available"] else f"`{p}`: not installed "
                                f"({e.get('error', '')})" for p, e in peers["packages"].items()) + ".", ""]
        if peers.get("rows"):
            mem = memory_index(results)
            body = []
            for r in peers["rows"]:
                ours_mem = mem[(r["form"], r["mode"])].get(r["variant"], {}).get(r["T"], {}).get("peak_bytes")
                body.append([r["T"], r["form"], r["mode"], f"`{r['variant']}`", f"`{r['package']}`",
                             _ms(r["ours_median_s"]), _ms(r["peer_median_s"]) if r["peer_median_s"] else
                             (r.get("peer_error") or "-"),
                             "-" if r["ours_speedup_vs_peer"] is None else f"{r['ours_speedup_vs_peer']:.2f}x",
                             _mib(ours_mem), _mib(r.get("peer_peak_bytes"))])
            lines += _table(["T", "form", "mode", "ours", "peer", "ours ms", "peer ms", "ours faster by",
                             "ours MiB", "peer MiB"], body) + [""]
    model = results.get("model")
    if model and model.get("rows"):
        cfgm = model["config"]
        mem = {(r["model"], r["tokens"], r["candidate"]): r.get("peak_bytes") for r in model.get("memory", [])}
        lines += [f"## Model level (random init, hidden {cfgm['hidden']}, {cfgm['heads']} heads, intermediate "
                  f"{cfgm['intermediate']})", ""]
        enc = [r for r in model["rows"] if r["model"] in ("bert", "vit")]
        if enc:
            body = []
            for r in enc:
                what = f"BERT, {r['layers']} layers" if r["model"] == "bert" else (
                    f"ViT-B/16, {r['layers']} layers, {r['image']}x{r['image']} image")
                body.append([what, r["tokens"], f"`{r['candidate']}`", _ms(r["median_s"]) if r["median_s"] else
                             (r.get("error") or "-"), _vs_sdpa(r), _mib(mem.get((r["model"], r["tokens"], r["candidate"])))])
            lines += ["### Encoders: one forward", ""]
            lines += _table(["model", "tokens", "attention", "ms", "x SDPA", "peak MiB"], body) + [""]
        dec = [r for r in model["rows"] if r["model"] == "gpt2"]
        if dec:
            r0 = dec[0]
            lines += [f"### GPT-2 small shapes ({r0['layers']} layers): greedy generate of {r0['new_tokens']} new "
                      f"tokens after a {r0['prompt']}-token prompt", ""]
            body = [[f"`{r['candidate']}`", r["cache"],
                     _ms(r["median_s"]) if r["median_s"] else (r.get("error") or "-"),
                     _vs_sdpa(r), _ms(r["prefill_s"]), _ms(r["per_token_s"]), _vs_sdpa(r, "decode_speedup_vs_sdpa"),
                     _ms(r.get("per_token_short_s")),
                     "" if r.get("latency_growth") is None else f"{r['latency_growth']:.2f}",
                     _mib(mem.get(("gpt2", r["tokens"], r["candidate"])))] for r in dec]
            short = r0.get("short_prompt") or "-"
            lines += _table(["attention", "cache", "total ms", "x SDPA", "prefill ms", "ms / new token",
                             "decode x SDPA", f"ms / new token after {short}", f"per-token {r0['prompt']} / {short}",
                             "peak MiB"], body) + [""]
    return "\n".join(lines)


def plot(results: dict, path) -> str | None:
    """Log-log plot of op-level time (forward, forward+backward) and peak memory against T, one row per form."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    idx, mem = op_index(results), memory_index(results)
    forms = [f for f in ("bidirectional", "causal") if any(k[0] == f for k in idx)]
    if not forms:
        return None
    panels = [(mode, what) for mode, what in [("fwd", "time"), ("fwd+bwd", "time"), ("fwd+bwd", "memory")]
              if any((idx if what == "time" else mem).get((f, mode)) for f in forms)]  # only panels with data
    fig, axes = plt.subplots(len(forms), len(panels), figsize=(5 * len(panels) + 2, 4.6 * len(forms)), squeeze=False)
    names = sorted({c for k in idx for c in idx[k]}, key=lambda c: (c not in ("sdpa", "eager"), c))
    # 20 colours and 5 markers: no two of up to 100 candidates share both (tab10 repeated after 10 and the catalogue
    # has 14 variants beside SDPA and eager)
    colors = {c: plt.cm.tab20(i % 20) for i, c in enumerate(names)}
    colors.update({"sdpa": "black", "eager": "dimgray"})  # the baselines, dashed
    markers = {c: "osD^v"[(i // 4) % 5] for i, c in enumerate(names)}
    for i, form in enumerate(forms):
        for j, (mode, what) in enumerate(panels):
            ax = axes[i][j]
            source = idx if what == "time" else mem
            for c in names:
                by_t = source.get((form, mode), {}).get(c, {})
                key = "median_s" if what == "time" else "peak_bytes"
                pts = sorted((t, r[key]) for t, r in by_t.items() if r.get(key))
                if pts:
                    xs, ys = zip(*pts)
                    ys = [y * 1e3 for y in ys] if what == "time" else [y / MIB for y in ys]
                    ax.plot(xs, ys, marker=markers[c], ms=4, label=c, color=colors[c],
                            linestyle="--" if c in ("sdpa", "eager") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens)")
            ax.set_ylabel("ms" if what == "time" else "MiB above inputs")
            ax.set_title(f"{form}, {mode}: {what}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:  # one legend beside the panels, with every candidate any panel drew
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.suptitle("hf_reshape op-level benchmark: [B=1, H=12, T, D=64] fp32" if not results["settings"].get("quick")
                 else "hf_reshape op-level benchmark (--quick)")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (5 * len(panels) + 2), 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
