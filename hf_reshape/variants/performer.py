"""``performer``: softmax attention estimated with FAVOR+ positive orthogonal random features (Choromanski et al.
2021, "Rethinking Attention with Performers", ICLR).

``exp(s q . k) = E_w[exp(w . u_q - |u_q|^2 / 2) exp(w . u_k - |u_k|^2 / 2)]`` for ``w ~ N(0, I)`` and ``u = x sqrt(s)``
(``s`` the model's softmax scale), so ``m = num_features`` draws give features whose dot products estimate the
softmax kernel without bias and are always positive (:func:`hf_reshape.ops.feature_maps.performer_features`). The
draws are orthogonal within blocks of ``D`` (lower variance than independent draws) and differ per head. The
estimate's error falls as ``m`` grows; time is ``O(T m D)``, no ``T x T`` tensor.

The projection ``[H, D, m]`` is a persistent buffer of the layer, drawn from ``seed`` at reshape time and saved with
the model, so a reload is exact whatever the seed's draws would be on another torch. With ``redraw_interval = N > 0``
it is redrawn in place every ``N`` forwards in training mode (the ``n``-th redraw is a deterministic function of
``seed`` and ``n``), as the paper does during training; never in eval mode, and never when ``N = 0``. The count of
training forwards lives on the buffer tensor itself, not in the checkpoint: it starts again from zero after a reload
or a move to another device or dtype. Every layer draws from the same ``seed``, so layers share their draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameterError
from ..ops.feature_maps import PerformerFeatureMap, performer_features, performer_projection
from ..registry import VariantParams, check_float, check_int, register_variant
from ._kernelized import variant_functions

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


def init_state(params, *, num_heads, head_dim, **_):
    fmap = PerformerFeatureMap(num_heads, head_dim, num_features=params.num_features, seed=params.seed)
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
    fresh = performer_projection(h, d, m, params.seed, draw=steps // params.redraw_interval)
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
_fast = _functions["forward"]


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False, projection=None):
    _check(projection, params)
    redraw_if_due(projection, params, training)
    return _fast(q, k, v, mask=mask, causal=causal, scaling=scaling, params=params, dropout=dropout,
                 training=training, projection=projection)


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
)
