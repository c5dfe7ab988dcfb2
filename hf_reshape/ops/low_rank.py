"""Low-rank attention fast paths.

* Linformer (Wang et al. 2020): keys and values are projected along the sequence by learned ``E, F`` of shape
  ``[proj_len, max_length]``; cost ``O(T k)``. Column ``r`` of ``E`` multiplies the ``r``-th *real* token, so
  the result does not depend on where padding sits, and a projected key that receives no real token is
  masked out (with identity projections this is exactly softmax attention).
* Nyströmformer (Xiong et al. 2021): ``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V`` with
  segment-mean landmarks over real tokens and the iterative pseudo-inverse of Razavi et al. 2014;
  cost ``O(T m)``.
* SVD: the exact attention matrix truncated to its top ``rank`` singular values; ``O(T^2)`` by nature,
  an analysis baseline.
"""

from __future__ import annotations

import torch

from .common import allowed_mask, dropout_probs, masked_softmax, token_ranks, upcast


def _check_square(q, k, name):
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"{name} is bidirectional self-attention and needs T_q == T_k, got {q.shape[-2]} and {k.shape[-2]}")


def linformer_attention(q, k, v, *, mask=None, scaling, proj_k, proj_v, dropout=0.0, training=False):
    _check_square(q, k, "linformer")
    bsz, t = q.shape[0], k.shape[-2]
    proj_k, proj_v = proj_k.to(k.dtype), proj_v.to(v.dtype)
    if mask is None:
        e = proj_k[:, :t].expand(bsz, -1, -1)  # [B, P, T]
        f = proj_v[:, :t].expand(bsz, -1, -1)
    else:
        ranks, _ = token_ranks(mask)
        keep = mask[:, None, :].to(k.dtype)
        # E_eff[b, :, j] = E[:, rank of token j] for real tokens, 0 for pads
        e = proj_k[:, ranks].transpose(0, 1) * keep  # [B, P, T]
        f = proj_v[:, ranks].transpose(0, 1) * keep
    kp = torch.einsum("bpt,bhtd->bhpd", e, k)  # [B, H, P, D]
    vp = torch.einsum("bpt,bhtd->bhpd", f, v)
    valid = (e != 0).any(-1)  # [B, P]: projected keys that received a real token
    scores = torch.matmul(q, kp.transpose(-1, -2)) * scaling  # [B, H, T, P]
    probs = masked_softmax(scores, valid[:, None, None, :])
    return torch.matmul(dropout_probs(probs, dropout, training), vp)


def newton_schulz_pinv(a, iterations, valid=None):
    """Batched iterative pseudo-inverse (Razavi et al. 2014, as used by Nyströmformer); each matrix is scaled
    by its own norms so a batch element never depends on another. ``iterations=0`` gives the exact pinv."""
    if iterations == 0:
        return torch.linalg.pinv(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # [...]
    z = a.transpose(-1, -2) / scale.clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q, k, v, *, mask=None, scaling, num_landmarks, pinv_iterations=6):
    _check_square(q, k, "nystrom")
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)
    bsz, h, t, d = q.shape
    m = num_landmarks
    if mask is None:
        mask = torch.ones(bsz, t, dtype=torch.bool, device=q.device)
    ranks, n = token_ranks(mask)
    # segment of each real token; pads go to an extra bucket m that is dropped
    seg = torch.where(mask, ranks * m // n.clamp_min(1)[:, None], torch.full_like(ranks, m))  # [B, T]
    counts = torch.zeros(bsz, m + 1, dtype=q.dtype, device=q.device).scatter_add_(1, seg, torch.ones_like(q[:, 0, :, 0]))
    index = seg[:, None, :, None].expand(bsz, h, t, d)
    q_sum = torch.zeros(bsz, h, m + 1, d, dtype=q.dtype, device=q.device).scatter_add_(2, index, q)
    k_sum = torch.zeros(bsz, h, m + 1, d, dtype=q.dtype, device=q.device).scatter_add_(2, index, k)
    counts, q_sum, k_sum = counts[:, :m], q_sum[:, :, :m], k_sum[:, :, :m]
    has = counts > 0  # [B, m]
    denom = counts.clamp_min(1)[:, None, :, None]
    ql, kl = q_sum / denom, k_sum / denom  # [B, H, m, D]
    lm = has[:, None, None, :]  # landmark columns
    k1 = masked_softmax(torch.matmul(q, kl.transpose(-1, -2)) * scaling, lm)  # [B, H, T, m]
    k2 = masked_softmax(torch.matmul(ql, kl.transpose(-1, -2)) * scaling, lm & has[:, None, :, None])  # [B, H, m, m]
    k3 = masked_softmax(torch.matmul(ql, k.transpose(-1, -2)) * scaling, mask[:, None, None, :] & has[:, None, :, None])
    out = torch.matmul(k1, torch.matmul(newton_schulz_pinv(k2, pinv_iterations), torch.matmul(k3, v)))
    return out.to(out_dtype)


def _truncated(p, rank):
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def svd_attention(q, k, v, *, mask=None, scaling, rank, dropout=0.0, training=False):
    _check_square(q, k, "svd")
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)

    def attend(qb, kb, vb):
        p = torch.softmax(torch.matmul(qb, kb.transpose(-1, -2)) * scaling, -1)
        return torch.matmul(dropout_probs(_truncated(p, rank), dropout, training), vb)

    if mask is None or bool(mask.all()):
        return attend(q, k, v).to(out_dtype)
    # Padded rows and columns would add repeated zero singular values, whose SVD gradient is undefined (NaN):
    # decompose each sequence's real block instead. Padded queries get zeros.
    outs = []
    for b in range(q.shape[0]):
        idx = mask[b].nonzero().flatten()
        out = v.new_zeros(v.shape[1], q.shape[2], v.shape[3])
        if idx.numel():
            out = out.index_copy(1, idx, attend(q[b][:, idx], k[b][:, idx], v[b][:, idx]))
        outs.append(out)
    return torch.stack(outs).to(out_dtype)
