"""Wrappers users hold around a transformers model: a PEFT ``PeftModel`` (LoRA), an ``EncoderDecoderModel`` and a
model already ``torch.compile``d. Each is reshaped through the transformers model inside it; tiny models built in
code."""

import copy

import pytest
import torch
import transformers as tf

import hf_reshape
from hf_reshape.architectures import attention_modules
from hf_reshape.integration import STATE_ATTR, ReshapedAttention

peft = pytest.importorskip("peft")

TEXT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(layers=2):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**TEXT, "num_hidden_layers": layers}, num_key_value_heads=2, **IDS)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # scores of order 1, where variants differ from softmax
        for name, p in model.named_parameters():
            if "self_attn" in name:
                p.mul_(5.0)
    return model


def _ids(batch=2, n=10, seed=1):
    return torch.randint(3, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


def _lora(model, seed=3):
    torch.manual_seed(seed)  # init_lora_weights=False: B is random too, so the adapters change the output
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))


def _holders(model):
    return [m for m in model.modules() if isinstance(m, ReshapedAttention)]


# ---------- PEFT ----------


@pytest.mark.parametrize("order", ["reshape-then-wrap", "wrap-then-reshape"])
@pytest.mark.parametrize("variant,params", [("linear", {}), ("sliding_window", {"window": 3})])
def test_peft_forward_equals_the_reshaped_base_with_the_adapters_folded_in(order, variant, params):
    """Reference built without PEFT's code path: the base's q/v weights plus B A * alpha / r, then reshaped."""
    stock = _llama()
    if order == "reshape-then-wrap":
        wrapped = _lora(hf_reshape.reshape(copy.deepcopy(stock), variant, **params))
    else:
        wrapped = hf_reshape.reshape(_lora(copy.deepcopy(stock)), variant, **params)
    assert hf_reshape.get_reshape_config(wrapped).method == variant
    reference = copy.deepcopy(stock)
    with torch.no_grad():
        for name, module in wrapped.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                target = reference.get_submodule(name.split("base_model.model.", 1)[1])
                target.weight.add_(delta)
    hf_reshape.reshape(reference, variant, **params)
    ids = _ids()
    with torch.no_grad():
        got, want = wrapped(input_ids=ids).logits, reference(input_ids=ids).logits
        base = hf_reshape.reshape(copy.deepcopy(stock), variant, **params)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the adapters are part of it
    merged = wrapped.merge_and_unload()  # PEFT's merge keeps the variant on the base model
    assert hf_reshape.get_reshape_config(merged).method == variant
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=2e-5, rtol=1e-4)


def test_peft_adapters_train_and_the_variant_state_stays_frozen_in_either_order():
    """PEFT trains adapters only; a variant installed inside the PeftModel (hedgehog: learned maps) is frozen as
    base weights are, like one installed before wrapping, so `PeftModel.save_pretrained` loses nothing trained."""
    first = _lora(hf_reshape.reshape(_llama(), "hedgehog"))
    second = hf_reshape.reshape(_lora(_llama()), "hedgehog")
    for wrapped in (first, second):
        assert _holders(wrapped) and all(not p.requires_grad for h in _holders(wrapped) for p in h.parameters())
        trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
    wrapped = second.train()
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    ids = _ids()
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # through the reshaped attention
    opt.step()
    after = dict(wrapped.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in grads)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in grads)


def test_peft_save_and_reload_of_base_and_adapters(tmp_path):
    """Two routes back: the reshaped base saved by hf_reshape plus the adapter folder, or a fresh base reshaped with
    the ReshapeConfig saved next to the adapter. An adapter folder given to hf_reshape.from_pretrained says which."""
    stock = _llama()
    base = hf_reshape.reshape(copy.deepcopy(stock), "performer", num_features=16)
    base.save_pretrained(tmp_path / "base")
    wrapped = _lora(base).train()
    ids = _ids()
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    wrapped.eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    hf_reshape.get_reshape_config(wrapped).save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
    again = peft.PeftModel.from_pretrained(hf_reshape.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    fresh = hf_reshape.reshape(copy.deepcopy(stock), hf_reshape.ReshapeConfig.from_pretrained(tmp_path / "adapter"))
    fresh = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)
        assert torch.equal(fresh(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        hf_reshape.from_pretrained(tmp_path / "adapter")


def test_peft_generate_uses_the_bounded_cache_and_equals_recomputation():
    wrapped = hf_reshape.reshape(_lora(_llama()), "linear")
    ids = _ids(batch=1, n=6)
    out = wrapped.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True)
    assert isinstance(out.cache, hf_reshape.ReshapeCache)
    plain = wrapped.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, plain)
    hf_reshape.unreshape(wrapped)
    assert not _holders(wrapped) and hf_reshape.get_reshape_config(wrapped) is None


# ---------- EncoderDecoderModel ----------


def _encoder_decoder():
    torch.manual_seed(0)
    bert = dict(TEXT, pad_token_id=0)
    model = tf.EncoderDecoderModel(
        encoder=tf.BertModel(tf.BertConfig(**bert), add_pooling_layer=False),
        decoder=tf.BertLMHeadModel(tf.BertConfig(**bert, is_decoder=True, add_cross_attention=True)),
    ).eval()
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = 1, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attention.self." in name or ".crossattention.self." in name:
                p.mul_(5.0)
    return model


def test_encoder_decoder_reshapes_both_self_attentions_and_leaves_cross_attention(tmp_path):
    """transformers' EncoderDecoderModel re-points its towers' configs, so `set_attn_implementation` misses the
    config its attention modules hold: reshape sets it there too (before, the first forward raised)."""
    stock = _encoder_decoder()
    ids, dec = _ids(n=9), _ids(n=5, seed=2)
    with torch.no_grad():
        want = stock(input_ids=ids, decoder_input_ids=dec).logits
    model = copy.deepcopy(stock)
    stale = model.encoder.encoder.layer[0].attention.self.config  # the encoder's first config, not model.encoder.config
    assert stale is not model.encoder.config
    hf_reshape.reshape(model, "sliding_window", window=64)  # degenerate: every key within the window
    assert stale._attn_implementation == "sdpa"  # reshape wrote into the model's own copy of it
    found = attention_modules(model)
    reshaped = {f.name for f in found if isinstance(getattr(f.module, STATE_ATTR, None), ReshapedAttention)}
    assert reshaped == {f.name for f in found if not f.cross}
    assert {f.causal for f in found if f.name in reshaped and f.name.startswith("decoder.")} == {True}
    assert {f.causal for f in found if f.name in reshaped and f.name.startswith("encoder.")} == {False}
    assert all(f.cross and f.name.startswith("decoder.") for f in found if f.name not in reshaped)
    assert len(reshaped) == 4 and len(found) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-5, rtol=1e-5)
    hf_reshape.reshape(model, "linear")
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.isfinite(got).all() and (got - want).abs().max() > 1e-3
    out = model.generate(input_ids=ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(input_ids=ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                           use_cache=False))
    model.save_pretrained(tmp_path)
    again = hf_reshape.from_pretrained(tmp_path).eval()
    assert type(again) is tf.EncoderDecoderModel
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=dec).logits, got)
    hf_reshape.unreshape(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec).logits, want)
    # the stock model (a copy of which was reshaped) is untouched, and the bidirectional-only variant is refused
    # for the causal decoder with the layer named
    with pytest.raises(hf_reshape.NotCausalError, match="decoder"):
        hf_reshape.reshape(model, "linformer")


# ---------- torch.compile ----------


def test_reshaping_a_compiled_model_runs_the_variant_through_the_compiled_wrapper():
    """`torch.compile` returns an OptimizedModule whose `_orig_mod` is the model: reshape works on it, and dynamo's
    guards on the attention implementation make the wrapper recompile, so it runs the variant (then, unreshaped,
    exact attention again). The `eager` backend keeps the test short; the guards are dynamo's, whatever the
    backend."""
    torch._dynamo.reset()
    stock = _llama(layers=1)
    ids = _ids(batch=1, n=8)
    with torch.no_grad():
        want_stock = stock(input_ids=ids).logits
        want = hf_reshape.reshape(copy.deepcopy(stock), "sliding_window", window=2)(input_ids=ids).logits
    compiled = torch.compile(copy.deepcopy(stock), backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, want_stock)  # compiled, and run, before the reshape
        assert hf_reshape.reshape(compiled, "sliding_window", window=2) is compiled
        assert hf_reshape.get_reshape_config(compiled).method == "sliding_window"
        assert _holders(compiled._orig_mod)
        got = compiled(input_ids=ids).logits
        assert torch.equal(got, want) and not torch.equal(got, want_stock)
        hf_reshape.unreshape(compiled)
        assert torch.equal(compiled(input_ids=ids).logits, want_stock)
    torch._dynamo.reset()
