"""Sparse attention fast paths.

Sliding window (Beltagy et al. 2020, Longformer's local attention; Child et al. 2019 for the blocked layout):
queries are cut into blocks of ``b`` tokens and each block meets only the ``b + 2w`` (bidirectional) or
``b + w`` (causal) keys its window can reach, so time and memory are ``O(T (b + 2w))``, never ``T x T``.

Top-k (Wang et al. 2022, "KVT"; Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"):
scores are inherently ``O(T^2)``; queries are processed in chunks to bound memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import allowed_mask, causal_offset, dropout_probs, masked_softmax

# scores per block group are kept under this many elements (bounds peak memory at long T)
_MAX_SCORE_ELEMENTS = 1 << 24


def sliding_window_attention(
    q, k, v, *, mask=None, causal=False, scaling, window, block_size=None, dropout=0.0, training=False
):
    """Query ``i`` attends key ``j`` when ``|i - j| <= window`` (or ``0 <= i - j <= window`` when causal)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q != t_k:
        # decoding against a cache: only the last T_q + window keys can be reached
        offset = causal_offset(t_q, t_k) if causal else None
        if offset is None:
            raise ValueError(f"bidirectional sliding_window needs T_q == T_k, got {t_q} and {t_k}")
        start = max(0, t_k - t_q - window)
        k, v = k[..., start:, :], v[..., start:, :]
        mask = None if mask is None else mask[:, start:]
        allowed = allowed_mask(mask, t_q, k.shape[-2], True, q.device, window=window)
        probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed)
        return torch.matmul(dropout_probs(probs, dropout, training), v)
    return _blocked_window(q, k, v, mask, causal, scaling, window, block_size, dropout, training)


def _blocked_window(q, k, v, mask, causal, scaling, window, block_size, dropout, training):
    bsz, h, t, d = q.shape
    dv = v.shape[-1]
    w = min(window, t)
    blk = block_size or max(16, min(128, w))
    blk = min(blk, t)
    n = math.ceil(t / blk)
    left, span = w, blk + (w if causal else 2 * w)
    right = n * blk - t + (0 if causal else w)
    kp = F.pad(k, (0, 0, left, right))  # [B, H, left + n*blk + (w or 0), D]
    vp = F.pad(v, (0, 0, left, right))
    key_ok = torch.ones(bsz, t, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    key_ok = F.pad(key_ok, (left, right), value=False)
    qp = F.pad(q, (0, 0, 0, n * blk - t)).view(bsz, h, n, blk, d)
    # relative offset of key slot s to query c inside a block: key position = start + s - w, query = start + c
    c_idx = torch.arange(blk, device=q.device)[:, None]
    s_idx = torch.arange(span, device=q.device)[None, :]
    rel = c_idx + w - s_idx  # i - j
    pattern = (rel >= 0) & (rel <= w) if causal else rel.abs() <= w  # [blk, span]
    out = q.new_empty(bsz, h, n, blk, dv)
    per_block = bsz * h * blk * span
    group = max(1, _MAX_SCORE_ELEMENTS // per_block)
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        lo, hi = g0 * blk, (g1 - 1) * blk + span
        kb = kp[:, :, lo:hi].unfold(2, span, blk).transpose(-1, -2)  # [B, H, g, span, D]
        vb = vp[:, :, lo:hi].unfold(2, span, blk).transpose(-1, -2)
        ok = key_ok[:, lo:hi].unfold(1, span, blk)  # [B, g, span]
        allowed = pattern[None, None] & ok[:, :, None, :]  # [B, g, blk, span]
        scores = torch.matmul(qp[:, :, g0:g1], kb.transpose(-1, -2)) * scaling  # [B, H, g, blk, span]
        probs = masked_softmax(scores, allowed[:, None])
        out[:, :, g0:g1] = torch.matmul(dropout_probs(probs, dropout, training), vb)
    return out.view(bsz, h, n * blk, dv)[:, :, :t]


def topk_attention(q, k, v, *, mask=None, causal=False, scaling, top_k, dropout=0.0, training=False):
    """Per query, softmax over its ``top_k`` highest allowed scores (all of them if fewer are allowed)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    kk = min(top_k, t_k)
    bsz, h = q.shape[:2]
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, bsz * h * t_k))
    allowed_all = allowed_mask(mask, t_q, t_k, causal, q.device)
    outs = []
    for s in range(0, t_q, chunk):
        e = min(t_q, s + chunk)
        scores = torch.matmul(q[..., s:e, :], k.transpose(-1, -2)) * scaling  # [B, H, c, T_k]
        allowed = allowed_all
        if allowed is not None:
            allowed = allowed[..., s:e, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
        vals, idx = scores.topk(kk, dim=-1)  # [B, H, c, kk]
        # a disallowed key can only enter the top-k when fewer than k keys are allowed; it stays -inf
        probs = dropout_probs(masked_softmax(vals, torch.isfinite(vals)), dropout, training)
        dense = torch.zeros_like(scores).scatter(-1, idx, probs)
        outs.append(torch.matmul(dense, v))
    return torch.cat(outs, dim=-2)
