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
