"""Helpers shared by the fast paths and the references: masks, guarded softmax, ranks of real tokens.

Conventions used everywhere in :mod:`hf_reshape.ops`:

* ``q`` is ``[B, H, T_q, D]``, ``k`` is ``[B, H, T_k, D]``, ``v`` is ``[B, H, T_k, D_v]``.
* ``mask`` is ``None`` or a bool key-padding mask ``[B, T_k]`` (True = real token).
* Under ``causal=True`` the queries are the *last* ``T_q`` positions of the key sequence (the layout of a
  decoder with a KV cache), so query ``i`` sits at absolute position ``i + T_k - T_q``.
* A query that may attend to no key at all returns zeros, never NaN.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast half-precision tensors to float32 for numerically delicate maths (pinv, SVD, running sums)."""
    return tuple(t.float() if t.dtype in LOW_PRECISION else t for t in tensors)


def causal_offset(t_q: int, t_k: int) -> int:
    if t_q > t_k:
        raise ValueError(f"causal attention needs T_q <= T_k (queries are the last T_q keys); got T_q={t_q}, T_k={t_k}")
    return t_k - t_q


def allowed_mask(
    mask: torch.Tensor | None, t_q: int, t_k: int, causal: bool, device: torch.device, window: int | None = None
) -> torch.Tensor | None:
    """Dense ``[B or 1, 1, T_q, T_k]`` bool matrix of allowed (query, key) pairs; ``None`` means all allowed.

    Only the references and the inherently quadratic variants call this.
    """
    allowed = None
    if causal or window is not None:
        offset = causal_offset(t_q, t_k) if causal else 0
        i = torch.arange(t_q, device=device)[:, None] + offset
        j = torch.arange(t_k, device=device)[None, :]
        rel = i - j
        if causal:
            allowed = rel >= 0
            if window is not None:
                allowed = allowed & (rel <= window)
        else:
            allowed = rel.abs() <= window
        allowed = allowed[None, None]
    if mask is not None:
        key_ok = mask[:, None, None, :].bool()
        allowed = key_ok if allowed is None else allowed & key_ok
    return allowed


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``allowed`` entries; rows with no allowed entry become all zeros."""
    if allowed is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=dim, keepdim=True)
    # a fully masked row has max -inf: shift by 0 instead so exp() gives exact zeros, not NaN
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=dim, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def empty_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *state: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """Zeros ``[B, H, T_q, D_v]`` for a call with nothing to attend (an empty batch, no heads, no queries or no
    keys), as torch SDPA returns an empty result for empty inputs. The result stays on the inputs' autograd
    graph, so a backward through it gives (empty or zero) gradients rather than an error."""
    if causal:
        causal_offset(q.shape[-2], k.shape[-2])  # the layout check every causal call makes
    out = v.new_zeros(*q.shape[:-1], v.shape[-1])
    inputs = (q, k, v, *state)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        tie = sum(x.sum().to(out.dtype) for x in inputs)  # sums of empty tensors: 0, tied to every input
        out = out + tie.masked_fill(torch.ones((), dtype=torch.bool, device=tie.device), 0.0)  # value and grad 0
    return out


def tracing() -> bool:
    """Whether torch is recording this call into a graph (``torch.export``, ``torch.compile``, ``torch.jit.trace``)
    rather than running it: then no branch may depend on tensor values (the graph would keep the branch its
    example input took), and nothing created during the call may be cached (it is a fake or traced tensor)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


def padding_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` if it pads some key, else ``None``: an all-True mask (what a tokenizer returns for an unpadded
    batch) means no padding, and the unpadded fast paths share one mask across sequences or need none. Costs
    one device-to-host sync on an accelerator, far less than the masked work it saves.

    While tracing (:func:`tracing`) a mask is always kept: the padded paths are exact for any mask, and a traced
    graph must serve later masks too (asking ``mask.all()`` there is a data-dependent branch that
    ``torch.export`` refuses and ``torch.jit.trace`` would freeze)."""
    if mask is None or tracing():
        return mask
    if bool(mask.all()):
        return None
    return mask


def autograd_records(t: torch.Tensor) -> bool:
    """Whether autograd is recording ops on ``t``: if not, the fast paths may reuse its memory in place (fresh
    memory costs page faults on first touch, a large share of these memory-bound ops on CPU)."""
    return torch.is_grad_enabled() and t.requires_grad


def zero_rows(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out.masked_fill(rows, 0)``, in place when autograd does not record ``out`` (a fresh result of ours)."""
    return out.masked_fill(rows, 0.0) if autograd_records(out) else out.masked_fill_(rows, 0.0)


def token_ranks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a key-padding mask ``[B, T]``: the rank of each real token among real tokens (pads get 0) and the
    number of real tokens per row ``[B]``. Ranks make position-dependent maths (Linformer's projection,
    Nyström's segments) independent of where the padding sits."""
    m = mask.long()
    ranks = (m.cumsum(-1) - 1).clamp_min(0) * m
    return ranks, m.sum(-1)


def dropout_probs(probs: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    if dropout > 0.0 and training:
        return torch.nn.functional.dropout(probs, p=dropout, training=True)
    return probs


def sdpa_zero_empty_rows(q, k, v, allowed, scaling, dropout_p=0.0):
    """``F.scaled_dot_product_attention`` with a bool ``allowed`` mask whose fully masked rows give zeros.
    torch's backends do not all agree on such rows (NaN on some), so they are given every key and zeroed after.
    Pass a 2D or 4D mask: the CPU flash kernel takes those, a 3D one falls back to the math kernel."""
    empty = ~allowed.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p, scale=scaling
    )
    return zero_rows(out, empty)
