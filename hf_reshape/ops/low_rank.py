"""Low-rank attention fast paths.

* Linformer (Wang et al. 2020): keys and values are projected along the sequence by learned ``E, F`` of shape
  ``[proj_len, max_length]``; cost ``O(T k)``. Column ``r`` of ``E`` multiplies the ``r``-th *real* token, so
  the result does not depend on where padding sits, and a projected key that receives no real token (by the
  projections' layout, not their values) is masked out (with identity projections this is exactly softmax
  attention).
* Nyströmformer (Xiong et al. 2021): ``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V`` with
  segment-mean landmarks over real tokens and the iterative pseudo-inverse of Razavi et al. 2014;
  cost ``O(T m)``.
* SVD: the exact attention matrix truncated to its top ``rank`` singular values; ``O(T^2)`` by nature,
  an analysis baseline.

Linformer's and Nyström's wide softmax products (``[T, k]``, ``[T, m]``, ``[m, T]``) run through
``F.scaled_dot_product_attention``: one fused kernel each, and backward recomputes the probabilities instead
of keeping them. Dropout, which acts on Linformer's probabilities, takes the explicit path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    dropout_probs,
    empty_attention,
    masked_softmax,
    padding_or_none,
    sdpa_zero_empty_rows,
    token_ranks,
    upcast,
)


def _check_square(q, k, name):
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"{name} is bidirectional self-attention and needs T_q == T_k, got {q.shape[-2]} and {k.shape[-2]}")


LINFORMER_LAYOUTS = ("segments", "dense")


def linformer_columns_used(n, p, max_length, layout):
    """``[B, P]`` bool: which projected columns receive a real token, for ``n`` ``[B]`` real tokens per sequence.

    Decided by the layout of the projections, never by their values (a learned entry passing through zero must
    not switch a key on or off): ``"segments"`` (``init="mean"``) maps the real token of rank ``r`` to column
    ``floor(r P / N)``, so column ``c`` first receives rank ``ceil(c N / P)`` and is used once ``n`` exceeds that;
    ``"dense"`` (``init="normal"``) gives every column every token, so all columns are used once ``n >= 1``."""
    if layout not in LINFORMER_LAYOUTS:
        raise ValueError(f"linformer layout must be one of {list(LINFORMER_LAYOUTS)}, got {layout!r}")
    if layout == "dense":
        return (n > 0)[:, None].expand(n.shape[0], p)
    cols = torch.arange(p, device=n.device)
    first_rank = (cols * max_length + p - 1) // p  # ceil(c N / P)
    return first_rank[None, :] < n[:, None]


def linformer_attention(
    q, k, v, *, mask=None, scaling, proj_k, proj_v, layout="dense", dropout=0.0, training=False
):
    """Attention over keys and values projected along the sequence, ``E K`` and ``F V``, column ``r`` of ``E, F``
    taking the ``r``-th real token. ``layout`` (see :func:`linformer_columns_used`) says which projected keys
    are empty for a given number of real tokens; those are masked out."""
    _check_square(q, k, "linformer")
    if q.numel() == 0:
        return empty_attention(q, k, v, proj_k, proj_v)  # no batch, heads or tokens
    mask = padding_or_none(mask)
    bsz, t = q.shape[0], k.shape[-2]
    proj_k, proj_v = proj_k.to(k.dtype), proj_v.to(v.dtype)
    if mask is None:
        e = proj_k[:, :t].expand(bsz, -1, -1)  # [B, P, T]
        f = proj_v[:, :t].expand(bsz, -1, -1)
        n = torch.full((bsz,), t, device=q.device)
    else:
        ranks, n = token_ranks(mask)
        keep = mask[:, None, :].to(k.dtype)
        # E_eff[b, :, j] = E[:, rank of token j] for real tokens, 0 for pads
        e = proj_k[:, ranks].transpose(0, 1) * keep  # [B, P, T]
        f = proj_v[:, ranks].transpose(0, 1) * keep
    kp, vp = _project(e, k), _project(f, v)  # [B, H, P, D]
    valid = linformer_columns_used(n, proj_k.shape[0], proj_k.shape[-1], layout)  # [B, P]
    if dropout > 0.0 and training:
        # dropout acts on the probabilities, which SDPA does not expose
        scores = torch.matmul(q, kp.transpose(-1, -2)) * scaling  # [B, H, T, P]
        probs = masked_softmax(scores, valid[:, None, None, :])
        return torch.matmul(dropout_probs(probs, dropout, training), vp)
    # SDPA's fused kernel never stores the [B, H, T, P] scores or probabilities (backward recomputes them)
    return sdpa_zero_empty_rows(q, kp, vp, valid[:, None, None, :], scaling)


def _project(e, x):
    """``E x`` per head, ``[B, P, T] x [B, H, T, D] -> [B, H, P, D]``, as one ``[P, T] x [T, H * D]`` matmul per
    sequence with the heads side by side in the columns, the layout of lucidrains' ``linformer``. The keys of an HF
    model arrive as a head-split view of a ``[B, T, H * D]`` projection, so the flattening is free there. A
    broadcast ``matmul(e[:, None], x)`` makes ``H`` thin matmuls instead, and its gradient for ``E`` builds a
    ``[B, H, P, T]`` tensor before summing over heads: fwd+bwd of the projection measured 1.6-1.7x slower
    (T = 2048 and 8192, H = 12, D = 64, P = 256)."""
    b, h, t, d = x.shape
    flat = x.transpose(1, 2).reshape(b, t, h * d)  # [B, T, H * D]
    return torch.matmul(e, flat).view(b, -1, h, d).transpose(1, 2)


def newton_schulz_pinv(a, iterations, valid=None):
    """Batched iterative pseudo-inverse (Razavi et al. 2014, as used by Nyströmformer); each matrix is scaled
    by its own norms so a batch element never depends on another. ``iterations=0`` gives the exact pinv."""
    if iterations == 0:
        return torch.linalg.pinv(a)
    shape, m = a.shape, a.shape[-1]
    a = a.reshape(-1, m, m)
    eye15 = torch.eye(m, dtype=a.dtype, device=a.device) * 15
    mag = a.abs()
    scale = mag.sum(-2).amax(-1) * mag.sum(-1).amax(-1)  # [N]
    z = a.transpose(-1, -2) / scale.clamp_min(torch.finfo(a.dtype).tiny)[:, None, None]
    for _ in range(iterations):
        # z <- 0.25 z (13 I - az (15 I - az (7 I - az))) = 3.25 z - 0.25 z (15 az - 7 az^2 + az^3), written as
        # fused multiply-adds. The [m, m] steps are launch-bound (on a GPU too, and on a loaded CPU each
        # multi-threaded launch can cost a scheduler tick), so the count of ops matters more than their flops.
        az = torch.bmm(a, z)
        inner = torch.add(eye15, az, alpha=-7).baddbmm_(az, az)  # 15 I - 7 az + az^2 (add's output is not saved)
        z = torch.baddbmm(z, z, torch.bmm(az, inner), beta=3.25, alpha=-0.25)
    return z.reshape(shape)


def nystrom_attention(q, k, v, *, mask=None, scaling, num_landmarks, pinv_iterations=6):
    """``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V``, evaluated right to left so that only
    ``[m, T]``-sized work touches the sequence: the two wide softmax products are SDPA calls (fused kernels
    that keep neither ``[T, m]`` nor ``[m, T]`` probabilities for backward), the ``[m, m]`` middle is explicit."""
    _check_square(q, k, "nystrom")
    if q.numel() == 0:
        return empty_attention(q, k, v)  # no batch, heads or tokens: no landmark to take
    mask = padding_or_none(mask)
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)
    bsz, h, t, d = q.shape
    m = num_landmarks
    if mask is None and t % m == 0:
        # equal segments of consecutive tokens, every landmark non-empty: plain means of a view, no masks
        ql = q.reshape(bsz, h, m, t // m, d).mean(-2)  # [B, H, m, D]
        kl = k.reshape(bsz, h, m, t // m, d).mean(-2)
        kv = F.scaled_dot_product_attention(ql, k, v, scale=scaling)  # softmax(Ql K^T) V: [B, H, m, Dv]
        k2 = torch.softmax(torch.matmul(ql, kl.transpose(-1, -2)) * scaling, -1)  # [B, H, m, m]
        w = torch.matmul(newton_schulz_pinv(k2, pinv_iterations), kv)  # [B, H, m, Dv]
        return F.scaled_dot_product_attention(q, kl, w, scale=scaling).to(out_dtype)  # softmax(Q Kl^T) W
    ql, kl, has = _segment_means(q, k, mask, m)
    rows = has[:, None, :, None]  # [B, 1, m, 1]: landmark rows; one with no token stays zero
    allowed = rows if mask is None else rows & mask[:, None, None, :]  # [B, 1, m, 1 or T]
    kv = sdpa_zero_empty_rows(ql, k, v, allowed, scaling)  # [B, H, m, Dv]
    lm = has[:, None, None, :]  # [B, 1, 1, m]: landmark columns
    k2 = masked_softmax(torch.matmul(ql, kl.transpose(-1, -2)) * scaling, lm & rows)  # [B, H, m, m]
    w = torch.matmul(newton_schulz_pinv(k2, pinv_iterations), kv)  # [B, H, m, Dv]
    return sdpa_zero_empty_rows(q, kl, w, lm, scaling).to(out_dtype)  # [B, H, T, Dv]


def _segment_means(q, k, mask, m):
    """Landmarks: means of the real tokens of each of ``m`` segments (by rank among real tokens), and which
    segments received a token ``[B, m]``."""
    bsz, h, t, d = q.shape
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
    denom = counts.clamp_min(1)[:, None, :, None]
    return q_sum / denom, k_sum / denom, counts > 0  # [B, H, m, D] twice, [B, m]


def _truncated(p, rank):
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def svd_attention(q, k, v, *, mask=None, scaling, rank, dropout=0.0, training=False):
    _check_square(q, k, "svd")
    if q.numel() == 0:
        return empty_attention(q, k, v)  # no batch, heads or tokens: no matrix to decompose
    out_dtype = v.dtype
    q, k, v = upcast(q, k, v)

    def attend(qb, kb, vb):
        p = torch.softmax(torch.matmul(qb, kb.transpose(-1, -2)) * scaling, -1)
        return torch.matmul(dropout_probs(_truncated(p, rank), dropout, training), vb)

    mask = padding_or_none(mask)
    if mask is None:
        return attend(q, k, v).to(out_dtype)
    if torch.compiler.is_compiling():
        # torch.export / torch.compile: no data-dependent sizes, so no per-sequence real block
        return _svd_padded_in_place(q, k, v, mask, scaling, rank, dropout, training).to(out_dtype)
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


def _svd_padded_in_place(q, k, v, mask, scaling, rank, dropout, training):
    """The per-sequence result without cutting out the real blocks (shapes independent of the mask, for graphs).

    ``P`` is the masked softmax with padded rows and columns zeroed, so it is block diagonal (real block, zero
    block); the zero block gets distinct diagonal values above any singular value of the real block (a
    row-stochastic ``n x n`` block has ``||P||_2 <= sqrt(n)``), so the SVD's leading ``n_pad`` components are
    exactly the pads, all singular values of the pad block are distinct (no NaN in the SVD gradient), and
    keeping the leading ``rank + n_pad`` components keeps the real block's top ``rank``. Rows and columns of
    the real block never mix with the pad block, and padded queries are zeroed."""
    t = q.shape[-2]
    key_ok = mask[:, None, None, :]
    row_ok = mask[:, None, :, None].to(q.dtype)
    p = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, key_ok) * row_ok  # [B, H, T, T]
    pads = ~mask  # [B, T]
    ramp = torch.arange(t, device=q.device, dtype=q.dtype) / t + (t**0.5 + 1.0)  # distinct, > sqrt(T)
    p = p + torch.diag_embed(ramp * pads.to(q.dtype))[:, None]
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    keep = torch.arange(t, device=q.device)[None, :] < (rank + pads.sum(-1))[:, None]  # [B, T]
    p_r = (u * (s * keep[:, None, :].to(s.dtype))[..., None, :]) @ vh
    out = torch.matmul(dropout_probs(p_r, dropout, training), v)
    return out * row_ok
