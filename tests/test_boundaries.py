"""Every registered variant, in each of its forms, at sizes that cross the fast paths' internal boundaries: the
causal linear chunks and segments, the bidirectional linear slices, the top-k query chunks and the sliding-window
block groups (score budget). The budgets are shrunk with monkeypatch so that small tensors cross them many times
(ragged last pieces, a sequence shorter than one piece, exactly one piece), with and without a padding mask, and
checked against the float64 reference, gradients included; a few cases run at the real budgets.

Parametrized from ``hf_reshape.list_variants()`` and each spec's forms: a new variant is covered by itself.
"""

import pytest
import torch

import hf_reshape
from hf_reshape import functional as fn
from hf_reshape.ops import linear, sparse

from test_ops import CASE_IDS, CASES, build, padding_mask, qkv

B, H, D = 2, 2, 8


def shrink_budgets(monkeypatch, b=B, h=H, t=45, d=D):
    """Budgets small enough that a ``[b, h, t, d]`` input crosses each of them several times: causal linear
    segments of ~10 rows (a few chunks each, ragged), bidirectional linear slices at their 16-row floor, top-k
    query chunks of 7 rows, sliding-window groups of a few blocks."""
    monkeypatch.setattr(linear, "CAUSAL_SEGMENT_BYTES", 4 * b * h * (d + 1) * 10)
    monkeypatch.setattr(linear, "BIDIRECTIONAL_CHUNK_BYTES", 1)
    monkeypatch.setattr(sparse, "_MAX_SCORE_ELEMENTS", 7 * b * h * t)


def _mask(kind, b, t):
    if kind == "nomask":
        return None
    if kind == "ones":  # a mask that pads nothing: the unpadded fast paths
        return torch.ones(b, t, dtype=torch.bool)
    return padding_mask(b, t, seed=t)  # right, left padding


def check_against_reference(name, causal, t_q, t_k, mask, b=B, h=H, d=D, atol=1e-9, **overrides):
    kwargs, state = build(name, max(t_k, 45), h, d, **overrides)  # state sized for a model of 50+ positions
    q, _, _ = qkv(b, t_q, h, d, seed=t_q)
    _, k, v = qkv(b, t_k, h, d, seed=t_k + 100)
    fast = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    ref = fn.reference(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    assert fast.shape == (b, h, t_q, d)
    torch.testing.assert_close(fast, ref, atol=atol, rtol=1e-7)
    inputs = [q, k, v, *state.values()]
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, atol=100 * atol, rtol=1e-6)


SIZES = [(1, "nomask"), (7, "ones"), (16, "nomask"), (17, "padded"), (45, "nomask"), (45, "padded")]


@pytest.mark.parametrize("t,mask_kind", SIZES, ids=[f"T{t}-{m}" for t, m in SIZES])
@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_crossing_shrunk_budgets_matches_reference(monkeypatch, name, causal, t, mask_kind):
    """T=1 and 7: shorter than one piece (7 with an all-True mask: the unpadded paths); 16: exactly one
    bidirectional slice, four causal chunks and two segments; 17: one row over each; 45: many causal chunks (4
    rows) and segments (8 rows), three slices, seven top-k chunks, block groups, ragged ends."""
    shrink_budgets(monkeypatch)
    check_against_reference(name, causal, t, t, _mask(mask_kind, B, t))


@pytest.mark.parametrize("mask_kind", ["nomask", "padded"])
@pytest.mark.parametrize("name", [n for n, c in CASES if c])
def test_decoder_layout_crossing_shrunk_budgets_matches_reference(monkeypatch, name, mask_kind):
    """Fewer queries than keys (a decoder's past enters as an initial state) over several segments and chunks."""
    shrink_budgets(monkeypatch)
    check_against_reference(name, True, 26, 45, _mask(mask_kind, B, 45))


@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_default_parameters_crossing_shrunk_budgets(monkeypatch, name, causal):
    """The variant's default parameters (e.g. linear's 64-token chunks: three of them, the last of 2 rows) rather than
    its small test parameters, across the shrunk budgets, with padding."""
    b, h, t, d = 2, 2, 130, 8
    shrink_budgets(monkeypatch, b, h, t, d)
    spec = hf_reshape.get_variant(name)
    defaults = {f: getattr(spec.params_cls(), f) for f in spec.small_params}  # undo the small test parameters
    check_against_reference(name, causal, t, t, padding_mask(b, t, seed=3), b=b, h=h, d=d, **defaults)


def test_budgets_really_split_the_work(monkeypatch):
    """Guards the tests above: under the shrunk budgets the pieces are as small as the docstrings say."""
    shrink_budgets(monkeypatch)
    q = torch.zeros(B, H, 45, D)
    assert linear._causal_segment(q, D + 1, 4) == 8
    assert linear._bidirectional_rows(q, D + 1) == 16
    assert max(1, sparse._MAX_SCORE_ELEMENTS // (B * H * 45)) == 7


# ---- at the real budgets (sizes picked to just cross them) ----


def test_topk_issue_reproducer_at_real_budget():
    """The issue's reproducer (the main job's crash): a key-padding mask with more than one query chunk. The
    chunked result must equal one chunk over all queries (the budget lifted), gradients included."""
    q, k, v = (torch.randn(4, 12, 512, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 512, dtype=torch.bool)
    assert sparse._MAX_SCORE_ELEMENTS // (4 * 12 * 512) < 512  # several query chunks
    mask[1, :100] = False
    chunked = fn.attention(q, k, v, "topk", top_k=8, attention_mask=mask)
    w = torch.randn_like(chunked)
    g_chunked = torch.autograd.grad((chunked * w).sum(), [q, k, v])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparse, "_MAX_SCORE_ELEMENTS", 1 << 40)
        whole = fn.attention(q, k, v, "topk", top_k=8, attention_mask=mask)
        g_whole = torch.autograd.grad((whole * w).sum(), [q, k, v])
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_linear_at_real_budgets_crosses_slices_and_segments(causal):
    """Bidirectional slices and causal segments of ~4 MiB at their real sizes (wide heads keep T and the reference
    small): 3 slices of up to 255 rows, 4 segments of up to 192 rows (both ragged last), with left padding."""
    b, h, t, d = 1, 16, 600, 256
    assert linear._bidirectional_rows(torch.zeros(b, h, t, d), d + 1) == 255
    assert linear._causal_segment(torch.zeros(b, h, t, d), d + 1, linear.DEFAULT_CHUNK) == 192
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :70] = False
    kwargs = dict(attention_mask=mask, is_causal=causal, feature_map="elu")
    q, k, v = qkv(b, t, h, d, seed=11)
    fast = fn.attention(q, k, v, "linear", **kwargs)
    ref = fn.reference(q, k, v, "linear", **kwargs)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
    w = torch.randn_like(fast)
    for a, r in zip(torch.autograd.grad((fast * w).sum(), [q, k, v]), torch.autograd.grad((ref * w).sum(), [q, k, v])):
        torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-6)


def test_sliding_window_at_real_budget_crosses_block_groups():
    """With autograd on, a padded sequence's 4D-masked group holds budget / (heads * span * D) blocks: 7 of the 9
    here. Grouped equals one group (the budget lifted), outputs and gradients."""
    b, h, t, d, w = 1, 16, 520, 64, 512
    assert sparse._MAX_SCORE_ELEMENTS // (h * (64 + 2 * w) * d) == 7
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -30:] = False
    kw = dict(attention_mask=mask, window=w, block_size=64)
    grouped = fn.attention(q, k, v, "sliding_window", **kw)
    g = torch.randn_like(grouped)
    g_grouped = torch.autograd.grad((grouped * g).sum(), [q, k, v])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparse, "_MAX_SCORE_ELEMENTS", 1 << 40)
        whole = fn.attention(q, k, v, "sliding_window", **kw)
        g_whole = torch.autograd.grad((whole * g).sum(), [q, k, v])
    torch.testing.assert_close(grouped, whole)
    for a, r in zip(g_grouped, g_whole):
        torch.testing.assert_close(a, r)
