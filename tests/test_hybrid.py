"""Per-layer hybrids (issue 12): a config that gives each layer its own variant (or exact attention) saves, reloads
bit-exactly (a folder, a Hub repo through an offline cache), round-trips through `ReshapeConfig`, refuses bad input
before anything changes, generates with the right cache layer per layer, unreshapes, and transfers."""

import json

import pytest
import torch
import transformers as tf
from transformers import TrainerCallback
from transformers.cache_utils import DynamicLayer

import hf_reshape
from hf_reshape import ReshapeConfig
from hf_reshape.cache import LinearRecurrentLayer, ReshapeCache, SlidingWindowLayer, cache_nbytes
from hf_reshape.integration import STATE_ATTR, ReshapedAttention

NO_EOS = {"bad_words_ids": [[0]]}  # token 0 is eos and pad of the tiny GPT-2: every row runs to the end


def bert(layers: int = 3, cls: str = "BertModel"):
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64)
    return getattr(tf, cls)(config).eval()


def gpt2(layers: int = 3):
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                           eos_token_id=0, pad_token_id=0)
    return tf.GPT2LMHeadModel(config).eval()


def ids_of(length: int, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def methods(model) -> list:
    """The variant of each self-attention layer, in order (None: exact)."""
    from hf_reshape.architectures import attention_modules

    return [getattr(getattr(f.module, STATE_ATTR, None), "method", None)
            for f in attention_modules(model) if not f.cross]


HEDGEHOG_WINDOW = {"hedgehog": {"layers": [1]}, "sliding_window": {"window": 2, "layers": [0]}}  # layer 2 exact


# ---------- the config ----------

def test_every_way_of_writing_a_hybrid_gives_the_same_config():
    parts = [ReshapeConfig("hedgehog", layers=[1]), ReshapeConfig("sliding_window", window=2, layers=[0])]
    forms = [
        ReshapeConfig.hybrid(HEDGEHOG_WINDOW),
        ReshapeConfig.hybrid(parts),
        ReshapeConfig("hybrid", parts=[{"method": "hedgehog", "layers": [1]},
                                       {"method": "sliding_window", "window": 2, "layers": [0]}]),
        hf_reshape.get_reshape_config(hf_reshape.reshape(bert(), HEDGEHOG_WINDOW)),
        hf_reshape.get_reshape_config(hf_reshape.reshape(bert(), parts)),
        hf_reshape.get_reshape_config(hf_reshape.reshape(bert(), ReshapeConfig.hybrid(parts))),
        hf_reshape.get_reshape_config(hf_reshape.reshape(bert(), ReshapeConfig.hybrid(parts).to_dict())),
    ]
    assert all(f == forms[0] for f in forms)
    cfg = forms[0]
    assert cfg.is_hybrid and cfg.method == "hybrid" and cfg.layers == [0, 1]
    assert [(p.method, p.layers) for p in cfg.parts] == [("hedgehog", [1]), ("sliding_window", [0])]
    assert cfg.parts[1].window == 2 and not cfg.parts[0].is_hybrid
    record = cfg.to_dict()
    assert set(record) == {"method", "parts", "hf_reshape_version"}
    assert record["parts"][1] == {"method": "sliding_window", "layers": [0], "window": 2, "block_size": None}
    assert ReshapeConfig.from_dict(json.loads(json.dumps(record))) == cfg
    assert "ReshapeConfig.hybrid([" in repr(cfg)
    parts[0].layers.append(2)  # a hybrid holds its own copies of the parts it was given
    assert ReshapeConfig.hybrid([ReshapeConfig("linear", layers=[1])]).parts[0].layers == [1]
    assert forms[1].parts[0].layers == [1]


def test_single_variant_records_are_unchanged():
    cfg = ReshapeConfig("sliding_window", window=64, layers=[0])
    assert cfg.to_dict() == {"method": "sliding_window", "layers": [0], "window": 64, "block_size": None,
                             "hf_reshape_version": hf_reshape.__version__}
    assert not cfg.is_hybrid and cfg.parts == (cfg,)
    model = hf_reshape.reshape(bert(), "sliding_window", window=64, layers=[0])
    assert model.config.hf_reshape == cfg.to_dict()


def test_hybrid_config_saves_and_loads_from_a_folder_and_an_offline_hub_cache(tmp_path, offline):
    cfg = ReshapeConfig.hybrid(HEDGEHOG_WINDOW)
    path = cfg.save_pretrained(tmp_path / "cfg")
    saved = json.loads(open(path).read())
    assert saved["method"] == "hybrid" and [p["method"] for p in saved["parts"]] == ["hedgehog", "sliding_window"]
    assert ReshapeConfig.from_pretrained(tmp_path / "cfg") == cfg
    hub_cache(tmp_path / "cache", "someone/hybrid-cfg", {"reshape_config.json": open(path, "rb").read()})
    assert ReshapeConfig.from_pretrained("someone/hybrid-cfg", cache_dir=str(tmp_path / "cache")) == cfg


def test_a_saved_hybrid_record_is_read_strictly():
    record = ReshapeConfig.hybrid(HEDGEHOG_WINDOW).to_dict()
    truncated = json.loads(json.dumps(record))
    del truncated["parts"][1]["block_size"]
    with pytest.raises(hf_reshape.InvalidParameterError,
                       match=r"hybrid part 1 \('sliding_window'\).*lacks.*block_size"):
        ReshapeConfig.from_dict(truncated)
    misspelt = json.loads(json.dumps(record))
    misspelt["parts"][0]["feature_dims"] = 4
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"hybrid part 0 \('hedgehog'\).*feature_dims.*accepted"):
        ReshapeConfig.from_dict(misspelt)
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"unknown key\(s\) \['window'\].*accepted"):
        ReshapeConfig.from_dict({**record, "window": 3})
    with pytest.raises(hf_reshape.InvalidParameterError, match="needs `parts`"):
        ReshapeConfig.from_dict({"method": "hybrid", "hf_reshape_version": hf_reshape.__version__})
    nested = {**record, "parts": [record]}
    with pytest.raises(hf_reshape.InvalidParameterError, match="hybrid part 0"):
        ReshapeConfig.from_dict(nested)
    unknown = json.loads(json.dumps(record))
    unknown["parts"][0]["method"] = "hedgehgo"
    with pytest.raises(hf_reshape.UnknownVariantError, match=r"hybrid part 0.*registered variants"):
        ReshapeConfig.from_dict(unknown)
    newer = {**record, "hf_reshape_version": "99.0", "future_key": 1}  # a newer writer's extra keys: warned, ignored
    assert ReshapeConfig.from_dict(newer) == ReshapeConfig.hybrid(HEDGEHOG_WINDOW)


@pytest.mark.parametrize("parts, error, pattern", [
    ({"hedgehog": {"layers": [0, 1]}, "sliding_window": {"window": 2, "layers": [1, 2]}},
     hf_reshape.InvalidParameterError, r"parts 0 \('hedgehog'\) and 1 \('sliding_window'\) both name layer 1"),
    ({"hedgehog": {"layers": [1]}, "slidng_window": {"layers": [0]}},
     hf_reshape.UnknownVariantError, r"hybrid part 1 \('slidng_window'\).*registered variants.*sliding_window"),
    ({"hedgehog": {"layers": [1]}, "sliding_window": {"window": -1, "layers": [0]}},
     hf_reshape.InvalidParameterError, r"hybrid part 1 \('sliding_window'\).*window.*integer >= 0"),
    ({"hedgehog": {"layers": [1]}, "sliding_window": {"widow": 2, "layers": [0]}},
     hf_reshape.InvalidParameterError, r"hybrid part 1.*unknown parameter.*\['window', 'block_size'\]"),
    ({"hedgehog": {"layers": [1]}, "sliding_window": {"layers": [0, 3]}},
     hf_reshape.InvalidParameterError, r"hybrid part 1.*layers \[3\] do not exist.*has layers \[0, 1, 2\]"),
    ({"hedgehog": {"layers": [1]}, "sliding_window": {"layers": [-1]}},
     hf_reshape.InvalidParameterError, r"hybrid part 1.*layer indices >= 0"),
    ({"hedgehog": {}, "linear": {}}, hf_reshape.InvalidParameterError, r"parts \[0, 1\] all leave `layers` out"),
    ([ReshapeConfig("linear", layers=[1, 1]), ReshapeConfig("topk", layers=[0, 1])], hf_reshape.InvalidParameterError,
     r"parts 0 \('linear'\) and 1 \('topk'\) both name layer 1"),
    ({"hedgehog": {"layers": [0, 1, 2]}, "linear": {}}, hf_reshape.InvalidParameterError,
     r"part 1 \('linear'\): leaves `layers` out.*name every layer"),
    ({"hedgehog": 4}, hf_reshape.InvalidParameterError, r"value of 'hedgehog' must be a dict"),
    ({}, hf_reshape.InvalidParameterError, r"non-empty list"),
    ([ReshapeConfig.hybrid({"linear": {"layers": [0]}})], hf_reshape.InvalidParameterError, "itself a hybrid"),
    (["linear"], hf_reshape.InvalidParameterError, r"part 0 must be a ReshapeConfig or a dict"),
])
def test_bad_hybrids_are_refused_before_anything_changes(parts, error, pattern):
    model = hf_reshape.reshape(bert(), "sliding_window", window=5)  # a refused call keeps this reshape as it is
    before, record = model(input_ids=ids_of(9)).last_hidden_state, dict(model.config.hf_reshape)
    holders = {id(m) for m in model.modules() if isinstance(m, ReshapedAttention)}
    with pytest.raises(error, match=pattern):
        hf_reshape.reshape(model, parts)
    assert model.config.hf_reshape == record
    assert {id(m) for m in model.modules() if isinstance(m, ReshapedAttention)} == holders
    assert torch.equal(model(input_ids=ids_of(9)).last_hidden_state, before)


def test_a_bidirectional_only_part_on_a_causal_layer_is_refused_and_changes_nothing():
    model = gpt2()
    stock = model(input_ids=ids_of(9)).logits
    # part 0 fits every layer it names; part 1 (Linformer, bidirectional only) does not fit GPT-2's causal layer 2
    with pytest.raises(hf_reshape.NotCausalError, match=r"hybrid part 1 \('linformer'\).*causal.*causal variants"):
        hf_reshape.reshape(model, {"linear": {"layers": [0, 1]}, "linformer": {"layers": [2]}})
    assert methods(model) == [None, None, None] and getattr(model.config, "hf_reshape", None) is None
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION
    assert torch.equal(model(input_ids=ids_of(9)).logits, stock)


def test_hybrid_refuses_layers_given_beside_it():
    with pytest.raises(hf_reshape.InvalidParameterError, match="inside each part"):
        ReshapeConfig("hybrid", layers=[0], parts=[ReshapeConfig("linear", layers=[1])])
    with pytest.raises(hf_reshape.InvalidParameterError, match="not both"):
        hf_reshape.reshape(bert(), HEDGEHOG_WINDOW, layers=[0])
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"unknown parameter\(s\) \['window'\] for a hybrid"):
        ReshapeConfig("hybrid", parts=[ReshapeConfig("linear", layers=[1])], window=3)


# ---------- the model ----------

def test_each_layer_runs_its_part():
    model = hf_reshape.reshape(bert(), HEDGEHOG_WINDOW)
    assert methods(model) == ["sliding_window", "hedgehog", None]
    # a one-part hybrid computes what the single variant on the same layers computes
    ids = ids_of(10)
    one = hf_reshape.reshape(bert(), {"linear": {"layers": [1], "chunk_size": 4}})(input_ids=ids).last_hidden_state
    single = hf_reshape.reshape(bert(), "linear", layers=[1], chunk_size=4)(input_ids=ids).last_hidden_state
    assert torch.equal(one, single)
    # the part without `layers` takes the rest (layers 1 and 2), and its record keeps `layers` as given
    rest = hf_reshape.reshape(bert(), {"sliding_window": {"window": 2, "layers": [0]}, "linear": {}})
    assert methods(rest) == ["sliding_window", "linear", "linear"]
    assert rest.config.hf_reshape["parts"][1]["layers"] is None


def test_defaults_are_fitted_to_the_model_per_part():
    # Linformer's proj_len (128) and max_length default to the model's 64 positions, in its own part only
    model = hf_reshape.reshape(bert(), {"linformer": {"layers": [0]}, "topk": {"top_k": 3, "layers": [2]}})
    linformer, topk = model.config.hf_reshape["parts"]
    assert linformer["proj_len"] == linformer["max_length"] == 64
    assert topk == {"method": "topk", "layers": [2], "top_k": 3}


def test_hybrid_model_reloads_bit_exactly_from_a_folder_and_an_offline_hub_cache(tmp_path, offline):
    model = hf_reshape.reshape(bert(cls="BertForSequenceClassification"),
                               {"hedgehog": {"layers": [1]}, "linformer": {"proj_len": 4, "layers": [2]}})
    with torch.no_grad():
        for n, p in hf_reshape.attention_parameters(model).items():
            p.add_(torch.randn_like(p) * 0.1)  # trained-looking state, not the initialisation
    ids = ids_of(12, batch=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "saved")
    files = {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()}
    hub_cache(tmp_path / "cache", "someone/bert-hybrid", files)
    for loaded in (hf_reshape.from_pretrained(tmp_path / "saved"),
                   hf_reshape.from_pretrained("someone/bert-hybrid", cache_dir=str(tmp_path / "cache"))):
        assert methods(loaded) == [None, "hedgehog", "linformer"]
        assert hf_reshape.get_reshape_config(loaded) == hf_reshape.get_reshape_config(model)
        state = {k: v for k, v in loaded.state_dict().items() if STATE_ATTR in k}
        assert state and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)


def test_hybrid_with_extended_positions_reloads(tmp_path):
    model = hf_reshape.reshape(bert(), {"sliding_window": {"window": 8, "layers": [0, 2]}, "linear": {"layers": [1]}},
                               max_positions=96)
    assert model.config.hf_reshape["positions"]["extended"] == 96 and model.config.hf_reshape["method"] == "hybrid"
    ids = ids_of(80)  # past the 64 trained positions
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    assert methods(loaded) == ["sliding_window", "linear", "sliding_window"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).last_hidden_state, expected)


def test_unreshape_restores_every_layer():
    model = bert()
    ids = ids_of(10)
    stock = model(input_ids=ids).last_hidden_state
    original = model.config._attn_implementation
    hf_reshape.reshape(model, {"hedgehog": {"layers": [1]}, "linear": {}})
    assert not torch.allclose(model(input_ids=ids).last_hidden_state, stock, atol=1e-4)
    hf_reshape.unreshape(model)
    assert methods(model) == [None, None, None] and hf_reshape.get_reshape_config(model) is None
    assert model.config._attn_implementation == original
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, stock, rtol=1e-5, atol=1e-5)


# ---------- generation ----------

LINEAR_WINDOW_EXACT = {"linear": {"layers": [0], "chunk_size": 4}, "sliding_window": {"window": 3, "layers": [1]}}


def test_hybrid_generation_picks_each_layer_its_cache_and_equals_recomputation():
    model = hf_reshape.reshape(gpt2(), LINEAR_WINDOW_EXACT)  # layer 2 stays exact
    ids = ids_of(7)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache)
    assert [type(layer) for layer in out.cache.layers] == [LinearRecurrentLayer, SlidingWindowLayer, DynamicLayer]
    seq = ids
    for _ in range(6):  # the reference: a full forward over the whole sequence for every new token, no cache
        logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        logits[:, 0] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    # a forward in chunks through the cache equals one forward
    long = ids_of(13, seed=5)
    cache = ReshapeCache(model)
    chunks = [model(input_ids=long[:, s:e], cache=cache, use_cache=True).logits for s, e in [(0, 6), (6, 11), (11, 13)]]
    torch.testing.assert_close(torch.cat(chunks, 1), model(input_ids=long, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)


def test_only_the_linear_layers_keep_a_constant_state():
    model = hf_reshape.reshape(gpt2(), LINEAR_WINDOW_EXACT)
    caches = [model.generate(ids_of(n), max_new_tokens=2, return_dict_in_generate=True, **NO_EOS).cache
              for n in (10, 40)]
    linear, window, exact = zip(*(cache.layers for cache in caches))
    state = [layer.state.shape for layer in linear]  # S [B, H, F, D]: the same whatever the prompt length
    assert state[0] == state[1] == torch.Size([1, 4, 8, 8])
    assert not hasattr(window[0], "state") and not hasattr(exact[0], "state")
    assert [layer.keys.shape[-2] for layer in window] == [3, 3]  # the last `window` keys
    assert [layer.keys.shape[-2] for layer in exact] == [11, 41]  # every key: grows with the prompt
    nbytes = [sum(v.nbytes for v in vars(layer).values() if isinstance(v, torch.Tensor)) for layer in linear]
    assert nbytes[0] == nbytes[1] > 0
    assert cache_nbytes(caches[1]) > cache_nbytes(caches[0])  # only through the exact layer


# ---------- attention transfer ----------

class _GradsSeen(TrainerCallback):
    """Names of the parameters that hold a gradient right before each optimizer step."""

    def __init__(self):
        self.names = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.names |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_transfer_trains_the_parameters_of_every_part_and_only_those():
    model = hf_reshape.reshape(bert(), {"hedgehog": {"layers": [0, 2]}, "sliding_window": {"window": 2, "layers": [1]}})
    hedgehog = {n for n in hf_reshape.attention_parameters(model)}
    assert hedgehog and all(n.startswith(("encoder.layer.0.", "encoder.layer.2.")) for n in hedgehog)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = ids_of(12, batch=16, seed=4)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in inputs]
    seen = _GradsSeen()
    report = hf_reshape.transfer(model, rows, steps=6, lr=2e-2, batch_size=4, progress=None, callbacks=[seen])
    assert seen.names == hedgehog
    assert {n for n, p in model.named_parameters() if not torch.equal(before[n], p)} == hedgehog
    assert report["final_loss"] < report["initial_loss"]


def test_transfer_refuses_a_hybrid_without_parameters_naming_its_variants():
    model = hf_reshape.reshape(bert(), {"linear": {"layers": [0]}, "sliding_window": {"layers": [1]}})
    with pytest.raises(hf_reshape.NothingToTransferError, match=r"\['linear', 'sliding_window'\] has no parameters"):
        hf_reshape.transfer(model, [{"input_ids": ids_of(4)[0]}], steps=1, progress=None)


# ---------- helpers ----------

def hub_cache(cache_dir, repo_id, files: dict):
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file> (as tests/test_api.py)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
