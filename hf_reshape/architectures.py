"""One row per supported architecture: how to find its self-attention modules and how long it can read.

This and :mod:`hf_reshape.integration` are the only places that know transformers' model internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    self_attention_classes: tuple[str, ...]
    max_positions: Callable[[object], int]
    modality: str


@dataclass(frozen=True)
class ModelFacts:
    """What a variant may need to know about the model at reshape time."""

    max_positions: int
    num_heads: int
    head_dim: int


def _vit_positions(config) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", ("BertSelfAttention",), lambda c: c.max_position_embeddings, "text"),
    "gpt2": Architecture("gpt2", ("GPT2Attention",), lambda c: c.n_positions, "text"),
    "vit": Architecture("vit", ("ViTAttention", "ViTSelfAttention"), _vit_positions, "image"),
}


def get_architecture(model: nn.Module) -> Architecture:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); supported model types: "
            f"{sorted(ARCHITECTURES)} (BertModel/BertFor*, GPT2Model/GPT2LMHeadModel/GPT2For*, ViTModel/ViTFor*)"
        )
    return ARCHITECTURES[model_type]


def self_attention_modules(model: nn.Module, arch: Architecture) -> list[tuple[int, str, nn.Module]]:
    """``(layer index, qualified name, module)`` of every self-attention module; cross-attention is skipped."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ not in arch.self_attention_classes or getattr(module, "is_cross_attention", False):
            continue
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            match = re.search(r"\.(\d+)\.", f".{name}.")
            layer = int(match.group(1)) if match else 0
        found.append((int(layer), name, module))
    if not found:
        raise UnsupportedModelError(f"found no self-attention module ({arch.self_attention_classes}) in {type(model).__name__}")
    return found


def model_facts(model: nn.Module, arch: Architecture) -> ModelFacts:
    config = model.config
    heads = config.num_attention_heads
    return ModelFacts(max_positions=arch.max_positions(config), num_heads=heads, head_dim=config.hidden_size // heads)
