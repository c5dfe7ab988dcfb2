"""Feature maps ``phi`` for linearized attention, applied elementwise to queries and keys as given.

* ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs").
* ``relu``: ``relu(x)`` (used as a baseline in Qin et al. 2022, cosFormer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


FEATURE_MAPS = {"elu": elu_plus_one, "relu": relu}


def elu_plus_one_grad(x: torch.Tensor, fx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad * d phi / dx`` for ``phi = elu + 1``: ``1`` where ``x > 0``, else ``exp(x) = phi(x)``."""
    return torch.where(x > 0, grad, grad * fx)


def relu_grad(x: torch.Tensor, fx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * (x > 0).to(grad.dtype)


FEATURE_MAP_GRADS = {elu_plus_one: elu_plus_one_grad, relu: relu_grad}
"""Hand-written vector-Jacobian products of the parameter-free feature maps, used by the chunked bidirectional
kernel's backward (:class:`hf_reshape.ops.linear._BidirectionalChunked`); a feature map missing here (one with
parameters, say) runs through plain autograd instead."""
