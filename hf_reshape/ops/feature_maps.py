"""Feature maps ``phi`` for linearized attention: modules that own their parameters and buffers, declare their
output dimension, and are found by name in a registry a user can add to (:func:`register_feature_map`).

Linearized attention scores a query against a key by ``phi(q) . phi(k)`` (Katharopoulos et al. 2020); what
tells the variants apart is ``phi``. Each map here is a :class:`FeatureMap`, an ``nn.Module`` of queries or keys
``[B, H, T, D] -> [B, H, T, F]`` with ``F = output_dim(D)``. Its maths is a plain function of the input and of
the map's tensors (``features(x, **tensors)``): a variant keeps those tensors as its per-layer state (saved with
the model, trained, passed to :func:`hf_reshape.functional.attention`) and calls the same function; the module
form (``forward``) is for using a map on its own. After flash-linear-attention's ``fla/modules/feature_map.py``
(maps as modules), with a registry and a declared output dimension added.

Built in:

* ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs"), elementwise, no parameters.
* ``relu``: ``relu(x)`` (a baseline in Qin et al. 2022, cosFormer), elementwise, no parameters.
* ``hedgehog``: ``[softmax(x W), softmax(-x W)]`` per head (Zhang et al. 2024, "The Hedgehog & the Porcupine").
* ``t2r``: ``relu(x W + b)`` per head (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs").
* ``performer``: FAVOR+ positive orthogonal random features ``exp(w_i . x - |x|^2 / 2) / sqrt(m)`` (Choromanski
  et al. 2021, "Rethinking Attention with Performers").
* ``taylor``: the second-order Taylor expansion of ``exp(s q . k)`` as a dot product (Arora et al. 2024, "Simple
  linear attention language models balance the recall-throughput tradeoff", the Based feature map).
* ``cosformer``: ``[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]`` at position ``i`` (Qin et al. 2022,
  "cosFormer: Rethinking Softmax in Attention"): the only built-in map that depends on positions.

The elementwise, parameter-free maps (``elu``, ``relu``, and any registered map that declares ``elementwise``)
are what the ``linear`` variant takes as its ``feature_map``; those with a hand-written derivative
(:data:`FEATURE_MAP_GRADS`) run the sliced bidirectional kernel of :mod:`hf_reshape.ops.linear`.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, SequenceTooLongError
from .common import autograd_records, tracing

_HALF = (torch.float16, torch.bfloat16)


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision (exp, products of features and running sums need the range)."""
    return x.float() if x.dtype in _HALF else x


# ---------- elementwise, parameter-free maps (the `linear` variant's) ----------


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def identity(x: torch.Tensor) -> torch.Tensor:
    """``phi`` for queries and keys that are already feature-mapped (the variants below map them first)."""
    return x


def elu_plus_one_grad(x: torch.Tensor, fx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad * d phi / dx`` for ``phi = elu + 1``: ``1`` where ``x > 0``, else ``exp(x) = phi(x)``."""
    return torch.where(x > 0, grad, grad * fx)


def relu_grad(x: torch.Tensor, fx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * (x > 0).to(grad.dtype)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"elu": elu_plus_one, "relu": relu}
"""The elementwise, parameter-free feature maps by name: what the ``linear`` variant's ``feature_map`` accepts.
:func:`register_feature_map` adds a map here when its class declares ``elementwise``."""

FEATURE_MAP_GRADS: dict = {elu_plus_one: elu_plus_one_grad, relu: relu_grad}
"""Hand-written vector-Jacobian products of the parameter-free feature maps, used by the chunked bidirectional
kernel's backward (:class:`hf_reshape.ops.linear._BidirectionalChunked`); a feature map missing here (one with
parameters, say) runs through plain autograd instead."""


# ---------- the maths of the other maps, as functions of their tensors ----------


def _check_per_head(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != x.shape[-1]:
        raise InvalidParameterError(
            f"{name} feature map of shape {tuple(weight.shape)} does not fit [H, D, F] for inputs {tuple(x.shape)}"
        )


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[softmax(x W), softmax(-x W)]`` per head: ``x`` ``[B, H, T, D]``, ``weight`` ``[H, D, F]`` -> ``[B, H, T, 2F]``.
    Computed in float32 for half-precision inputs."""
    _check_per_head("hedgehog", x, weight)
    x = _work(x)
    proj = torch.einsum("bhtd,hdf->bhtf", x, weight.to(x.dtype))
    return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], -1)


def t2r_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x W + b)`` per head: ``x`` ``[B, H, T, D]``, ``weight`` ``[H, D, F]``, ``bias`` ``[H, F]`` ->
    ``[B, H, T, F]`` (float32 for half-precision inputs)."""
    _check_per_head("t2r", x, weight)
    if bias.dim() != 2 or tuple(bias.shape) != (weight.shape[0], weight.shape[2]):
        raise InvalidParameterError(
            f"t2r feature bias of shape {tuple(bias.shape)} does not fit [H, F] = {(weight.shape[0], weight.shape[2])}"
        )
    x = _work(x)
    proj = torch.einsum("bhtd,hdf->bhtf", x, weight.to(x.dtype))
    return F.relu(proj + bias.to(x.dtype)[:, None, :])


def performer_features(x: torch.Tensor, projection: torch.Tensor, scaling: float, query: bool) -> torch.Tensor:
    """FAVOR+ positive random features of ``u = x sqrt(scaling)``: ``exp(w_i . u - |u|^2 / 2) / sqrt(m)`` for the
    ``m`` columns ``w_i`` of ``projection`` ``[H, D, m]``, so that ``E[phi(q) . phi(k)] = exp(scaling q . k)``.

    ``query=True`` gives the query form: every feature of a query is divided by the same positive number
    (``exp(max_i w_i . u - |u|^2 / 2)``), which cancels between the numerator and the denominator of that query's
    normalised attention, and keeps its features in ``(0, 1 / sqrt(m)]`` whatever its norm. Keys get no such shift:
    their relative weights are the point, and a shift shared by all keys would depend on the other keys (on the
    padding, the batch, the future), which neither padding invariance nor a recurrent decode state allows. A key's
    exponent is at most ``|w_i|^2 / 2``, so it cannot overflow in float32 for head dims up to a few hundred.
    """
    _check_per_head("performer", x, projection)
    x = _work(x) * math.sqrt(scaling)
    m = projection.shape[-1]
    proj = torch.einsum("bhtd,hdm->bhtm", x, projection.to(x.dtype))  # [B, H, T, m]
    if query:
        shift = proj.amax(-1, keepdim=True).detach()
    else:
        shift = x.pow(2).sum(-1, keepdim=True).mul(0.5)
    shift = shift + 0.5 * math.log(m)  # the 1 / sqrt(m) inside the exponent: one pass fewer
    if autograd_records(proj):
        return torch.exp(proj - shift)
    return proj.sub_(shift).exp_()  # no autograd: in place (fresh [B, H, T, m] memory costs page faults)


def orthogonal_gaussian(num_heads: int, head_dim: int, num_features: int, generator: torch.Generator) -> torch.Tensor:
    """``[H, D, m]``: per head, ``m`` columns drawn as FAVOR+'s orthogonal random features (Choromanski et al. 2021,
    Sec. 2.4): blocks of ``D`` orthonormal directions (QR of a Gaussian matrix, signs fixed by ``diag(R)`` so the
    directions are uniformly distributed), each column then given the length of an independent ``N(0, I_D)`` vector
    (chi-distributed), so every column is marginally ``N(0, I_D)`` and columns within a block are exactly orthogonal."""
    blocks = []
    for _ in range(num_heads):
        cols = []
        for _ in range(math.ceil(num_features / head_dim)):
            g = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            cols.append(q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0))
        directions = torch.cat(cols, -1)[:, :num_features]  # [D, m], unit columns
        lengths = torch.randn(head_dim, num_features, generator=generator, dtype=torch.float64).norm(dim=0)
        blocks.append(directions * lengths)
    if not blocks:  # no heads
        return torch.empty(0, head_dim, num_features)
    return torch.stack(blocks).to(torch.float32)


def taylor_output_dim(head_dim: int) -> int:
    return 1 + head_dim + head_dim * (head_dim + 1) // 2


_TRIANGLE: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _triangle(d: int, device: torch.device, dtype: torch.dtype):
    """The upper triangle of a ``d x d`` matrix, row by row (``a`` ascending, then ``b`` from ``a``): the index of
    each diagonal entry ``(a, a)`` in that order, and the weight of every entry in the quadratic features,
    ``1 / sqrt(2)`` on the diagonal and ``1`` off it (see :func:`taylor_features`)."""
    key = (d, str(device), dtype)
    if key in _TRIANGLE:
        return _TRIANGLE[key]
    diagonal = torch.tensor([a * d - a * (a - 1) // 2 for a in range(d)], dtype=torch.long, device=device)
    weight = torch.ones(d * (d + 1) // 2, dtype=torch.float64, device=device)
    weight[diagonal] = 0.5**0.5
    found = diagonal, weight.to(dtype)
    if not tracing():  # a traced call's tensors are fakes: never keep them
        _TRIANGLE[key] = found
    return found


def taylor_features(x: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[1, u, (u_a u_b w_ab)_{a <= b}]`` with ``u = x sqrt(scaling)``: ``[B, H, T, D] -> [B, H, T, 1 + D + D(D+1)/2]``.

    ``phi(q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2`` with ``s = scaling``, the second-order Taylor expansion of
    ``exp(s q . k)`` (Arora et al. 2024, Based): ``(q.k)^2 = sum_a q_a^2 k_a^2 + 2 sum_{a<b} q_a q_b k_a k_b``, so the
    upper triangle of ``u u^T`` with weights ``1 / sqrt(2)`` on the diagonal and ``1`` off it carries the quadratic
    term in ``D(D+1)/2`` features rather than ``D^2``. The kernel is at least ``1/2`` for any pair, so every
    allowed key gets a positive weight. Float32 for half-precision inputs.

    Row ``a`` of the triangle is one broadcast product ``u_a * u_{a:}`` (measured faster than gathering the pairs
    along the last axis, and than building feature-major rows, whose transposed layout the kernels' matmuls read
    slowly)."""
    u = _work(x) * math.sqrt(scaling)
    d = u.shape[-1]
    diagonal, weight = _triangle(d, u.device, u.dtype)
    if autograd_records(u):
        quad = torch.cat([u[..., a:a + 1] * u[..., a:] for a in range(d)], -1) if d else u[..., :0]
        ones = u.new_ones(()).expand(*u.shape[:-1], 1)
        return torch.cat([ones, u, quad * weight], -1)
    # no autograd: every piece written in place into one buffer (fresh memory costs page faults on first touch)
    return taylor_features_into(u, u.new_empty(*u.shape[:-1], taylor_output_dim(d)))


def taylor_features_into(u: torch.Tensor, out: torch.Tensor, weighted: bool = True, dim: int = -1) -> torch.Tensor:
    """The Taylor features of ``u`` (already scaled by ``sqrt(scaling)``) written into ``out`` and returned; no
    autograd. ``dim`` is the axis of the head dimension in ``u`` and of the ``1 + D + D(D+1)/2`` features in
    ``out``: ``-1`` gives token-major ``[..., T, F]``, ``-2`` feature-major ``[..., F, T]`` from ``u`` ``[..., D, T]``,
    each product row then one contiguous block (measured 29-47 ms against 58-120 ms for token-major, T = 8192,
    H = 12, D = 64, slices of 128-512 rows), the layout ``phi(K)^T V`` reads as is. A kernel that maps slice after
    slice passes the same buffer each time: a fresh ``[rows, 2,145]`` slice is an ``mmap`` whose pages fault in on
    first touch (57 ms against 146 ms for fresh buffers, same sizes).

    ``weighted=False`` leaves the diagonal entries ``u_a^2`` unweighted (two indexing passes fewer): a kernel that
    sums ``phi(k)^T v`` can instead halve the diagonal rows of its ``[F, D_v]`` sums once
    (:func:`taylor_diagonal_features`), since ``(u_a^2 / sqrt(2)) (w_a^2 / sqrt(2)) = u_a^2 w_a^2 / 2``."""
    d = u.shape[dim]
    out.narrow(dim, 0, 1).fill_(1.0)
    out.narrow(dim, 1, d).copy_(u)
    start = d + 1
    for a in range(d):
        torch.mul(u.narrow(dim, a, 1), u.narrow(dim, a, d - a), out=out.narrow(dim, start, d - a))
        start += d - a
    if weighted:
        diagonal = taylor_diagonal_features(d, u.device)
        out.index_copy_(dim, diagonal, out.index_select(dim, diagonal).mul_(0.5**0.5))
    return out


def taylor_diagonal_features(d: int, device: torch.device) -> torch.Tensor:
    """Indices, among the ``1 + D + D(D+1)/2`` Taylor features, of the diagonal products ``u_a^2`` (the entries
    :func:`taylor_features` weights by ``1 / sqrt(2)``)."""
    return _triangle(d, device, torch.float32)[0] + (d + 1)


def taylor_unit(x: torch.Tensor) -> torch.Tensor:
    """:func:`taylor_features` at ``scaling = 1``: the Taylor map of inputs already scaled by ``sqrt(scaling)``. A
    fixed function (the variant scales ``q`` and ``k`` first), so it has a hand-written derivative
    (:func:`taylor_unit_grad`) and runs the sliced bidirectional kernel, which never holds more than a slice of its
    ``1 + D + D(D+1)/2`` features."""
    return taylor_features(x, 1.0)


taylor_unit.feature_dim = taylor_output_dim


def taylor_unit_grad(x: torch.Tensor, fx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of :func:`taylor_unit`: ``grad = [g_0, g_1, g_2]`` over ``[1, x, quad]`` gives
    ``g_1 + (G + G^T) x`` with ``G`` the upper-triangular ``D x D`` matrix of ``g_2`` times the entry weights
    (``d/dx_a (w x_a x_b) = w x_b``, ``d/dx_b = w x_a``; on the diagonal ``d/dx_a (w x_a^2) = 2 w x_a``). ``G`` is
    ``D^2`` per token, formed for the kernel's slice of rows only."""
    d = x.shape[-1]
    _, weight = _triangle(d, grad.device, grad.dtype)
    rows, cols = torch.triu_indices(d, d, device=grad.device)  # the same order, row by row
    g2 = grad[..., d + 1:] * weight
    g = grad.new_zeros(*grad.shape[:-1], d * d).index_copy_(-1, rows * d + cols, g2).view(*grad.shape[:-1], d, d)
    sym = g + g.transpose(-1, -2)
    return grad[..., 1:d + 1] + torch.matmul(sym, x.to(grad.dtype).unsqueeze(-1)).squeeze(-1)


def cosformer_features(x: torch.Tensor, offset: int, max_length: int | None) -> torch.Tensor:
    """``[relu(x) cos(theta_i), relu(x) sin(theta_i)]`` with ``theta_i = pi i / (2 M)`` at absolute position
    ``i = offset + t``: ``[B, H, T, D] -> [B, H, T, 2D]``. The dot product of a query at ``i`` and a key at ``j`` is
    ``relu(q) . relu(k) cos(pi (i - j) / (2 M))`` (cos(a - b) = cos a cos b + sin a sin b), cosFormer's re-weighting,
    non-negative while ``|i - j| <= M``; positions past ``M`` are refused. ``max_length=None``: ``M`` is the last
    position plus one. Float32 for half-precision inputs."""
    x = _work(x)
    t = x.shape[-2]
    m = offset + t if max_length is None else max_length
    if offset + t > m:
        raise SequenceTooLongError(
            f"cosformer was built for positions below max_length={m} (its re-weighting cos(pi (i - j) / 2M) turns "
            f"negative past M), got positions up to {offset + t - 1}; reshape again with a larger `max_length`"
        )
    theta = torch.arange(offset, offset + t, device=x.device, dtype=torch.float64) * (math.pi / (2 * max(m, 1)))
    cos, sin = (f(theta).to(x.dtype)[:, None] for f in (torch.cos, torch.sin))  # [T, 1]
    r = F.relu(x)
    if autograd_records(r):
        return torch.cat([r * cos, r * sin], -1)
    out = r.new_empty(*r.shape[:-1], 2 * r.shape[-1])  # no autograd: one buffer, written in place
    torch.mul(r, cos, out=out[..., : r.shape[-1]])
    torch.mul(r, sin, out=out[..., r.shape[-1]:])
    return out


# ---------- modules and their registry ----------


class FeatureMap(nn.Module):
    """A feature map ``phi`` of queries or keys ``[B, H, T, D] -> [B, H, T, F]`` as a module: it owns its parameters
    and buffers, declares ``F = output_dim(D)``, and computes through :meth:`features`, a function of the input and of
    the tensors by name, so a variant that keeps those tensors as its layer state runs the same maths.

    Subclass and register to add one (:func:`register_feature_map`)::

        class Squared(FeatureMap):
            "phi(x) = x^2 (elementwise, no parameters)."

            elementwise = staticmethod(torch.square)

        register_feature_map("squared", Squared)

    Args (of every built-in; a subclass adds its own options as keyword arguments):
        num_heads (`int`), head_dim (`int`): the shape of the queries and keys it maps.

    Class attributes:
        elementwise: for an elementwise, parameter-free map, the function itself; such a map is also accepted by
            the ``linear`` variant's ``feature_map``.
        elementwise_grad: optionally its vector-Jacobian product ``(x, phi(x), grad) -> grad * phi'(x)``, which puts
            it on the sliced bidirectional kernel (:data:`FEATURE_MAP_GRADS`).
        positional: whether ``phi`` depends on the position of the token (``forward(x, offset)``).
    """

    elementwise: Callable[[torch.Tensor], torch.Tensor] | None = None
    elementwise_grad: Callable[..., torch.Tensor] | None = None
    positional = False

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    def output_dim(self, head_dim: int) -> int:
        """``F``, the features per token for queries and keys of head dimension ``head_dim``."""
        if type(self).elementwise is not None:
            return head_dim
        raise NotImplementedError(f"{type(self).__name__} must define output_dim(head_dim)")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its own parameters and persistent buffers by name: what a variant keeps as layer state."""
        out = dict(self.named_parameters(recurse=False))
        skip = self._non_persistent_buffers_set
        out.update((name, b) for name, b in self.named_buffers(recurse=False) if name not in skip)
        return out

    def features(self, x: torch.Tensor, offset: int = 0, **tensors: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` with the given tensors standing in for the map's own (the same names as :meth:`tensors`);
        ``offset`` is the absolute position of the first token (used by positional maps only)."""
        fn = type(self).elementwise
        if fn is None:
            raise NotImplementedError(f"{type(self).__name__} must define features(x, offset, **tensors)")
        return fn(x)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.features(x, offset, **self.tensors())


class EluPlusOne(FeatureMap):
    """``elu(x) + 1`` (Katharopoulos et al. 2020)."""

    elementwise = staticmethod(elu_plus_one)
    elementwise_grad = staticmethod(elu_plus_one_grad)


class ReLUFeatureMap(FeatureMap):
    """``relu(x)``."""

    elementwise = staticmethod(relu)
    elementwise_grad = staticmethod(relu_grad)


def _identity_columns(head_dim: int, feature_dim: int) -> torch.Tensor:
    """``[D, F]`` with column ``c`` equal to ``+e_{c mod D}`` in even blocks of ``D`` columns and ``-e_{c mod D}`` in odd
    ones: the identity when ``F = D``, its first ``F`` columns when ``F < D``, ``[I, -I, I, ...]`` beyond."""
    c = torch.arange(feature_dim)
    sign = 1.0 - 2.0 * ((c // head_dim) % 2).to(torch.float32)
    return torch.zeros(head_dim, feature_dim).index_put_((c % head_dim, c), sign)


class HedgehogFeatureMap(FeatureMap):
    """``[softmax(x W), softmax(-x W)]`` per head, ``W`` ``[H, D, F]`` learned, ``W = I`` (padded with zeros) at first
    (Zhang et al. 2024, Hedgehog). ``F`` defaults to the head dim; the output has ``2F`` features."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        f = feature_dim or head_dim
        if f < head_dim:
            eye = torch.eye(head_dim)[:, :f]
        else:
            eye = torch.cat([torch.eye(head_dim), torch.zeros(head_dim, f - head_dim)], -1)
        self.weight = nn.Parameter(eye.expand(num_heads, head_dim, f).clone())

    def output_dim(self, head_dim: int) -> int:
        return 2 * self.weight.shape[-1]

    def features(self, x, offset=0, *, weight):
        return hedgehog_features(x, weight)


class T2RFeatureMap(FeatureMap):
    """``relu(x W + b)`` per head, ``W`` ``[H, D, F]`` and ``b`` ``[H, F]`` learned (Kasai et al. 2021, T2R).
    Initialised so the map starts as ``relu`` of signed coordinates (:func:`_identity_columns`: ``relu(x)`` when
    ``F = D``, ``[relu(x), relu(-x)]`` when ``F = 2D``) with ``b = 0``: a reshaped model starts as ``linear`` with
    ``feature_map="relu"``, usable before any training."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__(num_heads, head_dim)
        f = feature_dim or head_dim
        self.weight = nn.Parameter(_identity_columns(head_dim, f).expand(num_heads, head_dim, f).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, f))

    def output_dim(self, head_dim: int) -> int:
        return self.weight.shape[-1]

    def features(self, x, offset=0, *, weight, bias):
        return t2r_features(x, weight, bias)


def performer_layer_seed(seed: int, layer: int) -> int:
    """The seed of layer ``layer``'s draws under the variant's ``seed``: distinct layers (and seeds) get distinct,
    independent-looking streams (a 64-bit mix, SplitMix64's finaliser, Steele et al. 2014), kept below ``2^63`` so it
    fits an int64 buffer and ``torch.Generator.manual_seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + layer * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def performer_projection(num_heads: int, head_dim: int, num_features: int, seed: int, draw: int = 0,
                         layer: int = 0) -> torch.Tensor:
    """FAVOR+'s projection ``[H, D, m]`` of layer ``layer`` drawn from ``seed`` (``draw`` > 0: another draw of the
    same stream), deterministically: layers draw independently (:func:`performer_layer_seed`)."""
    g = torch.Generator().manual_seed(performer_layer_seed(performer_layer_seed(seed, layer), draw))
    return orthogonal_gaussian(num_heads, head_dim, num_features, g)


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Choromanski et al. 2021): ``m = num_features`` features, the
    projection a persistent buffer ``[H, D, m]`` drawn from ``seed``. ``scaling`` is the softmax scale the map
    approximates (``exp(scaling q . k)``; the head dim's ``D^-1/2`` by default). The module form is the unshifted
    (key) map; :func:`performer_features` ``query=True`` is the query form that variants use."""

    def __init__(self, num_heads: int, head_dim: int, num_features: int = 256, seed: int = 0,
                 scaling: float | None = None, layer: int = 0):
        super().__init__(num_heads, head_dim)
        self.scaling = head_dim**-0.5 if scaling is None else scaling
        self.register_buffer("projection", performer_projection(num_heads, head_dim, num_features, seed, layer=layer))

    def output_dim(self, head_dim: int) -> int:
        return self.projection.shape[-1]

    def features(self, x, offset=0, *, projection):
        return performer_features(x, projection, self.scaling, query=False)


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor features of ``exp(scaling q . k)`` (Arora et al. 2024, Based): ``1 + D + D(D+1)/2``
    features, no parameters (:func:`taylor_features`)."""

    def __init__(self, num_heads: int, head_dim: int, scaling: float | None = None):
        super().__init__(num_heads, head_dim)
        self.scaling = head_dim**-0.5 if scaling is None else scaling

    def output_dim(self, head_dim: int) -> int:
        return taylor_output_dim(head_dim)

    def features(self, x, offset=0):
        return taylor_features(x, self.scaling)


class CosformerFeatureMap(FeatureMap):
    """cosFormer's ReLU features with the cos/sin position re-weighting (Qin et al. 2022): ``2D`` features,
    positions ``offset, offset + 1, ...``; ``max_length`` is ``M`` (:func:`cosformer_features`)."""

    positional = True

    def __init__(self, num_heads: int, head_dim: int, max_length: int | None = None):
        super().__init__(num_heads, head_dim)
        self.max_length = max_length

    def output_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def features(self, x, offset=0):
        return cosformer_features(x, offset, self.max_length)


FEATURE_MAP_GRADS[taylor_unit] = taylor_unit_grad

_FEATURE_MAP_CLASSES: dict[str, type[FeatureMap]] = {}


def register_feature_map(name: str, cls: type[FeatureMap] | None = None):
    """Register a :class:`FeatureMap` subclass under ``name`` (usable as a decorator: ``@register_feature_map("x")``).
    An elementwise, parameter-free map (``cls.elementwise``) also becomes a ``feature_map`` of the ``linear``
    variant, and with ``cls.elementwise_grad`` runs its sliced bidirectional kernel.

    Raises ``ValueError`` on a malformed or taken name, ``TypeError`` if ``cls`` is not a ``FeatureMap`` subclass."""

    def add(cls: type[FeatureMap]) -> type[FeatureMap]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
            raise ValueError(f"feature map name {name!r} must match [a-z][a-z0-9_]*")
        if name in _FEATURE_MAP_CLASSES:
            raise ValueError(f"feature map {name!r} is already registered; registered: {list_feature_maps()}")
        if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
            raise TypeError(f"a feature map must be a subclass of hf_reshape.ops.feature_maps.FeatureMap, got {cls!r}")
        _FEATURE_MAP_CLASSES[name] = cls
        fn = cls.elementwise
        if fn is not None:
            FEATURE_MAPS[name] = fn
            if cls.elementwise_grad is not None:
                FEATURE_MAP_GRADS[fn] = cls.elementwise_grad
        return cls

    return add if cls is None else add(cls)


def unregister_feature_map(name: str) -> None:
    cls = get_feature_map(name)
    del _FEATURE_MAP_CLASSES[name]
    if cls.elementwise is not None and FEATURE_MAPS.get(name) is cls.elementwise:
        del FEATURE_MAPS[name]
        if not any(c.elementwise is cls.elementwise for c in _FEATURE_MAP_CLASSES.values()):
            FEATURE_MAP_GRADS.pop(cls.elementwise, None)


def list_feature_maps() -> list[str]:
    """Names of the registered feature maps, sorted."""
    return sorted(_FEATURE_MAP_CLASSES)


def get_feature_map(name: str) -> type[FeatureMap]:
    try:
        return _FEATURE_MAP_CLASSES[name]
    except (KeyError, TypeError):
        raise InvalidParameterError(f"unknown feature map {name!r}; registered: {list_feature_maps()}") from None


def make_feature_map(name: str, *, num_heads: int, head_dim: int, **options) -> FeatureMap:
    """A fresh registered feature map, e.g. ``make_feature_map("performer", num_heads=12, head_dim=64, num_features=128)``."""
    return get_feature_map(name)(num_heads, head_dim, **options)


for _name, _cls in (("elu", EluPlusOne), ("relu", ReLUFeatureMap), ("hedgehog", HedgehogFeatureMap),
                    ("t2r", T2RFeatureMap), ("performer", PerformerFeatureMap), ("taylor", TaylorFeatureMap),
                    ("cosformer", CosformerFeatureMap)):
    register_feature_map(_name, _cls)
