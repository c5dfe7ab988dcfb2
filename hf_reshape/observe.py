"""The observer seam of the attention dispatch: see (and optionally replace) every attention call that goes
through hf_reshape's attention function, without copying model code.

Attention transfer (:mod:`hf_reshape.attention_transfer`) and diagnostics use it: inside ``with observe(fn):`` every call
of :func:`hf_reshape.integration.hf_reshape_attention_forward` builds an :class:`AttentionCall` (the layer's
queries, keys and values *after* the model's own projections and position embeddings, its key-padding mask, its
form and its output) and hands it to ``fn``. If ``fn`` returns a tensor, the model continues with that tensor in
place of the layer's output: attention transfer returns the exact softmax output there, so every layer of the
student sees the teacher's hidden states (layer-by-layer transfer, as in LoLCATs, Zhang et al. 2024, where each
converted layer is trained on the frozen teacher's inputs).

Observers live in a :class:`contextvars.ContextVar`, so two threads (or two generations) never see each
other's observers. Modules that carry no reshaped state (exact attention through our function: layers left out,
or a teacher model switched to ``attn_implementation="hf_reshape"``) are observed too, with ``holder=None``.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

_OBSERVERS: ContextVar[tuple] = ContextVar("hf_reshape_observers", default=())


@dataclass
class AttentionCall:
    """One attention call as the dispatch saw it. Tensors are ``[B, H, T, D]``; ``output`` is ``[B, H, T_q, D_v]``
    (before the model's output projection); ``mask`` is the 2D key-padding mask (True = real token) or None."""

    module: nn.Module
    holder: nn.Module | None  # the ReshapedAttention state holder, None for exact attention
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scaling: float
    output: torch.Tensor


def active() -> bool:
    """Whether any observer is installed in this context (the dispatch's fast check)."""
    return bool(_OBSERVERS.get())


def notify(call: AttentionCall) -> torch.Tensor:
    """Hand ``call`` to every observer, innermost last; return the output the model continues with."""
    out = call.output
    for fn in _OBSERVERS.get():
        replaced = fn(call)
        if replaced is not None:
            if replaced.shape != out.shape:
                raise ValueError(f"an observer replaced an attention output {tuple(out.shape)} by {tuple(replaced.shape)}")
            out = replaced
            call.output = out
    return out


@contextlib.contextmanager
def observe(fn: Callable[[AttentionCall], torch.Tensor | None]) -> Iterator[None]:
    """Install ``fn`` for the calls made inside the ``with`` block (in this thread/context only)."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (fn,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)
