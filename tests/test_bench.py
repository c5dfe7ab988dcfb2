"""`hf-reshape bench`: a `--quick` smoke run of every level writes JSON, markdown and a PNG with sane contents;
the analytic FLOP counts match brute-force counts of the attended pairs."""

import json
import struct
import sys

import pytest
import torch

from hf_reshape import cli
from hf_reshape.bench import op as op_bench
from hf_reshape.bench import report

VARIANTS = ["linear", "sliding_window", "linformer"]  # causal + bidirectional, stateless + stateful


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # sys.executable has no peer packages (hf_reshape must not depend on them): exercises the peers server path
    cli.main(["bench", "--quick", "--level", "all", "--out", str(out), "--variants", *VARIANTS,
              "--peers-python", sys.executable])
    return out, json.loads((out / "bench.json").read_text())


def test_quick_op_level(quick_run):
    out, res = quick_run
    rows = res["op"]["rows"]
    got = {(r["form"], r["mode"], r["candidate"]) for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        for c in ["sdpa", "eager", *VARIANTS]:
            assert ("bidirectional", mode, c) in got
        assert ("causal", mode, "linear") in got and ("causal", mode, "sliding_window") in got
        assert ("causal", mode, "linformer") not in got  # bidirectional only
    for r in rows:
        assert r["error"] is None, r
        assert r["median_s"] > 0 and len(r["times_s"]) == res["settings"]["rounds"]
        assert r["speedup_vs_sdpa"] > 0 and r["gflops_per_s"] > 0
    assert rows[0]["T"] == 32 and {r["T"] for r in rows} == {32, 64}
    assert res["machine"]["matmul_peak_gflops"] > 0
    memory = res["op"]["memory"]
    assert {r["T"] for r in memory} == {32, 64, 128}  # 128: memory-only size of the non-quadratic candidates
    assert not any(r["candidate"] in ("sdpa", "eager") for r in memory if r["T"] == 128)
    if sys.platform.startswith("linux"):
        assert all(r["peak_bytes"] is not None for r in memory)
        lin = {r["T"]: r["peak_bytes"] for r in memory if (r["candidate"], r["form"], r["mode"]) ==
               ("linear", "bidirectional", "fwd+bwd")}
        assert 0 < lin[32] < lin[128] < 64 * 2**20  # grows with T, and stays small
    assert len(res["goals"]) >= 12 and all(g["met"] is None for g in res["goals"][:12])  # T=8192 not run


def test_quick_peers_and_models(quick_run):
    _, res = quick_run
    peers = res["peers"]
    assert peers["status"] == "ok", peers
    assert set(peers["packages"]) == {"performer-pytorch", "linformer", "nystrom-attention", "local-attention"}
    for name, entry in peers["packages"].items():
        if not entry["available"]:
            assert entry["error"]  # says why
    rows = res["model"]["rows"]
    assert {r["model"] for r in rows} == {"bert", "vit", "gpt2"}
    for model in ("bert", "vit", "gpt2"):
        cands = {r["candidate"] for r in rows if r["model"] == model}
        assert "sdpa" in cands and "linear" in cands
    assert "linformer" not in {r["candidate"] for r in rows if r["model"] == "gpt2"}  # GPT-2 is causal
    assert next(r for r in rows if r["model"] == "vit")["tokens"] == 17  # 64 x 64 image, 16-pixel patches
    for r in rows:
        assert r["error"] is None and r["median_s"] > 0, r
    assert {r["tokens"] for r in rows if r["model"] == "bert"} == {32, 64}
    gen = [r for r in rows if r["model"] == "gpt2"]
    assert all(r["cache"] and r["prefill_s"] > 0 for r in gen)
    # decoding after the short prompt is timed too: the per-token ratio long / short is reported. At these sizes a
    # per-token time is a difference of two noisy times (one round) that load on the machine can make <= 0, when
    # the ratio is left out rather than made up
    for r in gen:
        assert r["short_prompt"] == 4 and isinstance(r["per_token_short_s"], float), r
        if r["per_token_s"] > 0 and r["per_token_short_s"] > 0:
            assert r["latency_growth"] == pytest.approx(r["per_token_s"] / r["per_token_short_s"]), r
        else:
            assert r["latency_growth"] is None, r
    memory = res["model"]["memory"]
    assert len(memory) == len(rows) and all(r["error"] is None for r in memory), memory


def test_quick_outputs(quick_run, capsys):
    out, res = quick_run
    md = (out / "bench.md").read_text()
    for needle in ("## Op level", "| `linear` |", "| `sdpa` |", "Peak memory above inputs", "Achieved GFLOP/s",
                   "## Goals", "## Peers", "## Model level", "GPT-2"):
        assert needle in md, needle
    png = (out / "op.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000
    width, height = struct.unpack(">II", png[16:24])
    assert width > 600 and height > 300


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [5, 40, 100])
def test_flops_count_attended_pairs(t, causal):
    cfg = op_bench.OpConfig(batch=1, heads=1, head_dim=1)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    w = 9
    band = ((i - j >= 0) & (i - j <= w)) if causal else (i - j).abs() <= w
    assert op_bench.forward_flops("sliding_window", t, cfg, causal, {"window": w}) == 4 * int(band.sum())
    full = (i >= j) if causal else torch.ones(t, t, dtype=torch.bool)
    assert op_bench.forward_flops("sdpa", t, cfg, causal) == 4 * int(full.sum())


def test_exponent():
    assert report.exponent({1024: 1.0, 4096: 16.0}, 1024, 4096) == pytest.approx(2.0)
    assert report.exponent({1024: 1.0}, 1024, 4096) is None


def test_progress_bars_name_stage_and_candidate(capsys):
    """The op-level timing shows which size, form, mode, round and candidate it is on (tqdm, on stderr)."""
    cfg = op_bench.OpConfig(heads=2, head_dim=8, sizes=(16,), variants=("linear",), forms=("bidirectional",),
                            modes=("fwd",), rounds=2, warmup=1, quick=True)
    rows = op_bench.run_timing(cfg)["rows"]
    assert {r["candidate"] for r in rows} == {"sdpa", "eager", "linear"}
    err = capsys.readouterr().err
    for label in ("op T=16 bidirectional fwd warm-up: linear", "op T=16 bidirectional fwd round 1/2: sdpa",
                  "op T=16 bidirectional fwd round 2/2: linear", "op T=16 bidirectional fwd round 2/2: eager"):
        assert label in err, label


def test_quick_llama_model_level(tmp_path):
    """`--models llama`: a Llama-shaped decoder (random weights, GQA, RoPE): forward and generate against SDPA."""
    cli.main(["bench", "--quick", "--level", "model", "--models", "llama", "--out", str(tmp_path),
              "--variants", "linear", "sliding_window"])
    res = json.loads((tmp_path / "bench.json").read_text())
    rows = res["model"]["rows"]
    fwd = {r["candidate"]: r for r in rows if r["model"] == "llama"}
    gen = {r["candidate"]: r for r in rows if r["model"] == "llama-generate"}
    assert set(fwd) == set(gen) == {"sdpa", "linear", "sliding_window"}
    assert all(r["error"] is None and r["median_s"] > 0 and r["weights"] == "random" for r in rows), rows
    assert fwd["sdpa"]["tokens"] == 64 and fwd["linear"]["kv_heads"] == 2
    assert gen["sdpa"]["cache"] == "DynamicCache" and gen["linear"]["cache"] == "ReshapeCache"
    assert all(r["cache_bytes"] > 0 and r["prefill_s"] > 0 for r in gen.values())
    md = (tmp_path / "bench.md").read_text()
    assert "Llama-shaped decoder (random weights" in md and "cache MiB at the end" in md


def test_load_runs_busy_processes_beside_the_benchmark_and_says_so(tmp_path, monkeypatch):
    import hf_reshape.bench.load as load

    seen = []
    real = load.competing_load

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(load, "competing_load", spy)
    cli.main(["bench", "--quick", "--level", "op", "--sizes", "32", "--variants", "linear", "--no-memory",
              "--forms", "bidirectional", "--modes", "fwd", "--load", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench.json").read_text())
    assert seen == [1] and res["machine"]["competing_processes"] == 1
    assert "1 competing busy-loop processes ran beside it (`--load 1`)" in (tmp_path / "bench.md").read_text()


def test_goals_cover_the_catalogue_and_read_the_measured_ratio():
    rows = [{"form": "bidirectional", "mode": "fwd", "candidate": "hedgehog", "T": 8192, "speedup_vs_sdpa": 25.0,
             "median_s": 0.1},
            {"form": "causal", "mode": "fwd", "candidate": "performer", "T": 8192, "speedup_vs_sdpa": 1.3,
             "median_s": 0.1},
            {"form": "bidirectional", "mode": "fwd", "candidate": "taylor", "T": 8192, "speedup_vs_sdpa": 2.6,
             "median_s": 0.1}]
    got = {g["goal"]: g["met"] for g in report.goals({"op": {"rows": rows, "memory": []}})}
    assert got["hedgehog bidirectional fwd: >= 20x SDPA at T=8192"] is True
    assert got["performer causal fwd: >= 4x SDPA at T=8192"] is False
    assert got["taylor bidirectional fwd: >= 2.5x SDPA at T=8192"] is True
    assert got["strided causal fwd+bwd: >= 3x SDPA at T=8192"] is None  # not measured
    # every registered variant without a T x T tensor gets the growth-exponent goal when it is measured
    assert {"block_sparse", "strided", "taylor", "performer"} <= set(report.subquadratic())
