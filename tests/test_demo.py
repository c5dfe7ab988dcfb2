"""Smoke run of the main job (`hf-reshape demo`) on the real MiniLM checkpoint, tiny sizes."""

import json

from hf_reshape import cli


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo.json"
    cli.main(["demo", "-n", "4", "--packed-length", "32", "--packed-batch", "1", "--repeats", "1",
              "--variants", "sliding_window", "linear", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| sliding_window |" in table and "| linear |" in table
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["softmax (sdpa)"]["token_cos"] > 0.9999
    assert 0.0 < rows["linear"]["token_cos"] < 0.9999  # untrained linear attention is not softmax
    assert rows["sliding_window"]["ms_T32"] > 0


def test_cli_lists_variants(capsys):
    cli.main(["variants"])
    assert "nystrom" in capsys.readouterr().out
