"""Competing CPU load for benchmarks: how a ratio holds up on a shared machine.

``competing_load(n)`` starts ``n`` single-threaded CPU-bound processes (a Python busy loop, the kind of neighbour a
shared CI runner or a colleague's job is) for the duration of a ``with`` block and stops them on exit, also when
the block raises. ``hf-reshape bench --load N`` runs the whole benchmark under it; with ``N`` = the number of cores
("one CPU-bound process per core") it shows whether a fast path's advantage survives a busy machine, which many
small multi-threaded operations do worse than few large ones (each synchronisation waits for the slowest thread).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

_BUSY = "while True:\n    pass\n"


@contextlib.contextmanager
def competing_load(n: int):
    """Run ``n`` busy-loop processes beside the block (``n = 0``: nothing). Yields their PIDs."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the competing load must be a number of processes >= 0, got {n!r}")
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.5)  # let them reach the scheduler before the first timed call
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
