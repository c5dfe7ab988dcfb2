"""Linearized attention fast paths: no ``T x T`` tensor and never a ``[T, D, D]`` one.

Bidirectional: two matmuls per head, ``phi(K)^T V`` and ``phi(Q) (phi(K)^T V)`` (Katharopoulos et al. 2020).
Causal: the chunked form used by flash-linear-attention's ``chunk`` kernels and by Yang et al. 2023 (GLA):
inside a chunk of ``C`` tokens a masked ``C x C`` product, across chunks a running ``D x D_v`` state, so time
is ``O(T C D + T D D_v)`` and memory ``O(T D + (T / C) D D_v)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import causal_offset, upcast

DEFAULT_CHUNK = 64


def linear_attention(q, k, v, *, mask=None, causal=False, phi, eps=1e-6, chunk_size=DEFAULT_CHUNK):
    """``out_i = phi(q_i) S_i / phi(q_i) z_i`` with ``S_i = sum_j phi(k_j) v_j^T``, ``z_i = sum_j phi(k_j)`` over
    the keys query ``i`` may see; a zero denominator (no allowed key) gives a zero output."""
    out_dtype = v.dtype
    fq, fk, v = upcast(phi(q), phi(k), v)
    if mask is not None:
        # a padded key contributes nothing to either sum
        fk = fk * mask[:, None, :, None].to(fk.dtype)
    if not causal:
        kv = torch.matmul(fk.transpose(-1, -2), v)  # [B, H, D, Dv]
        z = fk.sum(-2, keepdim=True)  # [B, H, 1, D]
        num = torch.matmul(fq, kv)  # [B, H, Tq, Dv]
        den = (fq * z).sum(-1, keepdim=True)  # [B, H, Tq, 1]
        return (num / den.clamp_min(eps)).to(out_dtype)
    t_q, t_k = fq.shape[-2], fk.shape[-2]
    offset = causal_offset(t_q, t_k)
    state, norm = None, None
    if offset:
        # keys before the first query (a decoder's past) enter as an initial state
        state = torch.matmul(fk[..., :offset, :].transpose(-1, -2), v[..., :offset, :])  # [B, H, D, Dv]
        norm = fk[..., :offset, :].sum(-2)  # [B, H, D]
        fk, v = fk[..., offset:, :], v[..., offset:, :]
    return causal_linear_chunked(fq, fk, v, eps=eps, chunk_size=chunk_size, state=state, norm=norm).to(out_dtype)


def causal_linear_chunked(fq, fk, v, *, eps, chunk_size, state=None, norm=None):
    """Causal linear attention on feature-mapped ``fq, fk`` of equal length ``T``; ``state``/``norm`` are the
    optional sums over earlier tokens (``[B, H, D, Dv]`` / ``[B, H, D]``)."""
    b, h, t, d = fq.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    n = math.ceil(t / c)
    pad = n * c - t
    if pad:
        # zero features are inert: they add nothing to sums and get a zero output that is sliced off
        fq, fk, v = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
    fq = fq.view(b, h, n, c, d)
    fk = fk.view(b, h, n, c, d)
    v = v.view(b, h, n, c, dv)
    chunk_kv = torch.matmul(fk.transpose(-1, -2), v)  # [B, H, n, D, Dv]
    chunk_z = fk.sum(-2)  # [B, H, n, D]
    # exclusive prefix sums over chunks: the state each chunk starts from
    prev_kv = chunk_kv.cumsum(2) - chunk_kv
    prev_z = chunk_z.cumsum(2) - chunk_z
    if state is not None:
        prev_kv = prev_kv + state[:, :, None]
        prev_z = prev_z + norm[:, :, None]
    tri = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    intra = torch.matmul(fq, fk.transpose(-1, -2)).masked_fill(~tri, 0.0)  # [B, H, n, C, C]
    num = torch.matmul(intra, v) + torch.matmul(fq, prev_kv)
    den = intra.sum(-1, keepdim=True) + torch.matmul(fq, prev_z.unsqueeze(-1))
    out = num / den.clamp_min(eps)
    return out.reshape(b, h, n * c, dv)[:, :, :t]
