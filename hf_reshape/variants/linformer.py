"""``linformer``: keys and values projected along the sequence by learned ``E, F`` of shape
``[proj_len, max_length]``, shared by the heads of a layer (Wang et al. 2020, "headwise sharing")."""

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..ops import low_rank, naive
from .. import attention_weights
from ..registry import VariantParams, capped_default, check_choice, check_int, register_variant
from ..errors import InvalidParameterError, SequenceTooLongError

INITS = ("mean", "normal")


@dataclass
class LinformerParams(VariantParams):
    proj_len: int = field(default=128, metadata={"help": "projected length k of keys and values"})
    max_length: int | None = field(
        default=None, metadata={"help": "longest sequence accepted; None = the model's maximum positions"}
    )
    init: str = field(
        default="mean",
        metadata={"help": "'mean': each row averages a contiguous segment (identity when proj_len == max_length); "
                  "'normal': N(0, 1/proj_len) as in the paper"},
    )

    def validate(self):
        check_int("proj_len", self.proj_len)
        check_int("max_length", self.max_length, optional=True)
        check_choice("init", self.init, INITS)
        if self.max_length is not None and self.proj_len > self.max_length:
            raise InvalidParameterError(
                f"`proj_len` ({self.proj_len}) must be <= `max_length` ({self.max_length})"
            )


def init_state(params, *, num_heads, head_dim, generator=None):
    if params.max_length is None:
        raise InvalidParameterError("linformer needs `max_length` to build its projections")
    p, n = params.proj_len, params.max_length
    if params.init == "mean":
        seg = torch.arange(n) * p // n  # position j belongs to segment floor(j p / n)
        e = torch.zeros(p, n).scatter_(0, seg[None], 1.0)
        e = e / e.sum(-1, keepdim=True).clamp_min(1.0)
        f = e.clone()
    else:
        e = torch.randn(p, n, generator=generator) / p**0.5
        f = torch.randn(p, n, generator=generator) / p**0.5
    return {"proj_k": nn.Parameter(e), "proj_v": nn.Parameter(f)}


def _check_state(proj_k, proj_v, params):
    if proj_k is None or proj_v is None:
        raise InvalidParameterError(
            "linformer needs its state tensors `proj_k` and `proj_v` of shape [proj_len, max_length]; "
            "make them with hf_reshape.functional.init_state('linformer', ...)"
        )
    shape = (params.proj_len, params.max_length) if params.max_length else (params.proj_len, proj_k.shape[-1])
    if tuple(proj_k.shape) != shape or tuple(proj_v.shape) != shape:
        raise InvalidParameterError(f"proj_k/proj_v must have shape {shape}, got {tuple(proj_k.shape)}, {tuple(proj_v.shape)}")


def _check_length(t, proj_k):
    if t > proj_k.shape[-1]:
        raise SequenceTooLongError(
            f"linformer was built for sequences of at most max_length={proj_k.shape[-1]} tokens, got {t}; "
            "reshape again with a larger `max_length`"
        )


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False, proj_k=None, proj_v=None):
    _check_state(proj_k, proj_v, params)
    _check_length(k.shape[-2], proj_k)
    return low_rank.linformer_attention(
        q, k, v, mask=mask, scaling=scaling, proj_k=proj_k, proj_v=proj_v, layout=_layout(params), dropout=dropout,
        training=training,
    )


def _reference(q, k, v, *, mask, causal, scaling, params, proj_k=None, proj_v=None):
    _check_state(proj_k, proj_v, params)
    _check_length(k.shape[-2], proj_k)
    return naive.linformer_reference(
        q, k, v, mask=mask, scaling=scaling, proj_k=proj_k, proj_v=proj_v, layout=_layout(params)
    )


def _layout(params):
    """Which real tokens each projected column takes, from how the projections were laid out (``init``), never
    from their values: ``"mean"`` gives each column a contiguous segment of ranks, ``"normal"`` every rank. A
    projected key is masked exactly while its segment holds no real token, however E is trained."""
    return "segments" if params.init == "mean" else "dense"


def _prepare(params, facts):
    if params.max_length is None:
        return replace(params, max_length=facts.max_positions)
    return params


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``E K``, ``F V``, then ``Q (E K)^T`` and ``P (F V)``."""
    kp, d = params.proj_len, head_dim
    return float(batch * num_heads * (4 * kp * t * d + 4 * t * kp * d))


register_variant(
    name="linformer",
    family="low_rank",
    params_cls=LinformerParams,
    forward=_forward,
    reference=_reference,
    causal=False,
    init_state=init_state,
    state_names=("proj_k", "proj_v"),
    degenerate=lambda t: {"proj_len": t, "max_length": t, "init": "mean"},
    prepare_params=_prepare,
    complexity="O(T k D) time, O(T k) memory",
    quadratic=False,
    description="keys/values projected to length k by learned E, F (masked keys contribute nothing)",
    small_params={"proj_len": 8, "init": "normal"},
    paper="Wang et al. 2020, Linformer",
    weights=attention_weights.linformer_weights,
    weights_over_keys=False,
    fit_defaults=capped_default("proj_len", by="max_length", fact="max_positions"),
    flops=flops,
    bench_params={"proj_len": 256},  # max_length = T, set by the bench per size
    quick_params={"proj_len": 16},
    demo_params={"proj_len": 16},
)
