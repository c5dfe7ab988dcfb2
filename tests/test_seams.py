"""Adding a variant is its file plus a registration: the benchmark's parameters and FLOP count, the demo's
parameters and the decode-cache layer are read from its ``VariantSpec``, never from tables keyed by name.

A throwaway feature-map variant (``phi(x) = [relu(x), 1]``, ``D + 1`` features) is registered for each test and
removed after it."""

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from conftest import recompute_greedy, tiny_model
from transformers.cache_utils import DynamicLayer

import hf_reshape
from hf_reshape import cli, demo
from hf_reshape.bench import op as op_bench
from hf_reshape.cache import _LAYER_KINDS, LinearRecurrentLayer, ReshapeCache
from hf_reshape.registry import CACHE_LAYERS, VariantParams, check_int, get_variant, register_variant, \
    unregister_variant
from hf_reshape.variants._kernelized import variant_functions

PROBE = "seam_probe"
BENCH, QUICK, DEMO = {"chunk_size": 32}, {"chunk_size": 8}, {"chunk_size": 2}


@dataclass
class ProbeParams(VariantParams):
    eps: float = 1e-6
    chunk_size: int = field(default=64)

    def validate(self):
        check_int("chunk_size", self.chunk_size)


def _phi(x):
    return torch.cat([F.relu(x), torch.ones_like(x[..., :1])], -1)


def probe_features(q, k, *, params, scaling, q_offset=0, k_offset=0):
    return _phi(q), _phi(k)


def probe_kernel(q, k, *, params, scaling, q_offset=0):
    return torch.matmul(F.relu(q), F.relu(k).transpose(-1, -2)) + 1.0


def probe_flops(*, t, head_dim, num_heads, batch, causal, params):
    return float(batch * num_heads * 4 * t * (head_dim + 1) * head_dim + params.chunk_size)  # chunk: params reach it


def register_probe(name=PROBE, **overrides):
    spec = dict(name=name, family="linear", params_cls=ProbeParams, **variant_functions(probe_features, probe_kernel),
                quadratic=False, small_params={"chunk_size": 4}, bench_params=BENCH, quick_params=QUICK,
                demo_params=DEMO, flops=probe_flops)
    return register_variant(**{**spec, **overrides})


@pytest.fixture
def probe():
    """Registers the throwaway variant (and any made by the test through ``make``), unregisters them after."""
    made = []

    def make(name=PROBE, **overrides):
        spec = register_probe(name, **overrides)
        made.append(name)
        return spec

    yield make
    for name in made:
        if name in hf_reshape.list_variants():
            unregister_variant(name)


def test_bench_takes_parameters_and_flops_from_the_spec(probe):
    probe()
    assert op_bench.variant_params(PROBE, 1024) == BENCH
    assert op_bench.variant_params(PROBE, 32, quick=True) == QUICK
    cfg = op_bench.OpConfig(batch=2, heads=3, head_dim=8)
    assert op_bench.forward_flops(PROBE, 100, cfg, causal=False) == 2 * 3 * 4 * 100 * 9 * 8 + 32
    assert op_bench.flops(PROBE, 100, cfg, True, "fwd+bwd") == 3 * (2 * 3 * 4 * 100 * 9 * 8 + 32)
    # every registered variant is a candidate of both forms it has
    assert PROBE in op_bench.candidate_names(op_bench.OpConfig(), "bidirectional")
    assert PROBE in op_bench.candidate_names(op_bench.OpConfig(), "causal")


def test_quick_params_default_to_small_params(probe):
    probe(quick_params=None)
    assert op_bench.variant_params(PROBE, 32, quick=True) == {"chunk_size": 4}


def test_every_builtin_variant_declares_bench_flops_and_cache():
    """Each built-in variant counts its FLOPs (a finite positive number at the bench's size), and runs with
    parameters its spec validates; the linearized ones keep an O(1) state in generation."""
    cfg = op_bench.OpConfig()
    for name in hf_reshape.list_variants():
        spec = get_variant(name)
        for quick in (False, True):
            params = op_bench.variant_params(name, 8192, quick)
            assert spec.params_cls(**params) is not None
        for causal in [c for c, ok in ((False, spec.bidirectional), (True, spec.causal)) if ok]:
            count = op_bench.forward_flops(name, 8192, cfg, causal)
            assert count is not None and 0 < count < float("inf"), name
        if spec.features is not None:
            assert spec.cache_layer == "linear_state", name
    assert get_variant("sliding_window").cache_layer == "window"
    assert get_variant("sink_window").cache_layer == "sink_window"
    assert get_variant("topk").cache_layer == "dynamic"
    assert set(_LAYER_KINDS) == set(CACHE_LAYERS)


def test_bench_shows_na_for_a_variant_without_flops_and_runs_every_variant(probe, tmp_path, monkeypatch):
    probe()
    probe("seam_probe_nocount", flops=None)
    assert op_bench.forward_flops("seam_probe_nocount", 64, op_bench.OpConfig(), False) is None
    monkeypatch.delenv("HF_RESHAPE_PEERS_PYTHON", raising=False)
    cli.main(["bench", "--quick", "--level", "op", "--no-memory", "--sizes", "16", "--modes", "fwd",
              "--variants", PROBE, "seam_probe_nocount", "--out", str(tmp_path), "--peers-python", ""])
    text = (tmp_path / "bench.json").read_text()
    assert "NaN" not in text
    rows = json.loads(text)["op"]["rows"]
    got = {(r["candidate"], r["form"]): r for r in rows}
    for form in ("bidirectional", "causal"):
        assert got[(PROBE, form)]["params"] == QUICK and got[(PROBE, form)]["gflops_per_s"] > 0
        assert got[("seam_probe_nocount", form)]["flops"] is None
        assert got[("seam_probe_nocount", form)]["gflops_per_s"] is None
    md = (tmp_path / "bench.md").read_text()
    gflops = md[md.index("### Achieved GFLOP/s"):]
    assert "| bidirectional | fwd | `seam_probe_nocount` | n/a |" in gflops
    assert "nan" not in gflops.lower().replace("nocount", "")


def test_demo_takes_parameters_from_the_spec(probe, monkeypatch):
    probe()
    assert demo.demo_params(PROBE) == DEMO
    seen = []
    real = hf_reshape.reshape

    def spy(model, method, **params):
        seen.append((method, params))
        return real(model, method, **params)

    monkeypatch.setattr(hf_reshape, "reshape", spy)
    results = demo.run(n=2, packed_length=16, packed_batch=1, repeats=1, variants=[PROBE])
    assert (PROBE, DEMO) in seen
    row = next(r for r in results["rows"] if r["variant"] == PROBE)
    assert row["params"] == DEMO and 0 < row["token_cos"] < 1


def test_a_feature_map_variant_without_a_cache_declaration_gets_the_linear_state(probe):
    """No ``cache_layer`` given: a variant with ``features`` gets the O(1) running sums, sized from its feature map
    (``D + 1`` features here), never transformers' growing DynamicLayer; generation equals recomputation."""
    spec = probe()
    assert spec.cache_layer == "linear_state"
    model = hf_reshape.reshape(tiny_model("gpt2"), PROBE, chunk_size=4)
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         bad_words_ids=[[0]])
    assert isinstance(out.cache, ReshapeCache)
    assert all(type(layer) is LinearRecurrentLayer for layer in out.cache.layers)
    head_dim = model.config.n_embd // model.config.n_head
    assert out.cache.layers[0].state.shape == (1, model.config.n_head, head_dim + 1, head_dim)
    assert torch.equal(out.sequences, recompute_greedy(model, ids, 5))


def test_a_declared_cache_layer_is_used(probe):
    """``cache_layer="dynamic"`` keeps every key; a callable builds the variant's own layer."""
    probe(cache_layer="dynamic")
    model = hf_reshape.reshape(tiny_model("gpt2"), PROBE)
    assert not ReshapeCache.applies_to(model)
    assert all(type(layer) is DynamicLayer for layer in ReshapeCache(model).layers)
    unregister_variant(PROBE)

    built = []

    class MyLayer(DynamicLayer):
        pass

    def make_layer(module):
        built.append(module)
        return MyLayer()

    probe(cache_layer=make_layer)
    hf_reshape.reshape(model, PROBE)
    assert ReshapeCache.applies_to(model)
    assert all(type(layer) is MyLayer for layer in ReshapeCache(model).layers) and len(built) >= 2

    unregister_variant(PROBE)
    probe(cache_layer=lambda module: "not a layer")
    hf_reshape.reshape(model, PROBE)
    with pytest.raises(TypeError, match="CacheLayerMixin"):
        ReshapeCache(model)


@pytest.mark.parametrize("overrides, message", [
    ({"cache_layer": "ring"}, "cache_layer must be one of"),
    ({"cache_layer": "linear_state", "features": None}, "no `features`"),
    ({"cache_layer": "window"}, "no `window` parameter"),
    ({"bench_params": {"chunk": 3}}, r"bench_params .* unknown parameter\(s\) \['chunk'\]"),
    ({"demo_params": [1]}, "demo_params must be a dict"),
    ({"flops": 12.0}, "flops must be a callable"),
])
def test_malformed_declarations_are_refused_at_registration(probe, overrides, message):
    with pytest.raises(ValueError, match=message):
        probe(**overrides)
    assert PROBE not in hf_reshape.list_variants()  # a refused registration registers nothing


def test_init_state_without_layer_index_still_works(probe):
    """An ``init_state`` written before ``layer_index`` existed (no such keyword, no ``**kwargs``) is called without
    it."""
    calls = []

    def init_state(params, *, num_heads, head_dim):
        calls.append((num_heads, head_dim))
        return {}

    probe(init_state=init_state)
    hf_reshape.reshape(tiny_model("gpt2"), PROBE)
    assert calls == [(4, 8), (4, 8)]
    assert hf_reshape.functional.init_state(PROBE, num_heads=2, head_dim=3, layer_index=5) == {}


# ---------- performer: a projection per layer; its segmented fast path ----------


def _projections(model):
    from hf_reshape.integration import ReshapedAttention

    return [m.projection for m in model.modules() if isinstance(m, ReshapedAttention)]


def test_performer_layers_draw_their_own_projection_deterministically(tmp_path):
    """Each layer's projection is its own draw from (seed, layer index), the same on every reshape, saved and
    reloaded exactly; a redraw in training keeps the layers apart and is the same on a twin model."""
    model = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, seed=7)
    first = _projections(model)
    assert len(first) == 2 and not torch.equal(first[0], first[1])
    for i, p in enumerate(first):
        expected = hf_reshape.functional.init_state("performer", num_heads=4, head_dim=8, num_features=16, seed=7,
                                                    layer_index=i)["projection"]
        assert torch.equal(p, expected)
    again = _projections(hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = _projections(hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, seed=8))
    assert not any(torch.equal(a, b) for a, b in zip(first, other_seed))
    model.save_pretrained(tmp_path)
    loaded = _projections(hf_reshape.from_pretrained(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first, loaded))

    inputs = {"input_ids": torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(1))}
    runs = []
    for _ in range(2):
        m = hf_reshape.reshape(tiny_model("bert"), "performer", num_features=16, seed=7, redraw_interval=1).train()
        with torch.no_grad():
            m(**inputs)
        runs.append([p.clone() for p in _projections(m)])
    redrawn, twin = runs
    assert not torch.equal(redrawn[0], redrawn[1])  # layers still apart after a redraw
    assert all(not torch.equal(a, b) for a, b in zip(redrawn, first))
    assert all(torch.equal(a, b) for a, b in zip(redrawn, twin))  # deterministic


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_performer_segmented_fast_path_matches_the_reference(causal, monkeypatch):
    """The fast path maps features segment by segment (forced to 8 rows here, over 50 tokens with left padding and
    a padded row): outputs and gradients equal the materialised reference."""
    from hf_reshape.variants import performer

    monkeypatch.setattr(performer, "SEGMENT_BYTES", 4 * 3 * 3 * 16 * 8)  # b = h = 3, m = 16: 8 rows, 2 chunks
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 3, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, :13] = False
    mask[2] = False  # no real key at all: zeros, never NaN
    state = {n: t.double() for n, t in hf_reshape.functional.init_state(
        "performer", num_heads=3, head_dim=8, num_features=16).items()}
    call = dict(attention_mask=mask, is_causal=causal, num_features=16, chunk_size=4, **state)
    with torch.no_grad():
        fast = hf_reshape.functional.attention(q, k, v, "performer", **call)
    ref = hf_reshape.functional.reference(q, k, v, "performer", **call)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(fast[2], torch.zeros_like(fast[2]))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = hf_reshape.functional.attention(*leaves, "performer", **call)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    refs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    expected = torch.autograd.grad((hf_reshape.functional.reference(*refs, "performer", **call) * w).sum(), refs)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_taylor_decode_state_is_sized_from_its_feature_map():
    """The recurrent state of a ``taylor`` layer holds ``1 + D + D(D+1)/2`` feature rows (the upper triangle), not
    ``1 + D + D^2``."""
    from hf_reshape.ops.feature_maps import taylor_output_dim

    model = hf_reshape.reshape(tiny_model("gpt2"), "taylor", chunk_size=4)
    cache = ReshapeCache(model)
    model(input_ids=torch.randint(1, 101, (1, 5)), cache=cache, use_cache=True)
    d = model.config.n_embd // model.config.n_head
    assert taylor_output_dim(d) == 1 + d + d * (d + 1) // 2
    assert all(layer.state.shape == (1, model.config.n_head, taylor_output_dim(d), d) for layer in cache.layers)
