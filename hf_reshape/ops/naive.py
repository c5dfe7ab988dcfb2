"""Plain, materialised references. Slow on purpose: each builds the full ``T_q x T_k`` matrix (or loops over
the batch) with the most literal reading of the variant's definition, so that the fast paths have something
independent to be checked against. Run them in float64 in tests.
"""

from __future__ import annotations

import torch

from .common import allowed_mask, masked_softmax


def _scores(q, k, scaling):
    return torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, T_q, T_k]


def _real_tokens(mask, b, k):
    """Indices of sequence ``b``'s real tokens (all of them without a mask)."""
    return torch.arange(k.shape[-2], device=k.device) if mask is None else mask[b].nonzero().flatten()


def softmax_reference(q, k, v, *, mask=None, causal=False, scaling):
    """Exact softmax attention with padding and causal masks; empty rows give zeros."""
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    return torch.matmul(masked_softmax(_scores(q, k, scaling), allowed), v)


def topk_reference(q, k, v, *, mask=None, causal=False, scaling, top_k):
    """Keep, per query, every allowed score at least as large as its ``top_k``-th largest allowed score."""
    scores = _scores(q, k, scaling)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed = allowed.expand_as(scores)
    ranked = torch.sort(scores.masked_fill(~allowed, float("-inf")), dim=-1, descending=True).values
    kth = ranked[..., min(top_k, scores.shape[-1]) - 1 : min(top_k, scores.shape[-1])]
    keep = allowed & (scores >= kth)
    return torch.matmul(masked_softmax(scores, keep), v)


def sliding_window_reference(q, k, v, *, mask=None, causal=False, scaling, window):
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device, window=window)
    return torch.matmul(masked_softmax(_scores(q, k, scaling), allowed), v)


def linear_reference(q, k, v, *, mask=None, causal=False, phi, eps):
    """``out_i = sum_j A_ij v_j / sum_j A_ij`` with ``A_ij = phi(q_i) . phi(k_j)`` over allowed ``j``."""
    a = torch.matmul(phi(q), phi(k).transpose(-1, -2))  # [B, H, T_q, T_k]
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if allowed is not None:
        a = a * allowed
    return torch.matmul(a, v) / a.sum(-1, keepdim=True).clamp_min(eps)


def linformer_reference(q, k, v, *, mask=None, scaling, proj_k, proj_v, layout="dense"):
    """Per sequence: gather its real tokens, project them with the first ``n`` columns of E and F, and attend
    over the projected keys that received at least one real token: under the ``"segments"`` layout
    (``init="mean"``) real token ``r`` goes to column ``floor(r P / N)``, under ``"dense"`` to every column."""
    p_len, n_max = proj_k.shape
    outs = []
    for b in range(q.shape[0]):
        idx = _real_tokens(mask, b, k)
        n = idx.numel()
        e, f = proj_k[:, :n], proj_v[:, :n]  # [P, n]
        kp = torch.matmul(e, k[b][:, idx])  # [H, P, D]
        vp = torch.matmul(f, v[b][:, idx])
        if layout == "segments":
            used = {r * p_len // n_max for r in range(n)}
            valid = torch.tensor([c in used for c in range(p_len)], device=q.device)  # [P]
        else:
            valid = torch.full((p_len,), n > 0, device=q.device)
        scores = torch.matmul(q[b], kp.transpose(-1, -2)) * scaling
        outs.append(torch.matmul(masked_softmax(scores, valid[None, None, :].expand_as(scores)), vp))
    return torch.stack(outs)


def newton_schulz_pinv_reference(a, iterations):
    """Iterative Moore-Penrose inverse used by Nyströmformer (Razavi et al. 2014), one matrix at a time."""
    if iterations == 0:
        return torch.linalg.pinv(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = a.transpose(-1, -2) / (a.abs().sum(-2).max() * a.abs().sum(-1).max())
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_reference(q, k, v, *, mask=None, scaling, num_landmarks, pinv_iterations):
    """Nyströmformer (Xiong et al. 2021) per sequence on its real tokens: landmark ``s`` is the mean of the
    real tokens of rank ``r`` with ``floor(r * m / n) == s``; empty landmarks are dropped."""
    outs = []
    for b in range(q.shape[0]):
        idx = _real_tokens(mask, b, k)
        n = idx.numel()
        out = torch.zeros(q.shape[1], q.shape[2], v.shape[-1], dtype=v.dtype, device=v.device)
        if n > 0:
            qb, kb, vb = q[b][:, idx], k[b][:, idx], v[b][:, idx]
            seg = [r * num_landmarks // n for r in range(n)]
            groups = [[r for r in range(n) if seg[r] == s] for s in range(num_landmarks)]
            groups = [g for g in groups if g]
            ql = torch.stack([qb[:, g].mean(1) for g in groups], 1)  # [H, m', D]
            kl = torch.stack([kb[:, g].mean(1) for g in groups], 1)
            k1 = torch.softmax(torch.matmul(q[b], kl.transpose(-1, -2)) * scaling, -1)  # all queries, real or not
            k2 = torch.softmax(torch.matmul(ql, kl.transpose(-1, -2)) * scaling, -1)
            k3 = torch.softmax(torch.matmul(ql, kb.transpose(-1, -2)) * scaling, -1)
            pinv = torch.stack([newton_schulz_pinv_reference(k2[h], pinv_iterations) for h in range(k2.shape[0])])
            out = k1 @ pinv @ (k3 @ vb)
        outs.append(out)
    return torch.stack(outs)


def svd_reference(q, k, v, *, mask=None, scaling, rank):
    """Best rank-``rank`` approximation of each sequence's attention matrix over its real tokens, computed as
    the projection of P onto its top-``rank`` left singular vectors, found with an eigendecomposition of
    ``P P^T`` (not an SVD). Padded queries get zeros."""
    outs = []
    for b in range(q.shape[0]):
        idx = _real_tokens(mask, b, k)
        out = torch.zeros(q.shape[1], q.shape[2], v.shape[-1], dtype=v.dtype, device=v.device)
        if idx.numel():
            p = torch.softmax(_scores(q[b][:, idx], k[b][:, idx], scaling), -1)  # [H, n, n]
            evals, evecs = torch.linalg.eigh(p @ p.transpose(-1, -2))  # ascending eigenvalues
            u = evecs[..., -rank:] if rank < p.shape[-2] else evecs
            out = out.index_copy(1, idx, u @ (u.transpose(-1, -2) @ (p @ v[b][:, idx])))
        outs.append(out)
    return torch.stack(outs)
