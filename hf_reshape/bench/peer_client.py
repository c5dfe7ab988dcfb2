"""Side-by-side timing of hf_reshape's variants against peer packages running in another Python environment.

``hf_reshape/bench/peers.py`` runs under the peers' interpreter in ``--serve`` mode; this module drives it one
JSON line at a time. In each round hf_reshape's call and the peer's call of the same shape run one after the
other (never at once), so machine noise hits both alike, exactly as between candidates of the op benchmark.
The peer's time is measured inside its own process (no IPC in it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from . import op as op_bench
from .timing import Timing, interleaved, paired_ratio

PEERS_SCRIPT = Path(__file__).with_name("peers.py")
# the peers' own limits on a 2-core CPU: performer-pytorch's causal path without its CUDA kernel loops over 128
# chunks with a [T/128, F, D] state each and takes seconds already at T=512
PEER_CAPS = {("performer-pytorch", "causal"): 1024}


class PeerServer:
    """The ``peers.py --serve`` subprocess."""

    def __init__(self, python: str, log_path: str | os.PathLike | None = None):
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [python, str(PEERS_SCRIPT), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, bufsize=1,
        )

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peers process exited (code {self.proc.poll()}); see its log")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.request(cmd="quit")
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


class _PeerCall:
    """A candidate for :func:`interleaved` whose time is the one the peer process measured."""

    reports_time = True

    def __init__(self, server: PeerServer, package: str, mode: str):
        self.server, self.package, self.mode = server, package, mode

    def __call__(self) -> float:
        reply = self.server.request(cmd="call", package=self.package, mode=self.mode)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["seconds"]


def run(python: str | None, cfg: op_bench.OpConfig, sizes, log_path=None, progress=None) -> tuple[dict, list]:
    """Time each installed peer next to its hf_reshape variant. Returns the ``peers`` section and memory jobs."""
    if not python:
        return {"status": "not run: pass --peers-python (a Python with the peer packages; see peers.py)"}, []
    try:
        server = PeerServer(python, log_path)
        info = server.request(cmd="info")
    except Exception as err:  # noqa: BLE001
        return {"status": f"not run: could not start {python} {PEERS_SCRIPT.name}: {err}"}, []
    section = {"status": "ok", "python": python, "torch": info.get("torch"), "threads": info.get("threads"),
               "packages": info["packages"], "rows": []}
    memory_jobs = []
    settings = {"window": op_bench.variant_params("sliding_window", 1, cfg.quick).get("window", 256),
                "proj_len": op_bench.variant_params("linformer", 1, cfg.quick).get("proj_len", 256),
                "num_landmarks": op_bench.variant_params("nystrom", 1, cfg.quick).get("num_landmarks", 64)}
    section["settings"] = settings
    selected = set(cfg.variants or op_bench.list_variants())
    try:
        for t in sizes:
            inputs = op_bench.OpInputs(cfg, t)
            for form in cfg.forms:
                causal = form == "causal"
                pairs = [(p, e["compared_with"]) for p, e in info["packages"].items()
                         if e["available"] and form in e["forms"] and e["compared_with"] in selected
                         and t <= PEER_CAPS.get((p, form), t)]
                if not pairs:
                    continue
                setup = server.request(cmd="setup", packages=[p for p, _ in pairs], B=cfg.batch, H=cfg.heads, T=t,
                                       D=cfg.head_dim, causal=causal, settings=settings)
                for mode in cfg.modes:
                    calls = {}
                    for p, ours in pairs:
                        if p in setup["ready"]:
                            calls[f"peer:{p}"] = _PeerCall(server, p, mode)
                        calls[f"ours:{ours}"] = op_bench.make_call(ours, inputs, causal, mode, cfg.quick)
                    if progress:
                        progress(f"peers T={t} {form} {mode}: {', '.join(calls)}")
                    timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"peers T={t} {form} {mode}")
                    for p, ours in pairs:
                        peer_t = timings.get(f"peer:{p}", Timing(error=setup["errors"].get(p)))
                        ours_t = timings[f"ours:{ours}"]
                        section["rows"].append({
                            "T": t, "form": form, "mode": mode, "package": p, "variant": ours,
                            "peer_times_s": peer_t.times, "peer_median_s": peer_t.median, "peer_error": peer_t.error,
                            "ours_times_s": ours_t.times, "ours_median_s": ours_t.median,
                            # > 1: hf_reshape is faster than the peer
                            "ours_speedup_vs_peer": paired_ratio(peer_t, ours_t),
                        })
                        if p in setup["ready"]:
                            memory_jobs.append((t, form, mode, p, causal, settings))
            del inputs
    except Exception as err:  # noqa: BLE001
        section["status"] = f"stopped: {type(err).__name__}: {err}"
        server.close()
        return section, []
    section["_server"] = server
    return section, memory_jobs


def run_memory(section: dict, jobs: list, cfg: op_bench.OpConfig, progress=None) -> None:
    """Peak memory of each peer call (in the peer process), added to the peer rows; closes the server."""
    server = section.pop("_server", None)
    if server is None:
        return
    try:
        done = {}
        setup_key = None
        for t, form, mode, package, causal, settings in jobs:
            if (t, form) != setup_key:
                packages = sorted({j[3] for j in jobs if j[0] == t and j[1] == form})
                server.request(cmd="setup", packages=packages, B=cfg.batch, H=cfg.heads, T=t, D=cfg.head_dim,
                               causal=causal, settings=settings)
                setup_key = (t, form)
            if progress:
                progress(f"memory peer T={t} {form} {mode} {package}")
            reply = server.request(cmd="memory", package=package, mode=mode)
            done[(t, form, mode, package)] = reply.get("bytes")
        for row in section["rows"]:
            row["peer_peak_bytes"] = done.get((row["T"], row["form"], row["mode"], row["package"]))
    finally:
        server.close()


def close(section: dict) -> None:
    server = section.pop("_server", None)
    if server is not None:
        server.close()


def default_python() -> str | None:
    return os.environ.get("HF_RESHAPE_PEERS_PYTHON") or None

