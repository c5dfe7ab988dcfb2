"""hf_reshape.bench.flex: the pattern handed to flex_attention is the variant's own, checked before timing."""

import json

import pytest
import torch

from hf_reshape.bench import flex


def test_sliding_window_pattern_is_the_band():
    t, w = 40, 6
    allowed = flex.allowed_keys("sliding_window", {"window": w}, t, causal=True)
    i = torch.arange(t)
    rel = i[:, None] - i[None, :]
    # the pattern read from the variant's weights equals the causal band it documents
    assert torch.equal(allowed, (rel >= 0) & (rel <= w))
    both = flex.allowed_keys("sliding_window", {"window": w}, t, causal=False)
    assert torch.equal(both, rel.abs() <= w)


@pytest.mark.parametrize("name", ["sliding_window", "sink_window"])
def test_smoke_run_writes_table(tmp_path, name):
    assert name in flex.sparse_variants()
    assert flex.main(["--T", "48", "--variants", name, "--rounds", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "flex.json").read_text())
    forms = {r["form"] for r in data["rows"]}
    assert forms == {"bidirectional", "causal"}
    for r in data["rows"]:
        assert r["variant_vs_sdpa"] > 0 and r["variant_vs_flex"] > 0
        assert 0 < r["pattern_density"] <= 1
    assert "eager (not compiled)" in (tmp_path / "flex.md").read_text()


def test_a_different_pattern_is_refused(monkeypatch):
    real = flex.allowed_keys
    # hand flex a pattern one key wider than the variant's: the check must stop the run
    monkeypatch.setattr(flex, "allowed_keys", lambda *a, **k: real(*a, **k) | torch.eye(a[2], dtype=torch.bool).roll(1, 1))
    with pytest.raises(RuntimeError, match="differs from the variant"):
        flex.run(32, ["sliding_window"], ["causal"], rounds=1, compile_=False, progress=False)


def test_unknown_variant_refused(tmp_path):
    from hf_reshape.errors import UnknownVariantError

    with pytest.raises(UnknownVariantError, match="registered variants"):
        flex.main(["--T", "32", "--variants", "nope", "--no-compile", "--out", str(tmp_path)])


def test_competing_load_starts_and_stops():
    import os

    from hf_reshape.bench.load import competing_load

    with competing_load(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive while the block runs
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped on exit
    with pytest.raises(ValueError, match="number of processes"):
        with competing_load(-1):
            pass
    with pytest.raises(RuntimeError):
        with competing_load(1) as pids:
            raise RuntimeError("the benchmark failed")
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # stopped also when the block raised
