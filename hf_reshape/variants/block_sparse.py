"""``block_sparse``: BigBird's block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
Sequences", NeurIPS 2020): each query block attends its sliding window of blocks, the global blocks (the first
``num_global_blocks``, which attend to and are attended by every token) and ``num_random_blocks`` random blocks.

The random pattern is a fixed function of ``seed`` (a saved parameter), the query block and, in the bidirectional
form, the sequence's number of blocks: reloading a saved model gives the same pattern. The variant's parameters do
not know their layer's index, so every layer shares one pattern for a given ``seed`` (give layers different seeds
through per-layer configurations to vary it). Blocks are cut over each sequence's real tokens (padding anywhere
leaves the pattern unchanged); see :mod:`hf_reshape.ops.block_sparse` for the exact rules and the fast path.
"""

from dataclasses import dataclass, field

from ..ops import block_sparse as ops
from ..ops.common import masked_softmax, upcast
from ..registry import VariantParams, check_int, register_variant
from ..errors import InvalidParameterError


@dataclass
class BlockSparseParams(VariantParams):
    block_size: int = field(default=64, metadata={"help": "tokens per block (queries and keys)"})
    num_global_blocks: int = field(
        default=1, metadata={"help": "first blocks that attend to and are attended by every token"}
    )
    num_random_blocks: int = field(
        default=3, metadata={"help": "random key blocks per query block (causal: drawn from the past only)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random blocks (0 <= seed < 2**63)"})
    num_window_blocks: int = field(
        default=3, metadata={"help": "odd width of the sliding window in blocks (3: the block and one each side)"}
    )

    def validate(self):
        check_int("block_size", self.block_size)
        check_int("num_global_blocks", self.num_global_blocks, minimum=0)
        check_int("num_random_blocks", self.num_random_blocks, minimum=0)
        check_int("seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise InvalidParameterError(f"`seed` must be an integer in [0, 2**63), got {self.seed!r}")
        check_int("num_window_blocks", self.num_window_blocks)
        if self.num_window_blocks % 2 == 0:
            raise InvalidParameterError(
                f"`num_window_blocks` must be an odd integer >= 1 (the block and as many on each side), "
                f"got {self.num_window_blocks!r}"
            )

    def pattern(self) -> dict:
        return dict(block_size=self.block_size, num_global_blocks=self.num_global_blocks,
                    num_random_blocks=self.num_random_blocks, num_window_blocks=self.num_window_blocks,
                    seed=self.seed)


def _forward(q, k, v, *, mask, causal, scaling, params, dropout=0.0, training=False):
    return ops.block_sparse_attention(q, k, v, mask=mask, causal=causal, scaling=scaling, dropout=dropout,
                                      training=training, **params.pattern())


def _reference(q, k, v, *, mask, causal, scaling, params):
    return ops.block_sparse_reference(q, k, v, mask=mask, causal=causal, scaling=scaling, **params.pattern())


def weights(q, k, v=None, *, mask=None, causal=False, scaling, params):
    """Softmax probabilities over the keys the BigBird pattern keeps, zeros elsewhere (and for padded queries)."""
    out_dtype = q.dtype
    q, k = upcast(q, k)
    allowed = ops.block_sparse_allowed(mask, q.shape[-2], k.shape[-2], causal, q.device, **params.pattern())
    return masked_softmax(q @ k.transpose(-1, -2) * scaling, allowed).to(out_dtype)


def flops(*, t, head_dim, num_heads, batch, causal, params):
    """Useful forward FLOPs: ``Q K^T`` and ``P V`` over the pattern's (query, key) pairs on an unpadded sequence."""
    return float(batch * num_heads * 4 * head_dim * ops.block_sparse_pairs(t, causal=causal, **params.pattern()))


register_variant(
    name="block_sparse",
    family="sparse",
    params_cls=BlockSparseParams,
    forward=_forward,
    reference=_reference,
    degenerate=lambda t: {"block_size": max(int(t), 1)},
    complexity="O(T (w + g + r) b D) time and memory",
    quadratic=False,
    description="BigBird: window, global and random blocks",
    small_params={"block_size": 2, "num_random_blocks": 1},
    paper="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences",
    weights=weights,
    flops=flops,
    bench_params={"block_size": 64, "num_random_blocks": 3},
    quick_params={"block_size": 4, "num_random_blocks": 1},
    demo_params={"block_size": 4, "num_random_blocks": 1},
)
