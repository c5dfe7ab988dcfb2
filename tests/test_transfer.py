"""Attention transfer (hf_reshape.transfer) and the observer seam it stands on, on tiny BERT, GPT-2 and ViT."""

import pytest
import torch

import hf_reshape
from hf_reshape import observe
from hf_reshape.attention_transfer import AttentionTransferLoss

from conftest import main_output, tiny_inputs, tiny_model

# a variant with parameters of its own for each form: Linformer (bidirectional), Hedgehog (both)
TRANSFERABLE = [("bert", "linformer", {"proj_len": 4, "max_length": 12}), ("vit", "linformer", {"proj_len": 4}),
                ("gpt2", "hedgehog", {}), ("bert", "hedgehog", {})]


def _rows(arch, n=16, seed=3):
    inputs = tiny_inputs(arch, batch=n, seed=seed)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(n)]
    if arch != "vit":
        for r in rows:
            r["attention_mask"] = torch.ones_like(r["input_ids"])
    return rows


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_observer_sees_every_layer_and_can_replace_outputs(arch):
    """An observer that hands back exact softmax makes a reshaped model compute the stock model's outputs: the seam
    sees each layer's real queries/keys/values and its replacement is what the model continues with."""
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        stock = main_output(arch, model(**inputs))
        hf_reshape.reshape(model, "sliding_window", window=1)
        approx = main_output(arch, model(**inputs))
        calls = []

        def exact(call):
            calls.append(call)
            from hf_reshape.integration import exact_attention

            return exact_attention(call.query, call.key, call.value, call.mask, call.causal, call.scaling)

        with observe.observe(exact):
            forced = main_output(arch, model(**inputs))
        after = main_output(arch, model(**inputs))
    assert not torch.allclose(approx, stock, atol=1e-4)
    torch.testing.assert_close(forced, stock, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 and all(c.holder is not None and c.holder.method == "sliding_window" for c in calls)
    assert calls[0].causal == (arch == "gpt2")
    torch.testing.assert_close(after, approx)  # the observer is gone after the with block


@pytest.mark.parametrize("arch,name,params", TRANSFERABLE, ids=[f"{a}-{n}" for a, n, _ in TRANSFERABLE])
def test_transfer_trains_only_the_attention_and_lowers_its_loss(arch, name, params):
    model = tiny_model(arch)
    hf_reshape.reshape(model, name, **params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = hf_reshape.transfer(model, _rows(arch) * 4, steps=24, lr=2e-2, batch_size=8, progress=None)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed == set(hf_reshape.attention_parameters(model))
    assert report["final_loss"] < report["initial_loss"]
    assert report["trainable_params"] == sum(p.numel() for p in hf_reshape.attention_parameters(model).values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored


def test_transfer_refuses_variants_without_parameters_and_changes_nothing():
    model = tiny_model("gpt2")
    with pytest.raises(hf_reshape.NothingToTransferError, match="not reshaped"):
        hf_reshape.transfer(model, _rows("gpt2"), steps=2, progress=None)
    hf_reshape.reshape(model, "linear")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(hf_reshape.NothingToTransferError, match="'linear' has no parameters of its own"):
        hf_reshape.transfer(model, _rows("gpt2"), steps=2, progress=None)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_separate_teacher_gives_the_same_loss_as_the_model_own_softmax():
    teacher = tiny_model("bert")
    student = tiny_model("bert")  # same seed: same weights
    hf_reshape.reshape(student, "hedgehog")
    batch = tiny_inputs("bert", batch=4)
    from hf_reshape.attention_transfer import _record_teacher

    recorded = _record_teacher(teacher, batch)
    assert teacher.config._attn_implementation != hf_reshape.ATTN_IMPLEMENTATION  # put back
    own, separate = AttentionTransferLoss(), AttentionTransferLoss(teacher_outputs=recorded)
    for collector in (own, separate):
        with torch.no_grad(), observe.observe(collector):
            student(**batch)
    torch.testing.assert_close(own.loss, separate.loss)
    assert own.loss > 0


def test_hedgehog_transfer_uses_the_attention_distribution_loss():
    model = tiny_model("bert")
    hf_reshape.reshape(model, "hedgehog")
    collector = AttentionTransferLoss(kl_weight=1.0)
    with torch.no_grad(), observe.observe(collector):
        model(**tiny_inputs("bert"))
    assert len(collector.mse_terms) == 2
    assert len(collector.kl_terms) == 2 and all(t >= 0 for t in collector.kl_terms)


def test_linformer_transfer_matches_outputs_only():
    """Linformer's weights are over projected keys, not the keys: no distribution term, even at proj_len == T."""
    model = tiny_model("bert")
    hf_reshape.reshape(model, "linformer", proj_len=12, max_length=12)
    collector = AttentionTransferLoss(kl_weight=1.0)
    with torch.no_grad(), observe.observe(collector):
        model(**tiny_inputs("bert"))
    assert len(collector.mse_terms) == 2 and collector.kl_terms == []
