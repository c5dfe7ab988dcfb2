"""``nystrom``: Nyströmformer with segment-mean landmarks over real tokens and an iterative pseudo-inverse."""

from dataclasses import dataclass, field

from ..ops import low_rank, naive
from ..registry import VariantParams, check_int, register_variant


@dataclass
class NystromParams(VariantParams):
    num_landmarks: int = field(default=64, metadata={"help": "landmarks m (segment means of the real tokens)"})
    pinv_iterations: int = field(
        default=6, metadata={"help": "Newton-Schulz iterations of the pseudo-inverse; 0 = exact torch.linalg.pinv"}
    )

    def validate(self):
        check_int("num_landmarks", self.num_landmarks)
        check_int("pinv_iterations", self.pinv_iterations, minimum=0)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return low_rank.nystrom_attention(
        q, k, v, mask=mask, scaling=scaling, num_landmarks=params.num_landmarks, pinv_iterations=params.pinv_iterations
    )


def _reference(q, k, v, *, mask, causal, scaling, params):
    return naive.nystrom_reference(
        q, k, v, mask=mask, scaling=scaling, num_landmarks=params.num_landmarks, pinv_iterations=params.pinv_iterations
    )


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``Q Kl^T``, ``Ql Kl^T``, ``Ql K^T``, ``K3 V``, ``pinv(K2) (K3 V)``, ``K1 (...)``, and 4
    ``m x m x m`` matmuls per Newton-Schulz step of the pseudo-inverse."""
    m, d = min(params.num_landmarks, t), head_dim
    per_head = 2 * t * m * d * 4 + 2 * m * m * d * 2 + params.pinv_iterations * 4 * 2 * m**3
    return float(batch * num_heads * per_head)


register_variant(
    name="nystrom",
    family="low_rank",
    params_cls=NystromParams,
    forward=_forward,
    reference=_reference,
    causal=False,
    degenerate=lambda t: {"num_landmarks": t, "pinv_iterations": 0},
    complexity="O(T m D + m^3) time, O(T m) memory",
    quadratic=False,
    description="Nyström approximation with m segment-mean landmarks (no dropout on its kernels)",
    small_params={"num_landmarks": 4},
    paper="Xiong et al. 2021, Nyströmformer",
    flops=flops,
    bench_params={"num_landmarks": 64},
    quick_params={"num_landmarks": 8},
    demo_params={"num_landmarks": 8},
)
