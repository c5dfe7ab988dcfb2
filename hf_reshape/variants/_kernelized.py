"""What the feature-map variants share (``performer``, ``cosformer``, ``t2r``, ``taylor``): attention
``out_i = sum_j A_ij v_j / max(sum_j A_ij, eps)`` over the keys query ``i`` may see, with ``A_ij = phi(q_i) . phi(k_j)``.

A variant supplies two functions of the same maths:

* ``features(q, k, *, params, scaling, q_offset, k_offset, **state) -> (phi(q), phi(k))``, the feature maps of
  queries at absolute positions ``q_offset + i`` and keys at ``k_offset + j``. The fast path maps queries and keys
  once and runs :func:`hf_reshape.ops.linear.linear_attention` on them with an identity ``phi`` (as ``hedgehog``
  does); the recurrent decode cache (:class:`hf_reshape.cache.LinearRecurrentLayer`, through
  ``VariantSpec.features``) maps each new token the same way and keeps a running state of ``F x D_v`` sums, ``F``
  being the feature map's output dimension.
* ``kernel(q, k, *, params, scaling, q_offset, **state) -> A`` ``[B, H, T_q, T_k]``, the materialised kernel, for the
  reference and for the attention weights. Where the maths allows, it is computed from ``q . k`` directly rather
  than through the features (Taylor's ``1 + s q.k + (s q.k)^2 / 2``, cosFormer's ``relu(q) . relu(k) cos(...)``), so
  checking the fast path against the reference checks the feature construction too.

Under ``causal=True`` the queries are the last ``T_q`` keys, so their first position is ``T_k - T_q``.
"""

from __future__ import annotations

import torch

from ..ops import linear as linear_ops
from ..ops.common import allowed_mask, causal_offset
from ..ops.feature_maps import identity


def query_offset(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int:
    """Absolute position of the first query (the keys start at 0)."""
    return causal_offset(q.shape[-2], k.shape[-2]) if causal else 0


def make_forward(features):
    """The fast path: feature-map ``q`` and ``k``, then the linear kernels of :mod:`hf_reshape.ops.linear`."""

    def forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False, **state):
        # no probability matrix to drop out
        fq, fk = features(q, k, params=params, scaling=scaling, q_offset=query_offset(q, k, causal), k_offset=0,
                          **state)
        out = linear_ops.linear_attention(fq, fk, v, mask=mask, causal=causal, phi=identity, eps=params.eps,
                                          chunk_size=params.chunk_size)
        return out.to(v.dtype)

    return forward


def _normalised_kernel(kernel, q, k, *, mask, causal, scaling, params, **state):
    a = kernel(q, k, params=params, scaling=scaling, q_offset=query_offset(q, k, causal), **state)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device)
    if allowed is not None:
        a = a * allowed
    return a / a.sum(-1, keepdim=True).clamp_min(params.eps)


def make_reference(kernel):
    """The materialised reference: the full ``[B, H, T_q, T_k]`` kernel, masked and normalised, times ``v``."""

    def reference(q, k, v, *, mask, causal, scaling, params, **state):
        w = _normalised_kernel(kernel, q, k, mask=mask, causal=causal, scaling=scaling, params=params, **state)
        return torch.matmul(w, v.to(w.dtype)).to(v.dtype)

    return reference


def make_weights(kernel):
    """``VariantSpec.weights``: the normalised kernel over the allowed keys ``[B, H, T_q, T_k]`` (``output = W @ v``;
    a row with no allowed key is zero)."""

    def weights(q, k, v, *, mask, causal, scaling, params, **state):
        w = _normalised_kernel(kernel, q, k, mask=mask, causal=causal, scaling=scaling, params=params, **state)
        return w.to(q.dtype)

    return weights


def kernel_flops(t: int, num_features: int, head_dim: int, *, map_matmul: int = 0) -> int:
    """Useful forward FLOPs per head of linear attention over ``num_features`` features: ``phi(K)^T V`` and
    ``phi(Q) S`` (``2 T F D`` each) and the normaliser ``phi(Q) z`` (``2 T F``), causal or not; plus the matmul of a
    feature map that projects its inputs (``map_matmul`` output columns per token, for queries and keys:
    ``2 T D map_matmul`` each). Elementwise work (exp, relu, products of coordinates) is not counted."""
    return 4 * t * num_features * head_dim + 2 * t * num_features + 2 * 2 * t * head_dim * map_matmul


def variant_functions(features, kernel) -> dict:
    """The keyword arguments of ``register_variant`` that these functions fill."""
    return {
        "forward": make_forward(features),
        "reference": make_reference(kernel),
        "weights": make_weights(kernel),
        "weights_over_keys": True,
        "features": features,
    }
