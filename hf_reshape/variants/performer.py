"""``performer``: softmax attention estimated with FAVOR+ positive orthogonal random features (Choromanski et al.
2021, "Rethinking Attention with Performers", ICLR).

``exp(s q . k) = E_w[exp(w . u_q - |u_q|^2 / 2) exp(w . u_k - |u_k|^2 / 2)]`` for ``w ~ N(0, I)`` and ``u = x sqrt(s)``
(``s`` the model's softmax scale), so ``m = num_features`` draws give features whose dot products estimate the
softmax kernel without bias and are always positive (:func:`hf_reshape.ops.feature_maps.performer_features`). The
draws are orthogonal within blocks of ``D`` (lower variance than independent draws) and differ per head. The
estimate's error falls as ``m`` grows; time is ``O(T m D)``, no ``T x T`` tensor.

The projection ``[H, D, m]`` is a persistent buffer of the layer, drawn at reshape time from ``seed`` and the
layer's index (:func:`hf_reshape.ops.feature_maps.performer_layer_seed`: every layer has its own draw, as the
paper's per-layer random features do) and saved with the model, so a reload is exact whatever the seed's draws would
be on another torch. With ``redraw_interval = N > 0`` it is redrawn in place every ``N`` forwards in training mode,
as the paper does during training; never in eval mode, and never when ``N = 0``. A redraw is a deterministic
function of ``seed`` and the projection it replaces (a hash of its float32 values), so each layer follows its own
chain of draws from ``(seed, layer)`` without any further state, and a model reloaded mid-training continues the
chain from its saved projection. The count of training forwards lives on the buffer tensor itself, not in the
checkpoint: it starts again from zero after a reload or a move to another device or dtype.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameterError
from ..ops import linear as linear_ops
from ..ops.common import autograd_records, padding_or_none
from ..ops.feature_maps import PerformerFeatureMap, performer_features, performer_projection
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import kernel_flops, variant_functions

_STEPS = "_hf_reshape_training_forwards"  # attribute of the projection buffer: training forwards since the reshape


@dataclass
class PerformerParams(VariantParams):
    num_features: int = field(default=256, metadata={"help": "m, random features per head (error falls as m grows)"})
    seed: int = field(default=0, metadata={"help": "seed of the random projection (drawn once, saved with the model)"})
    redraw_interval: int = field(
        default=0, metadata={"help": "redraw the projection every N training forwards (0 = never; never in eval)"}
    )
    eps: float = field(default=1e-6, metadata={"help": "lower bound of the denominator (no allowed key -> 0)"})
    chunk_size: int = field(default=64, metadata={"help": "chunk of the causal chunked kernel (speed knob only)"})

    def validate(self):
        check_int("num_features", self.num_features)
        check_int("seed", self.seed, minimum=0)
        check_int("redraw_interval", self.redraw_interval, minimum=0)
        check_float("eps", self.eps)
        check_int("chunk_size", self.chunk_size)


def init_state(params, *, num_heads, head_dim, layer_index=0, **_):
    fmap = PerformerFeatureMap(num_heads, head_dim, num_features=params.num_features, seed=params.seed,
                               layer=layer_index)
    return {"projection": fmap.projection}  # a plain tensor: the layer keeps it as a persistent buffer


def _check(projection, params):
    if projection is None:
        raise InvalidParameterError(
            "performer needs its state tensor `projection` of shape [H, D, num_features]; make it with "
            "hf_reshape.functional.init_state('performer', num_heads=..., head_dim=...)"
        )
    if projection.dim() != 3 or projection.shape[-1] != params.num_features:
        raise InvalidParameterError(
            f"performer projection must be [H, D, num_features={params.num_features}], got {tuple(projection.shape)}"
        )


def _fingerprint(projection: torch.Tensor) -> int:
    """A 63-bit hash of the projection's values (as float32, wherever it lives): what the next draw is keyed by."""
    data = projection.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def redraw_if_due(projection: torch.Tensor, params: PerformerParams, training: bool) -> bool:
    """Count one training forward on ``projection`` and redraw it in place when the count reaches a multiple of
    ``redraw_interval``. Returns whether it redrew. Eval forwards, and ``redraw_interval = 0``, count nothing."""
    if not training or not params.redraw_interval:
        return False
    steps = getattr(projection, _STEPS, 0) + 1
    setattr(projection, _STEPS, steps)
    if steps % params.redraw_interval:
        return False
    h, d, m = projection.shape
    fresh = performer_projection(h, d, m, params.seed, draw=1, layer=_fingerprint(projection))
    with torch.no_grad():
        projection.copy_(fresh)
    return True


def features(q, k, *, params, scaling, q_offset=0, k_offset=0, projection=None):
    _check(projection, params)
    return (performer_features(q, projection, scaling, query=True),
            performer_features(k, projection, scaling, query=False))


def kernel(q, k, *, params, scaling, q_offset=0, projection=None):
    """``phi(q) . phi(k)`` with the plain (unshifted) map on both sides: the reference checks that the query shift of
    the fast path cancels."""
    _check(projection, params)
    fq = performer_features(q, projection, scaling, query=False)
    return torch.matmul(fq, performer_features(k, projection, scaling, query=False).transpose(-1, -2))


_functions = variant_functions(features, kernel)
_generic = _functions["forward"]

# Bytes of one [B, H, rows, m] fp32 slice of features that the fast path maps at a time. Larger than the linear
# kernels' own slices: with m = 256 features their ~4 MiB segments are ~300 rows, so a causal call at T = 8192 ran
# ~26 segments of ~10 small multi-threaded ops each, which a busy machine serialises (measured at load 13 on 2 cores,
# T = 8192, m = 256, causal forward of the kernel alone: 10.4 s at 4 MiB, 2.9 s at 16 MiB, 2.0 s at 64 MiB).
SEGMENT_BYTES = 32 << 20


def _segment_rows(q, m: int, chunk_size: int) -> int:
    b, h, t, _ = q.shape
    rows = SEGMENT_BYTES // max(1, 4 * b * h * m)
    return min(t, max(chunk_size, rows // chunk_size * chunk_size)) or 1


def _key_features(k, v, mask, projection, scaling):
    """``phi(k)`` with padded keys zeroed, and ``v`` in the working dtype."""
    fk = performer_features(k, projection, scaling, query=False)
    if mask is not None:
        fk = fk * mask[:, None, :, None].to(fk.dtype) if autograd_records(fk) else \
            fk.mul_(mask[:, None, :, None].to(fk.dtype))
    return fk, v.to(fk.dtype)


def _inference(q, k, v, mask, projection, scaling, params, rows, causal):
    """Without autograd: the features exist one slice of ``rows`` tokens at a time, never for the whole sequence
    (:func:`hf_reshape.ops.linear.mapped_linear_inference`; causal: chunk after chunk from one running state)."""
    return linear_ops.mapped_linear_inference(
        q, k, v, mask=mask, causal=causal, eps=params.eps, chunk_size=params.chunk_size, rows=rows,
        phi_q=functools.partial(performer_features, projection=projection, scaling=scaling, query=True),
        phi_k=functools.partial(performer_features, projection=projection, scaling=scaling, query=False))


def _causal(q, k, v, mask, projection, scaling, params, rows):
    """Segments of ``rows`` tokens: each maps its queries and keys, runs the chunked causal kernel
    (:func:`hf_reshape.ops.linear.causal_linear_chunked`, which has its own backward) from the running sums of the
    segments before it, then adds its keys to them. Autograd sees the segments' features only through the kernel and
    the running sums, so forward + backward keeps ``[B, H, T, m]`` features but no ``[T, m, D]`` state."""
    state = norm = None
    outs = []
    t = q.shape[-2]
    for s in range(0, t, rows):
        fq = performer_features(q[..., s:s + rows, :], projection, scaling, query=True)
        fk, v_s = _key_features(k[..., s:s + rows, :], v[..., s:s + rows, :],
                                None if mask is None else mask[:, s:s + rows], projection, scaling)
        outs.append(linear_ops.causal_linear_chunked(fq, fk, v_s, eps=params.eps, chunk_size=params.chunk_size,
                                                     state=state, norm=norm))
        if s + rows < t:
            kv, z = torch.matmul(fk.transpose(-1, -2), v_s), fk.sum(-2)
            state, norm = (kv, z) if state is None else (state + kv, norm + z)
    return outs[0] if len(outs) == 1 else torch.cat(outs, -2)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False, projection=None):
    """The fast path (no probability matrix to drop out). Causal, and bidirectional without autograd, map the
    features segment by segment (:func:`_causal` under autograd, :func:`_inference` without); bidirectional under
    autograd maps them
    once and runs the sliced linear kernel with an identity map; a decoder's call with past keys (``T_q < T_k``)
    takes the generic feature-map path."""
    _check(projection, params)
    redraw_if_due(projection, params, training)
    t_q, t_k = q.shape[-2], k.shape[-2]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, projection))
    if t_q == 0 or t_k == 0 or q.shape[0] == 0 or q.shape[1] == 0 or (causal and t_q != t_k) or \
            (not causal and grad):
        return _generic(q, k, v, mask=mask, causal=causal, scaling=scaling, params=params, dropout=dropout,
                        training=training, projection=projection)
    mask = padding_or_none(mask)
    rows = _segment_rows(q, projection.shape[-1], params.chunk_size)
    if causal and grad:
        return _causal(q, k, v, mask, projection, scaling, params, rows).to(v.dtype)
    return _inference(q, k, v, mask, projection, scaling, params, rows, causal).to(v.dtype)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: the projection ``x W`` (``m`` columns) for queries and keys, then linear attention over
    the ``m`` features: ``8 T m D + 2 T m`` per head (the exp is not counted)."""
    m = params.num_features
    return float(batch * num_heads * kernel_flops(t, m, head_dim, map_matmul=m))


register_variant(
    name="performer",
    family="linear",
    params_cls=PerformerParams,
    **{**_functions, "forward": _forward},
    init_state=init_state,
    state_names=("projection",),
    complexity="O(T m D) time, O(T m + m D) memory (causal: chunked)",
    quadratic=False,
    description="softmax estimated by m positive orthogonal random features (FAVOR+); projection saved, optional redraw",
    small_params={"num_features": 16, "chunk_size": 4},
    paper="Choromanski et al. 2021, Rethinking Attention with Performers (ICLR)",
    cache_layer="linear_state",
    flops=flops,
    bench_params={"num_features": 256},
    quick_params={"num_features": 16},
)
