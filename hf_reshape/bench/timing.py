"""Timing, peak-memory and machine-peak helpers shared by the op-level and model-level benchmarks.

Timing
    :func:`interleaved` runs every candidate once per *round* and rotates the order from round to round, so a
    burst of load from another process on a shared machine lands on all candidates alike; each candidate's
    result is the median over rounds, and ratios between candidates are the median of the *per-round* ratios
    (paired samples). Each candidate gets untimed warm-up calls first (lazy initialisation, first-touch page
    faults of its code paths); a candidate that already took longer than ``skip_warmup_after`` seconds at a
    smaller size skips them, since its code paths are warm and one more call would only cost time.

Peak memory (:class:`PeakMemory`)
    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the allocation
      that existed before the call.
    * CPU (Linux): the process's peak resident set size. Before each measured call the kernel's high-water mark
      is reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and the current RSS is read as the
      baseline; after the call ``VmHWM`` from ``/proc/self/status`` is the peak, and peak - baseline is what the
      call needed on top of what already existed (the inputs). For this to see every tensor, glibc must not
      serve a new tensor from memory that an earlier, freed tensor left resident in its heap; so memory mode
      first sets ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``: every allocation of 64 KiB or more (every tensor that
      matters) is then its own ``mmap``, counted when touched and returned to the system when freed, and the
      measured peak is the peak of live tensor bytes, page-rounded (what ``max_memory_allocated`` reports on
      CUDA). Memory that was freed *before* the call but is still held by glibc's heap is handed back with
      ``malloc_trim(0)`` before each measurement: reusing it then faults pages in again and is counted.
      Setting the threshold also switches off glibc's dynamic threshold for the rest of the process, which makes
      large allocations slower, so the benchmark measures memory only after all timing is done. Checked against the
      alternative of a fresh process per measurement (``docs/bench/README.md``): they agree within a few per cent.
      Where ``/proc`` is missing (macOS, Windows) memory is reported as unavailable rather than guessed.

Machine peak: :func:`matmul_peak_gflops` times a square fp32 matmul (best of a few runs) and reports
``2 n^3 / t``; achieved GFLOP/s of a candidate is its analytic FLOP count over its median time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


def synchronize(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Wall time of one call in seconds (CUDA is synchronized before and after). A callable with a true
    ``reports_time`` attribute measures itself (e.g. in another process) and returns its seconds."""
    if getattr(fn, "reports_time", False):
        return float(fn())
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@dataclass
class Timing:
    """Per-round times (seconds) of one candidate; ``skipped`` explains a candidate that did not run."""

    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device="cpu",
    skip_warmup: set[str] | None = None,
    on_call: Callable[[str], None] | None = None,
    label: str | None = None,
) -> dict[str, Timing]:
    """Time each candidate ``rounds`` times, one call per candidate per round, rotating the order each round.

    Args:
        candidates: name -> zero-argument callable.
        rounds: timed rounds.
        warmup: untimed calls per candidate before the first round.
        skip_warmup: names that get no warm-up (already warm and slow).
        on_call: called with the candidate's name before each call (progress display).
        label: when given, a progress bar (tqdm, on stderr) over the group's calls, described as
            ``"{label} warm-up: {name}"`` / ``"{label} round r/n: {name}"`` with the candidate about to run.

    Returns:
        name -> :class:`Timing`. A candidate that raises is dropped from later rounds and keeps its error text.
    """
    skip_warmup = skip_warmup or set()
    out = {name: Timing() for name in candidates}
    names = list(candidates)
    bar = _progress_bar(label, sum(warmup for n in names if n not in skip_warmup) + rounds * len(names))
    for name in names:
        if name in skip_warmup:
            continue
        for _ in range(warmup):
            _announce(bar, label, "warm-up", name)
            try:
                candidates[name]()
            except Exception as err:  # noqa: BLE001 - a failing candidate is reported, not fatal
                out[name].error = f"{type(err).__name__}: {err}"
                break
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            if out[name].error:
                continue
            _announce(bar, label, f"round {r + 1}/{rounds}", name)
            if on_call:
                on_call(name)
            try:
                out[name].times.append(time_call(candidates[name], device))
            except Exception as err:  # noqa: BLE001
                out[name].error = f"{type(err).__name__}: {err}"
    if bar is not None:
        bar.close()
    return out


def _progress_bar(label: str | None, total: int):
    if label is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="call", leave=False)


def _announce(bar, label: str | None, stage: str, name: str) -> None:
    """Name the call about to run on the bar (``set_description`` redraws it now, before any timing starts)."""
    if bar is not None:
        bar.update()
        bar.set_description(f"{label} {stage}: {name}")


def paired_ratio(base: Timing, other: Timing) -> float | None:
    """Median over rounds of ``base_time / other_time`` (> 1: ``other`` is faster than ``base``)."""
    n = min(len(base.times), len(other.times))
    if n == 0:
        return None
    return statistics.median(b / o for b, o in zip(base.times[:n], other.times[:n]))


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, device="cpu", dtype=torch.float32) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n x n`` by ``n x n`` matmul: the machine's practical fp32 peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = min(time_call(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a call above what existed before it (see the module docstring for the method).

    Call :meth:`enable` once before measuring (on CPU it changes glibc's allocation policy for the rest of the
    process). :attr:`method` names what is measured, or why nothing is.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.enabled = False
        self.method = "unavailable"

    def enable(self) -> "PeakMemory":
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            self.enabled = True
            return self
        if _status_kib("VmHWM") is None:
            self.method = "unavailable: no /proc/self/status (peak RSS needs Linux)"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as err:
            self.method = f"unavailable: cannot reset the RSS high-water mark ({err})"
            return self
        libc_name = ctypes.util.find_library("c")
        try:
            self._libc = ctypes.CDLL(libc_name) if libc_name else None
            ok = bool(self._libc and self._libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024))
        except (OSError, AttributeError):
            self._libc, ok = None, False
        self.method = "peak RSS above the inputs (VmHWM reset via clear_refs" + (
            ", malloc_trim, mmap threshold 64 KiB)" if ok else "; glibc malloc controls unavailable: may undercount)")
        self.enabled = True
        return self

    def _trim(self) -> None:
        """Give free heap pages back to the system, so memory freed before the call cannot be reused unseen."""
        if getattr(self, "_libc", None) is not None:
            try:
                self._libc.malloc_trim(0)
            except AttributeError:
                pass

    @staticmethod
    def collect() -> None:
        """Full garbage collection (a few tenths of a second with transformers loaded: call it between groups of
        measurements, not before each one; tensors are freed by reference counting, not by the collector)."""
        gc.collect()

    def measure(self, fn: Callable[[], object]) -> int | None:
        """Bytes the call needed above the memory in use when it started, or None when unavailable."""
        if not self.enabled:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - base)
        self._trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        if base is None or peak is None:
            return None
        return max(0, peak - base) * 1024
