"""The recipe runner on tiny models and tiny data files built by the tests (no network, no shared data)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reshape.recipes import Recipe, RecipeError, run
from hf_reshape.recipes.cli import build_recipe, recipe_parser

WORDS = "good great fine nice happy bad awful poor sad ugly the a movie film plot actor was is very not".split()
REQUIRED_ROW_KEYS = {"variant", "params", "stage", "metric", "retained", "train_samples_per_s", "latency_ms",
                     "latency_long_ms", "peak_mem_mib", "added_params"}
REQUIRED_RUN_KEYS = {"rows", "model", "dataset", "versions", "seed", "machine", "world_size", "command"}


def _write_data(path: Path, n=120, labels=("5", "1")) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write("review,stars\n")
        for _ in range(n):
            pos = rng.random() < 0.5
            w = [rng.choice(WORDS[:5] if pos else WORDS[5:10])] + [rng.choice(WORDS[10:]) for _ in range(rng.randint(2, 6))]
            rng.shuffle(w)
            f.write(" ".join(w) + "," + (labels[0] if pos else labels[1]) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A 2-layer BERT with a 25-word vocabulary, saved with its tokenizer, and a CSV of sentiment-like rows whose
    labels are 1-based star ratings (strings in the file's header-named column)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab))
    tok = tf.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _write_data(root / "data.csv")
    return root


def _recipe(root: Path, **schedule) -> dict:
    return {
        "name": "tiny",
        "task": "text-classification",
        "model": str(root / "model"),
        "data": {"train": str(root / "data.csv"), "text_column": "review", "label_column": "stars"},
        "schedule": {"max_steps": 3, "batch_size": 8, "transfer_steps": 2, "transfer_batch_size": 8, "long_length": 48,
                     "latency_repeats": 1, "lr": 1e-3, **schedule},
        "variants": [{"name": "linformer", "params": {"proj_len": 8}}, {"name": "topk", "params": {"top_k": 4}}],
    }


@pytest.fixture(scope="module")
def tiny_run(tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    results = run(Recipe.from_dict(_recipe(tiny_text)), out, command="pytest tiny run")
    return out, results


def test_run_writes_every_row_stage_and_artefact(tiny_run):
    out, results = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert REQUIRED_RUN_KEYS <= set(saved)
    assert saved["world_size"] == 1
    stages = {(r["variant"], r["stage"]) for r in saved["rows"]}
    assert stages == {("softmax", "finetune"), ("linformer", "none"), ("linformer", "transfer"),
                      ("linformer", "finetune"), ("linformer", "transfer+finetune"), ("topk", "none"),
                      ("topk", "finetune")}
    for row in saved["rows"]:
        assert REQUIRED_ROW_KEYS <= set(row), row
        assert row["metric"]["name"] == "accuracy" and 0.0 <= row["metric"]["value"] <= 1.0
        assert row["latency_ms"] > 0 and row["latency_long_ms"] > 0
    base = next(r for r in saved["rows"] if r["variant"] == "softmax")
    for row in saved["rows"]:
        assert row["retained"] == pytest.approx(row["metric"]["value"] / base["metric"]["value"])
    lin = {r["stage"]: r for r in saved["rows"] if r["variant"] == "linformer"}
    assert lin["none"]["added_params"] == 2 * 2 * 8 * 64  # E and F, [proj_len, max_length], per layer
    assert lin["transfer"]["transfer"]["final_loss"] < lin["transfer"]["transfer"]["initial_loss"]
    assert lin["none"]["train_samples_per_s"] is None and lin["finetune"]["train_samples_per_s"] > 0
    # parameter-free variants: transfer skipped, with the reason
    assert {(s["variant"], s["stage"]) for s in saved["skipped"]} == {("topk", "transfer"), ("topk", "transfer+finetune")}
    assert all("no parameters of its own" in s["reason"] for s in saved["skipped"])
    md = (out / "results.md").read_text()
    assert "| linformer | proj_len=8 | transfer+finetune |" in md and "topk / transfer:" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_reload_with_their_variant_and_labels(tiny_run):
    import hf_reshape
    from transformers import AutoModelForSequenceClassification

    out, _ = tiny_run
    folder = out / "models" / "linformer-transfer-finetune"
    model = hf_reshape.from_pretrained(str(folder), model_class=AutoModelForSequenceClassification)
    assert hf_reshape.get_reshape_config(model).method == "linformer"
    # 1-based star ratings in a string column map to class ids in sorted order, recorded in id2label
    assert model.config.id2label == {0: "1", 1: "5"}


def test_model_cards(tiny_run):
    from huggingface_hub import ModelCard

    out, results = tiny_run
    card = ModelCard.load(out / "models" / "linformer-transfer-finetune" / "README.md")
    assert card.data.library_name == "hf_reshape"
    assert "linformer" in card.data.tags
    metric = card.data.eval_results[0]
    row = next(r for r in results["rows"] if r["variant"] == "linformer" and r["stage"] == "transfer+finetune")
    assert metric.metric_value == pytest.approx(round(row["metric"]["value"], 4))
    assert "hf_reshape.from_pretrained" in card.text
    # `hf-reshape card RUN_DIR` rebuilds them
    (out / "models" / "topk-finetune" / "README.md").unlink()
    from hf_reshape.recipes.cli import card_main

    card_main([str(out)])
    assert (out / "models" / "topk-finetune" / "README.md").is_file()


def test_push_to_hub_uploads_the_folder_through_hfapi(tiny_run):
    from hf_reshape.recipes.cards import push_to_hub

    out, _ = tiny_run
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))
            return f"https://huggingface.co/{repo_id}/commit/0"

    folder = out / "models" / "linformer-finetune"
    url = push_to_hub(folder, "me/tiny-linformer", api=FakeApi())
    assert url.endswith("/commit/0")
    assert calls[0] == ("create", "me/tiny-linformer")
    assert {"README.md", "config.json", "model.safetensors"} <= set(calls[1][2])


def test_resume_skips_finished_rows_and_redoes_a_missing_one(tiny_text, tiny_run, tmp_path, monkeypatch):
    import shutil

    from hf_reshape.recipes import runner

    out, _ = tiny_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    (copy / "rows" / "topk__finetune.json").unlink()
    trained = []
    real_train = runner.train

    def spy(task, model, data, where, label, **kw):
        trained.append(label)
        return real_train(task, model, data, where, label, **kw)

    monkeypatch.setattr(runner, "train", spy)
    results = run(Recipe.from_dict(_recipe(tiny_text)), copy, command="pytest resumed")
    assert trained == ["topk / finetune"]  # baseline and every other finished row were kept
    assert {(r["variant"], r["stage"]) for r in results["rows"]} >= {("topk", "finetune"), ("linformer", "none")}


def test_bad_recipes_are_refused_naming_what_is_accepted(tiny_text, tmp_path):
    base = _recipe(tiny_text)
    with pytest.raises(RecipeError, match=r"unknown field\(s\) \['epoch'\].*accepted"):
        Recipe.from_dict({**base, "schedule": {"epoch": 1}})
    with pytest.raises(RecipeError, match="unknown task 'translation'.*text-classification"):
        Recipe.from_dict({**base, "task": "translation"})
    with pytest.raises(RecipeError, match="stages"):
        Recipe.from_dict({**base, "stages": ["distil"]})
    with pytest.raises(RecipeError, match="missing field `model`"):
        Recipe.from_dict({k: v for k, v in base.items() if k != "model"})
    with pytest.raises(RecipeError, match="`lr` must be a float"):
        Recipe.from_dict({**base, "schedule": {"lr": "fast"}})
    from hf_reshape import InvalidParameterError, UnknownVariantError

    with pytest.raises(InvalidParameterError, match="top_kk"):
        Recipe.from_dict({**base, "variants": [{"name": "topk", "params": {"top_kk": 3}}]})
    with pytest.raises(UnknownVariantError):
        Recipe.from_dict({**base, "variants": ["softmaxx"]})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot parse it as YAML"):
        Recipe.load(bad_yaml)
    with pytest.raises(RecipeError, match="built-in recipes: .*bert-sst2"):
        Recipe.load("no-such-recipe")


def test_bad_columns_and_empty_files_name_what_was_found(tiny_text, tmp_path):
    recipe = Recipe.from_dict({**_recipe(tiny_text), "data": {"train": str(tiny_text / "data.csv"),
                                                              "text_column": "sentence", "label_column": "stars"}})
    with pytest.raises(RecipeError, match=r"no column\(s\) \['sentence'\]; columns found: \['review', 'stars'\]"):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "rows").exists()  # refused before any training
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    recipe = Recipe.from_dict({**_recipe(tiny_text), "data": {"train": str(empty)}})
    with pytest.raises(RecipeError, match="empty"):
        run(recipe, tmp_path / "out2")


def test_cli_overrides_and_builtin_recipes_parse(tiny_text):
    for name in ("bert-sst2",):
        recipe = Recipe.load(name)
        quick = recipe.with_overrides(recipe.quick)
        assert quick.schedule.max_train_samples < (recipe.schedule.max_train_samples or 10**9)
    args = recipe_parser().parse_args(["bert-sst2", "--quick", "--dataset", str(tiny_text / "data.csv"),
                                       "--text-column", "review", "--label-column", "stars", "--seed", "3",
                                       "--model", str(tiny_text / "model")])
    recipe = build_recipe(args)
    assert recipe.data.train == str(tiny_text / "data.csv") and recipe.data.eval is None
    assert recipe.data.text_column == "review" and recipe.schedule.seed == 3
    assert recipe.model == str(tiny_text / "model")
    assert recipe.data.hub_fallback is None


def test_two_processes_write_the_same_kind_of_results(tiny_text, tmp_path):
    """torchrun with two CPU processes (DDP over gloo): world size 2 recorded, same rows as in one process."""
    spec = tmp_path / "r.json"
    recipe = _recipe(tiny_text)
    recipe["variants"] = [{"name": "linformer", "params": {"proj_len": 8}}]
    recipe["stages"] = ["none", "transfer+finetune"]
    spec.write_text(json.dumps(recipe))
    import socket

    with socket.socket() as sock:  # a free port: two suites on one machine must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "hf_reshape.cli", "recipe", str(spec), "--out", str(tmp_path / "ddp"), "--no-cards"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2
    assert {(r["variant"], r["stage"]) for r in results["rows"]} == {
        ("softmax", "finetune"), ("linformer", "none"), ("linformer", "transfer+finetune")}
    for row in results["rows"]:
        assert REQUIRED_ROW_KEYS <= set(row)


def _write_idx(folder: Path, n=80, side=8) -> Path:
    """MNIST-format idx files (big-endian headers, gzip) with class-dependent images: labels 0-2."""
    import gzip
    import struct

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    pixels = (torch.rand(n, side, side, generator=g) * 60).to(torch.uint8)
    for c in range(3):  # a bright band whose row depends on the class
        pixels[labels == c, 2 * c:2 * c + 2, :] = 250
    images = folder / "t10k-images-idx3-ubyte.gz"
    with gzip.open(images, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, side, side) + pixels.numpy().tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())
    return images


def test_image_recipe_pretrains_a_vit_here_and_converts_it(tmp_path):
    images = _write_idx(tmp_path)
    recipe = Recipe.from_dict({
        "name": "tiny-vit", "task": "image-classification", "model": "local:tiny-vit",
        "description": "tiny ViT trained in the test",
        "pretrain": {"config": {"image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 16,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
                     "steps": 3, "batch_size": 16},
        "data": {"train": str(images), "eval_fraction": 0.25, "image_column": "image", "label_column": "label"},
        "schedule": {"max_steps": 2, "batch_size": 16, "transfer_steps": 2, "transfer_batch_size": 16,
                     "long_length": 16, "latency_repeats": 1},
        "variants": [{"name": "linformer", "params": {"proj_len": 2}}, "hedgehog"],
        "stages": ["none", "transfer"],
    })
    results = run(recipe, tmp_path / "out", cards=False)
    assert (tmp_path / "out" / "pretrained" / "config.json").is_file()
    assert "trained in the test" in results["model"]
    rows = {(r["variant"], r["stage"]): r for r in results["rows"]}
    assert set(rows) == {("softmax", "finetune"), ("linformer", "none"), ("linformer", "transfer"),
                         ("hedgehog", "none"), ("hedgehog", "transfer")}
    assert rows[("hedgehog", "none")]["latency_inputs"]["long"] == "1 image 16x16 (17 tokens)"
    assert rows[("hedgehog", "none")]["latency_long_ms"] > 0
    # Linformer's projections end at the trained positions: no long figures, and the reason is recorded
    assert rows[("linformer", "none")]["latency_long_ms"] is None
    assert "17" in rows[("linformer", "none")]["long_refused"]  # the refusal names the length it got


def test_causal_lm_recipe_reports_perplexity_inverted_and_extra_sets(tmp_path):
    rng = random.Random(1)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "other.txt").write_text(text[::-1])
    recipe = Recipe.from_dict({
        "name": "tiny-lm", "task": "causal-lm", "model": "local:tiny-gpt2", "metric": "perplexity",
        "pretrain": {"config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}, "steps": 3,
                     "batch_size": 8, "vocab_size": 300},
        "data": {"train": str(tmp_path / "corpus.txt"), "eval_fraction": 0.1,
                 "extra_eval": {"other_ppl": str(tmp_path / "other.txt")}},
        "schedule": {"max_steps": 2, "batch_size": 8, "max_length": 16, "max_eval_samples": 8, "transfer_steps": 2,
                     "transfer_batch_size": 8, "long_length": 48, "latency_repeats": 1},
        "variants": ["hedgehog", {"name": "sliding_window", "params": {"window": 4}}, "linformer"],
        "stages": ["none", "transfer+finetune"],
    })
    results = run(recipe, tmp_path / "out", cards=False)
    assert results["metric"] == "perplexity" and results["higher_is_better"] is False
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()  # trained here, on the training text
    base = next(r for r in results["rows"] if r["variant"] == "softmax")
    hh = next(r for r in results["rows"] if r["variant"] == "hedgehog" and r["stage"] == "transfer+finetune")
    assert hh["retained"] == pytest.approx(base["metric"]["value"] / hh["metric"]["value"])
    assert hh["extra_metrics"]["other_ppl"] > 1
    assert not any(r["variant"] == "linformer" for r in results["rows"])  # bidirectional only: skipped on GPT-2
    assert {(s["variant"], s["stage"]) for s in results["skipped"]} == {("sliding_window", "transfer+finetune")}


def test_lora_finetune_merges_adapters_and_keeps_the_variant(tiny_text, tmp_path):
    import hf_reshape
    from transformers import AutoModelForSequenceClassification

    recipe = Recipe.from_dict({**_recipe(tiny_text, lora=True, lora_r=2), "stages": ["finetune"],
                               "variants": [{"name": "linformer", "params": {"proj_len": 8}}]})
    results = run(recipe, tmp_path / "out", cards=False)
    assert {(r["variant"], r["stage"]) for r in results["rows"]} == {("softmax", "finetune"), ("linformer", "finetune")}
    folder = tmp_path / "out" / "models" / "linformer-finetune"
    model = hf_reshape.from_pretrained(str(folder), model_class=AutoModelForSequenceClassification)
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged into the weights
    assert hf_reshape.get_reshape_config(model).method == "linformer"


def test_long_document_recipe_packs_marked_sentences_past_the_trained_positions(tiny_text, tmp_path):
    """bert-longdoc's machinery at tiny sizes: sentences packed into documents longer than the 64 positions the
    tiny BERT was trained on (seeded, the label is the marked sentence's), the baseline and each variant extended
    to `max_positions`, the long latency taken at the extended length."""
    from hf_reshape.recipes.data import pack_documents

    rows = [line.split(",") for line in (tiny_text / "data.csv").read_text().splitlines()[1:]]
    (tmp_path / "s.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    spec = {**_recipe(tiny_text, max_steps=2, max_length=128, max_positions=128, long_length=100),
            "stages": ["finetune"], "variants": [{"name": "sink_window", "params": {"num_sink": 2, "window": 8}}]}
    spec["data"] = {"train": f"packed:{tmp_path / 's.tsv'}", "text_column": "sentence", "label_column": "label",
                    "pack": {"doc_tokens": 100, "train_doc_tokens": 40, "train_docs": 16, "eval_docs": 8,
                             "marker": "[MASK]"}}
    results = run(Recipe.from_dict(spec), tmp_path / "out", cards=False)
    packed = results["data_notes"]["packed"]
    assert packed["train"]["documents"] == 16 and 64 < packed["eval"]["max_tokens"] <= 100
    assert packed["eval"]["mean_tokens"] > 90 and packed["train"]["max_tokens"] <= 40
    assert [(r["label"], r["stage"]) for r in results["rows"]] == [("softmax", "finetune"), ("sink_window", "finetune")]
    assert all(r["latency_inputs"]["long"] == "1 x 100 tokens" and r["latency_long_ms"] for r in results["rows"])
    for folder in ("baseline/model", "models/sink_window-finetune"):
        assert json.loads((tmp_path / "out" / folder / "config.json").read_text())["max_position_embeddings"] == 128
    # deterministic from the seed; the label is the marked sentence's, wrapped in the marker
    sentences, labels = [s for s, _ in rows], [y for _, y in rows]
    kw = dict(n_docs=4, doc_tokens=30, marker="@", marker_tokens=1, seed=5)
    docs = pack_documents(sentences, labels, [len(s.split()) for s in sentences], **kw)
    assert docs == pack_documents(sentences, labels, [len(s.split()) for s in sentences], **kw)
    for text, label in zip(docs["text"], docs["label"]):
        marked = text.split("@")[1].strip()
        assert text.count("@") == 2 and labels[sentences.index(marked)] == label and len(text.split()) <= 28
    bad = {**spec, "data": {**spec["data"], "pack": {"doc_tokens": 100, "docs": 3}}}
    with pytest.raises(RecipeError, match="unknown field.*accepted"):
        Recipe.from_dict(bad)
    longdoc = Recipe.load("bert-longdoc")  # the built-in recipe parses; --quick is shorter
    quick = longdoc.with_overrides(longdoc.quick)
    assert longdoc.schedule.max_positions == 2048 and quick.data.pack["doc_tokens"] < longdoc.data.pack["doc_tokens"]
    too_long = {**spec, "schedule": {**spec["schedule"], "max_length": 64}}
    with pytest.raises(RecipeError, match="longer than the schedule's max_length"):
        run(Recipe.from_dict(too_long), tmp_path / "bad2", cards=False)


def test_the_same_hub_dataset_with_another_eval_split_reads_that_split(monkeypatch, tmp_path):
    """bert-sst2's online fallback names stanfordnlp/sst2 for train and eval with `eval_split: validation`: the
    validation split must be read, not a slice of the training rows."""
    from types import SimpleNamespace

    import datasets

    from hf_reshape.recipes import tasks
    from hf_reshape.recipes.spec import DataSpec

    calls = []

    def fake_load(source, split="train"):
        calls.append((source, split))
        return datasets.Dataset.from_dict({"text": [f"{split} {i}" for i in range(20)], "label": [i % 2 for i in range(20)]})

    monkeypatch.setattr(tasks, "load_source", fake_load)
    owner = SimpleNamespace(schedule=SimpleNamespace(seed=0))
    spec = DataSpec(train="someorg/reviews", eval="someorg/reviews", train_split="train", eval_split="validation")
    train, evals, how = tasks.Task._train_eval(owner, spec, ["text", "label"], contiguous=False)
    assert calls == [("someorg/reviews", "train"), ("someorg/reviews", "validation")]
    assert len(train) == 20 and set(evals["text"]) == {f"validation {i}" for i in range(20)}
    # the same local file twice is one source: split by eval_fraction, not read twice
    calls.clear()
    f = tmp_path / "rows.csv"
    f.write_text("text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(20)))
    spec = DataSpec(train=str(f), eval=str(f), eval_fraction=0.25)
    train, evals, how = tasks.Task._train_eval(owner, spec, ["text", "label"], contiguous=False)
    assert len(calls) == 1 and (len(train), len(evals)) == (15, 5) and "split" in how


def test_same_label_filler_packs_documents_of_one_sentiment():
    from hf_reshape.recipes.data import PackSpec, pack_documents

    sentences = [f"s{i}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    by_name = dict(zip(sentences, labels))
    for filler in ("same_label", "any"):
        docs = pack_documents(sentences, labels, [1] * 40, n_docs=12, doc_tokens=14, marker="@@", marker_tokens=1,
                              seed=0, filler=filler)
        mixed = 0
        for text, label in zip(docs["text"], docs["label"]):
            found = {by_name[w] for w in text.split() if w in by_name}
            marked = text.split("@@")[1].split()[0]
            assert by_name[marked] == label  # the marked sentence gives the label either way
            mixed += len(found) > 1
        # same_label: every sentence of a document has its label; any: some documents mix both
        assert (mixed == 0) if filler == "same_label" else (mixed > 0)
    with pytest.raises(RecipeError, match="`filler` must be one of"):
        PackSpec.from_dict({"filler": "same-label"})
