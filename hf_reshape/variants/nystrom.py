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
)
