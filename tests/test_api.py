"""Public API: configs and their files, the Hub path (offline cache), registration, layer selection,
cross-attention, and every user-facing error."""

import json
import logging

import pytest
import torch
import transformers

import hf_reshape
from hf_reshape import ReshapeConfig, functional as fn
from hf_reshape.integration import STATE_ATTR

from conftest import tiny_inputs, tiny_model


# ---------- errors ----------

def test_unknown_variant_names_the_registered_ones():
    model = tiny_model("bert")
    with pytest.raises(hf_reshape.UnknownVariantError, match="sliding_window"):
        hf_reshape.reshape(model, "slidng_window")
    with pytest.raises(hf_reshape.UnknownVariantError, match="registered variants"):
        fn.attention(*[torch.randn(1, 1, 4, 2)] * 3, "nope")


def test_unsupported_model_names_the_supported_ones():
    # DeBERTa-v2's disentangled attention does not go through transformers' attention interface
    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=20)
    with pytest.raises(hf_reshape.UnsupportedModelError, match="any model whose attention goes through that interface"):
        hf_reshape.reshape(transformers.DebertaV2Model(config), "linear")
    with pytest.raises(hf_reshape.UnsupportedModelError):
        hf_reshape.reshape(torch.nn.Linear(2, 2), "linear")


@pytest.mark.parametrize("method,params,pattern", [
    ("sliding_window", {"window": -1}, "window.*integer >= 0"),
    ("topk", {"top_k": 0}, "top_k.*integer >= 1"),
    ("topk", {"top_k": 2.5}, "top_k"),
    ("linear", {"feature_map": "tanh"}, r"feature_map.*\['elu', 'relu'\]"),
    ("linear", {"eps": 0}, "eps"),
    ("nystrom", {"pinv_iterations": -1}, "pinv_iterations"),
    ("linformer", {"proj_len": 10, "max_length": 5}, "proj_len.*max_length"),
    ("linformer", {"init": "xavier"}, "init"),
    ("svd", {"rank": True}, "rank"),
    ("svd", {"rnak": 3}, r"unknown parameter.*accepted: \['rank'\]"),
])
def test_invalid_parameters_are_refused_with_what_is_accepted(method, params, pattern):
    with pytest.raises(hf_reshape.InvalidParameterError, match=pattern):
        ReshapeConfig(method, **params)
    with pytest.raises(hf_reshape.InvalidParameterError, match=pattern):
        hf_reshape.reshape(tiny_model("bert"), method, **params)


def test_linformer_refuses_sequences_longer_than_max_length():
    model = hf_reshape.reshape(tiny_model("bert"), "linformer", proj_len=4, max_length=8)
    with pytest.raises(hf_reshape.SequenceTooLongError, match="max_length=8"):
        model(**tiny_inputs("bert"))  # 12 tokens
    model(input_ids=tiny_inputs("bert")["input_ids"][:, :8])


def test_linformer_defaults_max_length_to_the_model_positions():
    model = hf_reshape.reshape(tiny_model("vit"), "linformer", proj_len=4)
    assert hf_reshape.get_reshape_config(model).max_length == 17  # 4 x 4 patches + CLS
    bert = hf_reshape.reshape(tiny_model("bert"), "linformer", proj_len=4)
    assert bert.config.hf_reshape["max_length"] == 64


def test_four_d_masks_are_refused_clearly():
    model = hf_reshape.reshape(tiny_model("bert"), "linear")
    mask = torch.ones(2, 1, 12, 12)
    with pytest.raises(ValueError, match="2D key-padding mask"):
        model(**tiny_inputs("bert"), attention_mask=mask)


def test_functional_checks_shapes_and_state():
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"\[B, T_k\]"):
        fn.attention(q, q, q, "linear", attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(hf_reshape.InvalidParameterError, match="proj_k"):
        fn.attention(q, q, q, "linformer", proj_len=2)
    with pytest.raises(hf_reshape.NotCausalError, match="not causal"):
        fn.attention(q, q, q, "nystrom", is_causal=True)


# ---------- config ----------

def test_config_attributes_dict_round_trip_and_files(tmp_path):
    cfg = ReshapeConfig("sliding_window", window=64, layers=[0])
    assert cfg.window == 64 and cfg.layers == [0] and cfg.method == "sliding_window"
    data = cfg.to_dict()
    assert data["window"] == 64 and data["hf_reshape_version"] == hf_reshape.__version__
    assert ReshapeConfig.from_dict(data) == cfg
    path = cfg.save_pretrained(tmp_path)
    with open(path) as f:
        assert json.load(f)["method"] == "sliding_window"
    assert ReshapeConfig.from_pretrained(tmp_path) == cfg
    assert ReshapeConfig("sliding_window", window=65) != cfg


def _write_record(folder, record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reshape_config.json").write_text(json.dumps(record))
    return folder


def _record(**changes):
    data = ReshapeConfig("topk", top_k=3).to_dict()
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("record, pattern", [
    # a misspelled parameter used to load with the default top_k=64 (a warning only)
    (_record(top_k=_DROP, top_kk=3), r"unknown parameter\(s\) \['top_kk'\].*accepted: \['top_k'\]"),
    (_record(future_knob=1), r"unknown parameter\(s\) \['future_knob'\]"),
    # a missing one (to_dict writes them all: the record was edited) used to load with the default too
    (_record(top_k=_DROP), r"lacks the parameter\(s\) \['top_k'\].*defaults: \{'top_k': 64\}"),
    (_record(layers=1), r"`layers` must be None .* list of layer indices.*got 1"),
    (_record(layers="0,1"), r"`layers` must be None .*got '0,1'"),
    ("topk", r"must be a dict .*got a str: 'topk'"),
    (["topk", 3], r"must be a dict .*got a list"),
])
def test_malformed_saved_records_are_refused_naming_what_is_wrong(tmp_path, record, pattern):
    with pytest.raises(hf_reshape.InvalidParameterError, match=pattern):
        ReshapeConfig.from_pretrained(_write_record(tmp_path, record))
    with pytest.raises(hf_reshape.InvalidParameterError, match=pattern):
        ReshapeConfig.from_dict(record)


def test_a_malformed_record_in_a_saved_model_is_refused_before_loading(tmp_path):
    model = hf_reshape.reshape(tiny_model("bert"), "topk", top_k=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hf_reshape"]["topk"] = config["hf_reshape"].pop("top_k")  # hand-edited
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"unknown parameter\(s\) \['topk'\]"):
        hf_reshape.from_pretrained(tmp_path)


def test_keys_from_a_newer_version_are_ignored_with_a_warning(tmp_path, caplog):
    record = _record(future_knob=1, hf_reshape_version="99.0")
    with caplog.at_level(logging.WARNING, logger="hf_reshape.config"):
        cfg = ReshapeConfig.from_pretrained(_write_record(tmp_path, record))
    assert cfg == ReshapeConfig("topk", top_k=3)
    assert "future_knob" in caplog.text and "99.0" in caplog.text and "accepted" in caplog.text
    # a newer version may add names, not drop one: a missing parameter stays an error
    with pytest.raises(hf_reshape.InvalidParameterError, match="lacks"):
        ReshapeConfig.from_dict(_record(top_k=_DROP, hf_reshape_version="99.0"))


def test_config_loads_from_a_saved_model_folder(tmp_path):
    model = hf_reshape.reshape(tiny_model("bert"), "topk", top_k=3)
    model.save_pretrained(tmp_path)
    assert ReshapeConfig.from_pretrained(tmp_path) == ReshapeConfig("topk", top_k=3)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="reshape_config.json"):
        ReshapeConfig.from_pretrained(tmp_path)
    tiny_model("bert").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a reshaped model"):
        hf_reshape.from_pretrained(tmp_path / "plain")


def _hub_cache(cache_dir, repo_id, files: dict[str, bytes]):
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_config_from_a_hub_repo_id_through_an_offline_cache(tmp_path, offline):
    cfg = ReshapeConfig("sliding_window", window=64)
    _hub_cache(tmp_path, "someone/bert-window-64", {"reshape_config.json": json.dumps(cfg.to_dict()).encode()})
    loaded = ReshapeConfig.from_pretrained("someone/bert-window-64", cache_dir=str(tmp_path))
    assert loaded == cfg
    with pytest.raises(FileNotFoundError):
        ReshapeConfig.from_pretrained("someone/not-cached", cache_dir=str(tmp_path))


def test_reshaped_model_from_a_hub_repo_id_through_an_offline_cache(tmp_path, offline):
    model = hf_reshape.reshape(tiny_model("bert", cls="BertForSequenceClassification"), "linformer", proj_len=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if STATE_ATTR in n:
                p.mul_(1.5)
    model.save_pretrained(tmp_path / "saved")
    files = {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()}
    _hub_cache(tmp_path / "cache", "someone/bert-linformer", files)
    loaded = hf_reshape.from_pretrained("someone/bert-linformer", cache_dir=str(tmp_path / "cache"))
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)


def test_model_class_can_be_given(tmp_path):
    model = hf_reshape.reshape(tiny_model("bert", cls="BertForSequenceClassification"), "linear")
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path, model_class=transformers.AutoModelForSequenceClassification)
    assert isinstance(loaded, transformers.BertForSequenceClassification)


# ---------- registration ----------

def _exact(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    from hf_reshape.ops import naive

    return naive.softmax_reference(q, k, v, mask=mask, causal=causal, scaling=scaling * params.temperature)


def test_register_a_variant_from_outside():
    from dataclasses import dataclass

    @dataclass
    class TemperatureParams(hf_reshape.VariantParams):
        temperature: float = 1.0

    spec = hf_reshape.register_variant(name="tempered_softmax", family="sparse", params_cls=TemperatureParams,
                                       forward=_exact, reference=_exact)
    try:
        assert "tempered_softmax" in hf_reshape.list_variants()
        with pytest.raises(ValueError, match="already registered"):
            hf_reshape.register_variant(spec)
        model = tiny_model("gpt2")
        inputs = tiny_inputs("gpt2")
        with torch.no_grad():
            stock = model(**inputs).logits
            hf_reshape.reshape(model, "tempered_softmax", temperature=1.0)
            torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)
    finally:
        hf_reshape.registry.unregister_variant("tempered_softmax")
    assert "tempered_softmax" not in hf_reshape.list_variants()


@pytest.mark.parametrize("name", ["Bad-Name", "my_sdpa", "flash_local", ""])
def test_register_refuses_bad_names(name):
    with pytest.raises(ValueError, match="must match"):
        hf_reshape.register_variant(name=name, family="sparse", params_cls=hf_reshape.VariantParams,
                                    forward=_exact, reference=_exact)


def test_register_refuses_the_hybrid_name():
    # "hybrid" is the method of per-layer hybrid configs: a variant of that name would be shadowed by them
    with pytest.raises(ValueError, match="per-layer hybrid"):
        hf_reshape.register_variant(name="hybrid", family="sparse", params_cls=hf_reshape.VariantParams,
                                    forward=_exact, reference=_exact)
    assert "hybrid" not in hf_reshape.list_variants()


# ---------- layers, cross-attention, re-reshaping ----------

def test_layers_selects_which_layers_change():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        stock = model(**inputs, output_hidden_states=True).hidden_states
        hf_reshape.reshape(model, "linear", layers=[1])
        out = model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(out[1], stock[1])  # layer 0 kept exact attention
    assert not torch.allclose(out[2], stock[2])
    holders = [n for n, m in model.named_modules() if n.endswith(STATE_ATTR)]
    assert holders == ["encoder.layer.1.attention.self.hf_reshape"]
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"has layers \[0, 1\]"):
        hf_reshape.reshape(model, "linear", layers=[5])


def test_cross_attention_is_never_touched():
    model = tiny_model("bert", cls="BertModel", is_decoder=True, add_cross_attention=True)
    hf_reshape.reshape(model, "sliding_window", window=2)
    for layer in model.encoder.layer:
        assert isinstance(getattr(layer.attention.self, STATE_ATTR), torch.nn.Module)
        assert not hasattr(layer.crossattention.self, STATE_ATTR)
    ids = tiny_inputs("bert")["input_ids"]
    enc = torch.randn(2, 5, 32)
    enc_mask = torch.ones(2, 5, dtype=torch.long)
    enc_mask[1, 3:] = 0
    out = model(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).last_hidden_state
    assert torch.isfinite(out).all()
    # a BERT decoder is causal: bidirectional-only variants are refused
    with pytest.raises(hf_reshape.NotCausalError):
        hf_reshape.reshape(model, "nystrom")


def test_reshaping_again_replaces_the_variant():
    model = tiny_model("bert")
    hf_reshape.reshape(model, "sliding_window", window=64)
    hf_reshape.reshape(model, ReshapeConfig(method="linear", feature_map="relu"))
    holders = [m for m in model.modules() if isinstance(m, hf_reshape.integration.ReshapedAttention)]
    assert len(holders) == 2 and all(h.method == "linear" for h in holders)
    assert model.config.hf_reshape["feature_map"] == "relu"
    with pytest.raises(hf_reshape.InvalidParameterError, match="not both"):
        hf_reshape.reshape(model, ReshapeConfig("linear"), feature_map="elu")


def test_gpt2_generation_runs_with_a_cache():
    model = hf_reshape.reshape(tiny_model("gpt2"), "sliding_window", window=4)
    ids = tiny_inputs("gpt2", batch=1)["input_ids"][:, :5]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    # recomputing the whole sequence each step gives the same tokens
    seq = ids
    for _ in range(6):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
