"""Op-level reliability: float32 gradients against float64 on masks with empty rows (every variant and form), the
causal linear backward's cancellation, Linformer's masking decided by layout, top-k selection in low precision,
empty inputs, mask dtypes, and graph capture (``torch.export``, ``torch.jit.trace``) of reshaped models.

Parametrized from ``hf_reshape.list_variants()`` and each spec's forms: a new variant is covered by itself.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import hf_reshape
from hf_reshape import functional as fn
from hf_reshape.errors import InvalidParameterError
from hf_reshape.ops import low_rank, naive, sparse

from conftest import tiny_model
from test_boundaries import shrink_budgets
from test_ops import CASE_IDS, CASES, build, qkv


def relative_error(got, want):
    """Largest error over the largest magnitude of ``want`` (the gradient's scale)."""
    return (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


# ---- float32 gradients against float64, on masks with empty rows, every variant and form ----

LAYOUTS = [(n, c, lay) for n, c in CASES for lay in (("square", "past") if c else ("square",))]


def empty_row_mask(b, t, causal):
    """Causal: left padding, so the first queries of a row see no real key (two rows, 9 and all but 3 pads).
    Bidirectional: a fully padded sequence beside a partly padded one and a full one."""
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :9] = False
    if causal:
        mask[2, : t - 3] = False
    else:
        mask[2] = False
    return mask


def _grads(name, causal, tensors, state, mask, kwargs, w):
    q, k, v = tensors
    out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    return torch.autograd.grad((out * w.to(out.dtype)).sum(), [q, k, v, *state.values()])


@pytest.mark.parametrize("name,causal,layout", LAYOUTS,
                         ids=[f"{n}-{'causal' if c else 'bidir'}-{lay}" for n, c, lay in LAYOUTS])
def test_float32_gradients_match_float64_with_empty_rows(monkeypatch, name, causal, layout):
    """The fast path's float32 gradients (q, k, v and any state) against its own float64 gradients, with an
    upstream gradient on every row (padded and empty ones too), across several chunks and segments. A row with
    no visible real key must not leak its clamped-denominator gradient (about g / eps) into the others."""
    b, h, t, d = 3, 2, 24, 8
    shrink_budgets(monkeypatch, b, h, t, d)
    t_q = 14 if layout == "past" else t  # "past": a decoder's earlier keys enter as an initial state
    kwargs, state64 = build(name, t, h, d)
    q64 = qkv(b, t_q, h, d, seed=40)[0]
    _, k64, v64 = qkv(b, t, h, d, seed=41)
    mask = empty_row_mask(b, t, causal)
    w = torch.randn(b, h, t_q, d, dtype=torch.float64)
    g64 = _grads(name, causal, (q64, k64, v64), state64, mask, kwargs, w)
    as32 = lambda x: x.detach().float().requires_grad_(True)  # noqa: E731
    state32 = {n: as32(x) for n, x in state64.items()}
    g32 = _grads(name, causal, [as32(x) for x in (q64, k64, v64)], state32, mask, kwargs, w)
    for label, a, r in zip(["dq", "dk", "dv", *state64], g32, g64):
        assert torch.isfinite(a).all(), label
        assert relative_error(a, r) < 1e-4, (label, relative_error(a, r))


@pytest.mark.parametrize("fmap", ["elu", "relu"])
def test_causal_linear_backward_issue_reproducer_in_float32(fmap):
    """The issue's reproducer at the default chunk size: dk was off by 0.109 where |dk| <= 0.318 (elu)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 32, dtype=torch.float64) for _ in range(3))
    m = torch.ones(2, 256, dtype=torch.bool)
    m[0, :40] = False
    g = torch.randn(2, 4, 256, 32, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        x = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn.attention(*x, "linear", attention_mask=m, is_causal=True, feature_map=fmap)
        grads[dtype] = torch.autograd.grad((out * g.to(dtype)).sum(), x)
    for a, r in zip(grads[torch.float32], grads[torch.float64]):
        assert relative_error(a, r) < 1e-5


def test_gpt2_left_padded_finetuning_gradients_float32_match_float64():
    """Model level: a tiny GPT-2 reshaped to causal linear attention, a left-padded batch with the pads' labels
    at -100 (the standard fine-tuning set-up): every parameter's float32 gradient against float64."""
    model = tiny_model("gpt2")
    hf_reshape.reshape(model, "linear", chunk_size=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 101, (2, 32), generator=g)
    am = torch.ones(2, 32, dtype=torch.long)
    am[1, :11] = 0
    labels = ids.masked_fill(am == 0, -100)
    model64 = copy.deepcopy(model).double()
    grads = []
    for m in (model, model64):
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        grads.append(torch.autograd.grad(loss, list(m.parameters()), allow_unused=True))
    names = [n for n, _ in model.named_parameters()]
    worst = max((relative_error(a, r), n) for n, a, r in zip(names, *grads) if r is not None and r.abs().max() > 0)
    assert worst[0] < 1e-3, worst


# ---- Linformer: projected keys masked by the layout of the projections, not their values ----


def _linformer_setup():
    """P = 4 columns over N = 12 positions, init "mean": column c takes ranks 3c..3c+2. A sequence with 5 real
    tokens fills columns 0 and 1 only; one with 10 fills all four."""
    b, t, h, d = 2, 10, 2, 8
    state = fn.init_state("linformer", num_heads=h, head_dim=d, proj_len=4, max_length=12, init="mean")
    proj = {n: x.detach().double() for n, x in state.items()}
    q, k, v = (x.detach() for x in qkv(b, t, h, d, seed=50))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :5] = False
    kwargs = dict(attention_mask=mask, proj_len=4, max_length=12, init="mean")
    return q, k, v, proj, kwargs


def test_linformer_mean_init_output_moves_smoothly_with_the_projections():
    """Noise of 1e-9 on E and F moved outputs by 0.49 (an empty column switched on); now by about 1e-9."""
    q, k, v, proj, kwargs = _linformer_setup()
    out = fn.attention(q, k, v, "linformer", **kwargs, **proj)
    g = torch.Generator().manual_seed(1)
    noisy = {n: x + 1e-9 * torch.randn(x.shape, generator=g, dtype=x.dtype) for n, x in proj.items()}
    moved = fn.attention(q, k, v, "linformer", **kwargs, **noisy)
    assert (moved - out).abs().max() < 1e-7


def test_linformer_empty_column_stays_masked_whatever_its_values():
    """Column 2 holds ranks 6..8: empty for the 5-token sequence, so that sequence ignores any value of E[2]."""
    q, k, v, proj, kwargs = _linformer_setup()
    out = fn.attention(q, k, v, "linformer", **kwargs, **proj)
    trained = {n: x.clone() for n, x in proj.items()}
    trained["proj_k"][2] = torch.linspace(-3, 3, 12, dtype=torch.float64)
    trained["proj_v"][2] = torch.linspace(2, -1, 12, dtype=torch.float64)
    again = fn.attention(q, k, v, "linformer", **kwargs, **trained)
    torch.testing.assert_close(again[1], out[1], atol=1e-12, rtol=0)
    assert (again[0] - out[0]).abs().max() > 1e-3  # column 2 is used by the full sequence
    ref = fn.reference(q, k, v, "linformer", **kwargs, **trained)
    torch.testing.assert_close(again, ref, atol=1e-9, rtol=1e-7)


def test_linformer_mean_init_gradcheck_wrt_projections_with_padding():
    q, k, v, proj, kwargs = _linformer_setup()
    e, f = (x.clone().requires_grad_(True) for x in (proj["proj_k"], proj["proj_v"]))

    def run(e, f):
        return fn.attention(q, k, v, "linformer", proj_k=e, proj_v=f, **kwargs)

    assert torch.autograd.gradcheck(run, (e, f), fast_mode=True)  # a random direction moves every entry of E


def test_linformer_columns_used_by_layout():
    n = torch.tensor([0, 1, 3, 4, 12])
    seg = low_rank.linformer_columns_used(n, 4, 12, "segments")
    assert seg.tolist() == [[False] * 4, [True, False, False, False], [True, False, False, False],
                            [True, True, False, False], [True] * 4]
    dense = low_rank.linformer_columns_used(n, 4, 12, "dense")
    assert dense.tolist() == [[False] * 4] + [[True] * 4] * 4
    with pytest.raises(ValueError, match="segments"):
        low_rank.linformer_columns_used(n, 4, 12, "diagonal")


# ---- top-k selects in float32 for half-precision inputs ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_topk_low_precision_selects_the_float32_key_set(dtype):
    """bf16 scores kept a different key set in 6% of rows (output error 0.49); selected from float32 scores the
    error is that of the inputs' rounding, like softmax's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 32, generator=g).to(dtype) for _ in range(3))
    out = fn.attention(q, k, v, "topk", top_k=8)
    assert out.dtype == dtype
    ref = fn.reference(q.double(), k.double(), v.double(), "topk", top_k=8)  # the same (rounded) inputs
    assert (out.double() - ref).abs().max() < 0.02


# ---- empty inputs, every variant and form ----

EMPTY = {"B0": (0, 2, 6, 4), "H0": (2, 0, 6, 4), "T0": (2, 2, 0, 4)}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", list(EMPTY.values()), ids=list(EMPTY))
@pytest.mark.parametrize("name,causal", CASES, ids=CASE_IDS)
def test_empty_inputs_give_empty_outputs_like_sdpa(name, causal, shape, masked):
    b, h, t, d = shape
    kwargs, state = build(name, max(t, 6), h, d)
    q, k, v = qkv(b, t, h, d)
    mask = torch.ones(b, t, dtype=torch.bool) if masked else None
    out = fn.attention(q, k, v, name, attention_mask=mask, is_causal=causal, **kwargs, **state)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == sdpa.shape and out.dtype == sdpa.dtype
    inputs = [q, k, v, *state.values()]
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    for x, gx in zip(inputs, grads):
        assert gx is None or (gx.shape == x.shape and not gx.any())


# ---- masks: bool or 0/1 integers only ----


def test_functional_accepts_bool_and_integer_masks_alike():
    q, k, v = (x.detach() for x in qkv(2, 9, 2, 4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    want = fn.attention(q, k, v, "sliding_window", window=2, attention_mask=mask)
    for dtype in (torch.long, torch.int32, torch.uint8):
        torch.testing.assert_close(fn.attention(q, k, v, "sliding_window", window=2, attention_mask=mask.to(dtype)),
                                   want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["additive", "float01", "int-values"])
@pytest.mark.parametrize("entry", ["attention", "reference"])
def test_functional_refuses_masks_that_bool_would_misread(kind, entry):
    """An additive 0/-inf mask was cast with .to(bool): padding read as real and real tokens as padding."""
    q, k, v = (x.detach() for x in qkv(2, 9, 2, 4))
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :3] = False
    mask = {
        "additive": torch.zeros(2, 9).masked_fill(~real, float("-inf")),
        "float01": real.float(),
        "int-values": real.long() * 2,
    }[kind]
    before = [x.clone() for x in (q, k, v, mask)]
    with pytest.raises(InvalidParameterError, match="bool") as info:
        getattr(fn, entry)(q, k, v, "topk", top_k=3, attention_mask=mask)
    assert "0/1 integers" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask)))  # nothing changed


# ---- graph capture: torch.export and torch.jit.trace of reshaped models ----


def _bert(name, **params):
    model = tiny_model("bert")
    return hf_reshape.reshape(model, name, **params)


def _bert_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 8:] = 0
    return ids, am


def test_export_leaves_no_traced_tensor_in_the_band_cache():
    """Export as the first use of a window geometry used to cache a FakeTensor band pattern, which every later
    eager forward with that geometry then returned. (Geometry window=5, block 3: used nowhere else.)"""
    model = _bert("sliding_window", window=5, block_size=3)
    ids, am = _bert_inputs()
    with torch.no_grad():
        ep = torch.export.export(model, args=(), kwargs={"input_ids": ids, "attention_mask": am})
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
        assert type(out) is torch.Tensor
        assert all(type(p) is torch.Tensor for p in sparse._BAND_PATTERNS.values())
        twin = _bert("sliding_window", window=5, block_size=4)  # same weights and maths, another geometry
        torch.testing.assert_close(out, twin(input_ids=ids, attention_mask=am).last_hidden_state)
        torch.testing.assert_close(ep.module()(input_ids=ids, attention_mask=am).last_hidden_state, out)


@pytest.mark.parametrize("name", [n for n in hf_reshape.list_variants() if hf_reshape.get_variant(n).bidirectional])
def test_export_of_reshaped_bert_with_attention_mask(name):
    """Stock BERT exports with an attention_mask; so must a reshaped one. Exported with an all-ones mask, the
    program must still honour padding given later (no branch on the example mask's values)."""
    model = _bert(name, **hf_reshape.get_variant(name).small_params)
    ids, am = _bert_inputs()
    with torch.no_grad():
        ep = torch.export.export(model, args=(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(am)})
        got = ep.module()(input_ids=ids, attention_mask=am).last_hidden_state
        want = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert type(want) is torch.Tensor
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_reshaped_sliding_window_bert():
    """jit.trace failed on `divmod(int, Tensor)` (traced sizes are tensors); traced with an unpadded mask, the
    graph must still honour padding."""
    model = _bert("sliding_window", window=4, block_size=4)
    ids, am = _bert_inputs()
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, torch.ones_like(am)), strict=False, check_trace=False)
        got = traced(ids, am)["last_hidden_state"]
        want = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_svd_padded_batches_decompose_the_same_under_graph_capture(monkeypatch):
    """Under torch.export/compile svd cannot cut out each sequence's real block (data-dependent sizes): the padded
    form gives the same outputs and gradients (finite, a fully padded sequence included)."""
    q, k, v = qkv(3, 9, 2, 5, seed=60)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False
    mask[2] = False
    kw = dict(attention_mask=mask, rank=3)
    eager = fn.attention(q, k, v, "svd", **kw)
    g_eager = torch.autograd.grad(eager.sum(), [q, k, v])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    captured = fn.attention(q, k, v, "svd", **kw)
    g_captured = torch.autograd.grad(captured.sum(), [q, k, v])
    torch.testing.assert_close(captured, eager, atol=1e-10, rtol=1e-8)
    for a, b in zip(g_captured, g_eager):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(captured, naive.svd_reference(q, k, v, mask=mask, scaling=5**-0.5, rank=3))
