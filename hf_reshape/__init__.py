"""hf_reshape: swap a Hugging Face model's self-attention for a sparse, low-rank or linearized variant in one call.

```python
import hf_reshape
model = hf_reshape.reshape(model, "sliding_window", window=64)
```
"""

__version__ = "0.1.0"

from . import functional, observe, variants  # noqa: F401  (importing variants registers the built-ins)
from .attention_transfer import NothingToTransferError, attention_parameters, transfer
from .cache import ReshapeCache
from .config import ReshapeConfig
from .fidelity import FidelityResult, fidelity  # `hf_reshape.fidelity` is the function; its module: sys.modules
from .errors import (
    InvalidParameterError,
    NotCausalError,
    ReshapeError,
    SequenceTooLongError,
    UnknownVariantError,
    UnsupportedModelError,
)
from .integration import ATTN_IMPLEMENTATION
from .ops.feature_maps import FeatureMap, list_feature_maps, make_feature_map, register_feature_map
from .registry import VariantParams, VariantSpec, get_variant, list_variants, register_variant
from .reshape import extend_positions, from_pretrained, get_reshape_config, reshape, unreshape

__all__ = [
    "ATTN_IMPLEMENTATION",
    "InvalidParameterError",
    "NotCausalError",
    "NothingToTransferError",
    "FeatureMap",
    "FidelityResult",
    "ReshapeCache",
    "ReshapeConfig",
    "ReshapeError",
    "SequenceTooLongError",
    "UnknownVariantError",
    "UnsupportedModelError",
    "VariantParams",
    "VariantSpec",
    "attention_parameters",
    "extend_positions",
    "fidelity",
    "from_pretrained",
    "functional",
    "get_reshape_config",
    "get_variant",
    "list_feature_maps",
    "list_variants",
    "make_feature_map",
    "register_feature_map",
    "register_variant",
    "observe",
    "reshape",
    "transfer",
    "unreshape",
]
