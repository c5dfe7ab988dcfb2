"""Built-in variants; importing this package registers them. One module per variant: its parameters
(a validated dataclass), the adapters from the registry's calling convention to :mod:`hf_reshape.ops`, and
its per-layer state if it has any."""

from . import hedgehog, linear, linformer, nystrom, sliding_window, svd, topk  # noqa: F401
from . import cosformer  # noqa: F401
from . import performer  # noqa: F401
from . import t2r  # noqa: F401
from . import taylor  # noqa: F401
from . import sink_window  # noqa: F401
from . import block_sparse, strided  # noqa: F401
