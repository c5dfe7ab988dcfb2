"""Generation caches for reshaped models: an O(1) recurrent state for ``linear``, the last ``window`` keys for
``sliding_window``, transformers' ordinary ``DynamicLayer`` for everything else.

``reshape()`` installs a small hook on the model so that ``model.generate(...)`` builds a :class:`ReshapeCache`
by itself; ``unreshape()`` removes it. A cache passed by the user (``cache=...`` or the deprecated
``past_key_values=...``) is always used as given.

How a recurrent step reaches the attention function: transformers' GPT-2 calls ``cache.update(k, v, layer_idx)``
*before* the attention function, and the attention function never sees the cache. The key-padding mask, which
decides what may enter the running sums, only arrives at the attention function. So
:meth:`LinearRecurrentLayer.update` returns a fresh alias of the new keys that carries the layer
(:func:`hf_reshape.integration.hand_over`): transformers hands ``update``'s keys straight to the attention
function, which takes the layer from them, computes the output from the state and folds the masked new keys into
it. The hand-over travels with the call, never through the shared attention module, so threads generating on one
model each reach their own cache, and a plain forward never sees a cache. A step whose keys never reached the
attention (an interrupted step) leaves the layer marked, and its next ``update`` refuses to go on with a state
that misses those tokens.

Design notes and sources:

* The running sums are the RNN form of Katharopoulos et al. 2020, "Transformers are RNNs":
  ``S_i = S_{i-1} + phi(k_i) v_i^T``, ``z_i = z_{i-1} + phi(k_i)``, ``out_i = phi(q_i) S_i / phi(q_i) z_i``.
* The layer structure (one object per layer, ``get_mask_sizes`` telling the mask function which slice of the 2D
  padding mask the current keys need) follows transformers' ``cache_utils.DynamicSlidingWindowLayer`` and
  ``LinearAttentionLayer``. transformers' sliding layer is not reused: it keeps ``sliding_window - 1`` keys,
  mis-slices at ``sliding_window == 1`` (our ``window=0``) and keeps the whole prefill storage alive.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.generation.configuration_utils import GenerationMode

from .architectures import get_architecture, self_attention_modules
from .integration import ATTN_IMPLEMENTATION, STATE_ATTR, ReshapedAttention, hand_over
from .ops.common import LOW_PRECISION
from .ops.feature_maps import FEATURE_MAPS
from .ops.linear import causal_linear_chunked

__all__ = ["LinearRecurrentLayer", "ReshapeCache", "SlidingWindowLayer", "cache_nbytes"]

HOOK_ATTR = "_prepare_cache_for_generation"  # GenerationMixin method shadowed per instance by reshape()
# modes whose cache is only appended to (and, for beams, reordered): a recurrent state serves them; assisted decoding
# rolls the cache back with `crop`, which a running sum cannot undo, so it keeps transformers' DynamicCache
_RECURRENT_MODES = frozenset(
    {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}
)


class _ReshapeLayerMixin:
    """What our two layer kinds share: a token counter and no rollback."""

    # `is_sliding` makes transformers size a model-wide mask from an exact layer, if the model still has one
    # (`masking_utils.find_first_full_attention_index`): the full mask is a superset, and the attention function
    # keeps its last T_k entries for layers that hold only the last T_k keys
    is_sliding = True
    is_croppable = False
    is_compileable = False

    def get_seq_length(self) -> int:
        """Tokens seen so far (not tokens stored)."""
        return self.seen

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            f"{type(self).__name__} keeps no past beyond its bounded state and cannot remove tokens; use a "
            "`DynamicCache` (pass `cache=DynamicCache(config=model.config)` to `generate`) for rollbacks"
        )


class LinearRecurrentLayer(_ReshapeLayerMixin, CacheLayerMixin):
    """Recurrent state of one causal ``linear`` layer: ``S = sum_j phi(k_j) v_j^T`` (``[B, H, D, D_v]``) and
    ``z = sum_j phi(k_j)`` (``[B, H, D]``) over the real tokens seen, in float32 for half-precision models.

    Args:
        attention_module (`nn.Module`):
            The transformers attention module whose ``hf_reshape`` holder runs the attention (held weakly).
    """

    def __init__(self, attention_module: nn.Module):
        super().__init__()
        self._module = weakref.ref(attention_module)
        self.state: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.seen = 0
        self.pending = 0  # tokens counted by `update` whose keys the attention function has not folded in yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # the feature maps are elementwise, so phi(k) keeps the head dim D of k
        b, h, _, d = key_states.shape
        dtype = torch.float32 if key_states.dtype in LOW_PRECISION else key_states.dtype
        self.device = key_states.device
        self.state = torch.zeros(b, h, d, value_states.shape[-1], dtype=dtype, device=self.device)  # [B, H, D, Dv]
        self.norm = torch.zeros(b, h, d, dtype=dtype, device=self.device)  # [B, H, D]
        self.is_initialized = True

    def _holder(self) -> ReshapedAttention:
        module = self._module()
        holder = None if module is None else getattr(module, STATE_ATTR, None)
        if not isinstance(holder, ReshapedAttention) or holder.method != "linear":
            raise RuntimeError(
                "this ReshapeCache was built for a `linear` layer that is no longer there (the model was reshaped "
                "again or unreshaped): start generation with a fresh cache"
            )
        if getattr(getattr(module, "config", None), "_attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"the model's attention implementation is {module.config._attn_implementation!r}, not "
                f"{ATTN_IMPLEMENTATION!r}: a ReshapeCache only works with hf_reshape's attention function"
            )
        return holder

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new tokens and hand this layer to the attention call with the keys; the attention function
        folds them into the state once it knows which keys are padding. Returns an alias of ``key_states`` that
        carries this layer (same values) and ``value_states``."""
        if self.pending:
            raise RuntimeError(
                f"the {self.pending} token(s) of this cache layer's previous step never reached hf_reshape's attention "
                "function (an interrupted step, or keys changed between the cache and the attention), so its running "
                "state misses them: start generation with a fresh cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._holder()
        self.seen += key_states.shape[-2]
        self.pending = key_states.shape[-2]
        return hand_over(key_states, self), value_states

    def attend(self, query, key, value, mask, params) -> torch.Tensor:
        """Causal linear attention of the new queries over the state plus the new keys, then fold the new keys in.

        Args:
            query, key (`torch.Tensor` of shape `[B, H, T, D]`), value (`[B, H, T, D_v]`): the new tokens only.
            mask (`torch.Tensor` of shape `[B, T]`, *optional*): key-padding mask of the new tokens (True = real).
            params (`LinearParams`): the layer's variant parameters.

        Returns:
            `torch.Tensor` of shape `[B, H, T, D_v]`, in the dtype of `value`.
        """
        if query.shape[-2] != key.shape[-2]:
            raise ValueError(
                f"a recurrent step needs as many queries as new keys, got {query.shape[-2]} and {key.shape[-2]}"
            )
        phi = FEATURE_MAPS[params.feature_map]
        fq, fk, v = phi(query), phi(key), value
        dtype = self.state.dtype
        fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
        if mask is not None:
            # a padded key never enters the sums
            fk = fk * mask[:, None, :, None].to(dtype)
        kv = torch.matmul(fk.transpose(-1, -2), v)  # [B, H, D, Dv]
        if fq.shape[-2] == 1:
            # one token: the recurrence itself (its own key is part of what it sees)
            self.state = self.state + kv
            self.norm = self.norm + fk[..., 0, :]
            num = torch.matmul(fq, self.state)  # [B, H, 1, Dv]
            den = torch.matmul(fq, self.norm.unsqueeze(-1))  # [B, H, 1, 1]
            out = num / den.clamp_min(params.eps)
        else:
            # prefill (or several tokens at once): the chunked causal kernel, started from the state
            out = causal_linear_chunked(
                fq, fk, v, eps=params.eps, chunk_size=params.chunk_size, state=self.state, norm=self.norm
            )
            self.state = self.state + kv
            self.norm = self.norm + fk.sum(-2)
        self.pending = 0
        return out.to(value.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask function slices the padding-mask entries of the current keys only."""
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.state.zero_()
            self.norm.zero_()
        self.seen = 0
        self.pending = 0

    def offload(self):
        if self.is_initialized:
            self.state, self.norm = self.state.to("cpu", non_blocking=True), self.norm.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.state.device != self.device:
            self.state = self.state.to(self.device, non_blocking=True)
            self.norm = self.norm.to(self.device, non_blocking=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
            self.norm = self.norm.index_select(0, beam_idx.to(self.norm.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.state = self.state.repeat_interleave(repeats, dim=0)
            self.norm = self.norm.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.state, self.norm = self.state[indices], self.norm[indices]


class SlidingWindowLayer(_ReshapeLayerMixin, DynamicLayer):
    """The last ``window`` keys and values of one causal ``sliding_window`` layer.

    Our causal window is ``0 <= i - j <= window``: a new token sees itself and the ``window`` keys before it, so
    ``window`` keys are all a decode step needs. ``update`` returns the kept keys followed by the new ones; the
    mask function slices the matching padding-mask entries (``get_mask_sizes``). Padded keys may sit in the window
    but are always masked out. During decoding the kept keys are a view of the last step's concatenation
    (``window + 1`` keys of storage); after a prefill they are copied so the prompt's storage is freed.

    Args:
        window (`int`): the variant's ``window``.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)  # [B, H, kept + T, D]
        full_v = torch.cat([self.values, value_states], dim=-2)
        start = max(0, full_k.shape[-2] - self.window)  # explicit start: `[-0:]` would keep everything
        self.keys, self.values = full_k[..., start:, :], full_v[..., start:, :]
        if key_states.shape[-2] > 1:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = min(self.seen, self.window)
        return kept + query_length, self.seen - kept

    def get_max_length(self) -> int:
        return self.window

    def reset(self) -> None:
        super().reset()
        self.seen = 0


def _layer_for(module: nn.Module | None) -> CacheLayerMixin:
    holder = None if module is None else getattr(module, STATE_ATTR, None)
    if not isinstance(holder, ReshapedAttention) or not getattr(module, "is_causal", False):
        return DynamicLayer()
    if holder.method == "linear":
        return LinearRecurrentLayer(module)
    if holder.method == "sliding_window":
        return SlidingWindowLayer(holder.params.window)
    return DynamicLayer()


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    return {idx: module for idx, _, module in self_attention_modules(model, get_architecture(model))}


class ReshapeCache(Cache):
    """A generation cache for a reshaped model: one layer per self-attention layer, chosen by its variant.

    * causal ``linear``: :class:`LinearRecurrentLayer`, a constant-size running state;
    * causal ``sliding_window``: :class:`SlidingWindowLayer`, the last ``window`` keys and values;
    * any other variant, or a layer left exact: transformers' ``DynamicLayer``.

    ``model.generate(...)`` on a reshaped model builds one by itself; build one by hand to drive forwards:

    ```python
    >>> cache = ReshapeCache(model)
    >>> out = model(input_ids, cache=cache, use_cache=True)
    ```

    Args:
        model (`nn.Module`): a reshaped model (GPT-2, or BERT run as a decoder).
    """

    def __init__(self, model: nn.Module):
        modules = _attention_modules(model)
        layers = [_layer_for(modules.get(i)) for i in range(max(modules) + 1)]
        super().__init__(layers=layers)

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        """Whether `model` has a layer that a `ReshapeCache` keeps bounded (causal `linear` or `sliding_window`)."""
        return any(isinstance(_layer_for(m), _ReshapeLayerMixin) for m in _attention_modules(model).values())

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (keys, values, recurrent states)."""
        return cache_nbytes(self)


def cache_nbytes(cache: Cache) -> int:
    """Sum of ``nbytes`` of every tensor a cache's layers hold (views count their own size)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
    return total


class _GenerationCacheHook:
    """Shadows ``GenerationMixin._prepare_cache_for_generation`` on one model instance: run transformers' own
    preparation, then swap the ``DynamicCache`` it made by default for a :class:`ReshapeCache`. A user's cache,
    ``use_cache=False``, a ``cache_implementation``, assisted decoding and variants without a bounded layer keep
    transformers' behaviour. Holds the model strongly so ``copy.deepcopy(model)`` re-points it at the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, generation_config, model_kwargs: dict, *args, **kwargs):
        model = self.model
        user_cache = model_kwargs.get("cache")
        result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        generation_mode = args[0] if args else kwargs.get("generation_mode")
        if (
            user_cache is None
            and type(model_kwargs.get("cache")) is DynamicCache
            and generation_config.cache_implementation in (None, "dynamic")
            and generation_mode in _RECURRENT_MODES
            and not getattr(generation_config, "is_assistant", False)
            and ReshapeCache.applies_to(model)
        ):
            model_kwargs["cache"] = ReshapeCache(model)
        return result


def install_generation_hook(model: nn.Module) -> None:
    """Make ``model.generate`` pick a :class:`ReshapeCache` by itself (no-op for models that cannot generate)."""
    if hasattr(type(model), HOOK_ATTR):
        model.__dict__[HOOK_ATTR] = _GenerationCacheHook(model)


def remove_generation_hook(model: nn.Module) -> None:
    """Undo :func:`install_generation_hook` (only our own hook is removed)."""
    if isinstance(model.__dict__.get(HOOK_ATTR), _GenerationCacheHook):
        del model.__dict__[HOOK_ATTR]
