"""Long inputs on pretrained models: position extension in the reshape call (`max_positions=` for BERT and GPT-2,
`image_size=` for ViT) and streaming generation with attention sinks (`sink_window` and its cache layer)."""

import copy
import json

import pytest
import torch
import transformers
from conftest import recompute_greedy, tiny_inputs, tiny_model
from transformers.cache_utils import DynamicLayer

import hf_reshape
from hf_reshape import positions
from hf_reshape.cache import ReshapeCache, SinkWindowLayer, cache_nbytes
from hf_reshape.integration import STATE_ATTR

NO_EOS = {"bad_words_ids": [[0]]}  # token 0 is eos and pad of the tiny GPT-2: every row runs to the end


def ids_of(length: int, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    """Everything an extension or a reshape changes, to check that a refused call changed nothing."""
    return {
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
        "tensors": {k: (tuple(v.shape), v.clone()) for k, v in model.state_dict(keep_vars=False).items()},
        "buffers": {k: tuple(v.shape) for k, v in model.named_buffers()},
        "holders": sorted(n for n, _ in model.named_modules() if n.endswith(STATE_ATTR)),
        "attrs": sorted(k for k in model.__dict__ if k.startswith("_hf_reshape")),
    }


def same(a, b) -> bool:
    tensors_a, tensors_b = a.pop("tensors"), b.pop("tensors")
    equal = tensors_a.keys() == tensors_b.keys() and all(
        tensors_a[k][0] == tensors_b[k][0] and torch.equal(tensors_a[k][1], tensors_b[k][1]) for k in tensors_a)
    return equal and a == b


# ---------------------------------------------------------------------------------------------------- extension


@pytest.mark.parametrize("arch, field", [("bert", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_max_positions_extends_in_the_reshape_call_and_keeps_short_inputs_bit_identical(arch, field):
    model = tiny_model(arch)
    ids = ids_of(50, batch=2)  # under the trained 64 positions
    with torch.no_grad():
        plain_before = model(input_ids=ids)[0]
        twin = hf_reshape.reshape(copy.deepcopy(model), "sliding_window", window=4)
        reshaped_before = twin(input_ids=ids)[0]
    hf_reshape.reshape(model, "sliding_window", window=4, max_positions=200)
    assert getattr(model.config, field) == 200 and model.config.max_position_embeddings == 200
    assert model.config.hf_reshape["positions"] == {"keyword": "max_positions", "trained": 64, "extended": 200,
                                                    "init": "copy"}
    base = model.base_model
    table = base.embeddings.position_embeddings if arch == "bert" else base.wpe
    assert table.weight.shape[0] == table.num_embeddings == 200
    # Longformer's initialisation: row p is trained row p mod 64
    assert torch.equal(table.weight[64:128], table.weight[:64]) and torch.equal(table.weight[192:], table.weight[:8])
    if arch == "bert":  # the default-id buffers grow with the table
        assert torch.equal(base.embeddings.position_ids, torch.arange(200)[None])
        assert base.embeddings.token_type_ids.shape == (1, 200) and not base.embeddings.token_type_ids.any()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)[0], reshaped_before)
        long = model(input_ids=ids_of(180))[0]  # past the trained table: used to be an index error
    assert long.shape[1] == 180 and torch.isfinite(long).all()
    # extension alone, on the plain model, changes nothing either
    plain = hf_reshape.extend_positions(tiny_model(arch), max_positions=200)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids)[0], plain_before)
    assert plain.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION


def test_vit_image_size_equals_interpolating_at_run_time():
    model = tiny_model("vit")  # 16 x 16 images, 4 x 4 patches
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        runtime = model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        twin = hf_reshape.reshape(copy.deepcopy(model), "sliding_window", window=4)
        runtime_reshaped = twin(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
    hf_reshape.reshape(model, "sliding_window", window=4, image_size=32)
    assert model.config.image_size == 32 and model.embeddings.position_embeddings.shape[1] == 65  # 8 x 8 + class
    assert model.embeddings.patch_embeddings.image_size == (32, 32)
    assert model.config.hf_reshape["positions"] == {"keyword": "image_size", "trained": 16, "extended": 32,
                                                    "init": "bicubic"}
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).last_hidden_state, runtime_reshaped)
        hf_reshape.unreshape(model)  # the extension stays: exact attention on the larger image
        assert torch.equal(model(pixel_values=images).last_hidden_state, runtime)


def test_variants_sized_by_the_model_see_the_extended_positions():
    model = hf_reshape.reshape(tiny_model("bert"), "linformer", max_positions=128)
    assert model.config.hf_reshape["max_length"] == 128  # Linformer's projections cover the extended model
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids_of(100)).last_hidden_state).all()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_an_extended_model_saves_and_reloads_bit_identically(arch, tmp_path):
    model = tiny_model(arch)
    size = {"image_size": 24} if arch == "vit" else {"max_positions": 150}
    hf_reshape.reshape(model, "sink_window", num_sink=2, window=3, **size)
    with torch.no_grad():  # stand-in for training: the extended rows move away from their copies
        for name, p in model.named_parameters():
            if "position" in name or "wpe" in name:
                p.add_(torch.randn_like(p) * 0.01)
    inputs = {"pixel_values": torch.randn(1, 3, 24, 24)} if arch == "vit" else {"input_ids": ids_of(140)}
    with torch.no_grad():
        before = model(**inputs)[0]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    field = {"bert": "max_position_embeddings", "gpt2": "n_positions", "vit": "image_size"}[arch]
    assert saved[field] == next(iter(size.values()))  # the shapes every loader builds before reading weights
    loaded = hf_reshape.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs)[0], before)
    assert loaded.config.hf_reshape == model.config.hf_reshape  # the record survives the round trip
    plain = type(model).from_pretrained(tmp_path)  # transformers alone: the shapes load, exact attention
    assert plain.config.to_dict()[field] == saved[field]


def test_an_extended_model_loads_from_a_hub_style_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    from test_api import _hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = hf_reshape.reshape(tiny_model("bert", cls="BertForSequenceClassification"), "sliding_window", window=4,
                               max_positions=160)
    model.save_pretrained(tmp_path / "saved")
    files = {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()}
    _hub_cache(tmp_path / "cache", "someone/bert-long", files)
    loaded = hf_reshape.from_pretrained("someone/bert-long", cache_dir=str(tmp_path / "cache")).eval()
    assert loaded.bert.embeddings.position_embeddings.num_embeddings == 160
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)  # bit-exact weights
    ids = ids_of(150)
    with torch.no_grad():
        assert torch.equal(loaded.bert(input_ids=ids).last_hidden_state, model.bert(input_ids=ids).last_hidden_state)
        # the logits only within rounding: a weight read from the file's memory map may sit at another alignment,
        # and the CPU GEMM kernel for the pooler's [1, 32] row then rounds its last bit differently
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_a_config_json_that_disagrees_with_its_record_is_refused_before_loading(tmp_path):
    model = hf_reshape.reshape(tiny_model("bert"), "sliding_window", window=4, max_positions=100)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 64  # hand-edited back: the saved table has 100 rows
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_reshape.InvalidParameterError, match="max_position_embeddings=64.*extended to 100"):
        hf_reshape.from_pretrained(tmp_path)
    config["max_position_embeddings"], config["hf_reshape"]["positions"] = 100, {"keyword": "max_positions"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_reshape.InvalidParameterError, match="malformed"):
        hf_reshape.from_pretrained(tmp_path)


def test_unreshape_keeps_the_extension_and_a_later_reshape_records_it(tmp_path):
    model = tiny_model("bert")
    ids = ids_of(40)
    with torch.no_grad():
        stock = model(input_ids=ids).last_hidden_state
    hf_reshape.reshape(model, "sliding_window", window=4, max_positions=100)
    hf_reshape.unreshape(model)
    assert model.config.max_position_embeddings == 100 and not hasattr(model.config, "hf_reshape")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, stock)  # exact attention, trained positions
        assert model(input_ids=ids_of(90)).last_hidden_state.shape[1] == 90
    model.save_pretrained(tmp_path / "plain")  # a plain transformers model with a longer table
    assert transformers.BertModel.from_pretrained(tmp_path / "plain").config.max_position_embeddings == 100
    hf_reshape.reshape(model, "linear")
    assert model.config.hf_reshape["positions"]["trained"] == 64
    hf_reshape.extend_positions(model, max_positions=150)  # extending a reshaped model updates its record
    assert model.config.hf_reshape["positions"] == {"keyword": "max_positions", "trained": 64, "extended": 150,
                                                    "init": "copy"}


REFUSED = [
    pytest.param("bert", {"max_positions": 32}, hf_reshape.InvalidParameterError, "smaller than the 64", id="smaller"),
    pytest.param("gpt2", {"max_positions": 63}, hf_reshape.InvalidParameterError, "smaller", id="gpt2-smaller"),
    pytest.param("vit", {"image_size": 8}, hf_reshape.InvalidParameterError, "smaller than the 16", id="vit-smaller"),
    pytest.param("bert", {"image_size": 32}, hf_reshape.InvalidParameterError, "takes `max_positions=`",
                 id="image-size-on-text"),
    pytest.param("vit", {"max_positions": 100}, hf_reshape.InvalidParameterError, "takes `image_size=`",
                 id="max-positions-on-vit"),
    pytest.param("bert", {"max_positions": "4096"}, hf_reshape.InvalidParameterError, "integer", id="a-string"),
    pytest.param("bert", {"max_positions": True}, hf_reshape.InvalidParameterError, "integer", id="a-bool"),
]


@pytest.mark.parametrize("first", [False, True], ids=["plain", "reshaped"])
@pytest.mark.parametrize("arch, size, error, message", REFUSED)
def test_a_refused_extension_changes_nothing(arch, size, error, message, first):
    model = tiny_model(arch)
    if first:
        hf_reshape.reshape(model, "sliding_window", window=2)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        hf_reshape.reshape(model, "sliding_window", window=3, **size)
    with pytest.raises(error, match=message):
        hf_reshape.extend_positions(model, **size)
    assert same(snapshot(model), before)


def test_an_unsupported_model_is_refused_unchanged(monkeypatch):
    config = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20)
    distil = transformers.DistilBertModel(config)
    before = snapshot(distil)
    with pytest.raises(hf_reshape.UnsupportedModelError):
        hf_reshape.extend_positions(distil, max_positions=1024)
    assert same(snapshot(distil), before)
    # an architecture hf_reshape reshapes but whose positions it does not know how to extend
    monkeypatch.delitem(positions.TABLES, "gpt2")
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(hf_reshape.UnsupportedModelError, match="cannot extend the positions of GPT2LMHeadModel"):
        hf_reshape.reshape(model, "sliding_window", window=3, max_positions=128)
    assert same(snapshot(model), before)
    with pytest.raises(hf_reshape.InvalidParameterError, match="give `max_positions=`"):
        hf_reshape.extend_positions(model)


def test_a_reshape_failing_half_way_puts_the_positions_back(monkeypatch):
    model = tiny_model("bert")
    before = snapshot(model)

    def broken(self, *args, **kwargs):
        raise RuntimeError("switch failed")

    monkeypatch.setattr(type(model), "set_attn_implementation", broken)
    with pytest.raises(RuntimeError, match="switch failed"):
        hf_reshape.reshape(model, "sliding_window", window=3, max_positions=128)
    assert same(snapshot(model), before)
    assert model.embeddings.position_embeddings.num_embeddings == 64


# ---------------------------------------------------------------------------------------------------- sink_window


def test_sink_window_sees_the_sinks_and_the_window():
    """The attention matrix itself: causal, window 2, two sinks counted over real tokens (left padding)."""
    q = k = v = torch.zeros(1, 1, 7, 2)
    mask = torch.tensor([[False, True, True, True, True, True, True]])
    w = hf_reshape.get_variant("sink_window").weights(q, k, v, mask=mask, causal=True, scaling=1.0,
                                                      params=hf_reshape.get_variant("sink_window").params_cls(2, 2))
    seen = (w[0, 0] > 0).int()
    assert seen.tolist() == [
        [0, 0, 0, 0, 0, 0, 0],  # a padded query whose only key is a pad: zeros
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],  # positions 1, 2 are the sinks; 2, 3, 4 the window
        [0, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 1, 1, 1],  # position 3 has left the window
    ]


def streaming_greedy(model, prompt, steps, position_ids=None):
    """Greedy decoding one token at a time through a ReshapeCache; returns the sequence, each step's cache bytes
    and the logits that chose each token."""
    cache = ReshapeCache(model)
    pos = None if position_ids is None else position_ids[:, : prompt.shape[1]]
    with torch.no_grad():
        logits = model(input_ids=prompt, cache=cache, use_cache=True, position_ids=pos).logits[:, -1:]
        seq, chosen, sizes = prompt, [logits], []
        for _ in range(steps):
            token = logits[:, -1].masked_fill(torch.arange(101) == 0, float("-inf")).argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            pos = None if position_ids is None else position_ids[:, seq.shape[1] - 1 : seq.shape[1]]
            logits = model(input_ids=token, cache=cache, use_cache=True, position_ids=pos).logits
            chosen.append(logits)
            sizes.append(cache_nbytes(cache))
    return seq, sizes, torch.cat(chosen[:-1], 1), cache


def test_streaming_past_the_trained_positions_keeps_a_constant_cache_and_equals_recomputing():
    """300 generated tokens, window 16, two sinks, on a GPT-2 trained for 64 positions extended to 320: the cache
    stops growing once it holds the sinks and the window, and every token is the one a full forward over the whole
    sequence (the sink_window forward, no cache) picks."""
    model = hf_reshape.reshape(tiny_model("gpt2"), "sink_window", num_sink=2, window=16, max_positions=320)
    prompt = ids_of(5)
    seq, sizes, logits, cache = streaming_greedy(model, prompt, 300)
    assert seq.shape[1] == 305 and cache.get_seq_length() == 305
    assert all(isinstance(layer, SinkWindowLayer) for layer in cache.layers)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 16 and layer.sink_keys.shape[-2] == 2 and layer.sinks_filled.tolist() == [2]
    # per layer: 16 window keys and values + 2 sinks' (4 heads x 8, float32), the window's mask, the sink count
    assert sizes[-1] == 2 * ((16 + 2) * 2 * 4 * 8 * 4 + 16 + 8)
    assert len(set(sizes[20:])) == 1  # full after 5 + 13 tokens; constant from there to the 300th
    with torch.no_grad():
        full = model(input_ids=seq, use_cache=False).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    full[..., 0] = float("-inf")
    assert torch.equal(full.argmax(-1), seq[:, prompt.shape[1] :])
    # generate() picks the same cache by itself and gives the same tokens
    out = model.generate(prompt, max_new_tokens=300, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache) and torch.equal(out.sequences, seq)


def test_position_ids_kept_in_range_stream_without_an_extension():
    """Without extending, position ids the caller keeps inside the table (p mod 64) stream as long: cached equals
    recomputed with the same ids, and equals the model extended by copying (row p is row p mod 64)."""
    model = hf_reshape.reshape(tiny_model("gpt2"), "sink_window", num_sink=2, window=8)
    prompt = ids_of(5, seed=6)
    wrapped = (torch.arange(205) % 64)[None]
    seq, sizes, logits, _ = streaming_greedy(model, prompt, 200, position_ids=wrapped)
    assert len(set(sizes[15:])) == 1
    with torch.no_grad():
        # with an attention mask: without one (and no cache), transformers reads the reset of the position ids at 64
        # as the start of a second packed sequence
        full = model(input_ids=seq, position_ids=wrapped, attention_mask=torch.ones_like(seq),
                     use_cache=False).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    extended = hf_reshape.extend_positions(copy.deepcopy(model), max_positions=205)
    assert torch.equal(streaming_greedy(extended, prompt, 200)[0], seq)


BOUNDED = [pytest.param({"num_sink": 2, "window": 3}, id="s2-w3"), pytest.param({"num_sink": 0, "window": 3}, id="s0"),
           pytest.param({"num_sink": 3, "window": 0}, id="w0")]


@pytest.mark.parametrize("params", BOUNDED)
def test_generate_with_sinks_matches_recomputing_and_a_padded_batch_each_row_alone(params):
    model = hf_reshape.reshape(tiny_model("gpt2"), "sink_window", **params)
    ids = ids_of(7)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache)
    with torch.no_grad():
        assert torch.equal(out.sequences, recompute_greedy(model, ids, 8))
    # left padding: the pads are neither sinks nor window keys, in the forward and in the cache
    long, short = ids_of(7, seed=4)[0], ids_of(4, seed=5)[0]
    batch = torch.stack([long, torch.cat([torch.tensor([17, 23, 42]), short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, **NO_EOS)
    for row, alone in enumerate([long, short]):
        ref = model.generate(alone[None], max_new_tokens=6, do_sample=False, **NO_EOS)
        assert torch.equal(out[row, -6:], ref[0, -6:])


def test_sink_window_cache_in_chunks_beams_sampling_and_refusals():
    model = hf_reshape.reshape(tiny_model("gpt2"), "sink_window", num_sink=2, window=3)
    ids = ids_of(13)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = ReshapeCache(model)
        parts = [model(input_ids=ids[:, s:e], cache=cache, use_cache=True).logits for s, e in [(0, 1), (1, 6), (6, 13)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    beams = model.generate(ids_of(5), max_new_tokens=4, num_beams=2, do_sample=False, **NO_EOS)
    assert torch.equal(beams, model.generate(ids_of(5), max_new_tokens=4, num_beams=2, do_sample=False,
                                             use_cache=False, **NO_EOS))
    runs = []
    for kwargs in ({}, {"use_cache": False}):
        torch.manual_seed(7)
        runs.append(model.generate(ids_of(6), max_new_tokens=6, do_sample=True, top_k=0, **NO_EOS, **kwargs))
    assert torch.equal(runs[0], runs[1])
    # a partly reshaped model: the exact layer keeps transformers' DynamicLayer
    part = hf_reshape.reshape(tiny_model("gpt2"), "sink_window", num_sink=1, window=2, layers=[1])
    out = part.generate(ids_of(6), max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert [type(layer) for layer in out.cache.layers] == [DynamicLayer, SinkWindowLayer]
    assert torch.equal(out.sequences, part.generate(ids_of(6), max_new_tokens=5, do_sample=False, use_cache=False,
                                                    **NO_EOS))
    # a cache outliving its variant refuses to go on
    cache = ReshapeCache(model)
    model(input_ids=ids_of(4), cache=cache, use_cache=True)
    hf_reshape.reshape(model, "sliding_window", window=3)
    with pytest.raises(RuntimeError, match="fresh cache"):
        model(input_ids=ids_of(1), cache=cache, use_cache=True)


def test_sink_window_bidirectional_on_bert_and_vit():
    for arch in ("bert", "vit"):
        model = tiny_model(arch)
        inputs = tiny_inputs(arch)
        with torch.no_grad():
            window = hf_reshape.reshape(copy.deepcopy(model), "sliding_window", window=2)(**inputs)[0]
            sinks = hf_reshape.reshape(copy.deepcopy(model), "sink_window", num_sink=1, window=2)(**inputs)[0]
            none = hf_reshape.reshape(copy.deepcopy(model), "sink_window", num_sink=0, window=2)(**inputs)[0]
        assert torch.equal(none, window)  # no sink: the sliding window itself
        assert not torch.allclose(sinks, window)


def _discovers_any_model() -> bool:
    """Whether this hf_reshape reshapes models beyond BERT, GPT-2 and ViT (the generic attention discovery)."""
    from hf_reshape import architectures

    return hasattr(architectures, "attention_modules")


@pytest.mark.skipif(not _discovers_any_model(), reason="needs hf_reshape's generic attention discovery (Llama)")
def test_a_rope_model_with_grouped_heads_streams_past_its_length_like_recomputing():
    """Llama (rotary positions, two query heads per key/value head): the kept keys are the rotated ones, at their
    true positions, so 60 tokens past max_position_embeddings match a full forward, with a constant cache."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = hf_reshape.reshape(transformers.LlamaForCausalLM(config).eval(), "sink_window", num_sink=2, window=4)
    prompt = ids_of(7)
    seq, sizes, logits, cache = streaming_greedy(model, prompt, 85)
    assert all(isinstance(layer, SinkWindowLayer) for layer in cache.layers) and len(set(sizes[10:])) == 1
    with torch.no_grad():
        full = model(input_ids=seq, use_cache=False).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    out = model.generate(prompt, max_new_tokens=85, min_new_tokens=85, do_sample=False)
    assert torch.equal(out, seq)


# ---------------------------------------------------------------------------------------------------- figure scripts


def test_streaming_figure_script_flat_cache_and_perplexity_rows(tmp_path):
    """hf_reshape.bench.streaming at tiny sizes: the latency stream starts with a full cache and keeps its bytes
    constant; perplexity rows are finite, and with a window covering the whole stream sink_window scores exactly
    what exact attention over the stream scores."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_reshape.bench import streaming

    cfg = '{"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 101, "n_positions": 64}'
    assert streaming.main(["--config", cfg, "--tokens", "40", "--num-sink", "2", "--window", "8", "--edge", "10",
                           "--out", str(tmp_path / "lat")]) == 0
    result = json.loads((tmp_path / "lat" / "streaming.json").read_text())
    assert "RANDOM" in result["model"] and result["stream"]["prompt_tokens"] == 10
    assert len(result["stream"]["times_s"]) == 40 and len(set(result["stream"]["cache_bytes"])) == 1
    assert result["flat"]["cache_ratio"] == 1.0 and (tmp_path / "lat" / "streaming.png").is_file()

    text = " ".join(["the cat sat on the mat and the dog ran to the park"] * 60)
    bpe = Tokenizer(models.BPE(unk_token="<u>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=60, special_tokens=["<u>"], show_progress=False))
    folder = tmp_path / "ckpt"
    tiny_model("gpt2").save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<u>").save_pretrained(folder)
    (tmp_path / "held.txt").write_text(text)
    args = ["--model", str(folder), "--tokens", "0", "--ppl-text", str(tmp_path / "held.txt"), "--trained-length",
            "16", "--num-sink", "2", "--out", str(tmp_path / "ppl")]
    assert streaming.main([*args, "--ppl-tokens", "120"]) == 0
    rows = json.loads((tmp_path / "ppl" / "streaming.json").read_text())["perplexity"]["rows"]
    assert set(rows) == {"sink_window(2, 14)", "window without sinks (16)", "sdpa, whole stream",
                         "sdpa, window of 16 recomputed per token", "sdpa, blocks of 16 (inside the trained length)"}
    assert rows["sdpa, window of 16 recomputed per token"]["tokens_scored"] == 120 - 16
    assert all(r["ppl"] > 1 and r["ppl"] < 1e6 for r in rows.values())
    assert rows["sink_window(2, 14)"]["ppl"] != rows["window without sinks (16)"]["ppl"]
    assert streaming.main([*args, "--ppl-tokens", "60", "--ppl-window", "200"]) == 0
    rows = json.loads((tmp_path / "ppl" / "streaming.json").read_text())["perplexity"]["rows"]
    assert rows["sink_window(2, 200)"]["ppl"] == pytest.approx(rows["sdpa, whole stream"]["ppl"], rel=1e-5)
    with pytest.raises(SystemExit):  # perplexity of random weights is refused, naming what it needs
        streaming.main(["--ppl-tokens", "50", "--tokens", "0"])


def test_vit_figure_runs_a_vit_at_four_times_its_tokens_against_sdpa():
    """hf_reshape.bench.long_inputs --vit without a run folder: a random ViT of the vit-mnist recipe's shape, each
    variant and SDPA extended with image_size= to 4x the trained tokens, timed side by side."""
    from hf_reshape.bench import long_inputs

    assert long_inputs.vit_sides(28, 4, [1, 2, 4]) == [(1, 28), (2, 40), (4, 56)]
    result = long_inputs.run_vit(None, [1, 4], rounds=1, warmup=0, n_eval=10, batch=2, progress=lambda m: None)
    assert "RANDOM" in result["model"] and result["eval_images"] is None
    rows = {(r["tokens"], r["model"]): r for r in result["rows"]}
    assert {t for t, _ in rows} == {50, 197} and len(rows) == 2 * (1 + len(long_inputs.VIT_VARIANTS))
    assert all(r["error"] is None and r["median_s"] > 0 for r in rows.values())
    assert "| 197 (4x) | 56x56 | sliding_window-none |" in long_inputs.vit_markdown(result)
