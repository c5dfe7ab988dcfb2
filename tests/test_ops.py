"""Op level: every registered variant's fast path against its materialised float64 reference, exact softmax in
the degenerate setting, padding, empty rows, causality, and no T x T tensor where the maths allows it."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import hf_reshape
from hf_reshape import functional as fn
from hf_reshape.architectures import ModelFacts
from hf_reshape.ops import naive
from hf_reshape.registry import make_params

from conftest import VARIANTS

SHAPES = [(2, 63, 4, 16), (1, 17, 2, 8), (3, 32, 3, 5)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}-D{d}" for b, t, h, d in SHAPES]


def forms(name):
    spec = hf_reshape.get_variant(name)
    return [c for c, ok in ((False, spec.bidirectional), (True, spec.causal)) if ok]


CASES = [(n, c) for n in VARIANTS for c in forms(n)]
CASE_IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in CASES]


def build(name, t, h, d, dtype=torch.float64, **overrides):
    """Parameters (filled like reshape() does for a model of length t + 5) and state of a variant."""
    spec = hf_reshape.get_variant(name)
    params = make_params(spec, {**spec.small_params, **overrides})
    if spec.prepare_params is not None:
        params = spec.prepare_params(params, ModelFacts(max_positions=t + 5, num_heads=h, head_dim=d))
    kwargs = params.to_dict()
    state = {}
    if spec.init_state is not None:
        state = {k: v.detach().to(dtype).requires_grad_(True) for k, v in spec.init_state(params, num_heads=h, head_dim=d).items()}
    return kwargs, state


def qkv(b, t, h, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


def padding_mask(b, t, seed=0):
    """Right padding, left padding and interior holes, one row each, cycling."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(t // 2, t, (1,), generator=g))
        kind = i % 3
        if kind == 0:
            mask[i, n:] = False
        elif kind == 1:
            mask[i, : t - n] = False
        else:
            mask[i, torch.randperm(t, generator=g)[: t - n]] = False
    return mask


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_fast_path_matches_reference_outputs_and_gradients(name, causal, shape):
    b, t, h, d = shape
    kwargs, state = build(name, t, h, d)
    q, k, v = qkv(b, t, h, d)
    mask = padding_mask(b, t)
    fast = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    ref = fn.reference(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    assert fast.shape == (b, h, t, d)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    inputs = [q, k, v, *state.values()]
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n, c in CASES if c])
def test_decoding_layout_matches_reference(name):
    """Fewer queries than keys (a decoder with a cache): queries are the last T_q positions."""
    kwargs, state = build(name, 20, 2, 8)
    q, _, _ = qkv(1, 3, 2, 8, seed=1)
    _, k, v = qkv(1, 20, 2, 8, seed=2)
    fast = fn.attention(q, k, v, name, is_causal=True, **kwargs, **state)
    ref = fn.reference(q, k, v, name, is_causal=True, **kwargs, **state)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)


DEGENERATE = [(n, c) for n, c in CASES if hf_reshape.get_variant(n).degenerate is not None]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name,causal", DEGENERATE, ids=[f"{n}-{'causal' if c else 'bidir'}" for n, c in DEGENERATE])
def test_degenerate_setting_equals_exact_softmax(name, causal, padded):
    b, t, h, d = 2, 24, 3, 8
    spec = hf_reshape.get_variant(name)
    kwargs, state = build(name, t, h, d, **spec.degenerate(t))
    q, k, v = qkv(b, t, h, d, seed=3)
    mask = padding_mask(b, t, seed=4) if padded else None
    out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    exact = naive.softmax_reference(q, k, v, mask=mask, causal=causal, scaling=d**-0.5)
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask
    sel = real[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[sel], exact[sel], atol=1e-9, rtol=1e-7)


def test_non_degenerate_settings_differ_from_softmax():
    """Guards the test above: with small parameters the variants really approximate."""
    b, t, h, d = 1, 40, 2, 8
    q, k, v = qkv(b, t, h, d, seed=5)
    exact = naive.softmax_reference(q, k, v, scaling=d**-0.5)
    for name in VARIANTS:
        if not hf_reshape.get_variant(name).bidirectional:
            continue
        kwargs, state = build(name, t, h, d)
        out = fn.attention(q, k, v, name, **kwargs, **state)
        assert (out - exact).abs().max() > 1e-3, name


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_padding_invariance(name, causal, side):
    """A sequence alone and the same sequence padded (pads full of garbage) give the same outputs."""
    n, t, h, d = 13, 20, 2, 8
    kwargs, state = build(name, t, h, d)
    q, k, v = (x.detach() for x in qkv(1, n, h, d, seed=6))
    alone = fn.attention(q, k, v, name, is_causal=causal, **kwargs, **state)
    pad = t - n
    junk = [torch.randn(1, h, pad, d, dtype=torch.float64) * 50 for _ in range(3)]
    cat = (lambda x, j: torch.cat([x, j], 2)) if side == "right" else (lambda x, j: torch.cat([j, x], 2))
    qp, kp, vp = (cat(x, j) for x, j in zip((q, k, v), junk))
    mask = cat(torch.ones(1, n, dtype=torch.bool)[:, None, :, None], torch.zeros(1, 1, pad, 1, dtype=torch.bool))
    mask = mask[:, 0, :, 0]
    padded = fn.attention(qp, kp, vp, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    real = padded[..., :n, :] if side == "right" else padded[..., pad:, :]
    torch.testing.assert_close(real, alone, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_fully_padded_rows_give_zeros_not_nan(name, causal):
    b, t, h, d = 2, 10, 2, 8
    kwargs, state = build(name, t, h, d)
    q, k, v = qkv(b, t, h, d, seed=7)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1] = False
    out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [n for n, c in CASES if c])
def test_causal_outputs_ignore_the_future(name):
    b, t, h, d, p = 1, 30, 2, 8, 17
    kwargs, state = build(name, t, h, d)
    q, k, v = (x.detach() for x in qkv(b, t, h, d, seed=8))
    out = fn.attention(q, k, v, name, is_causal=True, **kwargs, **state)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[..., p + 1 :, :] = torch.randn_like(x[..., p + 1 :, :]) * 10
    out2 = fn.attention(q2, k2, v2, name, is_causal=True, **kwargs, **state)
    # float rounding inside a blocked matmul may differ in the last bit; dependence would show at O(1)
    torch.testing.assert_close(out2[..., : p + 1, :], out[..., : p + 1, :], atol=1e-12, rtol=0)
    assert not torch.allclose(out2[..., p + 1 :, :], out[..., p + 1 :, :])


class TrailingSquareSpy(TorchDispatchMode):
    """Records the largest trailing 2D block of any tensor an op produces."""

    def __init__(self, t):
        super().__init__()
        self.t, self.offenders = t, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] >= self.t and o.shape[-2] >= self.t:
                self.offenders.append((str(func), tuple(o.shape)))
        return out


SUBQUADRATIC = [(n, c) for n, c in CASES if not hf_reshape.get_variant(n).quadratic]


@pytest.mark.parametrize("name,causal", SUBQUADRATIC, ids=[f"{n}-{'causal' if c else 'bidir'}" for n, c in SUBQUADRATIC])
def test_subquadratic_paths_never_build_t_by_t(name, causal):
    b, t, h, d = 1, 256, 2, 8
    kwargs, state = build(name, t, h, d, dtype=torch.float32)
    q, k, v = qkv(b, t, h, d, dtype=torch.float32)
    mask = padding_mask(b, t)
    spy = TrailingSquareSpy(t)
    with spy:
        out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
        out.sum().backward()
    assert spy.offenders == []
    # the spy does catch a quadratic path
    spy = TrailingSquareSpy(t)
    with spy:
        naive.softmax_reference(q, k, v, scaling=1.0)
    assert spy.offenders


def test_blocked_kernels_agree_across_memory_chunking(monkeypatch):
    """Force many block groups / query chunks: results must not change."""
    from hf_reshape.ops import sparse

    q, k, v = qkv(2, 45, 2, 8, seed=9)
    mask = padding_mask(2, 45)
    before = {n: fn.attention(q, k, v, n, attention_mask=mask, is_causal=True, **hf_reshape.get_variant(n).small_params)
              for n in ("sliding_window", "topk")}
    monkeypatch.setattr(sparse, "_MAX_SCORE_ELEMENTS", 64)
    for n, out in before.items():
        again = fn.attention(q, k, v, n, attention_mask=mask, is_causal=True, **hf_reshape.get_variant(n).small_params)
        torch.testing.assert_close(again, out, atol=1e-12, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 40), window=st.integers(0, 45), block=st.integers(1, 20),
    causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sliding_window_property(t, window, block, causal, seed):
    q, k, v = (x.detach() for x in qkv(2, t, 2, 4, seed=seed))
    mask = padding_mask(2, t, seed=seed) if t > 1 else None
    kw = dict(attention_mask=mask, is_causal=causal, window=window, block_size=block)
    torch.testing.assert_close(
        fn.attention(q, k, v, "sliding_window", **kw), fn.reference(q, k, v, "sliding_window", **kw), atol=1e-9, rtol=1e-7
    )


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 40), chunk=st.integers(1, 16), t_q=st.integers(1, 40), fmap=st.sampled_from(["elu", "relu"]),
       seed=st.integers(0, 2**16))
def test_linear_causal_chunked_property(t, chunk, t_q, fmap, seed):
    t_q = min(t_q, t)
    q, _, _ = (x.detach() for x in qkv(1, t_q, 2, 4, seed=seed))
    _, k, v = (x.detach() for x in qkv(1, t, 2, 4, seed=seed + 1))
    kw = dict(is_causal=True, feature_map=fmap, chunk_size=chunk)
    torch.testing.assert_close(fn.attention(q, k, v, "linear", **kw), fn.reference(q, k, v, "linear", **kw), atol=1e-9, rtol=1e-7)
