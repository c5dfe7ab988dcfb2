"""The matrix each variant multiplies the values by, for ``output_attentions=True`` and attention transfer.

Each function has the signature of a variant's ``reference`` (``VariantSpec.weights``) and returns ``W`` with
``output == W @ values``: ``[B, H, T_q, T_k]`` over the keys, except Linformer, whose ``[B, H, T_q, proj_len]``
probabilities are over its projected keys (``output == W @ (F v)``). They materialise the full matrix, as
transformers' eager attention does when asked for weights, and are differentiable (attention transfer's KL term
back-propagates through them). The selection rules are those of the fast paths in :mod:`hf_reshape.ops`
(top-k ranked in float32; padded queries and keys, and queries with no allowed key, get zero rows and columns);
``tests/test_reliability_model.py`` checks ``W @ v`` against each variant's forward.

Which variants have such a matrix follows transformers' eager attention, which returns softmax probabilities:
``linear`` (no normalised score matrix is formed; Katharopoulos et al. 2020) and ``nystrom`` (a product of three
softmaxes and a pseudo-inverse; Xiong et al. 2021) have none.
"""

from __future__ import annotations

import torch

from .ops.common import allowed_mask, masked_softmax, token_ranks, upcast
from .ops.low_rank import linformer_columns_used


def _scores(q, k, scaling):
    return torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, T_q, T_k]


def softmax_weights(q, k, v=None, *, mask=None, causal=False, scaling, params=None):
    """Exact softmax probabilities (the layers a reshape leaves exact, and cross-attention); empty rows are zeros."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    return masked_softmax(_scores(q, k, scaling), allowed).to(out_dtype)


def topk_weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """Softmax over each query's ``top_k`` highest allowed scores, zero elsewhere (Gupta et al. 2021)."""
    out_dtype = q.dtype
    q, k = upcast(q, k)  # ranked in float32 for half-precision inputs, as the fast path does
    scores = _scores(q, k, scaling)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    kk = min(params.top_k, k.shape[-2])
    if kk == 0:
        return scores.new_zeros(scores.shape).to(out_dtype)
    vals, idx = scores.topk(kk, dim=-1)
    # a disallowed key enters the top-k only when fewer than top_k keys are allowed; it stays -inf (weight 0)
    probs = masked_softmax(vals, torch.isfinite(vals))
    return torch.zeros_like(scores).scatter(-1, idx, probs).to(out_dtype)


def sliding_window_weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """Softmax over the keys with ``|i - j| <= window`` (``0 <= i - j <= window`` causal; Beltagy et al. 2020)."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device, window=params.window)
    return masked_softmax(_scores(q, k, scaling), allowed).to(out_dtype)


def svd_weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """Each sequence's softmax matrix over its real tokens truncated to its top ``rank`` singular values
    (Eckart-Young); padded rows and columns are zero. Not a distribution: entries may be negative."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    mats = []
    for i in range(q.shape[0]):
        w = q.new_zeros(q.shape[1], q.shape[2], k.shape[-2])  # [H, T_q, T_k]
        idx = torch.arange(k.shape[-2], device=k.device) if mask is None else mask[i].nonzero().flatten()
        if idx.numel():
            p = torch.softmax(_scores(q[i][:, idx], k[i][:, idx], scaling), -1)  # [H, n, n]
            u, s, vh = torch.linalg.svd(p, full_matrices=False)
            r = min(params.rank, s.shape[-1])
            w[:, idx[:, None], idx[None, :]] = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
        mats.append(w)
    out = torch.stack(mats)
    return out.to(out_dtype)


def linformer_weights(q, k, v=None, *, mask=None, causal=False, scaling, params, proj_k=None, proj_v=None):
    """Softmax probabilities over Linformer's ``proj_len`` projected keys ``E k`` (Wang et al. 2020),
    ``[B, H, T_q, proj_len]``: column ``r`` of ``E`` takes the ``r``-th real token, and a projected key that
    receives no real token (by the projections' layout, :func:`hf_reshape.ops.low_rank.linformer_columns_used`:
    contiguous segments for ``init="mean"``, every token for ``"normal"``) has weight zero, as in
    :func:`hf_reshape.ops.low_rank.linformer_attention`."""
    if proj_k is None:
        raise ValueError("linformer weights need the layer's projection `proj_k`")
    b, t = k.shape[0], k.shape[-2]
    proj_k = proj_k.to(k.dtype)
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=k.device)
    ranks, n = token_ranks(mask)
    e = proj_k[:, ranks].transpose(0, 1) * mask[:, None, :].to(k.dtype)  # [B, P, T], zero columns for pads
    kp = torch.matmul(e[:, None], k)  # [B, H, P, D]
    layout = "segments" if params.init == "mean" else "dense"
    valid = linformer_columns_used(n, proj_k.shape[0], proj_k.shape[-1], layout)  # [B, P]
    return masked_softmax(_scores(q, kp, scaling), valid[:, None, None, :])
