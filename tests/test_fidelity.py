"""``hf_reshape.fidelity`` and ``hf-reshape diagnose``: per-layer, per-head fidelity of variants to exact attention."""

import json
import math

import pytest
import torch
from conftest import tiny_model

import hf_reshape
from hf_reshape import functional, observe
from hf_reshape.errors import InvalidParameterError, NotCausalError, UnknownVariantError
from hf_reshape.fidelity import FidelityResult, fidelity, parse_variant

T = 12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sharp(arch: str):
    """A tiny model whose attention is peaked (query/key weights scaled up), so approximations visibly differ."""
    model = tiny_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(6.0)
            elif name.endswith("c_attn.weight"):  # GPT-2: [hidden, 3 * hidden], query and key first
                p[:, : 2 * p.shape[0]].mul_(6.0)
    return model


def batch(arch: str = "bert", pad: int = 4, left: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    if pad:
        if left:
            mask[1, :pad] = 0
        else:
            mask[1, T - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_degenerate_settings_are_exact(arch):
    model = sharp(arch)
    r = fidelity(model, batch(arch, left=arch == "gpt2"),
                 ["topk:top_k=12", ("sliding_window", {"window": T}), hf_reshape.ReshapeConfig("topk", top_k=40)])
    assert r.cosine.shape == r.rel_error.shape == r.kl.shape == (3, 2, 4)
    assert r.variants == ["topk(top_k=12)", "sliding_window(window=12)", "topk(top_k=40)"]
    assert torch.allclose(r.cosine, torch.ones_like(r.cosine), atol=1e-5)
    assert float(r.rel_error.max()) < 1e-5
    assert float(r.kl.max()) < 1e-5
    # ... and a setting that is not degenerate is not reported as exact
    worse = fidelity(model, batch(arch), ["topk:top_k=2"])
    assert float(worse.rel_error.mean()) > 1e-2 and float(worse.kl.mean()) > 1e-2


def test_a_worse_variant_scores_worse():
    r = fidelity(sharp("bert"), batch(), ["linear:feature_map=elu", "topk:top_k=8"])
    cos, rel = r.cosine.mean((1, 2)), r.rel_error.mean((1, 2))
    assert cos[0] < cos[1] and rel[0] > rel[1]
    assert torch.isnan(r.kl[0]).all() and torch.isfinite(r.kl[1]).all()  # elu linear has no attention weights
    assert any("no attention weights" in n for n in r.notes)


VARIANTS = ["linear", "topk:top_k=3", "sliding_window:window=2", "hedgehog"]


def _stats(r: FidelityResult):
    return torch.stack([r.cosine, r.rel_error, torch.nan_to_num(r.kl, nan=-1.0)])


@pytest.mark.parametrize("arch,left", [("bert", False), ("gpt2", True)])
def test_padded_rows_do_not_count(arch, left):
    """Padded query rows are left out: other padded tokens give the same numbers, and so does running each
    sequence on its own with no padding at all."""
    model = sharp(arch)
    inputs = batch(arch, pad=5, left=left)
    base = fidelity(model, inputs, VARIANTS)
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    padded = inputs["attention_mask"] == 0
    other["input_ids"][padded] = (other["input_ids"][padded] * 7) % 100 + 1
    changed = fidelity(model, other, VARIANTS)
    assert torch.allclose(_stats(base), _stats(changed), atol=1e-9, rtol=0)
    real = inputs["attention_mask"][1].bool()
    alone = [{"input_ids": inputs["input_ids"][:1]}, {"input_ids": inputs["input_ids"][1:, real]}]
    if arch == "gpt2":  # positions count from the first real token, as GPT-2 does with a mask
        alone[1]["attention_mask"] = torch.ones(1, int(real.sum()), dtype=torch.long)
        inputs_pos = dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0))
        base = fidelity(model, inputs_pos, VARIANTS)
    separate = fidelity(model, alone, VARIANTS)
    assert base.queries == separate.queries == [2 * T - 5] * 2
    assert torch.allclose(_stats(base), _stats(separate), atol=1e-5, rtol=1e-4)


def test_causal_model_uses_the_causal_form_and_the_definitions_hold():
    model = sharp("gpt2")
    inputs = batch("gpt2", pad=3, left=True)
    r = fidelity(model, inputs, ["sliding_window:window=2"])
    assert r.forms == ["causal", "causal"]
    calls = []
    model.set_attn_implementation("hf_reshape")
    with torch.no_grad(), observe.observe(lambda c: calls.append(c) and None):
        model(**inputs)
    model.set_attn_implementation("eager")
    c = calls[0]
    assert c.causal
    kw = dict(attention_mask=c.mask, is_causal=True, scaling=c.scaling)
    exact = functional.reference(c.query, c.key, c.value, "topk", top_k=T, **kw).double()
    out = functional.attention(c.query, c.key, c.value, "sliding_window", window=2, **kw).double()
    real = c.mask[:, None, :].expand(-1, 4, -1)
    cos = torch.nn.functional.cosine_similarity(out, exact, dim=-1)
    for h in range(4):
        rows = real[:, h]
        assert math.isclose(float(cos[:, h][rows].mean()), float(r.cosine[0, 0, h]), rel_tol=1e-6)
        rel = (out[:, h][rows] - exact[:, h][rows]).norm() / exact[:, h][rows].norm()
        assert math.isclose(float(rel), float(r.rel_error[0, 0, h]), rel_tol=1e-6)
    # the same variant in the bidirectional form would give other numbers: the form is the model's
    bidir = functional.attention(c.query, c.key, c.value, "sliding_window", window=2, attention_mask=c.mask,
                                 scaling=c.scaling).double()
    assert not torch.allclose(bidir, out, atol=1e-3)


def test_bidirectional_only_variants_are_refused_on_a_causal_model_and_nothing_changes():
    model = tiny_model("gpt2")
    before = model.config._attn_implementation
    with pytest.raises(NotCausalError, match="bidirectional only"):
        fidelity(model, batch("gpt2"), ["nystrom"])
    assert model.config._attn_implementation == before
    r = fidelity(model, batch("gpt2"))  # default: the variants that serve the causal form
    assert "nystrom" not in r.variants and "topk" in r.variants
    assert all(hf_reshape.get_variant(c["method"]).causal for c in r.configs)


@pytest.mark.parametrize("bad,error,needle", [
    (42, InvalidParameterError, "accepted"),
    ([("topk",)], InvalidParameterError, "accepted"),
    ([("topk", 5)], InvalidParameterError, "accepted"),
    ({"topk": {}}, InvalidParameterError, "accepted"),
    ([], InvalidParameterError, "empty"),
    (["nope"], UnknownVariantError, "registered variants"),
    (["topk:top_k=0"], InvalidParameterError, "top_k"),
    (["topk:k=3"], InvalidParameterError, "accepted: \\['top_k'\\]"),
    (["topk:top_k"], InvalidParameterError, "param=value"),
])
def test_bad_variants_are_refused_naming_what_is_accepted(bad, error, needle):
    model = tiny_model("bert")
    with pytest.raises(error, match=needle):
        fidelity(model, batch(), bad)
    assert model.config._attn_implementation != "hf_reshape"


def test_bad_inputs_are_refused():
    with pytest.raises(InvalidParameterError, match="keyword arguments"):
        fidelity(tiny_model("bert"), torch.ones(2, 3, dtype=torch.long), ["linear"])


def test_parse_variant():
    assert parse_variant("nystrom") == ("nystrom", {})
    assert parse_variant("linear:feature_map=relu,eps=1e-5") == ("linear", {"feature_map": "relu", "eps": 1e-5})
    assert parse_variant("linformer:max_length=none,proj_len=8") == ("linformer", {"max_length": None, "proj_len": 8})


def test_reshaped_model_compares_its_own_trained_variant_and_is_left_as_it_was():
    model = sharp("bert")
    inputs = batch()
    fresh = fidelity(model, inputs, ["hedgehog"])
    hf_reshape.reshape(model, "hedgehog")
    with torch.no_grad():  # stands for training: the model's state is no longer the fresh one
        for name, p in hf_reshape.attention_parameters(model).items():
            p.add_(0.3 * torch.randn_like(p))
        ref = model(**inputs).last_hidden_state
    r = fidelity(model, inputs, ["hedgehog", "linear"])
    assert r.variants == ["hedgehog (model)", "linear"]  # the same variant and parameters: the model's own state
    assert r.state[0] == "the model's own"
    assert not torch.allclose(r.cosine[0], fresh.cosine[0], atol=1e-4)
    assert hf_reshape.get_reshape_config(model).method == "hedgehog"
    assert model.config._attn_implementation == "hf_reshape"
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, ref)
    # with exact_forward (default) the layers see the softmax model's inputs: linear's numbers match the
    # unreshaped model's; letting the model run its own variant changes the deeper layer's
    plain = fidelity(hf_reshape.unreshape(sharp("bert")), inputs, ["linear"])
    assert torch.allclose(r.cosine[1], plain.cosine[0], atol=1e-6)
    drift = fidelity(model, inputs, ["linear"], exact_forward=False)
    assert torch.allclose(drift.cosine[1, 0], plain.cosine[0, 0], atol=1e-6)
    assert float((drift.rel_error[1, 1] - plain.rel_error[0, 1]).abs().max()) > 1e-6


def test_table_json_and_png(tmp_path):
    r = fidelity(sharp("bert"), batch(), ["linear", "topk:top_k=4"], model_name="tiny-bert", inputs_name="2 rows")
    table = r.table()
    assert "| linear |" in table and "| topk(top_k=4) |" in table
    data = json.loads(r.to_json(tmp_path / "f.json"))
    assert json.loads((tmp_path / "f.json").read_text()) == data
    assert [v["variant"] for v in data["variants"]] == ["linear", "topk(top_k=4)"]
    assert data["variants"][0]["kl"] is None and data["variants"][0]["kl_per_head"][0] == [None] * 4
    assert math.isclose(data["variants"][1]["cosine"], float(r.cosine[1].mean()), rel_tol=1e-9)
    path = r.plot(tmp_path / "heat.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _model_folder(tmp_path):
    from transformers import BertTokenizerFast

    words = "the a film movie good bad great awful it is was not very".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "tiny-bert"
    sharp("bert").save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    data = tmp_path / "rows.tsv"
    rows = ["the film was great", "bad", "it is not a very good movie", "awful awful film", "a great movie"]
    data.write_text("sentence\tlabel\n" + "".join(f"{s} \t{i % 2}\n" for i, s in enumerate(rows)))
    return folder, data


def test_diagnose_command_writes_json_markdown_and_png(tmp_path, capsys):
    from hf_reshape import cli

    folder, data = _model_folder(tmp_path)
    out = tmp_path / "out"
    cli.main(["diagnose", str(folder), "--data", str(data), "--text-column", "sentence", "--samples", "4",
              "--batch-size", "3", "--variants", "linear", "topk:top_k=2", "--out", str(out)])
    printed = capsys.readouterr()
    assert "| topk(top_k=2) |" in printed.out
    assert "diagnose: attention fidelity on 4 texts" in printed.err  # the progress bar says what it does
    md = (out / "fidelity.md").read_text()
    assert md.splitlines()[3].startswith("hf-reshape diagnose ") and "--samples 4" in md
    assert "| linear |" in md and "the first 4 rows of rows.tsv" in md
    assert str(tmp_path) not in md.split("```")[2]  # the command is as typed; the rest names no machine path
    data_json = json.loads((out / "fidelity.json").read_text())
    assert data_json["sequences"] == 4 and data_json["model"] == "tiny-bert"
    assert [v["variant"] for v in data_json["variants"]] == ["linear", "topk(top_k=2)"]
    assert (out / "fidelity.png").read_bytes()[:8] == PNG_MAGIC


def test_diagnose_command_refuses_bad_variants_and_columns(tmp_path, capsys):
    from hf_reshape import cli

    folder, data = _model_folder(tmp_path)
    with pytest.raises(SystemExit) as err:
        cli.main(["diagnose", str(folder), "--data", str(data), "--variants", "nope", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "registered variants" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="columns found"):
        cli.main(["diagnose", str(folder), "--data", str(data), "--text-column", "review", "--out",
                  str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    code = None
    try:
        cli.main(["diagnose", "-h"])
    except SystemExit as e:
        code = e.code
    help_text = capsys.readouterr().out
    assert code == 0 and "examples:" in help_text and "--variants" in help_text


def test_layers_and_hybrids_cover_only_their_layers():
    model = sharp("bert")
    r = fidelity(model, batch(), [hf_reshape.ReshapeConfig("linear", layers=[1])])
    assert r.variants == ["linear[layers 1]"]
    assert torch.isnan(r.cosine[0, 0]).all() and torch.isfinite(r.cosine[0, 1]).all()
    assert r.means()[0]["cosine"] == pytest.approx(float(r.cosine[0, 1].mean()))
    if not hasattr(hf_reshape.ReshapeConfig, "hybrid"):
        pytest.skip("no per-layer hybrids in this hf_reshape")
    cfg = hf_reshape.ReshapeConfig.hybrid({"topk": {"top_k": T, "layers": [0]}, "linear": {"layers": [1]}})
    h = fidelity(model, batch(), cfg)
    assert h.variants[0].startswith("hybrid[")
    assert float(h.rel_error[0, 0].max()) < 1e-5 and float(h.kl[0, 0].max()) < 1e-5  # exact topk on layer 0
    assert torch.allclose(h.cosine[0, 1], r.cosine[0, 1]) and torch.isnan(h.kl[0, 1]).all()  # linear: no weights
    hf_reshape.reshape(model, cfg)
    own = fidelity(model, batch(), ["linear"])
    assert own.variants == [h.variants[0] + " (model)", "linear"]
    assert torch.allclose(own.cosine[0], h.cosine[0], equal_nan=True)


def test_missing_matplotlib_is_named(tmp_path, monkeypatch):
    import sys

    r = fidelity(tiny_model("bert"), batch(), ["linear"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match="needs matplotlib, which is not installed: `pip install matplotlib`"):
        r.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
