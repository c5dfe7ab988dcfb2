"""Model-level reliability (issue 10): threads generating on one model, refused calls that change nothing,
SentenceTransformer, shared configs, a switched attention implementation, plain transformers loads of a reshaped
checkpoint, `output_attentions`, an unreachable Hub, and defaults that adapt to small models."""

import logging
import sys
import threading
import time

import pytest
import torch
import transformers

import hf_reshape
from hf_reshape import ReshapeConfig
from hf_reshape import functional as fn
from hf_reshape.cache import HOOK_ATTR, LinearRecurrentLayer
from hf_reshape.errors import AttentionImplementationError
from hf_reshape.integration import STATE_ATTR, ReshapedAttention

from conftest import VARIANTS, fits, main_output, small_params, tiny_inputs, tiny_model

NO_EOS = {"bad_words_ids": [[0]]}  # token 0 is eos and pad of the tiny GPT-2: every row runs to the end


@pytest.fixture
def transformers_log():
    """Records of transformers' logger (it does not propagate to the root logger, where caplog listens)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def _messages(records):
    return "\n".join(r.getMessage() for r in records)


# ---------- 4. threads generating on one model ----------


def test_threads_generating_on_one_model_get_what_sequential_generation_gets(monkeypatch):
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear", chunk_size=4)
    prompts = [torch.randint(1, 101, (1, 3 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def generate(ids):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_scores=True, **NO_EOS)
        return out.sequences, torch.stack(out.scores)

    expected = [generate(p) for p in prompts]
    # widen the window between a cache layer's update and the attention call that uses it, so that the threads
    # interleave there on every step (the race needs no more than that; a sleep releases the GIL)
    update = LinearRecurrentLayer.update

    def slow_update(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        time.sleep(0.002)
        return out

    monkeypatch.setattr(LinearRecurrentLayer, "update", slow_update)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    results, errors = [None] * len(prompts), []

    def run(i):
        try:
            results[i] = generate(prompts[i])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for (seq, scores), (ref_seq, ref_scores) in zip(results, expected):
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


# ---------- 8. a refused reshape changes nothing; SentenceTransformer ----------


def _state(model):
    holders = {n: (m.method, m.params.to_dict()) for n, m in model.named_modules() if isinstance(m, ReshapedAttention)}
    hooks = {n: len(m._forward_pre_hooks) for n, m in model.named_modules() if m._forward_pre_hooks}
    return {
        "config": model.config.to_dict(),
        "config_id": id(model.config),
        "attn": model.config._attn_implementation,
        "holders": holders,
        "hooks": hooks,
        "keys": sorted(model.state_dict()),
        "generation_hook": HOOK_ATTR in model.__dict__,
    }


REFUSALS = [
    pytest.param("gpt2", ("slidng_window",), {}, hf_reshape.UnknownVariantError, id="unknown-variant"),
    pytest.param("gpt2", ("topk",), {"top_k": 0}, hf_reshape.InvalidParameterError, id="bad-parameter"),
    pytest.param("gpt2", ("topk",), {"topk": 3}, hf_reshape.InvalidParameterError, id="unknown-parameter"),
    pytest.param("gpt2", ("nystrom",), {}, hf_reshape.NotCausalError, id="not-causal"),
    pytest.param("gpt2", ("linear",), {"layers": [0, 5]}, hf_reshape.InvalidParameterError, id="bad-layers"),
    pytest.param("gpt2", ("linear",), {"layers": 1}, hf_reshape.InvalidParameterError, id="layers-not-a-list"),
    pytest.param("vit", ("linformer",), {"proj_len": 32}, hf_reshape.InvalidParameterError, id="explicit-too-long"),
]


@pytest.mark.parametrize("first", [None, ("sliding_window", {"window": 2})], ids=["plain", "reshaped"])
@pytest.mark.parametrize("arch, args, kwargs, error", REFUSALS)
def test_a_refused_reshape_changes_nothing(arch, args, kwargs, error, first):
    model = tiny_model(arch)
    if first is not None and fits(first[0], arch):
        hf_reshape.reshape(model, first[0], **first[1])
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        before_out = main_output(arch, model(**inputs))
    before = _state(model)
    with pytest.raises(error):
        hf_reshape.reshape(model, *args, **kwargs)
    assert _state(model) == before
    with torch.no_grad():
        assert torch.equal(main_output(arch, model(**inputs)), before_out)


def test_an_unsupported_model_is_refused_unchanged():
    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=20)  # attention outside transformers' interface
    model = transformers.DebertaV2Model(config)
    before = (model.config.to_dict(), model.config._attn_implementation, sorted(model.state_dict()))
    with pytest.raises(hf_reshape.UnsupportedModelError, match="attention interface"):
        hf_reshape.reshape(model, "linear")
    assert (model.config.to_dict(), model.config._attn_implementation, sorted(model.state_dict())) == before
    assert not hasattr(model.config, "hf_reshape")


def test_switching_the_implementation_failing_half_way_puts_the_model_back(monkeypatch):
    model = hf_reshape.reshape(tiny_model("bert"), "sliding_window", window=2)
    before = _state(model)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("cannot switch")

    monkeypatch.setattr(transformers.BertModel, "set_attn_implementation", refuse)
    with pytest.raises(RuntimeError, match="cannot switch"):
        hf_reshape.reshape(model, "linear")
    assert _state(model) == before


def _tiny_sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(96)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_model("bert").save_pretrained(folder)
    return SentenceTransformer(modules=[Transformer(str(folder)), Pooling(32, "mean")], device="cpu")


SENTENCES = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]


def test_a_sentence_transformer_is_reshaped_saved_and_reloaded(tmp_path, transformers_log):
    from sentence_transformers import SentenceTransformer

    st = _tiny_sentence_transformer(tmp_path / "base")
    st.eval()
    softmax = st.encode(SENTENCES, convert_to_tensor=True)
    assert hf_reshape.reshape(st, "linformer", proj_len=4) is st
    assert hf_reshape.get_reshape_config(st) == ReshapeConfig("linformer", proj_len=4, max_length=64)
    with torch.no_grad():  # train the projections a little, so that only a reload of the state reproduces them
        for name, p in st.named_parameters():
            if STATE_ATTR in name:
                p.mul_(1.5)
    reshaped = st.encode(SENTENCES, convert_to_tensor=True)
    assert not torch.allclose(reshaped, softmax, atol=1e-3)
    st.save(str(tmp_path / "saved"))

    loaded = hf_reshape.from_pretrained(tmp_path / "saved", model_class=SentenceTransformer)
    assert isinstance(loaded, SentenceTransformer)
    assert hf_reshape.get_reshape_config(loaded) == hf_reshape.get_reshape_config(st)
    assert torch.equal(loaded.encode(SENTENCES, convert_to_tensor=True), reshaped)
    assert "built by transformers alone" not in _messages(transformers_log)

    # sentence-transformers alone loads softmax attention: loud, and it names the call that keeps the variant
    plain = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert "hf_reshape.from_pretrained(path, model_class=SentenceTransformer)" in _messages(transformers_log)
    assert torch.allclose(plain.encode(SENTENCES, convert_to_tensor=True), softmax, atol=1e-5)

    hf_reshape.unreshape(st)
    assert hf_reshape.get_reshape_config(st) is None
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True), softmax)


# ---------- 9. models sharing one config object ----------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_reshaping_one_of_two_models_sharing_a_config_leaves_the_other_alone(arch):
    first = tiny_model(arch)
    second = type(first)(first.config).eval()  # one config object for both
    second.load_state_dict(first.state_dict())
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        softmax = main_output(arch, second(**inputs))
    variant = "linear" if fits("linear", arch) else "topk"
    hf_reshape.reshape(first, variant, **small_params(variant))
    assert first.config is not second.config
    assert not hasattr(second.config, "hf_reshape")
    assert second.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION
    # every module of the reshaped model that keeps the config (attention modules do) sees the copy
    held = [v for m in first.modules() for v in vars(m).values() if isinstance(v, transformers.PretrainedConfig)]
    assert held and all(c is first.config for c in held)
    with torch.no_grad():
        assert torch.equal(main_output(arch, second(**inputs)), softmax)
        assert not torch.allclose(main_output(arch, first(**inputs)), softmax, atol=1e-4)
    hf_reshape.unreshape(first)
    assert not hasattr(second.config, "hf_reshape")


# ---------- 10. a switched attention implementation; plain loads of a reshaped checkpoint ----------


def test_switching_the_attention_implementation_after_reshape_is_refused_at_forward():
    model = hf_reshape.reshape(tiny_model("bert", cls="BertForSequenceClassification"), "linear")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        reshaped = model(**inputs).logits
    model.set_attn_implementation("sdpa")
    with pytest.raises(AttentionImplementationError, match=r"'linear'.*now 'sdpa'.*hf_reshape.unreshape"):
        model(**inputs)
    model.bert.set_attn_implementation("hf_reshape")
    model.config._attn_implementation = "eager"
    with pytest.raises(AttentionImplementationError, match="now 'eager'"):
        model.bert(**inputs)
    model.set_attn_implementation("hf_reshape")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reshaped)
    hf_reshape.unreshape(model)
    model.set_attn_implementation("eager")
    model(**inputs)  # exact attention again: nothing left to refuse


def test_a_plain_transformers_load_of_a_reshaped_checkpoint_warns(tmp_path, transformers_log):
    model = hf_reshape.reshape(tiny_model("bert"), "sliding_window", window=2)
    model.save_pretrained(tmp_path)
    transformers_log.clear()
    plain = transformers.AutoModel.from_pretrained(tmp_path)
    text = _messages(transformers_log)
    assert "'sliding_window'" in text and "hf_reshape.from_pretrained(path)" in text
    assert text.count("built by transformers alone") == 1  # once, not once per submodel
    assert plain.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION
    transformers_log.clear()
    hf_reshape.from_pretrained(tmp_path)  # hf_reshape's own load reshapes what it builds: no warning
    assert "built by transformers alone" not in _messages(transformers_log)
    # a model built from a reshaped model's config is plain too
    transformers.BertModel(model.config)
    assert "built by transformers alone" in _messages(transformers_log)


# ---------- 13. output_attentions ----------


def _weights_case(name, causal, mask, **extra):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4, dtype=torch.float64) for _ in range(3))
    params = dict(small_params(name), **({"max_length": 10} if name == "linformer" else {}), **extra)
    spec = hf_reshape.get_variant(name)
    state = fn.init_state(name, num_heads=3, head_dim=4, **params)
    # as after training: no entry of a projection is exactly zero any more
    state = {n: t.detach().double() + 0.01 * torch.randn(t.shape, dtype=torch.float64) for n, t in state.items()}
    key_mask = None
    if mask:
        key_mask = torch.ones(2, 10, dtype=torch.bool)
        key_mask[1, 7:] = False
    call = dict(attention_mask=key_mask, is_causal=causal, **params, **state)
    out = fn.attention(q, k, v, name, **call)
    p = hf_reshape.registry.make_params(spec, params)
    w = spec.weights(q, k, v, mask=key_mask, causal=causal, scaling=4 ** -0.5, params=p, **state)
    return q, k, v, key_mask, state, out, w


WITH_WEIGHTS = [n for n in VARIANTS if hf_reshape.get_variant(n).weights is not None]
WEIGHT_CASES = [pytest.param(n, {}, id=n) for n in WITH_WEIGHTS] + [
    # Linformer's segment layout: with 7 real tokens of 10, projected keys 5 to 7 (of 8) receive none
    pytest.param("linformer", {"init": "mean"}, id="linformer-mean"),
]


def test_the_variants_with_attention_matrices_return_weights():
    assert {"topk", "sliding_window", "linformer", "svd"} <= set(WITH_WEIGHTS)


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name, extra", WEIGHT_CASES)
def test_variant_weights_times_values_give_the_forward(name, extra, causal, mask):
    spec = hf_reshape.get_variant(name)
    if (causal and not spec.causal) or (not causal and not spec.bidirectional):
        pytest.skip("form not supported")
    q, k, v, key_mask, state, out, w = _weights_case(name, causal, mask, **extra)
    if spec.weights_over_keys:
        assert w.shape == (2, 3, 10, 10)
        torch.testing.assert_close(w @ v, out)
    else:  # Linformer: probabilities over the projected keys, applied to the projected values F v
        keep = torch.ones(2, 10, dtype=torch.bool) if key_mask is None else key_mask
        ranks = (keep.long().cumsum(-1) - 1).clamp_min(0)  # column r of F takes the r-th real token
        f = state["proj_v"][:, ranks].transpose(0, 1) * keep[:, None]  # [B, P, T], zero columns for pads
        torch.testing.assert_close(w @ (f[:, None] @ v), out)
    probs = spec.name != "svd"  # svd's truncated matrix is not a distribution
    if probs:
        rows = w.sum(-1)
        real = torch.ones_like(rows, dtype=torch.bool) if key_mask is None else key_mask[:, None, :].expand_as(rows)
        if spec.family == "linear":
            # a ReLU feature map (t2r, cosformer) can give a real query zero weight on every key: then its row of
            # weights is zero, as its output is (the guarded denominator), not a distribution
            real = real & ~((rows == 0) & (out.abs().sum(-1) == 0))
        torch.testing.assert_close(rows[real], torch.ones_like(rows[real]))


ARCH_VARIANTS = [(a, n) for a in ("bert", "gpt2", "vit") for n in VARIANTS if fits(n, a)]


@pytest.mark.parametrize("arch, name", ARCH_VARIANTS)
def test_output_attentions_returns_the_variant_weights_or_warns(arch, name, transformers_log):
    transformers.utils.logging.warning_once.cache_clear()  # the warning is once per process
    model = hf_reshape.reshape(tiny_model(arch), name, **small_params(name))
    spec = hf_reshape.get_variant(name)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    t = 17 if arch == "vit" else 12
    if spec.weights is None:
        assert not out.attentions
        assert f"{name!r} returns no attention weights" in _messages(transformers_log)
        return
    assert len(out.attentions) == 2
    last = spec.name == "linformer" and model.config.hf_reshape["proj_len"]
    assert all(a.shape == (2, 4, t, last or t) for a in out.attentions)
    if name != "svd":
        rows = out.attentions[0].sum(-1)
        if spec.family == "linear":  # a ReLU feature map can give a query zero weight on every key (a zero row)
            rows = torch.where(rows == 0, torch.ones_like(rows), rows)
        torch.testing.assert_close(rows, torch.ones(2, 4, t))
    with torch.no_grad():
        assert torch.equal(main_output(arch, out), main_output(arch, model(**inputs)))  # weights change nothing


def test_output_attentions_of_layers_left_exact_are_softmax():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions
    hf_reshape.reshape(model, "sliding_window", layers=[1], window=64)  # layer 0 exact; window 64 >= T is exact
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True).attentions
    assert len(ours) == 2
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------- 14. offline or unreachable Hub ----------


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_an_uncached_repo_id_offline_says_offline(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="(?s)'org/name' is not a local folder.*offline mode is enabled"):
        ReshapeConfig.from_pretrained("org/name", cache_dir=str(tmp_path))


def test_a_missing_local_folder_says_it_does_not_exist(tmp_path, offline):
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope/", "nope/deeper/still"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ReshapeConfig.from_pretrained(missing)


def test_no_network_keeps_the_hub_message(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id, filename, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as err:
            raise LocalEntryNotFoundError("not in the local cache; check your connection") from err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match="(?s)check your connection.*Name or service not known"):
        ReshapeConfig.from_pretrained("org/name")


def test_a_cached_model_without_a_reshape_config_file_reads_its_record_offline(tmp_path, offline):
    from test_api import _hub_cache

    model = hf_reshape.reshape(tiny_model("bert"), "topk", top_k=3)
    model.save_pretrained(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_bytes()
    _hub_cache(tmp_path / "cache", "someone/bert-topk", {"config.json": config})  # no reshape_config.json
    loaded = ReshapeConfig.from_pretrained("someone/bert-topk", cache_dir=str(tmp_path / "cache"))
    assert loaded == ReshapeConfig("topk", top_k=3)


# ---------- 15. defaults that adapt to small models ----------


@pytest.mark.parametrize("arch, positions", [("vit", 17), ("bert", 64)])
def test_linformer_default_proj_len_adapts_to_the_model(arch, positions, tmp_path):
    model = hf_reshape.reshape(tiny_model(arch), "linformer")
    record = model.config.hf_reshape
    assert record["proj_len"] == positions and record["max_length"] == positions  # the value used is recorded
    with torch.no_grad():
        out = main_output(arch, model(**tiny_inputs(arch)))
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    assert loaded.config.hf_reshape == record
    with torch.no_grad():
        assert torch.equal(main_output(arch, loaded.eval()(**tiny_inputs(arch))), out)


def test_explicit_values_that_do_not_fit_stay_errors_and_unset_ones_fit_the_given_ones():
    with pytest.raises(hf_reshape.InvalidParameterError, match=r"proj_len.*\(128\).*max_length.*\(17\)"):
        hf_reshape.reshape(tiny_model("vit"), "linformer", proj_len=128)
    cfg = ReshapeConfig("linformer", max_length=8)
    assert cfg.proj_len == 8 and cfg.defaulted == {"proj_len", "init"}
    assert ReshapeConfig.from_dict(cfg.to_dict()) == cfg  # the round trip stays exact
    assert ReshapeConfig("linformer").proj_len == 128  # the documented default where it fits
    model = hf_reshape.reshape(tiny_model("bert"), "linformer", proj_len=16)
    assert model.config.hf_reshape["proj_len"] == 16


@pytest.mark.parametrize("arch, name", ARCH_VARIANTS)
def test_every_variant_runs_with_its_defaults_on_tiny_models(arch, name):
    model = hf_reshape.reshape(tiny_model(arch), name)
    with torch.no_grad():
        out = main_output(arch, model(**tiny_inputs(arch)))
    assert torch.isfinite(out).all()
