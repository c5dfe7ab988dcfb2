"""The linear feature-map catalogue: feature maps as registered modules, and the properties of each feature-map
variant that the parametrized suite (test_ops, test_boundaries, test_conformance, ...) does not cover by itself:
Performer's error falling with its feature count, its saved and redrawn projection; cosFormer's positions; T2R's
starting point; the Taylor kernel identity; and generation with the O(1) recurrent state for every feature-map
variant (cached generation equals recomputation)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_reshape
from hf_reshape import functional as fn
from hf_reshape.cache import LinearRecurrentLayer, ReshapeCache, cache_nbytes
from hf_reshape.errors import InvalidParameterError, SequenceTooLongError
from hf_reshape.integration import STATE_ATTR
from hf_reshape.ops import feature_maps as fm
from hf_reshape.ops import linear as linear_ops
from hf_reshape.ops import naive

from conftest import tiny_inputs, tiny_model
from test_generation import NO_EOS, ids_of, recompute_greedy
from test_ops import qkv

NEW = ["performer", "cosformer", "t2r", "taylor"]


def _holders(model):
    return [m for m in model.modules() if isinstance(m, hf_reshape.integration.ReshapedAttention)]


# ---------- feature maps as modules, and their registry ----------

MAP_OPTIONS = {"hedgehog": {}, "t2r": {"feature_dim": 12}, "performer": {"num_features": 20}, "taylor": {},
               "cosformer": {"max_length": 10}, "elu": {}, "relu": {}}


@pytest.mark.parametrize("name", sorted(MAP_OPTIONS))
def test_every_builtin_feature_map_is_a_registered_module_with_its_declared_output_dim(name):
    assert name in fm.list_feature_maps()
    phi = fm.make_feature_map(name, num_heads=3, head_dim=6, **MAP_OPTIONS[name])
    assert isinstance(phi, torch.nn.Module) and isinstance(phi, fm.FeatureMap)
    x = torch.randn(2, 3, 7, 6)
    out = phi(x)
    assert out.shape == (2, 3, 7, phi.output_dim(6))
    # what it owns is what a variant keeps as layer state: in its state_dict, and the same maths
    assert set(phi.tensors()) == set(phi.state_dict())
    torch.testing.assert_close(phi.features(x, 0, **phi.tensors()), out)


def test_output_dims_of_the_catalogue():
    dims = {name: fm.make_feature_map(name, num_heads=2, head_dim=64, **MAP_OPTIONS[name]).output_dim(64)
            for name in MAP_OPTIONS}
    assert dims == {"hedgehog": 128, "t2r": 12, "performer": 20, "taylor": 1 + 64 + 2080, "cosformer": 128,
                    "elu": 64, "relu": 64}


def test_learnable_maps_own_parameters_and_performer_a_buffer():
    t2r = fm.make_feature_map("t2r", num_heads=2, head_dim=4)
    assert {n for n, _ in t2r.named_parameters()} == {"weight", "bias"}
    perf = fm.make_feature_map("performer", num_heads=2, head_dim=4, num_features=8)
    assert [n for n, _ in perf.named_parameters()] == [] and "projection" in perf.state_dict()


def test_elu_and_relu_keep_the_sliced_kernel_of_linear():
    """The parameter-free maps are the same functions as before, with their hand-written derivatives: `linear`
    keeps its sliced bidirectional kernel (FEATURE_MAP_GRADS) and its results."""
    assert fm.FEATURE_MAPS["elu"] is fm.elu_plus_one and fm.FEATURE_MAPS["relu"] is fm.relu
    assert fm.FEATURE_MAP_GRADS[fm.elu_plus_one] is fm.elu_plus_one_grad
    assert linear_ops.FEATURE_MAP_GRADS is fm.FEATURE_MAP_GRADS
    assert sorted(fm.FEATURE_MAPS) == ["elu", "relu"]  # the other maps are not elementwise: variants of their own


class _Softplus(fm.FeatureMap):
    """softplus(x), elementwise, with its derivative sigmoid(x)."""

    elementwise = staticmethod(torch.nn.functional.softplus)
    elementwise_grad = staticmethod(lambda x, fx, grad: grad * torch.sigmoid(x))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_a_user_registered_elementwise_map_runs_in_linear_on_the_sliced_kernel(causal):
    fm.register_feature_map("softplus_test", _Softplus)
    try:
        assert _Softplus.elementwise in fm.FEATURE_MAP_GRADS  # the fast bidirectional kernel takes it
        q, k, v = qkv(2, 19, 2, 4, seed=3)
        mask = torch.ones(2, 19, dtype=torch.bool)
        mask[1, :5] = False
        kw = dict(attention_mask=mask, is_causal=causal, feature_map="softplus_test")
        fast = fn.attention(q, k, v, "linear", **kw)
        ref = fn.reference(q, k, v, "linear", **kw)
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
        g = torch.randn_like(fast)
        for a, r in zip(torch.autograd.grad((fast * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
            torch.testing.assert_close(a, r, atol=1e-8, rtol=1e-6)
        model = hf_reshape.reshape(tiny_model("gpt2"), "linear", feature_map="softplus_test", chunk_size=4)
        ids = ids_of(5)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **NO_EOS)
        assert isinstance(out.cache.layers[0], LinearRecurrentLayer)
        assert torch.equal(out.sequences, recompute_greedy(model, ids, 4))
    finally:
        fm.unregister_feature_map("softplus_test")
    assert "softplus_test" not in fm.FEATURE_MAPS and _Softplus.elementwise not in fm.FEATURE_MAP_GRADS
    with pytest.raises(InvalidParameterError, match="feature_map"):
        fn.attention(q, k, v, "linear", feature_map="softplus_test")


def test_feature_map_registry_refuses_bad_registrations():
    with pytest.raises(ValueError, match="already registered"):
        fm.register_feature_map("elu", fm.EluPlusOne)
    with pytest.raises(ValueError, match="must match"):
        fm.register_feature_map("Bad Name", _Softplus)
    with pytest.raises(TypeError, match="FeatureMap"):
        fm.register_feature_map("not_a_map", torch.nn.ReLU)
    with pytest.raises(InvalidParameterError, match="unknown feature map 'nope'.*registered"):
        fm.make_feature_map("nope", num_heads=1, head_dim=2)
    assert "not_a_map" not in fm.list_feature_maps()


def test_linear_refuses_a_map_that_is_not_elementwise_and_names_its_variant():
    with pytest.raises(InvalidParameterError, match="not an elementwise.*use the 'taylor' variant"):
        hf_reshape.reshape(tiny_model("bert"), "linear", feature_map="taylor")


# ---------- performer ----------


def _softmax_error(num_features, seeds, causal, scale=0.5):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 48, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q * scale, k * scale
    exact = naive.softmax_reference(q, k, v, causal=causal, scaling=16**-0.5)
    errors = []
    for seed in seeds:
        proj = fn.init_state("performer", num_heads=4, head_dim=16, num_features=num_features, seed=seed)["projection"]
        out = fn.attention(q, k, v, "performer", is_causal=causal, num_features=num_features, seed=seed,
                           projection=proj.double())
        errors.append(((out - exact).norm() / exact.norm()).item())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_performer_error_against_softmax_falls_as_num_features_grows(causal):
    seeds = range(6)
    e16, e64, e256 = (_softmax_error(m, seeds, causal) for m in (16, 64, 256))
    assert e256 < e64 < e16
    assert e256 < 0.6 * e16  # about 1 / sqrt(m): 0.25 in expectation


def test_performer_projection_is_orthogonal_within_blocks_seeded_and_per_head():
    a = fn.init_state("performer", num_heads=2, head_dim=8, num_features=20, seed=3)["projection"]
    b = fn.init_state("performer", num_heads=2, head_dim=8, num_features=20, seed=3)["projection"]
    c = fn.init_state("performer", num_heads=2, head_dim=8, num_features=20, seed=4)["projection"]
    assert a.shape == (2, 8, 20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # heads draw their own features
    block = a[0, :, :8].double()
    gram = block.T @ block
    torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_performer_projection_is_a_saved_buffer_reloaded_exactly_not_redrawn(tmp_path):
    model = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, seed=5)
    holder = _holders(model)[0]
    assert "projection" in dict(holder.named_buffers()) and not list(holder.parameters())
    with torch.no_grad():  # a projection that is no longer the seed's draw (a redraw during training, say)
        for h in _holders(model):
            h.projection.mul_(1.5)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    for h_saved, h_loaded in zip(_holders(model), _holders(loaded)):
        assert torch.equal(h_saved.projection, h_loaded.projection)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, before)


def test_performer_redraws_every_n_training_forwards_never_in_eval():
    def projections(model):
        return [h.projection.clone() for h in _holders(model)]

    model = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, redraw_interval=2)
    twin = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, redraw_interval=2)
    inputs = tiny_inputs("bert")
    start = projections(model)
    with torch.no_grad():
        for _ in range(3):  # eval: never
            model(**inputs)
        assert all(torch.equal(a, b) for a, b in zip(projections(model), start))
        model.train()
        model(**inputs)  # training forward 1 of 2
        assert all(torch.equal(a, b) for a, b in zip(projections(model), start))
        model(**inputs)  # 2 of 2: redrawn
        first = projections(model)
        assert all(not torch.equal(a, b) for a, b in zip(first, start))
        model(**inputs), model(**inputs)  # 4: the next draw
        assert all(not torch.equal(a, b) for a, b in zip(projections(model), first))
        twin.train()
        for _ in range(2):
            twin(**inputs)
        assert all(torch.equal(a, b) for a, b in zip(projections(twin), first))  # a deterministic redraw
    never = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16)  # redraw_interval=0
    before = projections(never)
    never.train()
    with torch.no_grad():
        for _ in range(3):
            never(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(projections(never), before))


def test_performer_refuses_a_projection_of_the_wrong_shape():
    q, k, v = qkv(1, 5, 2, 4)
    proj = fn.init_state("performer", num_heads=2, head_dim=4, num_features=8)["projection"]
    with pytest.raises(InvalidParameterError, match="num_features=16"):
        fn.attention(q, k, v, "performer", num_features=16, projection=proj)
    with pytest.raises(InvalidParameterError, match="state tensor `projection`"):
        fn.attention(q, k, v, "performer")


# ---------- cosformer ----------


@pytest.mark.parametrize("offset", [0, 5])
def test_cosformer_features_dot_product_is_relu_times_cos_of_the_distance(offset):
    x, y = torch.randn(2, 1, 2, 9, 6, dtype=torch.float64)
    m = 20
    fx = fm.cosformer_features(x, offset, m)
    fy = fm.cosformer_features(y, 0, m)
    i = torch.arange(offset, offset + 9, dtype=torch.float64)[:, None]
    j = torch.arange(9, dtype=torch.float64)[None]
    want = torch.relu(x) @ torch.relu(y).transpose(-1, -2) * torch.cos(math.pi * (i - j) / (2 * m))
    torch.testing.assert_close(fx @ fy.transpose(-1, -2), want, atol=1e-12, rtol=1e-12)


def test_cosformer_decoder_queries_sit_at_the_end_of_the_keys():
    """With a decoder's past (T_q < T_k) the queries are the last T_q positions: the same outputs as those rows
    of the full causal call, which a wrong position offset would change."""
    q, k, v = (x.detach() for x in qkv(2, 15, 2, 4, seed=8))
    full = fn.attention(q, k, v, "cosformer", is_causal=True, max_length=20)
    last = fn.attention(q[:, :, -4:], k, v, "cosformer", is_causal=True, max_length=20)
    torch.testing.assert_close(last, full[:, :, -4:], atol=1e-12, rtol=1e-10)
    shifted = fn.attention(q[:, :, -4:], k[:, :, 1:], v[:, :, 1:], "cosformer", is_causal=True, max_length=20)
    assert not torch.allclose(shifted, full[:, :, -4:])  # keys cut off: the check above can fail


def test_cosformer_max_length_defaults_to_the_models_positions_and_bounds_them():
    model = hf_reshape.reshape(tiny_model("gpt2"), "cosformer")
    assert model.config.hf_reshape["max_length"] == 64  # n_positions of the tiny GPT-2
    q, k, v = qkv(1, 12, 2, 4)
    with pytest.raises(SequenceTooLongError, match="max_length=10"):
        fn.attention(q, k, v, "cosformer", max_length=10)
    short = hf_reshape.reshape(tiny_model("gpt2"), "cosformer", max_length=8)
    with pytest.raises(SequenceTooLongError, match="max_length=8"):
        short.generate(ids_of(6), max_new_tokens=4, do_sample=False, **NO_EOS)


# ---------- t2r ----------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_t2r_starts_as_linear_relu_and_its_parameters_learn(causal):
    q, k, v = qkv(2, 11, 3, 4, seed=2)
    state = fn.init_state("t2r", num_heads=3, head_dim=4)
    w, b = (x.detach().double().requires_grad_(True) for x in (state["feature_weight"], state["feature_bias"]))
    out = fn.attention(q, k, v, "t2r", is_causal=causal, feature_weight=w, feature_bias=b)
    relu = fn.attention(q, k, v, "linear", is_causal=causal, feature_map="relu")
    torch.testing.assert_close(out, relu, atol=1e-12, rtol=1e-10)
    gw, gb = torch.autograd.grad((out * torch.randn_like(out)).sum(), [w, b])
    assert gw.abs().sum() > 0 and gb.abs().sum() > 0


def test_t2r_wider_maps_start_as_signed_relu():
    phi = fm.make_feature_map("t2r", num_heads=1, head_dim=3, feature_dim=6)
    x = torch.randn(1, 1, 4, 3)
    torch.testing.assert_close(phi(x), torch.cat([torch.relu(x), torch.relu(-x)], -1))


def test_t2r_parameters_train_in_a_model_and_reload(tmp_path):
    model = hf_reshape.reshape(tiny_model("gpt2"), "t2r", feature_dim=16).train()
    names = [n for n, _ in model.named_parameters() if f".{STATE_ATTR}." in n]
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["feature_bias", "feature_weight"]
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n in names], lr=0.5)
    ids = ids_of(10)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in names)
    model.eval().save_pretrained(tmp_path)
    loaded = hf_reshape.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------- taylor ----------


@pytest.mark.parametrize("scaling", [8**-0.5, 0.3])
def test_taylor_features_dot_product_is_the_second_order_polynomial(scaling):
    d = 8
    q, k = torch.randn(2, 2, 3, 10, d, dtype=torch.float64)
    fq, fk = fm.taylor_features(q, scaling), fm.taylor_features(k, scaling)
    assert fq.shape[-1] == 1 + d + d * (d + 1) // 2 == fm.taylor_output_dim(d)  # the upper triangle, not D^2
    s = (q @ k.transpose(-1, -2)) * scaling
    torch.testing.assert_close(fq @ fk.transpose(-1, -2), 1 + s + s * s / 2, atol=1e-12, rtol=1e-12)


def test_taylor_hand_written_derivative_matches_autograd():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    fx = fm.taylor_unit(x)
    g = torch.randn_like(fx)
    want = torch.autograd.grad((fx * g).sum(), x)[0]
    torch.testing.assert_close(fm.taylor_unit_grad(x.detach(), fx.detach(), g), want, atol=1e-12, rtol=1e-12)
    assert fm.FEATURE_MAP_GRADS[fm.taylor_unit] is fm.taylor_unit_grad  # the sliced bidirectional kernel takes it


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_taylor_never_holds_the_features_of_the_whole_sequence(monkeypatch, causal):
    """1 + D + D(D+1)/2 features per token: the bidirectional kernel maps slices of rows (forward and backward), the
    causal one segments, so the largest tensor does not grow with T (here slices of 16 rows, segments of 32)."""
    b, h, d = 1, 2, 16
    f = fm.taylor_output_dim(d)
    monkeypatch.setattr(linear_ops, "BIDIRECTIONAL_CHUNK_BYTES", 1)  # the 16-row floor
    monkeypatch.setattr(linear_ops, "CAUSAL_SEGMENT_BYTES", 4 * b * h * f * 32)
    largest = []
    for t in (128, 256):
        q, k, v = qkv(b, t, h, d, dtype=torch.float32)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[0, :9] = False
        spy = _LargestTensor()
        with spy:
            out = fn.attention(q, k, v, "taylor", attention_mask=mask, is_causal=causal, chunk_size=8)
            if not causal:  # the causal backward keeps each segment's features, as autograd does
                torch.autograd.grad(out.sum(), [q, k, v])
        largest.append(spy.largest)
        ref = fn.reference(q.double(), k.double(), v.double(), "taylor", attention_mask=mask, is_causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert largest[0] == largest[1] < b * h * 256 * f / 2, largest  # half the features of T = 256


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("t", [1, 7, 16, 50], ids=lambda t: f"T{t}")
def test_taylor_inference_paths_match_the_reference_across_segments(monkeypatch, causal, t):
    """Without autograd ``taylor`` runs its own paths: feature-major slices of keys and queries in one reused buffer
    (bidirectional), the exact kernel inside causal segments and the features across them. Forced to 5-row
    slices and 4-row causal segments (T = 7, 50 cross them, unevenly; T = 16 lands on them), with no mask, right
    and left padding, holes and a fully padded row (zeros, never NaN): equal to the float64 reference, and a
    half-precision call agrees in float32."""
    from hf_reshape.variants import taylor

    b, h, d = 5, 2, 6
    monkeypatch.setattr(taylor, "SEGMENT_BYTES", 4 * b * h * fm.taylor_output_dim(d) * 5)
    monkeypatch.setattr(taylor, "CAUSAL_ROWS", 4)
    q, k, v = (x.detach() for x in qkv(b, t, h, d, seed=3))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t - max(1, t // 3):] = False
    mask[2, : max(1, t // 2)] = False
    mask[3] = False
    mask[4, ::3] = False
    for m in (None, mask):
        with torch.no_grad():
            fast = fn.attention(q, k, v, "taylor", attention_mask=m, is_causal=causal, scaling=0.4)
            half = fn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "taylor", attention_mask=m,
                                is_causal=causal, scaling=0.4)
        ref = fn.reference(q, k, v, "taylor", attention_mask=m, is_causal=causal, scaling=0.4)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.double(), ref, rtol=0.05, atol=0.05)
        if m is not None:
            assert torch.equal(fast[3], torch.zeros_like(fast[3]))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("t", [1, 7, 16, 50], ids=lambda t: f"T{t}")
def test_hedgehog_inference_maps_slices_and_matches_the_reference(monkeypatch, causal, t):
    """Without autograd ``hedgehog`` maps 8-row slices (chunks of 3 inside causal segments: ragged both ways) through
    :func:`hf_reshape.ops.linear.mapped_linear_inference`; trained-looking maps, padding, holes and a fully padded
    row (zeros): equal to the float64 reference; bf16 agrees; the path is the one taken."""
    from hf_reshape.variants import hedgehog

    b, h, d = 4, 2, 6
    monkeypatch.setattr(hedgehog, "SEGMENT_BYTES", 4 * b * h * 2 * d * 8)
    taken = []
    original = linear_ops.mapped_linear_inference
    monkeypatch.setattr(linear_ops, "mapped_linear_inference", lambda *a, **kw: taken.append(1) or original(*a, **kw))
    g = torch.Generator().manual_seed(5)
    q, k, v = (x.detach() for x in qkv(b, t, h, d, seed=7))
    state = {n: (x + 0.3 * torch.randn(x.shape, generator=g)).double().detach()
             for n, x in fn.init_state("hedgehog", num_heads=h, head_dim=d).items()}
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, : max(1, t // 2)] = False
    mask[2] = False
    mask[3, ::3] = False
    for m in (None, mask):
        kw = dict(attention_mask=m, is_causal=causal, chunk_size=3, **state)
        with torch.no_grad():
            fast = fn.attention(q, k, v, "hedgehog", **kw)
            half = fn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "hedgehog", attention_mask=m,
                                is_causal=causal, chunk_size=3, **{n: x.float() for n, x in state.items()})
        ref = fn.reference(q, k, v, "hedgehog", **kw)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(half.double(), ref, rtol=0.05, atol=0.05)
        if m is not None:
            assert torch.equal(fast[2], torch.zeros_like(fast[2]))
    assert len(taken) == 4


def test_taylor_inference_path_is_the_one_taken_without_autograd(monkeypatch):
    """The no-autograd call goes through the inference paths (not the chunked kernels), and a call with
    autograd does not: a spy on each path's entry."""
    from hf_reshape.variants import taylor

    calls = []
    for name in ("_bidirectional", "_causal"):
        original = getattr(taylor, name)
        monkeypatch.setattr(taylor, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    q, k, v = qkv(1, 9, 2, 4)
    with torch.no_grad():
        fn.attention(q, k, v, "taylor")
        fn.attention(q, k, v, "taylor", is_causal=True)
        fn.attention(q[..., -3:, :], k, v, "taylor", is_causal=True)  # queries after past keys: the chunked kernel
    fn.attention(q, k, v, "taylor", is_causal=True).sum().backward()
    assert calls == ["_bidirectional", "_causal"]


def test_taylor_follows_the_models_softmax_scale():
    """``scaling`` is the softmax scale it expands: at small scores it is softmax to third order."""
    q, k, v = (x.detach() * 0.2 for x in qkv(1, 16, 2, 8, seed=4))
    exact = naive.softmax_reference(q, k, v, scaling=0.5)
    assert (fn.attention(q, k, v, "taylor", scaling=0.5) - exact).abs().max() < 1e-4
    assert (fn.attention(q, k, v, "taylor", scaling=0.1) - exact).abs().max() > 1e-3


# ---------- generation: the O(1) recurrent state for every feature-map variant ----------

RECURRENT = [
    pytest.param("hedgehog", {"chunk_size": 4}, 16, id="hedgehog"),  # 2F, F = head dim 8
    pytest.param("performer", {"num_features": 12, "chunk_size": 4}, 12, id="performer"),
    pytest.param("cosformer", {"chunk_size": 4}, 16, id="cosformer"),
    pytest.param("t2r", {"chunk_size": 4, "feature_dim": 10}, 10, id="t2r"),
    pytest.param("taylor", {"chunk_size": 4}, 1 + 8 + 36, id="taylor"),
]


def _perturbed(model):
    """Move learned maps off their initial values (a trained model), so the tests see their own maths."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{STATE_ATTR}." in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return model


@pytest.mark.parametrize("method, params, features", RECURRENT)
def test_greedy_generation_with_the_recurrent_state_equals_recomputation(method, params, features):
    model = _perturbed(hf_reshape.reshape(tiny_model("gpt2"), method, **params))
    ids = ids_of(7)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out.cache, ReshapeCache)
    assert all(isinstance(layer, LinearRecurrentLayer) for layer in out.cache.layers)
    # sized from the feature map: S [B, H, F, D_v], z [B, H, F]
    assert {tuple(layer.state.shape) for layer in out.cache.layers} == {(1, 4, features, 8)}
    assert torch.equal(out.sequences, recompute_greedy(model, ids, 6))
    sizes = {cache_nbytes(model.generate(ids_of(n), max_new_tokens=2, return_dict_in_generate=True,
                                         **NO_EOS).cache) for n in (5, 30)}
    assert sizes == {2 * (4 * features * 8 + 4 * features) * 4}  # the prompt's length does not matter


@pytest.mark.parametrize("method, params, features", RECURRENT)
def test_recurrent_left_padded_batch_and_chunked_forwards_match(method, params, features):
    """Left padding shifts the absolute positions of a row's tokens (cosformer's offset) and chunks start from the
    state; both give what the whole sequence alone gives."""
    model = _perturbed(hf_reshape.reshape(tiny_model("gpt2"), method, **params))
    long, short = ids_of(7, seed=4)[0], ids_of(4, seed=5)[0]
    batch = torch.stack([long, torch.cat([torch.tensor([17, 23, 42]), short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, **NO_EOS)
    for row, alone_ids in enumerate([long, short]):
        alone = model.generate(alone_ids[None], max_new_tokens=5, do_sample=False, **NO_EOS)
        assert torch.equal(out[row, -5:], alone[0, -5:])
    ids = ids_of(13)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = ReshapeCache(model)
        parts = [model(input_ids=ids[:, s:e], cache=cache, use_cache=True).logits
                 for s, e in [(0, 6), (6, 11), (11, 12), (12, 13)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_the_recurrent_state_follows_a_scaled_softmax():
    """GPT-2's `scale_attn_by_inverse_layer_idx` changes the softmax scale per layer: the recurrent step gets the
    scale the attention call got (performer and taylor approximate exp(scale q . k))."""
    model = hf_reshape.reshape(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True), "taylor", chunk_size=4)
    ids = ids_of(6)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = ReshapeCache(model)
        parts = [model(input_ids=ids[:, s:e], cache=cache, use_cache=True).logits for s, e in [(0, 3), (3, 4), (4, 6)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
