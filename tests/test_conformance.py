"""Model level: every registered variant x {bert, gpt2, vit} on tiny models built in code."""

import json

import pytest
import torch

import hf_reshape
from hf_reshape.integration import STATE_ATTR

from conftest import ARCHS, SEQ, VARIANTS, fits, main_output, small_params, tiny_inputs, tiny_model

CASES = [(n, a) for n in VARIANTS for a in ARCHS if fits(n, a)]
IDS = [f"{n}-{a}" for n, a in CASES]
REFUSED = [(n, a) for n in VARIANTS for a in ARCHS if not fits(n, a)]


def reshaped(name, arch, dtype=torch.float32, **extra):
    model = tiny_model(arch, dtype)
    return hf_reshape.reshape(model, name, **{**small_params(name), **extra})


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_forward_shapes_and_finiteness(name, arch):
    # weights 10x the default init: attention scores of order 1, where every variant differs from softmax (at the
    # default 0.02 they are ~0.01, where `taylor`'s 1 + s + s^2/2 equals exp(s) to 1e-7)
    model = tiny_model(arch, initializer_range=0.2)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        stock = main_output(arch, model(**inputs))
        hf_reshape.reshape(model, name, **small_params(name))
        out = main_output(arch, model(**inputs))
    assert model.config._attn_implementation == hf_reshape.ATTN_IMPLEMENTATION
    assert out.shape == stock.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-6), "reshaping changed nothing: the variant did not run"


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(name, arch):
    model = reshaped(name, arch).train()
    model.config.hidden_dropout_prob = 0.0
    out = model(**tiny_inputs(arch))
    loss = sum(v.float().pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
    for n, p in model.named_parameters():
        if f".{STATE_ATTR}." in n:
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name,arch", [c for c in CASES if hf_reshape.get_variant(c[0]).degenerate], ids=[
    i for c, i in zip(CASES, IDS) if hf_reshape.get_variant(c[0]).degenerate])
def test_degenerate_setting_matches_stock_model(name, arch):
    model = tiny_model(arch, torch.float64)
    inputs = tiny_inputs(arch, dtype=torch.float64)
    t = 17 if arch == "vit" else SEQ
    with torch.no_grad():
        stock = main_output(arch, model(**inputs))
        hf_reshape.reshape(model, name, **hf_reshape.get_variant(name).degenerate(t))
        out = main_output(arch, model(**inputs))
    torch.testing.assert_close(out, stock, atol=1e-9, rtol=1e-7)


TEXT = [c for c in CASES if c[1] != "vit"]
TEXT_IDS = [f"{n}-{a}" for n, a in TEXT]


@pytest.mark.parametrize("name,arch", TEXT, ids=TEXT_IDS)
def test_padding_invariance_and_empty_rows(name, arch):
    """Sequence alone == same sequence padded in a batch (real tokens); a fully padded row stays finite."""
    model = reshaped(name, arch, torch.float64)
    ids = tiny_inputs(arch, batch=3)["input_ids"]
    n = 7
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[0, n:] = 0
    mask[2] = 0
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        alone = model(input_ids=ids[:1, :n], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(batch[0, :n], alone[0], atol=1e-9, rtol=1e-7)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("name", [n for n, a in CASES if a == "gpt2"])
def test_gpt2_left_padding(name):
    model = reshaped(name, "gpt2", torch.float64)
    ids = tiny_inputs("gpt2", batch=2)["input_ids"]
    n = 8
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, : SEQ - n] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone = model(input_ids=ids[:1, SEQ - n :]).logits
    torch.testing.assert_close(batch[0, SEQ - n :], alone[0], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", [n for n, a in CASES if a == "gpt2"])
def test_gpt2_causality(name):
    model = reshaped(name, "gpt2", torch.float64)
    ids = tiny_inputs("gpt2", batch=1)["input_ids"]
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 13) % 100 + 1
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[0, :6], b[0, :6], atol=1e-10, rtol=0)
    assert not torch.allclose(a[0, 6:], b[0, 6:])


@pytest.mark.parametrize("name,arch", REFUSED, ids=[f"{n}-{a}" for n, a in REFUSED])
def test_bidirectional_only_variant_refused_on_causal_model(name, arch):
    model = tiny_model(arch)
    with pytest.raises(hf_reshape.NotCausalError, match="not causal"):
        hf_reshape.reshape(model, name)
    assert model.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_save_and_reload_is_exact(name, arch, tmp_path):
    model = reshaped(name, arch)
    with torch.no_grad():  # stand-in for training: move the variant's learned state off its initial value
        for n, p in model.named_parameters():
            if f".{STATE_ATTR}." in n:
                p.add_(torch.randn_like(p) * 0.1)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        before = main_output(arch, model(**inputs))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["hf_reshape"]
    assert record["method"] == name
    loaded = hf_reshape.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        after = main_output(arch, loaded.eval()(**inputs))
    assert torch.equal(before, after)
    assert hf_reshape.get_reshape_config(loaded) == hf_reshape.get_reshape_config(model)


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_unreshape_restores_exact_attention(name, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        stock = main_output(arch, model(**inputs))
        hf_reshape.reshape(model, name, **small_params(name))
        hf_reshape.unreshape(model)
        back = main_output(arch, model(**inputs))
    assert torch.equal(stock, back)
    assert not any(n for n, _ in model.named_modules() if n.endswith(STATE_ATTR))
    assert not hasattr(model.config, "hf_reshape")


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_bf16_runs_finite(name, arch):
    model = reshaped(name, arch, torch.bfloat16)
    inputs = tiny_inputs(arch, dtype=torch.bfloat16)
    with torch.no_grad():
        out = main_output(arch, model(**inputs))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
