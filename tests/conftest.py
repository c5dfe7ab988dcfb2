import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import hf_reshape

VARIANTS = hf_reshape.list_variants()
ARCHS = ("bert", "gpt2", "vit")
SEQ = 12  # tokens for text models; ViT below has 16 patches + CLS = 17


def tiny_model(arch: str, dtype=torch.float32, cls: str | None = None, **overrides):
    """A 2-layer, 4-head, hidden-32 model of each architecture, built in code, deterministic, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=64, **overrides)
        model = getattr(tf, cls or "BertModel")(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides)
        model = getattr(tf, cls or "GPT2LMHeadModel")(config)
    elif arch == "vit":
        config = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, num_labels=3, **overrides)
        model = getattr(tf, cls or "ViTModel")(config)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def tiny_inputs(arch: str, batch: int = 2, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype)}
    return {"input_ids": torch.randint(1, 101, (batch, SEQ), generator=g)}


def main_output(arch: str, out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def recompute_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache, one full forward per new token (token 0 never chosen): what cached generation
    must equal."""
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        logits[:, 0] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


def is_causal_arch(arch: str) -> bool:
    return arch == "gpt2"


def fits(name: str, arch: str) -> bool:
    spec = hf_reshape.get_variant(name)
    return spec.causal if is_causal_arch(arch) else spec.bidirectional


def small_params(name: str) -> dict:
    return dict(hf_reshape.get_variant(name).small_params)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
