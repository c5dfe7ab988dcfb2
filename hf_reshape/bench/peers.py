"""Peer implementations of efficient attention, timed on the shapes hf_reshape's op benchmark uses.

This file imports only ``torch`` and the peer packages, so it runs in its own virtual environment, where the
peers are installed and hf_reshape is not (hf_reshape never depends on them)::

    python3 -m venv peers-venv && peers-venv/bin/pip install torch==2.13.0 \\
        performer-pytorch linformer nystrom-attention local-attention
    peers-venv/bin/python hf_reshape/bench/peers.py --sizes 1024 4096 --json peers.json   # standalone
    hf-reshape bench --peers-python peers-venv/bin/python                             # side by side

Standalone it times each installed peer against torch SDPA, interleaved round by round, and writes JSON.
With ``--serve`` it answers one JSON request per line on stdin (``setup``, ``call``, ``memory``, ``info``,
``quit``), so that ``hf-reshape bench`` can alternate a peer's call with hf_reshape's own call of the same shape
in the same round: the two processes never run at the same time, and the ratio is measured side by side.

Peers (lucidrains' packages) and the hf_reshape variant each is compared with:

================== =============================================================== =====================
package             module and settings                                             hf_reshape variant
================== =============================================================== =====================
performer-pytorch   ``FastAttention(dim_heads=D, nb_features=F, causal=...)``:       ``linear`` (elu+1)
                    FAVOR+ softmax kernel with F random features (default
                    ``int(D log D)`` = 266 at D=64); causal runs its non-CUDA
                    prefix-sum path
linformer           ``LinformerSelfAttention(dim=H*D, seq_len=T, k=256, heads=H)``  ``linformer(256)``
                    with its ``to_q/to_k/to_v`` replaced by the given q, k, v and
                    ``to_out`` by identity: only the attention is timed
nystrom-attention   ``NystromAttention(dim=H*D, dim_head=D, heads=H,                ``nystrom(64)``
                    num_landmarks=64, pinv_iterations=6, residual=False)``, its
                    ``to_qkv`` replaced by the given packed q, k, v and ``to_out``
                    by identity
local-attention     ``LocalAttention(window_size=256, causal=..., look_forward=1     ``sliding_window(256)``
                    if bidirectional, exact_windowsize=True, autopad=True)``:
                    the same |i-j| <= w band, computed over 3 (2 causal) buckets
================== =============================================================== =====================

The peers are not numerically identical to hf_reshape's variants (Performer's random features are not elu+1,
lucidrains' Linformer takes no padding mask, ...): the comparison is of cost on equal shapes, not of outputs.
Peak memory is measured as in ``hf_reshape.bench.timing.PeakMemory`` (peak RSS above the inputs, with glibc's
mmap threshold lowered so freed tensors are returned to the system); that code is repeated here because this
file may not import hf_reshape.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

PEERS = {
    # package: (import name, hf_reshape variant compared with, forms)
    "performer-pytorch": ("performer_pytorch", "linear", ("bidirectional", "causal")),
    "linformer": ("linformer", "linformer", ("bidirectional",)),
    "nystrom-attention": ("nystrom_attention", "nystrom", ("bidirectional",)),
    "local-attention": ("local_attention", "sliding_window", ("bidirectional", "causal")),
}
DEFAULT_SETTINGS = {"window": 256, "proj_len": 256, "num_landmarks": 64, "pinv_iterations": 6, "nb_features": None}


def package_info() -> dict:
    """Version of each peer package, or why it cannot be imported."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    info = {}
    for package, (module, ours, forms) in PEERS.items():
        entry = {"compared_with": ours, "forms": list(forms)}
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import_module(module)
            try:
                entry["version"] = version(package)
            except PackageNotFoundError:
                entry["version"] = "unknown"
            entry["available"] = True
        except Exception as err:  # noqa: BLE001 - any import failure means "not available"
            entry["available"] = False
            entry["error"] = f"{type(err).__name__}: {err}"
        info[package] = entry
    return info


class _Given(nn.Module):
    """Stands in for a projection layer: returns a fixed tensor whatever it is given."""

    def __init__(self, tensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, x):
        return self.tensor


class PeerCall:
    """One peer on one shape: ``run(mode)`` does a forward (``fwd``, under no_grad) or forward+backward."""

    def __init__(self, package: str, b: int, h: int, t: int, d: int, causal: bool, settings: dict, seed: int = 0):
        s = {**DEFAULT_SETTINGS, **(settings or {})}
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.package = package
        if package == "performer-pytorch":
            from performer_pytorch import FastAttention

            with contextlib.redirect_stdout(sys.stderr):  # it prints a notice about its CUDA kernel
                self.module = FastAttention(dim_heads=d, nb_features=s["nb_features"], causal=causal)
            q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
            self.leaves = [q, k, v]
            self.forward = lambda: self.module(q, k, v)
        elif package == "local-attention":
            from local_attention import LocalAttention

            self.module = LocalAttention(window_size=s["window"], causal=causal, look_backward=1,
                                         look_forward=0 if causal else 1, exact_windowsize=True, autopad=True)
            q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
            self.leaves = [q, k, v]
            self.forward = lambda: self.module(q, k, v)
        elif package == "linformer":
            if causal:
                raise ValueError("linformer is bidirectional only")
            from linformer import LinformerSelfAttention

            self.module = LinformerSelfAttention(dim=h * d, seq_len=t, k=s["proj_len"], heads=h, dim_head=d)
            q, k, v = (torch.randn(b, t, h * d, generator=g) for _ in range(3))
            self.module.to_q, self.module.to_k, self.module.to_v = _Given(q), _Given(k), _Given(v)
            self.module.to_out = nn.Identity()
            self.leaves = [q, k, v]
            self.forward = lambda: self.module(q)
        elif package == "nystrom-attention":
            if causal:
                raise ValueError("nystrom-attention is bidirectional only")
            from nystrom_attention import NystromAttention

            self.module = NystromAttention(dim=h * d, dim_head=d, heads=h, num_landmarks=s["num_landmarks"],
                                           pinv_iterations=s["pinv_iterations"], residual=False)
            qkv = torch.randn(b, t, 3 * h * d, generator=g)
            self.module.to_qkv = _Given(qkv)
            self.module.to_out = nn.Identity()
            self.leaves = [qkv]
            self.forward = lambda: self.module(qkv)
        elif package == "sdpa":
            q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
            self.leaves = [q, k, v]
            self.forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            raise ValueError(f"unknown peer {package!r}")
        self.module = getattr(self, "module", None)
        if self.module is not None:
            self.module.eval()
        for x in self.leaves:
            x.requires_grad_(True)
        self.wrt = self.leaves + ([p for p in self.module.parameters() if p.requires_grad] if self.module else [])
        with torch.no_grad():
            self.grad = torch.randn_like(self.forward())

    def run(self, mode: str):
        if mode == "fwd":
            with torch.no_grad():
                return self.forward()
        return torch.autograd.grad(self.forward(), self.wrt, self.grad)

    def timed(self, mode: str) -> float:
        t0 = time.perf_counter()
        self.run(mode)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- peak memory


def _status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_MEMORY = {"enabled": None}


def peak_memory(fn) -> int | None:
    """Peak RSS above the current RSS during ``fn()`` (Linux), as in hf_reshape.bench.timing.PeakMemory."""
    if _MEMORY["enabled"] is None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            name = ctypes.util.find_library("c")
            if name:
                _MEMORY["libc"] = ctypes.CDLL(name)
                _MEMORY["libc"].mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            _MEMORY["enabled"] = _status_kib("VmHWM") is not None
        except (OSError, AttributeError):
            _MEMORY["enabled"] = False
    if not _MEMORY["enabled"]:
        return None
    gc.collect()
    if _MEMORY.get("libc") is not None:
        _MEMORY["libc"].malloc_trim(0)  # free heap pages go back, so reusing them is counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - base) * 1024


# ------------------------------------------------------------------------------------------- modes


def serve(stdin=None, proto=None) -> None:
    """Answer JSON requests, one per line; replies go to the original stdout, anything printed to stderr."""
    stdin = stdin or sys.stdin
    if proto is None:
        proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        sys.stdout = sys.stderr  # peers print notices; keep the protocol channel clean
    calls: dict[str, PeerCall] = {}
    for line in stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "info":
                reply = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "python": sys.version.split()[0], "packages": package_info()}
            elif cmd == "setup":
                calls.clear()
                gc.collect()
                errors = {}
                for package in req["packages"]:
                    try:
                        calls[package] = PeerCall(package, req["B"], req["H"], req["T"], req["D"], req["causal"],
                                                  req.get("settings", {}))
                    except Exception as err:  # noqa: BLE001
                        errors[package] = f"{type(err).__name__}: {err}"
                reply = {"ready": sorted(calls), "errors": errors}
            elif cmd == "call":
                reply = {"seconds": calls[req["package"]].timed(req["mode"])}
            elif cmd == "memory":
                call = calls[req["package"]]
                reply = {"bytes": peak_memory(lambda: call.run(req["mode"]))}
            elif cmd == "quit":
                proto.write(json.dumps({"bye": True}) + "\n")
                return
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as err:  # noqa: BLE001
            reply = {"error": f"{type(err).__name__}: {err}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


def standalone(sizes, forms, modes, rounds, warmup, b, h, d, settings, memory) -> dict:
    """Each available peer and torch SDPA on each shape, interleaved within rounds; medians and x SDPA."""
    info = package_info()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "shape": {"B": b, "H": h, "D": d}, "settings": {**DEFAULT_SETTINGS, **settings}, "packages": info,
               "rows": []}
    available = [p for p, e in info.items() if e["available"]]
    for t in sizes:
        for form in forms:
            causal = form == "causal"
            names = ["sdpa"] + [p for p in available if form in PEERS[p][2]]
            calls = {n: PeerCall(n, b, h, t, d, causal, settings) for n in names}
            for mode in modes:
                for n in names:
                    for _ in range(warmup):
                        calls[n].run(mode)
                times = {n: [] for n in names}
                for r in range(rounds):
                    for n in names[r % len(names):] + names[: r % len(names)]:
                        times[n].append(calls[n].timed(mode))
                for n in names:
                    ratio = statistics.median(a / c for a, c in zip(times["sdpa"], times[n]))
                    results["rows"].append({
                        "T": t, "form": form, "mode": mode, "package": n, "times_s": times[n],
                        "median_s": statistics.median(times[n]), "speedup_vs_sdpa": ratio, "peak_bytes": None,
                    })
                    print(f"T={t:6d} {form:13s} {mode:7s} {n:18s} {1e3 * statistics.median(times[n]):10.1f} ms "
                          f"x{ratio:.2f} vs sdpa", file=sys.stderr)
    if memory:  # after all timing: measuring changes glibc's allocation policy for the rest of the process
        for row in results["rows"]:
            call = PeerCall(row["package"], b, h, row["T"], d, row["form"] == "causal", settings)
            row["peak_bytes"] = peak_memory(lambda: call.run(row["mode"]))
            del call
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (used by hf-reshape bench)")
    p.add_argument("--info", action="store_true", help="print which peers import, as JSON, and exit")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--forms", nargs="+", default=["bidirectional", "causal"], choices=["bidirectional", "causal"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=DEFAULT_SETTINGS["window"])
    p.add_argument("--proj-len", type=int, default=DEFAULT_SETTINGS["proj_len"])
    p.add_argument("--num-landmarks", type=int, default=DEFAULT_SETTINGS["num_landmarks"])
    p.add_argument("--nb-features", type=int, default=None, help="Performer random features (default int(D log D))")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (changes glibc's malloc policy)")
    p.add_argument("--json", default=None, help="write the results here (default: stdout)")
    args = p.parse_args(argv)
    if args.serve:
        return serve()
    if args.info:
        print(json.dumps(package_info(), indent=2))
        return
    settings = {"window": args.window, "proj_len": args.proj_len, "num_landmarks": args.num_landmarks,
                "nb_features": args.nb_features}
    results = standalone(args.sizes, args.forms, args.modes, args.rounds, args.warmup, args.batch, args.heads,
                         args.head_dim, settings, args.memory)
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
