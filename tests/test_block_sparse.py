"""``block_sparse`` (BigBird, Zaheer et al. 2020) and ``strided`` (Sparse Transformer, Child et al. 2019): fast paths
against their materialised references across block boundaries, the patterns' properties (causality, global and
random blocks, seeds), degenerate settings, save / reload and cached generation."""

import pytest
import torch
from transformers import DynamicCache

import hf_reshape
from hf_reshape import functional as fn
from hf_reshape.errors import InvalidParameterError
from hf_reshape.ops import block_sparse as ops
from hf_reshape.ops import naive

from conftest import main_output, recompute_greedy, tiny_inputs, tiny_model

BS = dict(block_size=4, num_global_blocks=1, num_random_blocks=2, seed=3)
STRIDE = dict(stride=4)
VARIANTS = [("block_sparse", BS), ("strided", STRIDE)]
SIZES = [3, 4, 5, 7, 8, 9, 15, 16, 17, 33]  # block * k - 1, block * k, block * k + 1


def qkv(b, t, h=2, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


def masks(t):
    """No mask, and a batch of: right padding, left padding, a fully padded row, holes."""
    m = torch.ones(4, t, dtype=torch.bool)
    m[0, t - max(1, t // 3):] = False
    m[1, : max(1, t // 2)] = False
    m[2] = False
    m[3, ::3] = False
    return [None, m]


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,params", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fast_path_matches_reference_across_block_boundaries(name, params, causal, t):
    for mask in masks(t):
        b = 4 if mask is not None else 2
        q, k, v = qkv(b, t, seed=t)
        kw = dict(attention_mask=mask, is_causal=causal, **params)
        fast, ref = fn.attention(q, k, v, name, **kw), fn.reference(q, k, v, name, **kw)
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
        if mask is not None:
            assert torch.equal(fast[2], torch.zeros_like(fast[2]))  # the fully padded row: zeros, not NaN
        w = torch.randn_like(fast)
        g_fast = torch.autograd.grad((fast * w).sum(), [q, k, v])
        g_ref = torch.autograd.grad((ref * w).sum(), [q, k, v])
        for a, r in zip(g_fast, g_ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-7)


BS_SHAPES = [BS, dict(block_size=4, num_global_blocks=2, num_random_blocks=0, seed=1),
             dict(block_size=3, num_global_blocks=0, num_random_blocks=3, num_window_blocks=5, seed=2),
             dict(block_size=2, num_global_blocks=1, num_random_blocks=1, num_window_blocks=1, seed=0)]


INFERENCE = [("block_sparse", p, "_blocks_inference") for p in BS_SHAPES] + \
    [("strided", {"stride": st}, "_strided_inference") for st in (1, 4, 7)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,params,path", INFERENCE, ids=["block_sparse-default", "block_sparse-no-random",
                                                           "block_sparse-no-global-wide", "block_sparse-window-1",
                                                           "strided-1", "strided-4", "strided-7"])
def test_inference_path_matches_reference_across_block_boundaries(name, params, path, causal, monkeypatch):
    """Without autograd both variants run their parts through torch's fused CPU kernel and merge them by their
    log-sum-exps: ``block_sparse`` its window and global slots as views and its random slots gathered
    (:func:`hf_reshape.ops.block_sparse._blocks_inference`, with and without global or random blocks), ``strided``
    its local band and its columns (:func:`hf_reshape.ops.block_sparse._strided_inference`). Equal to the reference
    at every size around the block or stride, with every mask (a fully padded row gives zeros; the first causal
    column row has no strided key), float32 and float64; a spy checks the path is the one taken."""
    taken = []
    original = getattr(ops, path)
    monkeypatch.setattr(ops, path, lambda *a, **kw: taken.append(1) or original(*a, **kw))
    for t in SIZES:
        for mask in masks(t):
            b = 4 if mask is not None else 2
            q, k, v = (x.detach() for x in qkv(b, t, seed=t))
            kw = dict(attention_mask=mask, is_causal=causal, **params)
            ref = fn.reference(q, k, v, name, **kw)
            with torch.no_grad():
                fast = fn.attention(q, k, v, name, **kw)
                single = fn.attention(q.float(), k.float(), v.float(), name, **kw)
            torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(single.double(), ref, atol=1e-5, rtol=1e-5)
            if mask is not None:
                assert torch.equal(fast[2], torch.zeros_like(fast[2]))
    if name == "strided":  # one call per forward; block_sparse calls once per sequence of a padded batch
        assert len(taken) == 2 * 2 * len(SIZES)
    assert taken


@pytest.mark.parametrize("name,params", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_weights_times_values_equal_the_forward(name, params):
    q, k, v = (x.detach() for x in qkv(4, 17, seed=1))
    mask = masks(17)[1]
    spec = hf_reshape.get_variant(name)
    p = spec.params_cls(**params)
    for causal in (False, True):
        w = spec.weights(q, k, v, mask=mask, causal=causal, scaling=8**-0.5, params=p)
        out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **params)
        torch.testing.assert_close(w @ v, out, atol=1e-10, rtol=1e-8)
        sums = w.sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-9) | (sums == 0))  # distributions, or zero rows


# ---- pattern properties ----


def bigbird(t, causal, mask=None, **params):
    return ops.block_sparse_allowed(mask, t, t, causal, "cpu", **{**BS, "num_window_blocks": 3, **params})[:, 0]


def test_block_sparse_pattern_counts_window_global_and_random_blocks():
    """48 tokens in 12 blocks of 4: a middle query block sees its 3 window blocks, the global block and 2 random
    ones (6 blocks, 24 keys); the global block's queries see everything and everyone sees the global block."""
    a = bigbird(48, False)[0]
    assert a[:4].all() and a[:, :4].all()
    per_block = a[::4].view(12, 12, 4).any(-1)  # [query block, key block]
    assert (per_block[3:9].sum(-1) == 6).all()
    assert torch.equal(a[::4].view(12, 12, 4).all(-1), per_block)  # whole blocks or nothing
    again = bigbird(48, False, num_random_blocks=0)[0][::4].view(12, 12, 4).any(-1)
    assert (again[3:9].sum(-1) == 4).all()  # the random blocks are new blocks, never window or global ones


def test_block_sparse_causal_random_blocks_are_strictly_past_and_never_future():
    a = bigbird(64, True)[0]
    assert not a.triu(1).any()  # no key after its query
    per_block = a[3::4].view(16, 16, 4).any(-1)  # last query of each block
    for g in range(5, 16):
        extra = per_block[g].nonzero().flatten().tolist()
        randoms = [j for j in extra if j not in (0, g - 1, g)]
        assert len(randoms) == 2 and all(j < g - 1 for j in randoms), (g, extra)
    # the causal pattern of the first 40 tokens does not change as the sequence grows (decode consistency)
    assert torch.equal(bigbird(40, True)[0], a[:40, :40])


def test_random_blocks_follow_the_seed():
    base = bigbird(96, False)
    assert torch.equal(base, bigbird(96, False))  # same seed: same pattern
    assert not torch.equal(base, bigbird(96, False, seed=4))  # another seed: another one
    idx, ok = ops.random_blocks(24, num_random=3, num_global=1, half=1, causal=False, seed=3)
    assert ok[0, 5:].all() and idx[0, 5:].unique(dim=-1).shape == idx[0, 5:].shape
    q, k, v = (x.detach() for x in qkv(1, 96, seed=2))
    outs = [fn.attention(q, k, v, "block_sparse", **{**BS, "seed": s}) for s in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_block_sparse_pattern_follows_real_tokens_not_positions():
    """Left padding shifts positions but not ranks: the padded sequence's pattern over its real tokens is the
    unpadded one's."""
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, :7] = False
    padded = bigbird(30, False, mask)[0][7:, 7:]
    assert torch.equal(padded, bigbird(23, False)[0])
    assert not bigbird(30, False, mask)[0][:7].any()  # padded queries see nothing: zero outputs


def test_strided_pattern():
    a = ops.strided_allowed(None, 20, 20, True, "cpu", stride=4)[0, 0]
    assert not a.triu(1).any()
    assert a[13].nonzero().flatten().tolist() == [1, 5, 9, 10, 11, 12, 13]
    b = ops.strided_allowed(None, 20, 20, False, "cpu", stride=4)[0, 0]
    assert b[9].nonzero().flatten().tolist() == [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17]


@pytest.mark.parametrize("name,params", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_causal_outputs_never_see_the_future(name, params):
    q, k, v = (x.detach() for x in qkv(2, 41, seed=5))
    out = fn.attention(q, k, v, name, is_causal=True, **params)
    for p in (0, 3, 4, 17, 39):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[..., p + 1:, :] = torch.randn_like(x[..., p + 1:, :]) * 10
        out2 = fn.attention(q2, k2, v2, name, is_causal=True, **params)
        torch.testing.assert_close(out2[..., : p + 1, :], out[..., : p + 1, :], atol=1e-12, rtol=0)


# ---- degenerate settings ----

DEGENERATE = [
    ("block_sparse", {"block_size": 33}),
    ("block_sparse", {"block_size": 64}),
    ("block_sparse", {"block_size": 4, "num_window_blocks": 17}),  # the window covers all 9 blocks
    ("block_sparse", {"block_size": 4, "num_global_blocks": 9}),  # every block global
    ("strided", {"stride": 33}),
    ("strided", {"stride": 100}),
]


@pytest.mark.parametrize("name,params", DEGENERATE, ids=[f"{n}-{p}" for n, p in DEGENERATE])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_degenerate_settings_are_exact_softmax(name, params, causal):
    t = 33
    q, k, v = (x.detach() for x in qkv(4, t, seed=9))
    for mask in masks(t):
        b = q.shape[0] if mask is not None else 4
        out = fn.attention(q[:b], k[:b], v[:b], name, attention_mask=mask, is_causal=causal, **params)
        exact = naive.softmax_reference(q[:b], k[:b], v[:b], mask=mask, causal=causal, scaling=8**-0.5)
        real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask
        sel = real[:, None, :, None].expand_as(out)  # block_sparse gives padded queries zeros
        torch.testing.assert_close(out[sel], exact[sel], atol=1e-10, rtol=1e-8)
    assert hf_reshape.get_variant(name).degenerate(t)


def test_small_settings_differ_from_softmax():
    q, k, v = (x.detach() for x in qkv(1, 64, seed=3))
    exact = naive.softmax_reference(q, k, v, scaling=8**-0.5)
    for name, params in VARIANTS:
        assert (fn.attention(q, k, v, name, **params) - exact).abs().max() > 1e-3, name


# ---- parameters ----


@pytest.mark.parametrize("bad", [{"num_window_blocks": 2}, {"seed": -1}, {"block_size": 0}, {"num_random_blocks": 1.5},
                                 {"num_global_blocks": -1}, {"seed": 2**63}])
def test_block_sparse_refuses_bad_parameters(bad):
    q, k, v = (x.detach() for x in qkv(1, 8))
    with pytest.raises(InvalidParameterError, match=next(iter(bad))):
        fn.attention(q, k, v, "block_sparse", **bad)


def test_strided_refuses_bad_stride():
    q, k, v = (x.detach() for x in qkv(1, 8))
    with pytest.raises(InvalidParameterError, match="stride"):
        fn.attention(q, k, v, "strided", stride=0)


def test_flops_count_the_allowed_pairs():
    for name, params in VARIANTS:
        spec = hf_reshape.get_variant(name)
        p = spec.params_cls(**params)
        for causal in (False, True):
            for t in (5, 17, 48):
                allowed = (ops.block_sparse_allowed(None, t, t, causal, "cpu", **p.pattern()) if name == "block_sparse"
                           else ops.strided_allowed(None, t, t, causal, "cpu", stride=p.stride))
                want = 2 * 3 * 4 * 8 * int(allowed.sum())
                assert spec.flops(t=t, head_dim=8, num_heads=3, batch=2, causal=causal, params=p) == want


# ---- models: save / reload, generation ----


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("name,params", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_save_reload_of_a_reshaped_model_is_bit_exact(name, params, arch, tmp_path):
    params = {**params, "block_size": 2} if "block_size" in params else params
    model = hf_reshape.reshape(tiny_model(arch), name, **params)
    inputs = tiny_inputs(arch)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :5] = 0
    with torch.no_grad():
        before = main_output(arch, model(**inputs, attention_mask=mask))
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    assert hf_reshape.get_reshape_config(loaded) == hf_reshape.get_reshape_config(model)
    with torch.no_grad():
        after = main_output(arch, loaded.eval()(**inputs, attention_mask=mask))
    assert torch.equal(before, after)


@pytest.mark.parametrize("name,params", [("block_sparse", dict(block_size=2, num_random_blocks=2, seed=1)),
                                         ("strided", dict(stride=3))], ids=["block_sparse", "strided"])
def test_cached_generation_equals_recomputation(name, params):
    """Greedy decoding with transformers' DynamicCache (the pattern's rows for the new queries against every cached
    key) gives the tokens a full recompute per step gives, well past several blocks / strides; the logits of a
    cached step equal the recomputed ones."""
    model = hf_reshape.reshape(tiny_model("gpt2", initializer_range=0.2), name, **params)
    ids = torch.randint(1, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, bad_words_ids=[[0]])
    assert type(out.cache) is DynamicCache
    assert torch.equal(out.sequences, recompute_greedy(model, ids, 14))
    seq = out.sequences
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=seq[:, :-3], cache=cache, use_cache=True)
        step = model(input_ids=seq[:, -3:], cache=cache, use_cache=True).logits
        full = model(input_ids=seq, use_cache=False).logits[:, -3:]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
