"""Generation with reshaped GPT-2: ReshapeCache (recurrent state for `linear`, last `window` keys for
`sliding_window`) is picked by `generate` itself and gives the tokens that recomputing the whole sequence gives."""

import copy
import warnings

import pytest
import torch
from conftest import recompute_greedy, tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import hf_reshape
from hf_reshape.cache import HOOK_ATTR, LinearRecurrentLayer, ReshapeCache, SlidingWindowLayer, cache_nbytes
from hf_reshape.registry import get_variant



def bounded_variants() -> list:
    """Every registered causal variant whose spec declares a bounded decode-cache layer (``VariantSpec.cache_layer``
    other than ``"dynamic"``), with its ``small_params``; plus ``linear`` with its other feature map. A new variant
    that declares one is tested here without being named."""
    found = [pytest.param(name, dict(get_variant(name).small_params), id=name) for name in hf_reshape.list_variants()
             if get_variant(name).causal and get_variant(name).cache_layer != "dynamic"]
    return found + [pytest.param("linear", {"feature_map": "relu", "chunk_size": 4}, id="linear-relu")]


BOUNDED = bounded_variants()
# token 0 is eos and pad of the tiny model: never emit it, so every row runs to the end
NO_EOS = {"bad_words_ids": [[0]]}


def ids_of(length: int, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method, params", BOUNDED)
def test_greedy_matches_recomputing_the_full_sequence(method, params):
    model = hf_reshape.reshape(tiny_model("gpt2"), method, **params)
    ids = ids_of(7)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache)
    assert torch.equal(out.sequences, recompute_greedy(model, ids, 6))


@pytest.mark.parametrize("method, params", BOUNDED)
def test_sampling_matches_generate_without_a_cache(method, params):
    model = hf_reshape.reshape(tiny_model("gpt2"), method, **params)
    ids = ids_of(6)
    runs = []
    for kwargs in ({}, {"use_cache": False}):  # our cache, then a full recompute per token
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, **NO_EOS, **kwargs))
    assert torch.equal(runs[0], runs[1])


def position_free(method: str, params: dict) -> bool:
    """Whether the variant's feature maps ignore the position (cosFormer's do not: a left-padded row's tokens sit
    at other absolute positions than alone, so its running sums differ by a rotation while its outputs agree)."""
    x = torch.randn(1, 4, 3, 8, generator=torch.Generator().manual_seed(0))
    state = hf_reshape.functional.init_state(method, num_heads=4, head_dim=8, **params)
    p = hf_reshape.registry.make_params(get_variant(method), params)
    at = [get_variant(method).features(x, x, params=p, scaling=0.3, q_offset=o, k_offset=o, **state) for o in (0, 5)]
    return all(torch.equal(a, b) for a, b in zip(*at))


@pytest.mark.parametrize("method, params", BOUNDED)
def test_left_padded_batch_matches_each_row_alone(method, params):
    model = hf_reshape.reshape(tiny_model("gpt2"), method, **params)
    long, short = ids_of(7, seed=4)[0], ids_of(4, seed=5)[0]
    pads = torch.tensor([17, 23, 42])  # real token ids under a zero mask: whatever they are, they must not count
    batch = torch.stack([long, torch.cat([pads, short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         return_dict_in_generate=True, **NO_EOS)
    for row, alone_ids in enumerate([long, short]):
        alone = model.generate(alone_ids[None], max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                               **NO_EOS)
        assert torch.equal(out.sequences[row, -5:], alone.sequences[0, -5:])
        for batched_layer, alone_layer in zip(out.cache.layers, alone.cache.layers):
            if isinstance(batched_layer, LinearRecurrentLayer) and position_free(method, params):
                # the pads never entered the running sums
                torch.testing.assert_close(batched_layer.state[row], alone_layer.state[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(batched_layer.norm[row], alone_layer.norm[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [[0], [1]])
def test_partly_reshaped_model_generates_like_without_a_cache(layers):
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear", layers=layers, chunk_size=4)
    batch = torch.cat([ids_of(6, seed=8), torch.cat([torch.tensor([[9, 9]]), ids_of(4, seed=9)], 1)])
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         return_dict_in_generate=True, **NO_EOS)
    ref = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False, **NO_EOS)
    kinds = [type(layer) for layer in out.cache.layers]
    assert kinds == [LinearRecurrentLayer if i in layers else DynamicLayer for i in range(2)]
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("method, params", BOUNDED)
def test_forward_in_chunks_with_the_cache_equals_one_forward(method, params):
    model = hf_reshape.reshape(tiny_model("gpt2"), method, **params)
    ids = ids_of(13)
    full = model(input_ids=ids, use_cache=False).logits
    cache = ReshapeCache(model)
    parts = [model(input_ids=ids[:, s:e], cache=cache, use_cache=True).logits for s, e in [(0, 6), (6, 11), (11, 13)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 13


def test_beam_search_matches_beam_search_without_a_cache():
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear", chunk_size=4)
    ids = ids_of(5)
    out = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    ref = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, use_cache=False, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache)
    assert torch.equal(out.sequences, ref)


def test_cache_is_selected_automatically_and_only_while_reshaped():
    model = tiny_model("gpt2")
    ids = ids_of(5)
    plain = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **NO_EOS)
    assert type(plain.cache) is DynamicCache
    hf_reshape.reshape(model, "linear")
    assert isinstance(model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **NO_EOS).cache, ReshapeCache)
    # a variant with no bounded form keeps transformers' DynamicCache
    hf_reshape.reshape(model, "topk", top_k=3)
    assert type(model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **NO_EOS).cache) is DynamicCache
    hf_reshape.reshape(model, "sliding_window", window=2)
    assert isinstance(model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **NO_EOS).cache, ReshapeCache)
    # a deep copy generates with its own hook
    twin = copy.deepcopy(model)
    assert twin.__dict__[HOOK_ATTR].model is twin
    hf_reshape.unreshape(model)
    assert HOOK_ATTR not in model.__dict__
    after = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **NO_EOS)
    assert type(after.cache) is DynamicCache
    assert torch.equal(after.sequences, plain.sequences)


def test_a_cache_passed_by_the_user_is_used_as_given():
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear")
    ids = ids_of(5)
    mine = DynamicCache(config=model.config)
    assert model.generate(ids, max_new_tokens=3, cache=mine, return_dict_in_generate=True, **NO_EOS).cache is mine
    legacy = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `past_key_values` is transformers' deprecated name for `cache`
        out = model.generate(ids, max_new_tokens=3, past_key_values=legacy, return_dict_in_generate=True, **NO_EOS)
    assert out.cache is legacy
    assert model.generate(ids, max_new_tokens=3, use_cache=False, return_dict_in_generate=True, **NO_EOS).cache is None


def test_linear_cache_bytes_do_not_grow_with_the_prompt():
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear")
    sizes = [
        cache_nbytes(model.generate(ids_of(n), max_new_tokens=2, return_dict_in_generate=True, **NO_EOS).cache)
        for n in (10, 50)
    ]
    assert sizes[0] == sizes[1] > 0
    # S [B, H, D, D] and z [B, H, D] per layer: 2 layers, 4 heads, head dim 8, float32
    assert sizes[0] == 2 * (4 * 8 * 8 + 4 * 8) * 4


def test_sliding_window_cache_keeps_the_last_window_keys():
    model = hf_reshape.reshape(tiny_model("gpt2"), "sliding_window", window=4)
    caches = [
        model.generate(ids_of(n), max_new_tokens=2, return_dict_in_generate=True, **NO_EOS).cache for n in (10, 50)
    ]
    assert cache_nbytes(caches[0]) == cache_nbytes(caches[1]) > 0
    for cache in caches:
        for layer in cache.layers:
            assert isinstance(layer, SlidingWindowLayer)
            assert layer.keys.shape[-2] == layer.values.shape[-2] == 4
    assert caches[1].get_seq_length() == 51  # counts tokens seen (the last one generated is not fed back)


def test_window_zero_sees_only_itself():
    model = hf_reshape.reshape(tiny_model("gpt2"), "sliding_window", window=0)
    ids = ids_of(5)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert torch.equal(out.sequences, recompute_greedy(model, ids, 5))
    assert all(layer.keys.shape[-2] == 0 for layer in out.cache.layers)


@pytest.mark.parametrize("method, params", BOUNDED)
def test_plain_forward_after_generate_is_unaffected(method, params):
    model = hf_reshape.reshape(tiny_model("gpt2"), method, **params)
    ids = ids_of(9)
    before = model(input_ids=ids).logits
    model.generate(ids_of(5, seed=11), max_new_tokens=4, **NO_EOS)
    assert torch.equal(model(input_ids=ids).logits, before)
    # a step interrupted between the cache update and the attention leaves nothing behind for the next forward
    cache = ReshapeCache(model)
    k = torch.randn(1, 4, 3, 8)
    cache.update(k, k.clone(), 0)
    assert torch.equal(model(input_ids=ids).logits, before)


def test_a_recurrent_cache_refuses_to_go_on_after_an_interrupted_step():
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear", chunk_size=4)
    cache = ReshapeCache(model)
    model(input_ids=ids_of(4), cache=cache, use_cache=True)
    k = torch.randn(1, 4, 2, 8)
    cache.update(k, k.clone(), 0)  # counted, but these keys never reach the attention function
    with pytest.raises(RuntimeError, match="never reached hf_reshape's attention"):
        model(input_ids=ids_of(1), cache=cache, use_cache=True)


def test_a_cache_refuses_a_model_reshaped_since():
    model = hf_reshape.reshape(tiny_model("gpt2"), "linear")
    cache = ReshapeCache(model)
    model(input_ids=ids_of(4), cache=cache, use_cache=True)
    hf_reshape.reshape(model, "topk", top_k=2)
    with pytest.raises(RuntimeError, match="fresh cache"):
        model(input_ids=ids_of(1), cache=cache, use_cache=True)


def test_half_precision_keeps_a_float32_state():
    model = hf_reshape.reshape(tiny_model("gpt2", dtype=torch.bfloat16), "linear")
    out = model.generate(ids_of(6), max_new_tokens=3, return_dict_in_generate=True, **NO_EOS)
    assert out.sequences.shape == (1, 9)
    assert all(layer.state.dtype == torch.float32 for layer in out.cache.layers)
