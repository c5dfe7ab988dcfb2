"""Built-in variants; importing this package registers them. One module per variant: its parameters
(a validated dataclass), the adapters from the registry's calling convention to :mod:`hf_reshape.ops`, and
its per-layer state if it has any."""

from . import hedgehog, linear, linformer, nystrom, sliding_window, svd, topk  # noqa: F401
