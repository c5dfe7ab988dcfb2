"""Op level, the pieces the fast paths are built from: the causal linear ``autograd.Function`` (gradcheck in
float64), the inference-only in-place branches, the unpadded sliding-window layout (interior blocks against
edge blocks), the SDPA-backed low-rank paths without a mask, and the fused Newton-Schulz steps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_reshape import functional as fn
from hf_reshape.ops import linear, low_rank, naive, sparse
from hf_reshape.ops.feature_maps import FEATURE_MAPS


def rand(*shape, seed=0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("t,chunk", [(7, 3), (8, 4), (5, 8), (6, 1)], ids=["ragged", "even", "one-chunk", "c1"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_causal_chunked_function_gradcheck(t, chunk, with_state):
    """The hand-written backward of the chunked causal kernel against finite differences (every input)."""
    b, h, d, dv = 2, 2, 3, 4
    phi = FEATURE_MAPS["elu"]
    q, k, v = rand(b, h, t, d, seed=1), rand(b, h, t, d, seed=2), rand(b, h, t, dv, seed=3)
    extra = (rand(b, h, d, dv, seed=4), rand(b, h, d, seed=5).abs().detach().requires_grad_()) if with_state else ()

    def f(q, k, v, *state):
        kw = {"state": state[0], "norm": state[1]} if state else {}
        return linear.causal_linear_chunked(phi(q), phi(k), v, eps=1e-6, chunk_size=chunk, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v, *extra))


@pytest.mark.parametrize("t_q", [9, 4], ids=["square", "cached-past"])
def test_causal_linear_with_mask_gradcheck(t_q):
    """Padding mask and a decoder's past (T_q < T_k) through linear_attention, gradients by finite differences."""
    b, h, t_k, d = 2, 2, 9, 3
    q, k, v = rand(b, h, t_q, d, seed=6), rand(b, h, t_k, d, seed=7), rand(b, h, t_k, d, seed=8)
    mask = torch.ones(b, t_k, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 5:7] = False

    def f(q, k, v):
        return linear.linear_attention(q, k, v, mask=mask, causal=True, phi=FEATURE_MAPS["elu"], chunk_size=4)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("t_q", [11, 6], ids=["square", "cached-past"])
def test_causal_linear_segments_gradcheck(monkeypatch, t_q):
    """Long causal inputs run in segments that carry the running state: three segments of 4 rows (ragged last),
    a padding mask and a decoder's past, against the reference and finite differences."""
    monkeypatch.setattr(linear, "CAUSAL_SEGMENT_BYTES", 4 * 2 * 2 * 4 * 4)  # b=2, h=2, max(d, dv + 1)=4: 4 rows
    b, h, t_k, d = 2, 2, 11, 3
    q, k, v = rand(b, h, t_q, d, seed=26), rand(b, h, t_k, d, seed=27), rand(b, h, t_k, d, seed=28)
    assert linear._causal_segment(q, d + 1, 2) == 4
    mask = torch.ones(b, t_k, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 6:8] = False
    phi = FEATURE_MAPS["elu"]

    def f(q, k, v):
        return linear.linear_attention(q, k, v, mask=mask, causal=True, phi=phi, chunk_size=2)

    torch.testing.assert_close(f(q, k, v), naive.linear_reference(q, k, v, mask=mask, causal=True, phi=phi, eps=1e-6))
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("t_q", [11, 6, 1], ids=["square", "cached-past", "one-step"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_causal_linear_inference_form_matches_the_reference(monkeypatch, t_q, chunk):
    """Without autograd the causal kernel runs chunk after chunk from one running state
    (:func:`causal_linear_recurrent`): three segments of 4 rows (ragged last), chunks that do and do not divide
    them, left padding with query rows that see no real key (zeros), holes, a decoder's past; equal to the float64
    reference, and the path is the one taken (the chunked kernel is not called)."""
    monkeypatch.setattr(linear, "CAUSAL_SEGMENT_BYTES", 4 * 3 * 2 * 4 * 4)  # b=3, h=2, max(d, dv + 1)=4: 4 rows
    b, h, t_k, d = 3, 2, 11, 3
    q, k, v = (rand(b, h, t, d, seed=40 + i).detach() for i, t in enumerate((t_q, t_k, t_k)))
    mask = torch.ones(b, t_k, dtype=torch.bool)
    mask[0, :8] = False
    mask[1, 6:8] = False
    called = []
    monkeypatch.setattr(linear, "_causal_chunked", lambda *a: called.append(1))
    for m in (None, mask):
        for name in ("elu", "relu"):
            phi = FEATURE_MAPS[name]
            with torch.no_grad():
                fast = linear.linear_attention(q, k, v, mask=m, causal=True, phi=phi, chunk_size=chunk)
            ref = naive.linear_reference(q, k, v, mask=m, causal=True, phi=phi, eps=1e-6)
            torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
            assert torch.isfinite(fast).all()
    assert not called


@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("t_q,t_k", [(13, 13), (5, 11)], ids=["square", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_bidirectional_sliced_function_gradcheck(monkeypatch, fmap, t_q, t_k, masked):
    """The bidirectional kernel's hand-written backward, walked in slices of 2..3 rows (ragged last slice), against
    finite differences and against the float64 reference."""
    b, h, d, dv = 2, 2, 4, 4
    q, k, v = rand(b, h, t_q, d, seed=20), rand(b, h, t_k, d, seed=21), rand(b, h, t_k, dv, seed=22)
    mask = None
    if masked:
        mask = torch.ones(b, t_k, dtype=torch.bool)
        mask[0, :3] = False
        mask[1, -2:] = False
    phi = FEATURE_MAPS[fmap]
    monkeypatch.setattr(linear, "_bidirectional_rows", lambda q, e: 3)  # below the 16-row floor: several slices

    def f(q, k, v):
        return linear.linear_attention(q, k, v, mask=mask, causal=False, phi=phi)

    ref = naive.linear_reference(q, k, v, mask=mask, causal=False, phi=phi, eps=1e-6)
    torch.testing.assert_close(f(q, k, v), ref)
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_bidirectional_feature_map_without_hand_written_grad_uses_autograd():
    """A feature map missing from FEATURE_MAP_GRADS (here softplus) takes the plain autograd path: it must still
    match the reference, with padding, and its gradients must match finite differences."""
    phi = torch.nn.functional.softplus
    assert phi not in linear.FEATURE_MAP_GRADS
    q, k, v = rand(2, 2, 9, 3, seed=29), rand(2, 2, 9, 3, seed=30), rand(2, 2, 9, 4, seed=31)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False

    def f(q, k, v):
        return linear.linear_attention(q, k, v, mask=mask, causal=False, phi=phi)

    torch.testing.assert_close(f(q, k, v), naive.linear_reference(q, k, v, mask=mask, causal=False, phi=phi, eps=1e-6))
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_bidirectional_sliced_low_precision_and_partial_grads(monkeypatch):
    """bf16 inputs are computed in float32 slice by slice and come back in bf16; gradients asked for only some
    inputs are the same as when asked for all."""
    monkeypatch.setattr(linear, "_bidirectional_rows", lambda q, e: 4)
    q, k, v = (rand(1, 2, 10, 8, seed=s, dtype=torch.float32) for s in (23, 24, 25))
    phi = FEATURE_MAPS["elu"]
    out = linear.linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=False, phi=phi)
    ref = naive.linear_reference(q.double(), k.double(), v.double(), causal=False, phi=phi, eps=1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    full = torch.autograd.grad(linear.linear_attention(q, k, v, causal=False, phi=phi).sum(), [q, k, v])
    k_only = torch.autograd.grad(linear.linear_attention(q.detach(), k, v.detach(), causal=False, phi=phi).sum(), [k])
    torch.testing.assert_close(k_only[0], full[1])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("fmap", ["elu", "relu"])
def test_linear_inference_path_equals_autograd_path(causal, fmap):
    """Under no_grad the bidirectional normalisation runs in place: values must not change, bit for bit. The causal
    form runs chunk after chunk from a running state instead of per-chunk prefix states (the same sums in another
    order): equal to float32 rounding."""
    q, k, v = (rand(2, 3, 21, 8, seed=s, dtype=torch.float32) for s in (9, 10, 11))
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 15:] = False
    kw = dict(mask=mask, causal=causal, phi=FEATURE_MAPS[fmap], chunk_size=8)
    with_grad = linear.linear_attention(q, k, v, **kw)
    with torch.no_grad():
        without = linear.linear_attention(q, k, v, **kw)
    tol = 2e-6 if causal else 0.0
    torch.testing.assert_close(without, with_grad.detach(), atol=tol, rtol=tol)


def test_relu_rows_with_no_feature_give_zeros():
    """relu features can all be zero: the denominator falls below eps and the output is 0, never NaN."""
    q = -torch.rand(1, 2, 10, 4, dtype=torch.float64) - 0.1  # relu(q) == 0 everywhere
    k, v = rand(1, 2, 10, 4, seed=12, grad=False), rand(1, 2, 10, 4, seed=13, grad=False)
    q.requires_grad_(True)
    for causal in (False, True):
        out = linear.linear_attention(q, k, v, causal=causal, phi=FEATURE_MAPS["relu"], chunk_size=4)
        assert torch.equal(out, torch.zeros_like(out))
        (g,) = torch.autograd.grad(out.sum(), [q])
        assert torch.isfinite(g).all()


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 70), window=st.integers(0, 20), block=st.sampled_from([None, 1, 4, 7, 16]),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_sliding_window_without_padding_mask(t, window, block, causal, seed):
    """No key-padding mask: interior blocks share one 2D mask and read the keys in place, edge blocks are padded,
    a ragged last block holds queries that see nothing. Outputs and gradients against the reference."""
    q, k, v = (rand(2, 2, t, 4, seed=seed + i) for i in range(3))
    kw = dict(is_causal=causal, window=window, block_size=block)
    fast = fn.attention(q, k, v, "sliding_window", **kw)
    ref = fn.reference(q, k, v, "sliding_window", **{k_: v_ for k_, v_ in kw.items() if k_ != "block_size"})
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    w = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad((fast * w).sum(), [q, k, v]), torch.autograd.grad((ref * w).sum(), [q, k, v])):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sliding_window_dropout_path_without_dropout_matches_reference(masked):
    """The explicit (probabilities written out) path that dropout uses, run at p = 0."""
    t, w = 23, 4
    q, k, v = (rand(2, 3, t, 5, seed=20 + i) for i in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[0, 17:] = False
        mask[1, :6] = False
    for causal in (False, True):
        band = sparse._Band(t, w, 4, causal)
        out = sparse._window_explicit(q, k, v, mask, band, q.shape[-1] ** -0.5, 0.0, False)
        ref = naive.sliding_window_reference(q, k, v, mask=mask, causal=causal, scaling=q.shape[-1] ** -0.5, window=w)
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)


def test_sliding_window_dropout_is_applied_in_training():
    q, k, v = (rand(1, 2, 40, 8, seed=30 + i, dtype=torch.float32, grad=False) for i in range(3))
    kw = dict(causal=False, scaling=8**-0.5, window=5)
    plain = sparse.sliding_window_attention(q, k, v, **kw)
    assert torch.equal(plain, sparse.sliding_window_attention(q, k, v, dropout=0.5, training=False, **kw))
    assert not torch.allclose(plain, sparse.sliding_window_attention(q, k, v, dropout=0.5, training=True, **kw))


@pytest.mark.parametrize("t,m", [(24, 6), (26, 6)], ids=["divisible", "ragged"])
def test_nystrom_without_mask_matches_reference(t, m):
    """Without a mask and T % m == 0 the landmarks are plain means of a view and no mask reaches SDPA."""
    q, k, v = (rand(2, 2, t, 5, seed=40 + i) for i in range(3))
    kw = dict(scaling=5**-0.5, num_landmarks=m, pinv_iterations=6)
    fast = low_rank.nystrom_attention(q, k, v, **kw)
    ref = naive.nystrom_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    w = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad((fast * w).sum(), [q, k, v]), torch.autograd.grad((ref * w).sum(), [q, k, v])):
        torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-6)


def test_linformer_without_mask_matches_reference():
    t, p = 30, 7
    q, k, v = (rand(2, 3, t, 4, seed=50 + i) for i in range(3))
    e, f = rand(p, t + 3, seed=54), rand(p, t + 3, seed=55)
    e.data[2] = 0.0  # a projected key that receives nothing is masked out
    fast = low_rank.linformer_attention(q, k, v, scaling=0.5, proj_k=e, proj_v=f)
    ref = naive.linformer_reference(q, k, v, scaling=0.5, proj_k=e, proj_v=f)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    inputs = [q, k, v, e, f]
    w = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("iterations", [1, 6])
def test_newton_schulz_fused_steps_match_reference(iterations):
    a = torch.softmax(rand(3, 2, 9, 9, seed=60), -1).detach().requires_grad_(True)
    fast = low_rank.newton_schulz_pinv(a, iterations)
    ref = torch.stack([torch.stack([naive.newton_schulz_pinv_reference(a[i, j], iterations) for j in range(2)])
                       for i in range(3)])
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)
    w = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), [a])
    (g_ref,) = torch.autograd.grad((ref * w).sum(), [a])
    torch.testing.assert_close(g_fast, g_ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("budget", [100, 500, 1 << 24], ids=["groups-of-1", "ragged-groups", "one-group"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sliding_window_block_groups_outputs_and_gradients(monkeypatch, budget, masked, causal):
    """Blocks split into groups (one per SDPA call, key windows overlapping between groups): outputs and
    gradients equal the reference whatever the grouping. T=75, blk=4: 19 blocks; with autograd on, the budgets
    give groups of 1, of 3 (bidirectional) or 6 (causal) with a shorter last group, and a single group."""
    monkeypatch.setattr(sparse, "_MAX_SCORE_ELEMENTS", budget)
    b, h, t, d, w = 2, 2, 75, 4, 6
    q, k, v = (rand(b, h, t, d, seed=70 + i) for i in range(3))
    mask = None
    if masked:
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[0, 60:] = False
        mask[1, :9] = False
    kw = dict(attention_mask=mask, is_causal=causal, window=w)
    fast = fn.attention(q, k, v, "sliding_window", block_size=4, **kw)
    ref = fn.reference(q, k, v, "sliding_window", **kw)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    g = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad((fast * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-7)
