"""Op-level benchmark: :func:`hf_reshape.functional.attention` of every registered variant against torch SDPA and
eager (materialised) softmax attention on ``[B, H, T, D]`` fp32 inputs, bidirectional and causal, forward and
forward+backward, over a range of ``T``.

FLOPs are counted analytically as *useful* matmul FLOPs of each method's maths (a multiply-add is 2 FLOPs;
softmax, exp, masking and feature maps are not counted; a causal method counts only its allowed pairs, as the
FLOP counters of FlashAttention's benchmarks do). Forward+backward is counted as 3x the forward (backward = two
matmuls per forward matmul), the usual convention (Kaplan et al. 2020; PaLM's MFU). Counting the maths rather
than what an implementation happens to compute keeps the numbers comparable when a kernel changes: a blocked
kernel that computes padding or a masked triangle shows as lower achieved GFLOP/s, which is the point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import functional
from ..registry import get_variant, list_variants, make_params
from .timing import PeakMemory, Timing, interleaved, paired_ratio

BASELINES = ("sdpa", "eager")
# A variant's benchmark parameters, --quick parameters and forward FLOP count are declared on its registration
# (``VariantSpec.bench_params``, ``quick_params``, ``flops``), so every registered variant is benchmarked.
# largest T each candidate runs at by default (time or memory grows too fast past it on a 2-core CPU):
# eager materialises H x T x T scores and probabilities (~3 GiB of them at T=4096 with their gradients); topk is
# O(T^2) and slower than SDPA by construction; svd is O(T^3). Other quadratic-time candidates (SDPA, a registered
# variant with ``quadratic=True``) stop at --quadratic-max-T. Override with --cap NAME=T.
DEFAULT_CAPS = {"eager": 4096, "topk": 2048, "svd": 512}


@dataclass
class OpConfig:
    batch: int = 1
    heads: int = 12
    head_dim: int = 64
    sizes: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    memory_sizes: tuple[int, ...] = (32768,)  # extra sizes measured for memory only (non-quadratic candidates)
    quadratic_max_t: int = 8192
    caps: dict[str, int] | None = None
    variants: tuple[str, ...] | None = None
    forms: tuple[str, ...] = ("bidirectional", "causal")
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    rounds: int = 3
    warmup: int = 1
    quick: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def variant_params(name: str, t: int, quick: bool = False) -> dict[str, Any]:
    """Benchmark parameters of a variant at length ``t``: its spec's ``bench_params`` (``quick``: ``quick_params``,
    else ``small_params``), with ``max_length = t`` where the variant has one and leaves it unset."""
    spec = get_variant(name)
    params = spec.quick() if quick else dict(spec.bench_params)
    if "max_length" in spec.params_cls.field_names() and params.get("max_length") is None:
        params["max_length"] = t
    return params


def candidate_names(cfg: OpConfig, form: str) -> list[str]:
    names = list(BASELINES)
    for v in cfg.variants or list_variants():
        spec = get_variant(v)
        if (form == "causal" and spec.causal) or (form == "bidirectional" and spec.bidirectional):
            names.append(v)
    return names


def is_quadratic(name: str) -> bool:
    return name in BASELINES or get_variant(name).quadratic


def max_t(name: str, cfg: OpConfig) -> int | None:
    """Largest timed T of a candidate (None: no limit)."""
    caps = {**DEFAULT_CAPS, **(cfg.caps or {})}
    limit = caps.get(name)
    if is_quadratic(name):
        limit = cfg.quadratic_max_t if limit is None else min(limit, cfg.quadratic_max_t)
    return limit


def runs_at(name: str, t: int, cfg: OpConfig) -> bool:
    limit = max_t(name, cfg)
    return limit is None or t <= limit


# ---------------------------------------------------------------------------------------------------- FLOPs


def forward_flops(name: str, t: int, cfg: OpConfig, causal: bool, params: dict[str, Any] | None = None) -> float | None:
    """Useful forward matmul FLOPs of one call on ``[B, H, t, D]`` (see the module docstring): SDPA's and eager's
    here, a variant's from its spec (``VariantSpec.flops``, given the validated parameters, defaults filled).
    ``None`` where the variant declares no count (the report shows "n/a")."""
    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
    if name in BASELINES:
        pairs = t * (t + 1) / 2 if causal else t * t  # (query, key) pairs attended
        return float(b * h * 4 * pairs * d)  # Q K^T and P V
    spec = get_variant(name)
    if spec.flops is None:
        return None
    if params is None:
        params = variant_params(name, t, cfg.quick)
    count = spec.flops(t=t, head_dim=d, num_heads=h, batch=b, causal=causal, params=make_params(spec, params))
    if count is None:
        return None
    count = float(count)
    return count if math.isfinite(count) else None


def flops(name: str, t: int, cfg: OpConfig, causal: bool, mode: str, params=None) -> float | None:
    f = forward_flops(name, t, cfg, causal, params)
    return f if mode == "fwd" or f is None else 3 * f


# ---------------------------------------------------------------------------------------------------- candidates


def eager_attention(q, k, v, causal: bool):
    """Materialised softmax attention: ``softmax(Q K^T / sqrt(D) [causal mask]) V``."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v)


class OpInputs:
    """Leaf ``q, k, v`` (requiring grad), an output gradient, and per-variant state for one ``T``."""

    def __init__(self, cfg: OpConfig, t: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shape = (cfg.batch, cfg.heads, t, cfg.head_dim)
        self.q, self.k, self.v, self.grad = (
            torch.randn(shape, generator=g, dtype=cfg.dtype).to(cfg.device) for _ in range(4)
        )
        for x in (self.q, self.k, self.v):
            x.requires_grad_(True)
        self.t = t
        self.cfg = cfg
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def state(self, name: str, params: dict[str, Any]) -> dict[str, torch.Tensor]:
        if name not in self._state:
            torch.manual_seed(0)
            st = functional.init_state(name, num_heads=self.cfg.heads, head_dim=self.cfg.head_dim, **params)
            # learned state (nn.Parameter) gets gradients in fwd+bwd, as it would in training
            self._state[name] = {
                k: v.detach().to(device=self.cfg.device, dtype=self.cfg.dtype if v.is_floating_point() else v.dtype)
                .requires_grad_(isinstance(v, torch.nn.Parameter))
                for k, v in st.items()
            }
        return self._state[name]


def make_call(name: str, inputs: OpInputs, causal: bool, mode: str, quick: bool = False) -> Callable[[], object]:
    """Zero-argument callable running one candidate once: under ``no_grad`` for ``fwd``; forward then
    ``torch.autograd.grad`` on ``q, k, v`` (and learned state) for ``fwd+bwd``."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if name == "sdpa":
        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        wrt = (q, k, v)
    elif name == "eager":
        def fwd():
            return eager_attention(q, k, v, causal)
        wrt = (q, k, v)
    else:
        params = variant_params(name, inputs.t, quick)
        state = inputs.state(name, params)

        def fwd():
            return functional.attention(q, k, v, name, is_causal=causal, **params, **state)
        wrt = (q, k, v) + tuple(s for s in state.values() if s.requires_grad)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd()
    else:
        grad = inputs.grad

        def call():
            out = fwd()
            return torch.autograd.grad(out, wrt, grad)
    return call


# ---------------------------------------------------------------------------------------------------- sweep


def run_timing(cfg: OpConfig, progress=None) -> dict:
    """Time every candidate at every size, form and mode. Returns the ``op`` section of the results."""
    rows = []
    slow: dict[tuple, float] = {}  # (form, mode, name) -> last median, to skip warm-up when already slow
    for t in cfg.sizes:
        inputs = OpInputs(cfg, t)
        for form in cfg.forms:
            causal = form == "causal"
            names = [n for n in candidate_names(cfg, form) if runs_at(n, t, cfg)]
            for mode in cfg.modes:
                calls = {n: make_call(n, inputs, causal, mode, cfg.quick) for n in names}
                skip = {n for n in names if slow.get((form, mode, n), 0.0) > 2.0}
                stage = f"op T={t} {form} {mode}"
                if progress:
                    progress(f"{stage}: {', '.join(names)}")
                timings = interleaved(calls, cfg.rounds, cfg.warmup, cfg.device, skip_warmup=skip, label=stage)
                base = timings.get("sdpa", Timing())
                for n in names:
                    tm = timings[n]
                    if tm.median is not None:
                        slow[(form, mode, n)] = tm.median
                    params = {} if n in BASELINES else variant_params(n, t, cfg.quick)
                    fl = flops(n, t, cfg, causal, mode, params)
                    rows.append({
                        "T": t, "form": form, "mode": mode, "candidate": n, "params": params,
                        "times_s": tm.times, "median_s": tm.median, "error": tm.error,
                        "speedup_vs_sdpa": paired_ratio(base, tm) if n != "sdpa" else (1.0 if tm.times else None),
                        "flops": fl,
                        "gflops_per_s": (fl / tm.median / 1e9) if tm.median and fl is not None else None,
                    })
            del calls
        del inputs
    return {"rows": rows}


def run_memory(cfg: OpConfig, meter: PeakMemory, progress=None) -> list[dict]:
    """One measured call per candidate, size, form and mode (after a warm-up call at the smallest size)."""
    out = []
    sizes = list(cfg.sizes) + [t for t in cfg.memory_sizes if t not in cfg.sizes]
    warm: set[tuple] = set()
    for t in sizes:
        meter.collect()
        inputs = OpInputs(cfg, t)
        for form in cfg.forms:
            causal = form == "causal"
            names = [n for n in candidate_names(cfg, form)
                     if runs_at(n, t, cfg) and (t in cfg.sizes or not is_quadratic(n))]
            for mode in cfg.modes:
                for n in names:
                    if (form, mode, n) not in warm:
                        small = OpInputs(cfg, min(cfg.sizes))
                        try:
                            make_call(n, small, causal, mode, cfg.quick)()
                        except Exception:  # noqa: BLE001 - reported by the measured call below
                            pass
                        warm.add((form, mode, n))
                        del small
                    if progress:
                        progress(f"memory T={t} {form} {mode} {n}")
                    row = {"T": t, "form": form, "mode": mode, "candidate": n, "peak_bytes": None, "error": None}
                    try:
                        row["peak_bytes"] = meter.measure(make_call(n, inputs, causal, mode, cfg.quick))
                    except Exception as err:  # noqa: BLE001
                        row["error"] = f"{type(err).__name__}: {err}"
                    out.append(row)
        row_inputs = 3 * inputs.q.numel() * inputs.q.element_size()
        for row in out:
            if row["T"] == t:
                row["input_bytes"] = row_inputs
        del inputs
    return out
