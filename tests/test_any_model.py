"""Any model on transformers' attention interface: a conformance matrix of tiny models built from configs in code
(decoders with grouped-query and multi-query attention, encoders, a vision encoder, a two-tower model and an
encoder-decoder), discovery without a row per model, and the attention call's own arguments (the model's sliding
window, soft-capping, sinks, a relative position bias) honoured or refused, never dropped."""

import copy

import pytest
import torch
import transformers as tf

import hf_reshape
from hf_reshape.architectures import attention_modules, layer_facts
from hf_reshape.cache import LinearRecurrentLayer, ReshapeCache, SlidingWindowLayer
from hf_reshape.registry import get_variant
from transformers.cache_utils import DynamicLayer
from hf_reshape.integration import STATE_ATTR, hf_reshape_attention_forward

SEQ = 12
TEXT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
VISION = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=37)
SEQ2SEQ = dict(vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, decoder_start_token_id=1)
DECODER_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(**kw):
    return tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2, **DECODER_IDS, **kw))


def _qwen2(**kw):
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT, num_key_value_heads=1, **DECODER_IDS, **kw))


def _mistral(sliding_window=None, **kw):
    return tf.MistralForCausalLM(tf.MistralConfig(**TEXT, num_key_value_heads=2, sliding_window=sliding_window,
                                                  **DECODER_IDS, **kw))


def _clip():
    return tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(TEXT, max_position_embeddings=20, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=VISION, projection_dim=16))


# name: (builder, kind); kind "decoder" generates, "encoder"/"vision" are bidirectional, "mixed" has both forms
MODELS = {
    "llama": (_llama, "decoder"),
    "qwen2": (_qwen2, "decoder"),
    "mistral": (_mistral, "decoder"),
    "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(**TEXT, pad_token_id=0)), "encoder"),
    "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=101, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)), "encoder"),
    "electra": (lambda: tf.ElectraModel(tf.ElectraConfig(**{**TEXT, "hidden_size": 32}, embedding_size=16)), "encoder"),
    "deit": (lambda: tf.DeiTModel(tf.DeiTConfig(**VISION)), "vision"),
    "clip": (_clip, "mixed"),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(**SEQ2SEQ, max_position_embeddings=64)), "mixed"),
}


@pytest.fixture(scope="module")
def stock_models():
    """One stock model per name, built once (deterministic); tests work on deep copies."""
    built = {}
    for name, (build, _) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        with torch.no_grad():  # attention projections 5x their init: scores of order 1, where every variant differs
            for layer in layer_facts(model):  # from softmax (at ~0.01, `taylor`'s 1 + s + s^2/2 is exp(s) to 1e-7)
                for linear in layer.module.modules():
                    if isinstance(linear, torch.nn.Linear):
                        linear.weight.mul_(5.0)
        built[name] = model
    return built


def _model(stock_models, name, dtype=torch.float32):
    return copy.deepcopy(stock_models[name]).to(dtype).eval()


def _inputs(name, batch=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, SEQ), generator=g)
    pixels = torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype)
    if name == "deit":
        return {"pixel_values": pixels}
    if name == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    if name == "bart":
        return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
    return {"input_ids": ids}


def _output(out) -> torch.Tensor:
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(f"no output in {type(out).__name__}")


def _forms(name) -> set[bool]:
    kind = MODELS[name][1]
    return {True} if kind == "decoder" else {False} if kind in ("encoder", "vision") else {True, False}


def _fits(variant, name) -> bool:
    spec = hf_reshape.get_variant(variant)
    return all(spec.causal if causal else spec.bidirectional for causal in _forms(name))


def _small(variant):
    return dict(hf_reshape.get_variant(variant).small_params)


CASES = [(m, v) for m in MODELS for v in hf_reshape.list_variants() if _fits(v, m)]
IDS = [f"{m}-{v}" for m, v in CASES]


# ---------- discovery ----------


def test_discovery_reads_heads_form_and_positions_without_a_row_per_model(stock_models):
    facts = {name: layer_facts(model) for name, model in stock_models.items()}
    llama = facts["llama"]
    assert [(f.index, f.name) for f in llama] == [(0, "model.layers.0.self_attn"), (1, "model.layers.1.self_attn")]
    assert {(f.num_heads, f.num_kv_heads, f.head_dim, f.causal, f.max_positions) for f in llama} == {(4, 2, 8, True, 64)}
    assert {f.num_kv_heads for f in facts["qwen2"]} == {1}
    assert {(f.causal, f.num_kv_heads) for f in facts["distilbert"]} == {(False, 4)}
    assert {f.max_positions for f in facts["deit"]} == {18}  # 16 patches + class and distillation tokens
    clip = {f.name.split(".")[0]: (f.causal, f.max_positions) for f in facts["clip"]}
    assert clip == {"text_model": (True, 20), "vision_model": (False, 17)}  # the text tower runs causal
    # the encoder-decoder: self-attention of both stacks, cross-attention skipped
    bart = {(f.name.split(".")[1], f.causal) for f in facts["bart"]}
    assert bart == {("encoder", False), ("decoder", True)}
    crosses = [f.name for f in attention_modules(stock_models["bart"]) if f.cross]
    assert crosses == ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]


def test_a_model_without_the_attention_interface_is_refused_with_the_reason():
    model = tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=20))
    with pytest.raises(hf_reshape.UnsupportedModelError, match="attention interface"):
        hf_reshape.reshape(model, "linear")
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION


# ---------- the matrix ----------


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_reshapes_runs_finite_and_saves_and_reloads_exactly(stock_models, name, variant, tmp_path):
    model = _model(stock_models, name)
    inputs = _inputs(name)
    with torch.no_grad():
        stock = _output(model(**inputs))
        hf_reshape.reshape(model, variant, **_small(variant))
        out = _output(model(**inputs))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-6), "reshaping changed nothing: the variant did not run"
    reshaped = {n for n, m in model.named_modules() if isinstance(getattr(m, STATE_ATTR, None), torch.nn.Module)}
    assert reshaped == {f.name for f in layer_facts(model)}  # every self-attention layer, no cross-attention
    with torch.no_grad():  # stand-in for training: move the variant's learned state off its initial value
        for n, p in model.named_parameters():
            if f".{STATE_ATTR}." in n:
                p.add_(torch.randn_like(p) * 0.1)
        before = _output(model(**inputs))
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(_output(loaded.eval()(**inputs)), before)


DEGENERATE = [c for c in CASES if hf_reshape.get_variant(c[1]).degenerate is not None]


@pytest.mark.parametrize("name,variant", DEGENERATE, ids=[f"{m}-{v}" for m, v in DEGENERATE])
def test_degenerate_setting_equals_stock_attention(stock_models, name, variant):
    model = _model(stock_models, name, torch.float64)
    inputs = _inputs(name, dtype=torch.float64)
    t = {"deit": 18, "clip": 17}.get(name, SEQ)  # the longest sequence any tower reads
    with torch.no_grad():
        stock = _output(model(**inputs))
        hf_reshape.reshape(model, variant, **hf_reshape.get_variant(variant).degenerate(t))
        out = _output(model(**inputs))
    torch.testing.assert_close(out, stock, atol=1e-9, rtol=1e-7)


PADDED = [c for c in CASES if c[0] not in ("deit", "clip")]


@pytest.mark.parametrize("name,variant", PADDED, ids=[f"{m}-{v}" for m, v in PADDED])
def test_padding_invariance(stock_models, name, variant):
    """A sequence alone equals the same sequence padded in a batch (right padding for encoders, left for decoders);
    a fully padded row stays finite."""
    model = hf_reshape.reshape(_model(stock_models, name, torch.float64), variant, **_small(variant))
    ids = _inputs(name, batch=3)["input_ids"]
    n, decoder = 7, MODELS[name][1] == "decoder"
    mask = torch.ones(3, SEQ, dtype=torch.long)
    real = slice(SEQ - n, None) if decoder else slice(0, n)
    mask[0] = 0
    mask[0, real] = 1
    mask[2] = 0
    kwargs = {}
    if decoder:  # positions count real tokens, as generate() gives them (rotary positions are not shift-free for
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}  # every variant)
    if name == "bart":  # the encoder is padded; the decoder reads the encoder's real tokens only
        dec = ids[:, :5].flip(-1)
        kwargs = {"decoder_input_ids": dec}
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
        alone = model(input_ids=ids[:1, real], output_hidden_states=True,
                      **({"decoder_input_ids": kwargs["decoder_input_ids"][:1]} if name == "bart" else {}))
    if name == "bart":
        torch.testing.assert_close(batch.encoder_last_hidden_state[0, real], alone.encoder_last_hidden_state[0],
                                   atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(batch.logits[0], alone.logits[0], atol=1e-9, rtol=1e-7)
        return
    hidden_b, hidden_a = batch.hidden_states[-1], alone.hidden_states[-1]
    torch.testing.assert_close(hidden_b[0, real], hidden_a[0], atol=1e-9, rtol=1e-7)
    assert torch.isfinite(hidden_b).all()


DECODING = [c for c in CASES if MODELS[c[0]][1] == "decoder"]


def _recompute_greedy(model, ids, steps):
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        logits[:, 2] = float("-inf")  # never eos
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("name,variant", DECODING, ids=[f"{m}-{v}" for m, v in DECODING])
def test_greedy_generation_equals_recomputation(stock_models, name, variant):
    """Rotary positions are applied before the attention call, so every variant sees rotated queries and keys;
    decoding with the cache (bounded where the variant has a bounded form) equals recomputing the sequence."""
    model = hf_reshape.reshape(_model(stock_models, name), variant, **_small(variant))
    ids = _inputs(name, batch=1)["input_ids"][:, :6]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         min_new_tokens=5)
    assert torch.equal(out.sequences, _recompute_greedy(model, ids, 5))
    if variant in ("linear", "sliding_window"):
        assert isinstance(out.cache, ReshapeCache)


@pytest.mark.parametrize("variant,heads", [("linear", 1), ("taylor", 1), ("hedgehog", 4)])
def test_grouped_query_linear_state_is_per_key_value_head_where_the_map_is_shared_and_bounded(stock_models, variant,
                                                                                              heads):
    """Qwen2 here has 4 query heads and 1 key/value head. A feature map that is the same for every head (`linear`,
    `taylor`) gives the 4 query heads of a group the same sums: the state is kept once per key/value head (4x less).
    Per-head learned maps (`hedgehog`) give each query head its own sums. Either way the state does not grow with
    the prompt, and decoding equals recomputation (test above and below)."""
    model = hf_reshape.reshape(_model(stock_models, "qwen2"), variant, chunk_size=4)
    sizes = []
    for n in (6, 20):
        ids = torch.randint(3, 101, (1, n), generator=torch.Generator().manual_seed(n))
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        layers = out.cache.layers
        assert all(isinstance(layer, LinearRecurrentLayer) for layer in layers)
        assert tuple(layers[0].state.shape[:2]) == (1, heads) and layers[0].state.shape[-1] == 8
        assert torch.equal(out.sequences, _recompute_greedy(model, ids, 3))
        sizes.append(out.cache.nbytes())
    assert sizes[0] == sizes[1]


# sampling on Llama (4 query heads, 2 key/value heads), beam search on Qwen2 (4 and 1): one decoding per model keeps
# the matrix short; greedy decoding of both is above
GQA = [(m, mode, v) for m, mode in (("llama", "sample"), ("qwen2", "beam")) for v in hf_reshape.list_variants()
       if _fits(v, m)]


@pytest.mark.parametrize("name,mode,variant", GQA, ids=[f"{m}-{d}-{v}" for m, d, v in GQA])
def test_grouped_query_sampled_and_beam_generation_equal_recomputation(stock_models, name, mode, variant):
    """Sampling with a fixed seed, and beam search (num_beams=2, which reorders the cache, the linear state
    included, at every step), give the tokens that recomputing the whole sequence (use_cache=False) gives."""
    model = hf_reshape.reshape(_model(stock_models, name), variant, **_small(variant))
    ids = _inputs(name, batch=1, seed=4)["input_ids"][:, :5]
    kw = dict(do_sample=True, top_k=0, temperature=1.5) if mode == "sample" else dict(do_sample=False, num_beams=2)
    kw.update(max_new_tokens=4, min_new_tokens=4)
    torch.manual_seed(11)
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    torch.manual_seed(11)
    assert torch.equal(out.sequences, model.generate(ids, use_cache=False, **kw))
    if get_variant(variant).features is not None or variant in ("sliding_window", "sink_window"):
        assert isinstance(out.cache, ReshapeCache)


@pytest.mark.parametrize("variant", ["linear", "sink_window"])
def test_reordering_and_selecting_rows_of_the_bounded_cache_moves_each_rows_state(stock_models, variant):
    """What beam search does to the cache between steps: after a prefill of two different prompts,
    `reorder_cache([1, 1])` (both beams continue the second row) then one more token gives, on both rows, the
    logits of the second prompt plus that token computed without a cache; `batch_select_indices` likewise."""
    model = hf_reshape.reshape(_model(stock_models, "qwen2"), variant, **_small(variant))
    prompts = _inputs("qwen2", batch=2, seed=5)["input_ids"][:, :7]
    nxt = torch.tensor([[7], [7]])
    want = model(input_ids=torch.cat([prompts[1:], nxt[:1]], 1), use_cache=False).logits[0, -1]
    for move in ("reorder", "select"):
        cache = ReshapeCache(model)
        model(input_ids=prompts, cache=cache, use_cache=True)
        assert not isinstance(cache.layers[0], DynamicLayer)
        if move == "reorder":
            cache.reorder_cache(torch.tensor([1, 1]))
            ids, rows = nxt, 2
        else:
            cache.batch_select_indices(torch.tensor([1]))
            ids, rows = nxt[:1], 1
        got = model(input_ids=ids, cache=cache, use_cache=True,
                    position_ids=torch.full((rows, 1), prompts.shape[1])).logits[:, -1]
        for row in range(rows):
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


# ---------- the attention call's own arguments ----------


def test_model_window_composes_with_sliding_window_and_refuses_other_variants():
    torch.manual_seed(0)
    stock = _mistral(sliding_window=5).eval().double()
    ids = _inputs("mistral")["input_ids"]
    with torch.no_grad():
        expected = stock(input_ids=ids).logits
    # a variant that cannot apply the model's window is refused up front, naming the argument and who serves it
    model = copy.deepcopy(stock)
    with pytest.raises(hf_reshape.UnsupportedModelError, match=r"sliding_window=5.*\['sliding_window'\]"):
        hf_reshape.reshape(model, "linear")
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION
    # the variant's window intersected with the model's: window >= T leaves the model's 5 keys, as stock attention
    hf_reshape.reshape(model, "sliding_window", window=SEQ)
    assert {m.hf_reshape.params.window for m in model.modules() if hasattr(m, STATE_ATTR)} == {4}
    assert hf_reshape.get_reshape_config(model).window == SEQ  # the record keeps what was asked
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-9, rtol=1e-7)
    # a layer left exact applies the model's window in hf_reshape's attention function too
    partly = hf_reshape.reshape(copy.deepcopy(stock), "sliding_window", window=SEQ, layers=[1])
    with torch.no_grad():
        torch.testing.assert_close(partly(input_ids=ids).logits, expected, atol=1e-9, rtol=1e-7)
    # and generation with the bounded cache equals recomputation
    narrow = hf_reshape.reshape(copy.deepcopy(stock).float(), "sliding_window", window=3)
    out = narrow.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                          min_new_tokens=5)
    assert all(isinstance(layer, SlidingWindowLayer) for layer in out.cache.layers)
    assert torch.equal(out.sequences, _recompute_greedy(narrow, ids[:1, :6], 5))


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "mt5"])
def test_arguments_only_exact_attention_applies_are_refused_and_applied_exactly(family):
    """Soft-capping (Gemma 2), sinks (gpt-oss) and a relative position bias (T5 kin) are refused for every variant
    at reshape time, naming the argument; layers left exact in hf_reshape's attention function apply them (and the
    model's window) as the model's eager attention does (its softmax runs in float32, hence the tolerance)."""
    torch.manual_seed(0)
    ids = _inputs("llama")["input_ids"]
    inputs = {"input_ids": ids}
    if family == "gemma2":
        model, argument = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **TEXT, num_key_value_heads=2, head_dim=8, sliding_window=5, attn_logit_softcapping=1.5,
            **DECODER_IDS)), "softcap=1.5"
    elif family == "gpt_oss":
        model, argument = tf.GptOssForCausalLM(tf.GptOssConfig(
            **{**TEXT, "intermediate_size": 32}, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=5,
            **DECODER_IDS)), "s_aux"
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.normal_()
    else:
        model, argument = tf.MT5Model(tf.MT5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                   num_heads=4, pad_token_id=0, decoder_start_token_id=0)), "position_bias"
        inputs["decoder_input_ids"] = ids[:, :5]
    model = model.eval() if family == "gpt_oss" else model.double().eval()  # gpt-oss experts run in float32 only
    for variant in ("linear", "sliding_window", "topk"):
        with pytest.raises(hf_reshape.UnsupportedModelError, match=rf"`{argument}`.*variants that can serve it: none"):
            hf_reshape.reshape(model, variant)
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = _output(model(**inputs))
        model.set_attn_implementation(hf_reshape.ATTN_IMPLEMENTATION)  # every layer exact, through our function
        got = _output(model(**inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if family == "gpt_oss":  # the sinks take part: without them (a logit of -1e9) the outputs differ
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.fill_(-1e9)
            assert not torch.allclose(_output(model(**inputs)), expected, atol=1e-3)


def test_an_unknown_argument_of_the_attention_call_raises_naming_it(stock_models):
    model = hf_reshape.reshape(_model(stock_models, "llama"), "linear")
    module = model.model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 3, 8)
    with pytest.raises(hf_reshape.UnsupportedModelError, match=r"\['block_indices'\]"):
        hf_reshape_attention_forward(module, q, k, v, None, block_indices=torch.zeros(1))
    with pytest.raises(hf_reshape.UnsupportedModelError, match=r"softcap"):
        hf_reshape_attention_forward(module, q, k, v, None, softcap=30.0)
    # None values are what transformers passes when a model has no such argument: accepted
    hf_reshape_attention_forward(module, q, k, v, None, softcap=None, block_indices=None, sliding_window=None)


def test_cross_attention_is_untouched(stock_models):
    model = hf_reshape.reshape(_model(stock_models, "bart"), "linear")
    decoder_layer = model.model.decoder.layers[0]
    assert hasattr(decoder_layer.self_attn, STATE_ATTR)
    assert not hasattr(decoder_layer.encoder_attn, STATE_ATTR)


def test_a_4d_padding_mask_is_read_as_padding_and_any_other_4d_mask_is_refused_by_reshaped_layers(stock_models):
    model = hf_reshape.reshape(_model(stock_models, "roberta", torch.float64), "linear")
    ids = _inputs("roberta")["input_ids"]
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 7:] = 0
    additive = torch.zeros(2, 1, SEQ, SEQ, dtype=torch.float64).masked_fill(~mask.bool()[:, None, None, :], -1e300)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=additive).last_hidden_state
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-12, rtol=0)
        pattern = additive.clone()
        pattern[..., 0, 3] = -1e300  # one pair more: not padding
        with pytest.raises(hf_reshape.UnsupportedModelError, match="4D mask .* not one"):
            model(input_ids=ids, attention_mask=pattern)


def test_exact_layers_apply_a_mask_the_model_builds_itself():
    """Swin's shifted windows come as a 4D additive mask with its relative position bias: a reshaped layer refuses
    it (above); a layer left exact applies it as eager attention does."""
    torch.manual_seed(0)
    model = tf.SwinModel(tf.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                       window_size=4)).double().eval()
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
        model.set_attn_implementation(hf_reshape.ATTN_IMPLEMENTATION)
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, expected, atol=1e-6, rtol=1e-6)


def test_a_mask_pattern_beyond_causality_and_a_window_is_refused_not_dropped():
    from transformers import masking_utils as mu

    from hf_reshape.integration import check_mask_function

    for accepted in (mu.causal_mask_function, mu.bidirectional_mask_function,
                     mu.sliding_window_causal_mask_function(3), mu.sliding_window_bidirectional_mask_function(2)):
        check_mask_function(accepted, 2, 10, 10)
    check_mask_function(mu.sliding_window_causal_mask_function(3), 2, 1, 3, q_offset=7, kv_offset=5)  # a decode step
    chunked = mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))  # Llama 4's chunked attention
    with pytest.raises(hf_reshape.UnsupportedModelError, match="chunked attention"):
        check_mask_function(chunked, 2, 10, 10)
    check_mask_function(mu.chunked_causal_mask_function(30, torch.zeros(2, dtype=torch.long)), 2, 10, 10)  # no effect


def test_a_model_with_attention_outside_the_interface_is_refused_naming_it():
    """GIT's text layers compute attention themselves from the mask transformers builds for the model's attention
    implementation: under hf_reshape's they would get a 2D key-padding mask and lose causality."""
    torch.manual_seed(0)
    model = tf.GitModel(tf.GitConfig(vision_config=dict(VISION, image_size=16), **TEXT))
    with pytest.raises(hf_reshape.UnsupportedModelError, match=r"GitSelfAttention.*outside transformers' attention"):
        hf_reshape.reshape(model, "sliding_window", window=4)
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION


def test_a_decoder_whose_causality_is_only_in_its_mask_runs_causal():
    """NLLB-MoE builds its decoder self-attention without `is_causal=True` (its mask carries causality): discovery
    tells it apart (an override row), and hf_reshape's attention function runs it causal."""
    torch.manual_seed(0)
    model = tf.NllbMoeModel(tf.NllbMoeConfig(**SEQ2SEQ, num_experts=2, expert_capacity=4, max_position_embeddings=64))
    model = model.double().eval()
    decoder = [f for f in layer_facts(model) if ".decoder." in "." + f.name]
    assert decoder and all(f.causal for f in decoder) and not any(f.module.is_causal for f in decoder)
    ids = _inputs("llama")["input_ids"]
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        hf_reshape.reshape(model, "sliding_window", window=SEQ)
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, atol=1e-9, rtol=1e-7)


def test_the_walk_over_model_types_reports_pass_and_refusal_reasons():
    """Smoke test of `python -m hf_reshape.bench.walk` (the full walk is not part of the suite)."""
    from hf_reshape.bench.walk import interface_model_types, walk_one

    types = interface_model_types()
    assert {"llama", "bert", "t5", "clip", "whisper"} <= set(types) and "deberta-v2" not in types
    rows = {t: walk_one(t) for t in ("llama", "distilbert", "t5")}
    assert rows["llama"]["outcome"] == rows["distilbert"]["outcome"] == "pass"
    assert rows["t5"]["outcome"] == "refused" and "`position_bias`" in rows["t5"]["reason"]


def test_keys_and_values_grouped_differently_are_each_repeated():
    """A few models group the keys only (Nemotron's audio encoders: 2 key heads, 4 value heads for 4 query heads)."""
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 4, 5, 8)
    out, _ = hf_reshape_attention_forward(module, q, k, v, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v, scale=0.3)
    torch.testing.assert_close(out.transpose(1, 2), expected)
