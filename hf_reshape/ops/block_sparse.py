"""Block-sparse (BigBird) and strided (Sparse Transformer) attention: fast paths and materialised references.

BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", NeurIPS): the sequence is cut into
blocks of ``block_size`` tokens; query block ``g`` attends

* its sliding window: the ``num_window_blocks`` blocks centred on it (``g - h .. g + h``, ``h = (w - 1) // 2``;
  causal: ``g - h .. g``, the diagonal block causally masked),
* the global blocks: the first ``num_global_blocks`` blocks, which every query attends and whose queries attend every
  key (causal: every earlier key, which the window and global blocks already cover),
* ``num_random_blocks`` random blocks, drawn without replacement among the blocks that are neither in its window
  nor global (causal: only blocks wholly in the past, ``j < g - h``).

A key in several of these sets counts once. Blocks are cut over the *real* tokens of each sequence: the token of rank
``r`` among the real tokens (``mask`` True) sits in block ``r // block_size``, so the pattern of a sequence does not
depend on where its padding is (left or right padding, or holes), and its number of blocks is
``ceil(real tokens / block_size)``. Padded queries get zeros. The random blocks are a fixed function of ``seed``,
the query block, the candidate block and (bidirectional form only) the sequence's number of blocks: each
(query block, key block) pair gets a 32-bit hash of ``(seed, g, j)`` (:func:`_hash_table`, a counter-based integer
mix) and each query block keeps the candidates with the ``num_random_blocks`` largest hashes. Nothing is drawn
from torch's random generator, so the pattern is the same after save / reload and on every device. In the causal
form the candidates of block ``g`` are the past blocks only, so its pattern does not change as the sequence grows
(cached generation equals recomputation).

Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse Transformers", the strided pattern):
query ``i`` attends the local keys ``i - stride < j <= i`` (bidirectional ``|i - j| < stride``) and every key with
``(i - j) % stride == 0`` (causal: earlier keys only), one softmax over the union. Positions are those of the
sequence as given (padding included), like ``sliding_window``: the pattern is shift-invariant, so left or right
padding does not change it.

Fast paths (no ``T x T`` tensor):

* block-sparse: each sequence's tokens are put in rank order (real first) once, the key / value blocks every query
  block meets are gathered once into ``[B, H, n_blocks, K * block_size, D]`` (``K`` slots: window, global, random;
  one ``index_select``), and all query blocks go through one ``F.scaled_dot_product_attention`` call (blocks in
  place of SDPA's heads, a ``[n_blocks, block, K * block]`` bool mask for duplicate slots, padding and causality);
  the global query blocks (bidirectional) run dense against all keys, ``num_global_blocks * block_size`` rows.
* strided: the local part by blocks of ``stride`` queries against the ``2 stride`` (causal) or ``3 stride`` keys
  around them, the strided part by viewing the (padded) sequence as ``[T / stride, stride]`` and attending along its
  columns (``[stride, T / stride, T / stride]`` scores); the two parts are merged through their log-sum-exp: a
  shared (detached) row maximum and the sum of both parts' exponentials as the denominator. The strided part
  leaves out ``j = i``, which the local part holds (the only key in both sets).

Without autograd (CPU, float32/64, no dropout) both run through torch's fused CPU attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``), which reads strided views and returns the log-sum-exp of each
row, so parts of a pattern are attended separately and merged exactly (``out = sum_p exp(lse_p - lse) out_p``):
block-sparse as window (an overlapping view of the padded keys), global (a zero-stride view) and random (gathered)
parts, :func:`_blocks_inference`; strided as the local band and the columns, :func:`_strided_inference`. The
kernel has no gradient for its log-sum-exp, so training keeps the paths above.

Decoding (``T_q < T_k``, causal) builds the ``T_q x T_k`` rows of the pattern directly, as ``sliding_window`` does.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .common import (
    autograd_records,
    causal_offset,
    dropout_probs,
    empty_attention,
    masked_softmax,
    padding_or_none,
    sdpa_zero_empty_rows,
)

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd 27-bit multiplier: products of 32-bit values stay below 2**63 in int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, two rounds) on int64 tensors holding values < 2**32."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def _hash_table(n: int, seed: int, device) -> torch.Tensor:
    """``[n, n]`` int64 keys, distinct per row: ``hash(seed, g, j) * 2**20 + j`` (``j < 2**20`` blocks)."""
    g = torch.arange(n, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(n, device=device, dtype=torch.int64)[None, :]
    s = _mix32(torch.tensor([(seed & _MASK32) ^ (seed >> 32)], device=device, dtype=torch.int64))
    h = _mix32(_mix32(_mix32(s ^ g) ^ j) ^ s)
    return (h << 20) | j


def random_blocks(n: int, *, num_random: int, num_global: int, half: int, causal: bool, seed: int,
                  n_blocks: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random key blocks of query blocks ``0 .. n - 1``: ``(idx, ok)``, each ``[B or 1, n, r]``
    (``r = min(num_random, n)``); ``ok`` False marks an unused slot (fewer candidates than ``num_random``).

    Candidates of query block ``g``: blocks ``j >= num_global`` outside the window ``|g - j| <= half``, below the
    sequence's number of blocks ``n_blocks`` (``[B]``; ``None``: ``n``); causal: ``j < g - half`` only (then
    ``n_blocks`` plays no part). Among them, the ``r`` with the largest :func:`_hash_table` keys."""
    r = min(num_random, n)
    if r == 0:
        empty = torch.zeros(1, n, 0, dtype=torch.int64, device=device)
        return empty, empty.bool()
    g = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    cand = (j >= num_global) & ((j < g - half) if causal else ((g - j).abs() > half))
    cand = cand[None]
    if n_blocks is not None and not causal:
        cand = cand & (j[None] < n_blocks.to(device)[:, None, None])
    keys = _hash_table(n, seed, device).masked_fill(~cand, -1)  # [B or 1, n, n]
    vals, idx = keys.topk(r, dim=-1)
    return idx, vals >= 0


def _slots(n, *, block_size, num_global, num_random, num_window, causal, seed, n_blocks, device):
    """Key-block slots of every query block: ``(idx, ok)`` ``[B or 1, n, K]`` (window, global, random), ``ok`` False
    for a slot outside ``[0, n)``, a duplicate of an earlier slot, a future block (causal) or an unused random slot."""
    half = (num_window - 1) // 2
    g = torch.arange(n, device=device)[:, None]
    offsets = torch.arange(-half, 1 if causal else half + 1, device=device)[None, :]
    win = g + offsets  # [n, w]
    glob = torch.arange(min(num_global, n), device=device)[None, :].expand(n, -1)
    idx = torch.cat([win, glob], 1)[None]
    ok = (idx >= 0) & (idx < n)
    if causal:
        ok = ok & (idx <= g[None])
    r_idx, r_ok = random_blocks(n, num_random=num_random, num_global=num_global, half=half, causal=causal,
                                seed=seed, n_blocks=n_blocks, device=device)
    bsz = max(idx.shape[0], r_idx.shape[0])
    idx = torch.cat([idx.expand(bsz, -1, -1), r_idx.expand(bsz, -1, -1)], -1)
    ok = torch.cat([ok.expand(bsz, -1, -1), r_ok.expand(bsz, -1, -1)], -1)
    # a block already in an earlier slot (a global block inside the window) counts once
    same = idx[..., :, None] == idx[..., None, :]  # [B, n, K, K]
    earlier = torch.ones(idx.shape[-1], idx.shape[-1], dtype=torch.bool, device=device).tril(-1)
    ok = ok & ~(same & earlier & ok[..., None, :]).any(-1)
    return idx.clamp(0, n - 1), ok


def _check_bidirectional_square(t_q, t_k, name):
    if t_q != t_k:
        raise ValueError(f"bidirectional {name} needs T_q == T_k, got {t_q} and {t_k}")


# ---------------------------------------------------------------- block-sparse (BigBird)


def block_sparse_allowed(mask, t_q, t_k, causal, device, *, block_size, num_global_blocks, num_random_blocks,
                         num_window_blocks, seed):
    """Dense ``[B or 1, 1, T_q, T_k]`` bool matrix of the BigBird pattern (queries are the last ``T_q`` keys). Built
    literally: each token's block from its rank among the real tokens, then window / global / random tests per
    (query, key) pair. Padded queries and keys are False."""
    offset = causal_offset(t_q, t_k) if causal else 0
    if not causal:
        _check_bidirectional_square(t_q, t_k, "block_sparse")
    real = torch.ones(1, t_k, dtype=torch.bool, device=device) if mask is None else mask.bool()
    rank = real.long().cumsum(-1) - 1
    blk = rank.clamp_min(0) // block_size  # [B, T_k]
    n_real = real.long().sum(-1)  # [B]
    n = max(1, math.ceil(t_k / block_size))
    half = (num_window_blocks - 1) // 2
    n_blocks = (n_real + block_size - 1) // block_size
    r_idx, r_ok = random_blocks(n, num_random=num_random_blocks, num_global=num_global_blocks, half=half,
                                causal=causal, seed=seed, n_blocks=n_blocks, device=device)
    rand = torch.zeros(r_idx.shape[0], n, n + 1, dtype=torch.bool, device=device)  # column n: unused slots
    rand.scatter_(-1, r_idx.masked_fill(~r_ok, n), True)
    rand = rand[..., :n]
    qb, kb = blk[:, offset:, None], blk[:, None, :]  # [B, T_q, 1], [B, 1, T_k]
    diff = qb - kb
    allowed = (diff <= half) & (diff >= (0 if causal else -half))
    allowed = allowed | (kb < num_global_blocks)
    if not causal:
        allowed = allowed | (qb < num_global_blocks)
    rows = rand.expand(blk.shape[0], -1, -1).gather(1, qb.expand(-1, -1, n))  # [B, T_q, n]: random blocks of a query
    allowed = allowed | rows.gather(2, kb.expand(-1, t_q, -1))
    if causal:
        allowed = allowed & (rank[:, offset:, None] >= rank[:, None, :])
    allowed = allowed & real[:, offset:, None] & real[:, None, :]
    return allowed[:, None]


def block_sparse_reference(q, k, v, *, mask=None, causal=False, scaling, **pattern):
    """Materialised BigBird attention: masked softmax over :func:`block_sparse_allowed`."""
    allowed = block_sparse_allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, **pattern)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    return torch.matmul(masked_softmax(scores, allowed), v)


def block_sparse_attention(q, k, v, *, mask=None, causal=False, scaling, block_size, num_global_blocks,
                           num_random_blocks, num_window_blocks, seed, dropout=0.0, training=False):
    """BigBird block-sparse attention, fast path (see the module docstring)."""
    t_q, t_k = int(q.shape[-2]), int(k.shape[-2])
    if q.numel() == 0 or k.numel() == 0:
        return empty_attention(q, k, v, causal=causal)
    pattern = dict(block_size=block_size, num_global_blocks=num_global_blocks, num_random_blocks=num_random_blocks,
                   num_window_blocks=num_window_blocks, seed=seed)
    if t_q != t_k:
        if not causal:
            _check_bidirectional_square(t_q, t_k, "block_sparse")
        # decoding against a cache: the T_q rows of the pattern, T_q x T_k
        allowed = block_sparse_allowed(mask, t_q, t_k, True, q.device, **pattern)
        probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed)
        return torch.matmul(dropout_probs(probs, dropout, training), v)
    mask = padding_or_none(mask)
    p = dropout if training else 0.0
    bsz, h, t, d = (int(x) for x in q.shape)
    dv = int(v.shape[-1])
    bs = block_size
    n = math.ceil(t / bs)
    tp = n * bs
    if mask is None:
        real = None
        n_blocks = None
        order = None
    else:
        real = mask.bool()
        # real tokens first, each group in its original order: blocks are cut over the real tokens' ranks
        order = torch.sort((~real).to(torch.uint8), dim=-1, stable=True).indices  # [B, T]
        n_real = real.long().sum(-1)
        n_blocks = (n_real + bs - 1) // bs
        gather = lambda x: x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))  # noqa: E731
        q, k, v = gather(q), gather(k), gather(v)
        real = torch.arange(t, device=q.device)[None, :] < n_real[:, None]  # [B, T] in rank order
    if tp != t:
        q, k, v = (F.pad(x, (0, 0, 0, tp - t)) for x in (q, k, v))
    if real is None and tp != t:
        real = (torch.arange(tp, device=q.device) < t)[None]
    elif real is not None and tp != t:
        real = F.pad(real, (0, tp - t))
    idx, ok = _slots(n, block_size=bs, num_global=num_global_blocks, num_random=num_random_blocks,
                     num_window=num_window_blocks, causal=causal, seed=seed, n_blocks=n_blocks, device=q.device)
    slots = idx.shape[-1]
    g0 = 0 if causal else min(num_global_blocks, n)  # bidirectional global query blocks run dense below
    # token-level mask of each slot: [B or 1, n, bs, K * bs]
    allowed = ok[..., None, :, None].expand(-1, -1, bs, -1, bs)
    if causal:
        c = torch.arange(bs, device=q.device)
        diag = idx == torch.arange(n, device=q.device)[:, None]  # [B or 1, n, K]
        tri = c[:, None] >= c[None, :]  # [bs (query), bs (key)]
        allowed = allowed & (~diag[..., None, :, None] | tri[None, None, :, None, :])
    if real is not None:
        key_ok = real.view(real.shape[0], n, bs)
        key_ok = key_ok.gather(1, idx.expand(real.shape[0], -1, -1).flatten(1)[..., None].expand(-1, -1, bs))
        key_ok = key_ok.view(real.shape[0], n, 1, slots, bs)
        q_ok = real.view(real.shape[0], n, bs)[..., None, None]
        allowed = allowed & key_ok & q_ok
    allowed = allowed.reshape(allowed.shape[0], n, bs, slots * bs)[:, g0:]
    blocks = _gathered_sdpa
    if _fused_kernel_applies(q, k, v, p):
        half = (num_window_blocks - 1) // 2
        blocks = functools.partial(_blocks_inference, half=half, causal=causal,
                                   num_global=min(num_global_blocks, n))
    if n == g0:  # every block is global: dense attention below
        out = q.new_zeros(bsz, h, 0, dv)
    elif idx.shape[0] == 1 and allowed.shape[0] == 1:
        out = blocks(q.reshape(bsz * h, tp, d), k.reshape(bsz * h, tp, d), v.reshape(bsz * h, tp, dv),
                     idx[0, g0:], allowed[0], bs, g0, scaling, p, empty_rows=real is not None)
    else:  # one sequence at a time: its own blocks (rank order) and random pattern
        out = torch.stack([
            blocks(q[i], k[i], v[i], idx[min(i, idx.shape[0] - 1), g0:], allowed[min(i, allowed.shape[0] - 1)],
                   bs, g0, scaling, p, empty_rows=True)
            for i in range(bsz)
        ])
    out = out.reshape(bsz, h, (n - g0) * bs, dv)
    if g0:
        # global query blocks attend every key
        rows = g0 * bs
        key_ok = torch.ones(1, tp, dtype=torch.bool, device=q.device) if real is None else real
        glob_ok = key_ok[:, None, None, :].expand(-1, 1, rows, -1)
        if real is not None:
            glob_ok = glob_ok & real[:, None, :rows, None]
        if real is None:
            glob = F.scaled_dot_product_attention(q[:, :, :rows], k, v, dropout_p=p, scale=scaling)
        else:
            glob = sdpa_zero_empty_rows(q[:, :, :rows], k, v, glob_ok, scaling, p)
        out = torch.cat([glob, out], 2)
    out = out[:, :, :t]
    if order is not None:
        inverse = torch.argsort(order, dim=-1)
        out = out.gather(2, inverse[:, None, :, None].expand(-1, h, -1, dv))
    return out


def _fused_kernel_applies(q, k, v, dropout_p) -> bool:
    """Whether the inference paths (:func:`_blocks_inference`, :func:`_strided_inference`) may run: no autograd
    (the fused kernel has no gradient for its log-sum-exp), no dropout, CPU, one float32/64 dtype."""
    return dropout_p == 0.0 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and \
        q.dtype == k.dtype == v.dtype and not any(autograd_records(x) for x in (q, k, v))


def _fused_part(q, k, v, ok, scaling):
    """One call of torch's fused CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, which reads
    strided views) under the bool mask ``ok`` (broadcastable to the scores): the output and the log-sum-exp of each
    row, ``-inf`` where the row allows no key (the kernel reports 0 there, and a zero output)."""
    bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                           scale=scaling)
    return out, lse.masked_fill(~ok.any(-1), float("-inf"))


def _merge_parts(outs, lses):
    """Attention over the union of disjoint key sets from each set's output and log-sum-exp (all the same shape,
    ``[..., Dv]`` and ``[...]``): ``sum_p exp(lse_p - lse) out_p`` with ``lse`` the log-sum-exp over the parts; a
    row with no key in any part gets zeros. Writes into ``outs[0]``."""
    lse_all = torch.stack(lses)
    total = torch.logsumexp(lse_all, 0)
    total = torch.where(torch.isfinite(total), total, 0.0)  # no key at all: every weight exp(-inf) = 0
    weights = torch.exp(lse_all - total)[..., None]
    out = outs[0].mul_(weights[0])
    for o, wt in zip(outs[1:], weights[1:]):
        out.addcmul_(o, wt)
    return out


def _gather_blocks(k, v, idx, bs):
    """Keys and values of the key blocks ``idx`` ``[nq, K]`` for every query block, ``[nq, X, K * bs, D or Dv]``,
    from ``k, v`` ``[X, n * bs, D]`` laid out block-major, ``[n * X, bs * D]`` (one row per (block, head)), with one
    ``index_select`` along dim 0: row copies, and a backward (``index_add`` along dim 0) measured about twice as fast
    on CPU as indexing the block axis of ``[X, n, bs * D]`` in place."""
    x, tp, d = (int(t) for t in k.shape)
    dv = int(v.shape[-1])
    n, nq, slots = tp // bs, int(idx.shape[0]), int(idx.shape[1])
    rows = (idx[:, None, :] * x + torch.arange(x, device=k.device)[None, :, None]).flatten()  # [nq, X, K]
    kt = k.reshape(x, n, bs * d).transpose(0, 1).reshape(n * x, bs * d)
    vt = v.reshape(x, n, bs * dv).transpose(0, 1).reshape(n * x, bs * dv)
    return kt.index_select(0, rows).view(nq, x, slots * bs, d), vt.index_select(0, rows).view(nq, x, slots * bs, dv)


def _gathered_sdpa(q, k, v, idx, allowed, bs, g0, scaling, dropout_p, empty_rows):
    """Query blocks ``g0 ..`` of ``q, k, v`` (``[X, n * bs, D]``, ``X`` heads of one sequence or all sequences' heads)
    against their key-block slots ``idx`` (``[n - g0, K]``) under ``allowed`` (``[n - g0, bs, K * bs]``), one SDPA
    call. The key blocks every query block needs are gathered into ``[n - g0, X, K * bs, D]``
    (:func:`_gather_blocks`). Blocks are SDPA's batch, heads its heads (the mask broadcast over them).
    Returns ``[X, (n - g0) * bs, Dv]``."""
    x, tp, d = (int(s) for s in q.shape)
    dv = int(v.shape[-1])
    n, nq = tp // bs, int(idx.shape[0])
    kg, vg = _gather_blocks(k, v, idx, bs)
    qn = q.reshape(x, n, bs, d)[:, g0:].transpose(0, 1)  # [nq, X, bs, D]
    mask = allowed[:, None]  # [nq, 1, bs, K * bs]
    if empty_rows:
        out = sdpa_zero_empty_rows(qn, kg, vg, mask, scaling, dropout_p)
    else:  # no padding and no ragged block: every query sees its own block
        out = F.scaled_dot_product_attention(qn, kg, vg, attn_mask=mask, dropout_p=dropout_p, scale=scaling)
    return out.transpose(0, 1).reshape(x, nq * bs, dv)


def _blocks_inference(q, k, v, idx, allowed, bs, g0, scaling, dropout_p, empty_rows, *, half, causal, num_global):
    """:func:`_gathered_sdpa` without autograd (CPU, float32/64, no dropout), gathering only what is not contiguous.
    The slots split into three parts, each one call of torch's fused CPU attention kernel
    (``_scaled_dot_product_flash_attention_for_cpu``, which returns its log-sum-exp and reads strided views):

    * the window: query block ``g`` meets blocks ``g - half .. g + half`` (causal ``.. g``), ``w`` consecutive blocks
      of the key sequence padded by ``half`` blocks at each end: an overlapping view, no copy;
    * the global blocks, the same keys for every query block: a view with a zero stride over the query blocks;
    * the random blocks, gathered as in :func:`_gathered_sdpa` (``r`` of the ``K`` slots);

    merged through their log-sum-exps (``out = sum_p exp(lse_p - lse) out_p``; a part whose row allows no key gets
    ``lse = -inf``, a row with none at all zeros). The slots keep their masks: out-of-range window blocks (read as
    zero padding), duplicates and causality are masked exactly as in the gathered path. Measured T = 8192, H = 12,
    D = 64, block 64, 3 random blocks, forward: see ``docs/bench`` (the gather of all ``K`` slots was about 40% of
    the gathered path's time)."""
    x, tp, d = (int(t) for t in q.shape)
    dv = int(v.shape[-1])
    n, nq, slots = tp // bs, int(idx.shape[0]), int(idx.shape[1])
    w = half + 1 if causal else 2 * half + 1
    qn = q.reshape(x, n, bs, d)[:, g0:].transpose(0, 1)  # [nq, X, bs, D], a view
    after = 0 if causal else half
    kp = F.pad(k, (0, 0, half * bs, after * bs))  # [X, (half + n + after) bs, D]
    vp = F.pad(v, (0, 0, half * bs, after * bs))
    lp = kp.shape[1]
    window = lambda t, e: t.as_strided((nq, x, w * bs, e), (bs * e, lp * e, e, 1), g0 * bs * e)  # noqa: E731
    parts = [(window(kp, d), window(vp, dv), 0, w)]
    if num_global:
        glob = lambda t, e: t.as_strided((nq, x, num_global * bs, e), (0, tp * e, e, 1))  # noqa: E731
        parts.append((glob(k.contiguous(), d), glob(v.contiguous(), dv), w, w + num_global))
    if slots > w + num_global:
        parts.append((*_gather_blocks(k, v, idx[:, w + num_global:], bs), w + num_global, slots))
    # [nq, X, bs, Dv] and [nq, X, bs] per part; the slots' mask [nq, 1, bs, keys] broadcast over the heads
    outs, lses = zip(*(_fused_part(qn, kk, vv, allowed[:, None, :, a * bs:b * bs], scaling) for kk, vv, a, b in parts))
    return _merge_parts(list(outs), list(lses)).transpose(0, 1).reshape(x, nq * bs, dv)


def block_sparse_pairs(t, *, block_size, num_global_blocks, num_random_blocks, num_window_blocks, seed, causal):
    """(query, key) pairs the pattern allows on an unpadded length-``t`` sequence, counted at block level."""
    if t == 0:
        return 0
    n = math.ceil(t / block_size)
    sizes = torch.full((n,), block_size, dtype=torch.int64)
    sizes[-1] = t - (n - 1) * block_size
    idx, ok = _slots(n, block_size=block_size, num_global=num_global_blocks, num_random=num_random_blocks,
                     num_window=num_window_blocks, causal=causal, seed=seed, n_blocks=None, device="cpu")
    idx, ok = idx[0], ok[0]
    g = torch.arange(n)[:, None]
    pair = sizes[:, None] * sizes[idx]  # [n, K]
    if causal:
        diag = idx == g
        pair = torch.where(diag, sizes[:, None] * (sizes[:, None] + 1) // 2, pair)
    total = int((pair * ok).sum())
    if not causal:
        glob = min(num_global_blocks, n)
        total = total - int((pair * ok)[:glob].sum()) + int(sizes[:glob].sum()) * t
    return total


# ---------------------------------------------------------------- strided (Sparse Transformer)


def strided_allowed(mask, t_q, t_k, causal, device, *, stride):
    """Dense ``[B or 1, 1, T_q, T_k]`` bool matrix of the strided pattern (queries are the last ``T_q`` keys)."""
    offset = causal_offset(t_q, t_k) if causal else 0
    if not causal:
        _check_bidirectional_square(t_q, t_k, "strided")
    i = torch.arange(t_q, device=device)[:, None] + offset
    j = torch.arange(t_k, device=device)[None, :]
    rel = i - j
    if causal:
        allowed = (rel >= 0) & ((rel < stride) | (rel % stride == 0))
    else:
        allowed = (rel.abs() < stride) | (rel % stride == 0)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    return allowed


def strided_reference(q, k, v, *, mask=None, causal=False, scaling, stride):
    """Materialised strided attention: masked softmax over :func:`strided_allowed`."""
    allowed = strided_allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, stride=stride)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    return torch.matmul(masked_softmax(scores, allowed), v)


def strided_attention(q, k, v, *, mask=None, causal=False, scaling, stride, dropout=0.0, training=False):
    """Sparse Transformer strided attention, fast path (see the module docstring)."""
    t_q, t_k = int(q.shape[-2]), int(k.shape[-2])
    if q.numel() == 0 or k.numel() == 0:
        return empty_attention(q, k, v, causal=causal)
    if t_q != t_k:
        if not causal:
            _check_bidirectional_square(t_q, t_k, "strided")
        allowed = strided_allowed(mask, t_q, t_k, True, q.device, stride=stride)
        probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed)
        return torch.matmul(dropout_probs(probs, dropout, training), v)
    mask = padding_or_none(mask)
    if _fused_kernel_applies(q, k, v, dropout if training else 0.0):
        return _strided_inference(q, k, v, mask=mask, causal=causal, scaling=scaling, stride=stride)
    bsz, h, t, d = (int(x) for x in q.shape)
    dv = int(v.shape[-1])
    s, n, tp, kp, vp, local_ok, col_ok = _strided_layout(k, v, mask, causal, stride)
    left, span = s, local_ok.shape[-1]  # `s` zero slots before the keys; the band's width
    qp = F.pad(q * scaling, (0, 0, 0, tp - t))  # the scale folded into the queries: T x D, not the scores
    qb = qp.view(bsz, h, n, s, d)
    kw = kp.unfold(2, span, s)  # [B, H, n, D, span]: block g sees keys g * s - s .. g * s + 2s (causal: + s)
    vw = vp.unfold(2, span, s).transpose(-1, -2)  # [B, H, n, span, Dv]
    # scores are fresh matmul results that no backward reads: masked, shifted and exponentiated in place
    local = torch.matmul(qb, kw).masked_fill_(~local_ok[:, None], float("-inf"))  # [B, H, n, s, span]
    # strided part along the columns of the [n, s] view: query (r, c) meets keys (r', c), r' < r (causal) or r' != r
    qc = qb.transpose(2, 3)  # [B, H, s, n, D]
    kc = kp[:, :, left : left + tp].view(bsz, h, n, s, d).transpose(2, 3)
    vc = vp[:, :, left : left + tp].view(bsz, h, n, s, dv).transpose(2, 3)
    col = torch.matmul(qc, kc.transpose(-1, -2)).masked_fill_(~col_ok[:, None], float("-inf"))  # [B, H, s, n, n]
    # log-sum-exp merge: one (detached) row maximum over both parts, the sum of both parts' exponentials
    with torch.no_grad():
        m = torch.maximum(local.amax(-1), col.amax(-1).transpose(2, 3))  # [B, H, n, s]
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e_local = local.sub_(m[..., None]).exp_()
    e_col = col.sub_(m.transpose(2, 3)[..., None]).exp_()
    denom = e_local.sum(-1) + e_col.sum(-1).transpose(2, 3)  # [B, H, n, s]
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout > 0.0 and training:
        e_local = F.dropout(e_local, dropout, training=True)
        e_col = F.dropout(e_col, dropout, training=True)
    out = torch.matmul(e_local, vw) + torch.matmul(e_col, vc).transpose(2, 3)  # [B, H, n, s, Dv]
    out = out / denom[..., None]
    return out.reshape(bsz, h, tp, dv)[:, :, :t]


def _strided_layout(k, v, mask, causal, stride):
    """What both strided paths cut the sequence into: ``s = min(stride, T)``, ``n`` rows of the ``[n, s]`` view,
    ``tp = n s``; keys and values padded with ``s`` zero slots before (and after, bidirectional) the padded sequence,
    ``[B, H, s + tp (+ s), D]``; the local band's mask ``[B or 1, n, s, span]`` (query block ``g`` against keys
    ``g s - s .. g s + 2 s``, causal ``.. g s + s``) and the strided columns' mask ``[B or 1, s, n, n]`` (query
    ``(r, c)`` against keys ``(r', c)``, ``r' < r`` causal, ``r' != r`` bidirectional), both with key padding."""
    t = int(k.shape[-2])
    s = min(stride, t)
    n = math.ceil(t / s)
    tp = n * s
    left, right = s, (0 if causal else s)
    span = left + s + right
    kp = F.pad(k, (0, 0, left, tp - t + right))
    vp = F.pad(v, (0, 0, left, tp - t + right))
    real = torch.ones(1, t, dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    key_ok = F.pad(real, (left, tp - t + right))  # [B or 1, left + tp + right]
    c = torch.arange(s, device=k.device)[:, None]
    u = torch.arange(span, device=k.device)[None, :]
    rel = c + left - u  # i - j
    band = ((rel >= 0) & (rel < s)) if causal else (rel.abs() < s)  # [s, span]
    local_ok = band[None, None] & key_ok.unfold(1, span, s)[:, :, None, :]  # [B or 1, n, s, span]
    r = torch.arange(n, device=k.device)
    other = (r[:, None] > r[None, :]) if causal else (r[:, None] != r[None, :])  # [n, n]
    col_key_ok = key_ok[:, left : left + tp].view(-1, n, s).transpose(1, 2)  # [B or 1, s, n]
    col_ok = other[None, None] & col_key_ok[:, :, None, :]  # [B or 1, s, n, n]
    return s, n, tp, kp, vp, local_ok, col_ok


def _strided_inference(q, k, v, *, mask, causal, scaling, stride):
    """Strided attention without autograd (CPU, float32/64), ``T_q = T_k``: the local band through torch's fused
    CPU attention kernel (:func:`_fused_part`: blocks of ``stride`` queries against the ``2 stride`` / ``3 stride``
    keys around them), which returns its log-sum-exp, so the ``[T, span]`` local scores are never materialised; the
    strided part the same way along the columns of the ``[n, stride]`` view (the columns as the kernel's heads,
    queries, keys and values as transposed views); the two merged through their log-sum-exps (:func:`_merge_parts`).
    The fused kernel has no gradient for its log-sum-exp output, so training takes :func:`strided_attention`'s own
    path. A row with no key at all gets a zero output. Measured T = 8192, H = 12, D = 64, stride 128 (fp32,
    2 threads), forward: 300 ms bidirectional through the materialised local scores, about 150 ms here
    (``docs/bench``)."""
    bsz, h, t, d = (int(x) for x in q.shape)
    dv = int(v.shape[-1])
    s, n, tp, kp, vp, local_ok, col_ok = _strided_layout(k, v, mask, causal, stride)
    span = local_ok.shape[-1]
    qb = (F.pad(q, (0, 0, 0, tp - t)) if tp > t else q.contiguous()).view(bsz * h, n, s, d)

    def per_head(ok):  # a mask over [B or 1, ...] broadcast over the kernel's B H batch
        return ok[:, None].expand(bsz, h, *ok.shape[1:]).flatten(0, 1) if ok.shape[0] > 1 else ok

    # [B H, n, s or span, D]: the n blocks as the kernel's heads; keys and values as overlapping windows of the
    # padded sequence, a view the kernel reads as is (measured 85 ms against 143 ms with contiguous copies)
    kw = kp.unfold(2, span, s).transpose(-1, -2).flatten(0, 1)
    vw = vp.unfold(2, span, s).transpose(-1, -2).flatten(0, 1)
    out_local, lse_local = _fused_part(qb, kw, vw, per_head(local_ok), scaling)
    kc = kp[:, :, s : s + tp].view(bsz * h, n, s, d).transpose(1, 2)
    vc = vp[:, :, s : s + tp].view(bsz * h, n, s, dv).transpose(1, 2)
    out_col, lse_col = _fused_part(qb.transpose(1, 2), kc, vc, per_head(col_ok), scaling)
    out = _merge_parts([out_local.view(bsz, h, n, s, dv), out_col.view(bsz, h, s, n, dv).transpose(2, 3)],
                       [lse_local.view(bsz, h, n, s), lse_col.view(bsz, h, s, n).transpose(2, 3)])
    return out.reshape(bsz, h, tp, dv)[:, :, :t]


def strided_pairs(t, *, stride, causal):
    """(query, key) pairs the strided pattern allows on an unpadded length-``t`` sequence."""
    i = torch.arange(t, dtype=torch.int64)
    s = stride
    if causal:
        return int((torch.clamp(i, max=s - 1) + 1 + i // s).sum())
    local = torch.clamp(i + s, max=t) - torch.clamp(i - s + 1, min=0)
    return int((local + i // s + (t - 1 - i) // s).sum())
