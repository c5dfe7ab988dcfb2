"""Generation caches for reshaped models: an O(1) recurrent state for the linearized variants (``linear`` and every
variant whose spec declares its feature maps, ``VariantSpec.features``: ``hedgehog``, ``performer``, ``cosformer``,
``t2r``, ``taylor``), the last ``window`` keys for ``sliding_window``, transformers' ordinary ``DynamicLayer`` for
everything else.

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
  ``S_i = S_{i-1} + phi(k_i) v_i^T``, ``z_i = z_{i-1} + phi(k_i)``, ``out_i = phi(q_i) S_i / phi(q_i) z_i``, with
  ``phi`` the variant's feature maps (``VariantSpec.features``), so the state is ``F x D_v`` for ``F`` features. A
  feature map that depends on the position (``cosformer``) gets the absolute position of the new tokens, the
  number of tokens seen before them, which the layer counts.
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
from .ops.common import LOW_PRECISION, masked_softmax
from .ops.linear import causal_linear_chunked
from .errors import UnknownVariantError
from .registry import get_variant

__all__ = ["LinearRecurrentLayer", "ReshapeCache", "SinkWindowLayer", "SlidingWindowLayer", "cache_nbytes"]

HOOK_ATTR = "_prepare_cache_for_generation"  # GenerationMixin method shadowed per instance by reshape()
# modes whose cache is only appended to (and, for beams, reordered): a recurrent state serves them; assisted decoding
# rolls the cache back with `crop`, which a running sum cannot undo, so it keeps transformers' DynamicCache
_RECURRENT_MODES = frozenset(
    {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}
)


class _ReshapeLayerMixin:
    """What our layer kinds share: a token counter, no rollback, and (for those that keep a ``_module`` and a
    ``method``) the check that the layer they were built for is still there."""

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

    def _holder(self) -> ReshapedAttention:
        """The live holder of the layer this cache layer was built for (``self._module()``, ``self.method``), or an
        error when the model was reshaped again, unreshaped or switched to another attention implementation."""
        module = self._module()
        holder = None if module is None else getattr(module, STATE_ATTR, None)
        if not isinstance(holder, ReshapedAttention) or holder.method != self.method:
            raise RuntimeError(
                f"this ReshapeCache was built for a `{self.method}` layer that is no longer there (the model was "
                "reshaped again or unreshaped): start generation with a fresh cache"
            )
        if getattr(getattr(module, "config", None), "_attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"the model's attention implementation is {module.config._attn_implementation!r}, not "
                f"{ATTN_IMPLEMENTATION!r}: a ReshapeCache only works with hf_reshape's attention function"
            )
        return holder


class LinearRecurrentLayer(_ReshapeLayerMixin, CacheLayerMixin):
    """Recurrent state of one causal linearized layer (``linear``, or any variant with ``VariantSpec.features``):
    ``S = sum_j phi(k_j) v_j^T`` (``[B, H, F, D_v]``) and ``z = sum_j phi(k_j)`` (``[B, H, F]``) over the real tokens
    seen, ``F`` the variant's feature dimension, in float32 for half-precision models. Both are sized at the first
    step, from the features of its keys.

    Args:
        attention_module (`nn.Module`):
            The transformers attention module whose ``hf_reshape`` holder runs the attention (held weakly).
    """

    takes_kv_heads = True  # the attention function hands `attend` the key/value heads as the model made them

    def __init__(self, attention_module: nn.Module):
        super().__init__()
        self._module = weakref.ref(attention_module)
        holder = getattr(attention_module, STATE_ATTR, None)
        self.method = holder.method if isinstance(holder, ReshapedAttention) else None
        self.state: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.seen = 0
        self.pending = 0  # tokens counted by `update` whose keys the attention function has not folded in yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # the state's size depends on the feature maps: the first `attend` allocates it from phi(k)
        self.dtype = torch.float32 if key_states.dtype in LOW_PRECISION else key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def _allocate(self, fk: torch.Tensor, value: torch.Tensor) -> None:
        b, h, _, f = fk.shape
        self.state = torch.zeros(b, h, f, value.shape[-1], dtype=self.dtype, device=self.device)  # [B, H, F, Dv]
        self.norm = torch.zeros(b, h, f, dtype=self.dtype, device=self.device)  # [B, H, F]

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

    def attend(self, query, key, value, mask, params, scaling=None) -> torch.Tensor:
        """Causal linear attention of the new queries over the state plus the new keys, then fold the new keys in.

        Args:
            query (`torch.Tensor` of shape `[B, H, T, D]`), key (`[B, H_kv, T, D]`), value (`[B, H_kv, T, D_v]`): the
                new tokens only; ``H_kv`` key/value heads (``H`` divisible by it: grouped-query attention). A feature
                map without per-layer state is the same function for every head, so the sums are kept per
                key/value head (``H / H_kv`` times less state and update work); per-head maps keep them per query
                head.
            mask (`torch.Tensor` of shape `[B, T]`, *optional*): key-padding mask of the new tokens (True = real).
            params (`VariantParams`): the layer's variant parameters (with `eps` and `chunk_size`).
            scaling (`float`, *optional*): the model's softmax scale (`1 / sqrt(D)` if not given), for the feature
                maps that approximate softmax (`performer`, `taylor`).

        Returns:
            `torch.Tensor` of shape `[B, H, T, D_v]`, in the dtype of `value`.
        """
        if query.shape[-2] != key.shape[-2]:
            raise ValueError(
                f"a recurrent step needs as many queries as new keys, got {query.shape[-2]} and {key.shape[-2]}"
            )
        holder = self._holder()
        state = {name: getattr(holder, name) for name in holder.state_names}
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        offset = self.seen - key.shape[-2]  # absolute position of the first new token
        groups = query.shape[1] // key.shape[1]  # query heads per key/value head (grouped-query attention)
        if groups > 1 and (state or value.shape[1] != key.shape[1]):
            # per-head feature maps (hedgehog, t2r, performer's projections): each query head's sums differ
            heads = query.shape[1]
            key = key.repeat_interleave(heads // key.shape[1], 1)
            value = value.repeat_interleave(heads // value.shape[1], 1)
            groups = 1
        fq, fk = get_variant(self.method).features(
            query, key, params=params, scaling=scaling, q_offset=offset, k_offset=offset, **state
        )
        v = value
        if self.state is None:
            self._allocate(fk, value)  # per key/value head when the map is the same for every head
        dtype = self.state.dtype
        fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
        if mask is not None:
            # a padded key never enters the sums
            fk = fk * mask[:, None, :, None].to(dtype)
        kv = torch.matmul(fk.transpose(-1, -2), v)  # [B, H_kv, F, Dv]
        if fq.shape[-2] == 1:
            # one token: the recurrence itself (its own key is part of what it sees)
            self.state = self.state + kv
            self.norm = self.norm + fk[..., 0, :]
            b, h = fq.shape[:2]
            fqg = fq.reshape(b, h // groups, groups, fq.shape[-1])  # query head h reads key/value head h // groups
            num = torch.matmul(fqg, self.state)  # [B, H_kv, groups, Dv]
            den = torch.matmul(fqg, self.norm.unsqueeze(-1))  # [B, H_kv, groups, 1]
            out = (num / den.clamp_min(params.eps)).reshape(b, h, 1, -1)
        else:
            # prefill (or several tokens at once): the chunked causal kernel, started from the state (repeated per
            # query head for the kernel only)
            out = causal_linear_chunked(
                fq, fk.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), eps=params.eps,
                chunk_size=params.chunk_size, state=self.state.repeat_interleave(groups, 1),
                norm=self.norm.repeat_interleave(groups, 1),
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
        if self.state is not None:
            self.state.zero_()
            self.norm.zero_()
        self.seen = 0
        self.pending = 0

    def offload(self):
        if self.state is not None:
            self.state, self.norm = self.state.to("cpu", non_blocking=True), self.norm.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.state is not None and self.state.device != self.device:
            self.state = self.state.to(self.device, non_blocking=True)
            self.norm = self.norm.to(self.device, non_blocking=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
            self.norm = self.norm.index_select(0, beam_idx.to(self.norm.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)
            self.norm = self.norm.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
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


class SinkWindowLayer(_ReshapeLayerMixin, CacheLayerMixin):
    """The attention sinks and the last ``window`` keys of one causal ``sink_window`` layer (StreamingLLM, Xiao et
    al. 2024): ``num_sink + window`` keys and values whatever the number of tokens seen.

    The sinks are the first ``num_sink`` *real* tokens of each sequence, so which keys to keep depends on the
    key-padding mask, which only the attention function sees: like :class:`LinearRecurrentLayer`, ``update`` hands
    this layer to the attention call with the new keys (:func:`hf_reshape.integration.hand_over`), and
    :meth:`attend` computes the output from the kept keys plus the new ones, then keeps what the next step needs.
    Positions are not touched: a model whose positions enter at its input (GPT-2, BERT) gave each kept key its
    position when it was computed, and a RoPE model rotated it at its true position, so a cache step sees exactly
    what recomputing the whole sequence with the ``sink_window`` forward sees. The position ids are the model's own
    (a learned table's must stay inside it, see ``hf_reshape.reshape(..., max_positions=...)``); StreamingLLM's
    re-rotation of kept RoPE keys to their cache positions is not done.

    State per sequence of the batch: ``sink_keys``/``sink_values`` ``[B, H, num_sink, D]`` with ``sinks_filled``
    ``[B]`` (how many slots hold a real token), and ``keys``/``values`` ``[B, H, <= window, D]``, the last
    ``window`` positions, with ``window_ok`` ``[B, <= window]`` (a real token that is not a sink: a sink is
    attended once, through its slot).

    Args:
        attention_module (`nn.Module`):
            The transformers attention module whose ``hf_reshape`` holder runs the attention (held weakly).
    """

    def __init__(self, attention_module: nn.Module):
        super().__init__()
        self._module = weakref.ref(attention_module)
        holder = getattr(attention_module, STATE_ATTR, None)
        self.method = holder.method if isinstance(holder, ReshapedAttention) else "sink_window"
        self.sink_keys = self.sink_values = self.sinks_filled = self.window_ok = None
        self.seen = 0
        self.pending = 0  # tokens counted by `update` that the attention function has not kept yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.window_ok = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new tokens and hand this layer to the attention call with the keys (an alias of
        ``key_states`` that carries it); :meth:`attend` keeps them once it knows which are padding."""
        if self.pending:
            raise RuntimeError(
                f"the {self.pending} token(s) of this cache layer's previous step never reached hf_reshape's attention "
                "function (an interrupted step, or keys changed between the cache and the attention), so its kept "
                "keys miss them: start generation with a fresh cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._holder()
        self.seen += key_states.shape[-2]
        self.pending = key_states.shape[-2]
        return hand_over(key_states, self), value_states

    def attend(self, query, key, value, mask, params, scaling=None) -> torch.Tensor:
        """Causal ``sink_window`` attention of the new tokens over the kept sinks and window plus themselves, then
        keep the sinks and the last ``window`` keys.

        Args:
            query, key (`torch.Tensor` of shape `[B, H, T, D]`), value (`[B, H, T, D_v]`): the new tokens only.
            mask (`torch.Tensor` of shape `[B, T]`, *optional*): key-padding mask of the new tokens (True = real).
            params (`SinkWindowParams`): the layer's variant parameters.
            scaling (`float`, *optional*): the softmax scale; by default the attention module's ``scaling``
                (GPT-2 and BERT keep theirs there), else ``1 / sqrt(D)``.

        Returns:
            `torch.Tensor` of shape `[B, H, T, D_v]`, in the dtype of `value`. A cache step applies no attention
            dropout (generation runs in eval mode).
        """
        from .variants.sink_window import sink_window_attention

        if query.shape[-2] != key.shape[-2]:
            raise ValueError(
                f"a cache step needs as many queries as new keys, got {query.shape[-2]} and {key.shape[-2]}"
            )
        if scaling is None:
            scaling = getattr(self._module(), "scaling", None) or query.shape[-1] ** -0.5
        b, t = key.shape[0], key.shape[-2]
        s, w = params.num_sink, params.window
        real = torch.ones(b, t, dtype=torch.bool, device=key.device) if mask is None else mask.bool()
        if self.sinks_filled is None:
            # sized by the heads the attention sees: grouped key/value heads arrive repeated per query head
            self.keys, self.values = key.new_zeros(*key.shape[:2], 0, key.shape[-1]), value[..., :0, :].clone()
            self.sinks_filled = torch.zeros(b, dtype=torch.long, device=key.device)
            self.sink_keys = key.new_zeros(*key.shape[:2], s, key.shape[-1])
            self.sink_values = value.new_zeros(*value.shape[:2], s, value.shape[-1])
        rank = self.sinks_filled[:, None] + real.long().cumsum(-1) - 1  # rank of each new token among real tokens
        new_sink = real & (rank < s)
        if self.seen == t:
            # the first step: nothing kept yet, the fast path over the new tokens is the whole computation
            out = sink_window_attention(query, key, value, mask=mask, causal=True, scaling=scaling, num_sink=s,
                                        window=w)
        else:
            out = self._attend_kept(query, key, value, real, new_sink, scaling, w)
        self._keep(key, value, real, new_sink, rank, s, w)
        self.pending = 0
        return out

    def _attend_kept(self, query, key, value, real, new_sink, scaling, w):
        """``[kept sinks | kept window | new keys]`` with an explicit ``T x (s + kept + T)`` mask, in float32 for
        half-precision models: a kept sink is always visible; a kept window key at distance ``t + kept - j`` and a
        new key at ``t - t'`` are visible within ``window``; a new key that is a sink is visible from its own
        position on."""
        t, kept = key.shape[-2], self.keys.shape[-2]
        s = self.sink_keys.shape[-2]
        dtype = torch.float32 if value.dtype in LOW_PRECISION else value.dtype
        i = torch.arange(t, device=key.device)[:, None]
        sink_ok = (torch.arange(s, device=key.device)[None] < self.sinks_filled[:, None])[:, None, :].expand(-1, t, s)
        dist = i + kept - torch.arange(kept, device=key.device)[None]  # [T, kept]
        window_ok = self.window_ok[:, None, :] & (dist <= w)[None]
        rel = i - torch.arange(t, device=key.device)[None]  # [T, T]
        new_ok = real[:, None, :] & (rel >= 0)[None] & ((rel <= w)[None] | new_sink[:, None, :])
        allowed = torch.cat([sink_ok, window_ok, new_ok], dim=-1)[:, None]  # [B, 1, T, s + kept + T]
        keys = torch.cat([self.sink_keys, self.keys, key], dim=-2).to(dtype)
        values = torch.cat([self.sink_values, self.values, value], dim=-2).to(dtype)
        scores = torch.matmul(query.to(dtype), keys.transpose(-1, -2)) * scaling
        return torch.matmul(masked_softmax(scores, allowed), values).to(value.dtype)

    def _keep(self, key, value, real, new_sink, rank, s, w):
        """Fill the sink slots from the new real tokens, and keep the last ``w`` positions (copied after a
        multi-token step, so the prompt's storage is freed)."""
        if s and bool(new_sink.any()):
            # slot r of a sequence takes its new real token of rank r (at most one per slot)
            pick = new_sink[:, None, :] & (rank[:, None, :] == torch.arange(s, device=key.device)[None, :, None])
            index, take = pick.to(torch.int8).argmax(-1), pick.any(-1)  # [B, s] each
            for name, new in (("sink_keys", key), ("sink_values", value)):
                chosen = torch.gather(new, 2, index[:, None, :, None].expand(*new.shape[:2], s, new.shape[-1]))
                setattr(self, name, torch.where(take[:, None, :, None], chosen, getattr(self, name)))
        self.sinks_filled = (self.sinks_filled + real.long().sum(-1)).clamp_max(s)
        full_k = torch.cat([self.keys, key], dim=-2)
        full_v = torch.cat([self.values, value], dim=-2)
        full_ok = torch.cat([self.window_ok, real & ~new_sink], dim=-1)
        start = max(0, full_k.shape[-2] - w)  # explicit start: `[-0:]` would keep everything
        self.keys, self.values, self.window_ok = full_k[..., start:, :], full_v[..., start:, :], full_ok[:, start:]
        if key.shape[-2] > 1:
            self.keys, self.values, self.window_ok = self.keys.clone(), self.values.clone(), self.window_ok.clone()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask function slices the padding-mask entries of the new keys only (the layer keeps its own)."""
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> tuple[str, ...]:
        return tuple(n for n in ("keys", "values", "window_ok", "sink_keys", "sink_values", "sinks_filled")
                     if getattr(self, n) is not None)

    def reset(self) -> None:
        if self.is_initialized:
            self.lazy_initialization(self.keys, self.values)
        self.sink_keys = self.sink_values = self.sinks_filled = None
        self.seen = 0
        self.pending = 0

    def offload(self):
        for name in self._tensors():
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self):
        for name in self._tensors():
            if getattr(self, name).device != self.device:
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in self._tensors():
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name)[indices])


# the named cache layers of ``VariantSpec.cache_layer`` (hf_reshape.registry.CACHE_LAYERS), built from the attention
# module and its hf_reshape holder
_LAYER_KINDS = {
    "linear_state": lambda module, holder: LinearRecurrentLayer(module),
    "window": lambda module, holder: SlidingWindowLayer(holder.params.window),
    "sink_window": lambda module, holder: SinkWindowLayer(module),
    "dynamic": lambda module, holder: DynamicLayer(),
}


def _layer_for(module: nn.Module | None) -> CacheLayerMixin:
    """The cache layer of one self-attention module: what its variant's spec declares (``VariantSpec.cache_layer``)
    for a causal reshaped layer, transformers' ``DynamicLayer`` for an exact or bidirectional one."""
    holder = None if module is None else getattr(module, STATE_ATTR, None)
    if not isinstance(holder, ReshapedAttention) or not getattr(module, "is_causal", False):
        return DynamicLayer()
    try:
        spec = get_variant(holder.method)
    except UnknownVariantError:  # unregistered since the reshape: its forward will say so
        return DynamicLayer()
    kind = spec.cache_layer
    if callable(kind):
        layer = kind(module)
        if not isinstance(layer, CacheLayerMixin):
            raise TypeError(
                f"the cache_layer of variant {spec.name!r} returned {type(layer).__name__}, not a transformers "
                "CacheLayerMixin"
            )
        return layer
    return _LAYER_KINDS[kind](module, holder)


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention module of each cache layer index. An encoder-decoder numbers its encoder and decoder layers
    alike: the decoder's (causal) module is the one that reads the cache."""
    found: dict[int, nn.Module] = {}
    for idx, _, module in self_attention_modules(model, get_architecture(model)):
        if idx not in found or getattr(module, "is_causal", False):
            found[idx] = module
    return found


class ReshapeCache(Cache):
    """A generation cache for a reshaped model: one layer per self-attention layer, the one its variant's spec
    declares (``VariantSpec.cache_layer``) for a causal layer:

    * ``"linear_state"`` (the default of every variant whose spec declares ``features``: ``linear`` and the other
      linearized variants): :class:`LinearRecurrentLayer`, a constant-size running state;
    * ``"window"`` (``sliding_window``): :class:`SlidingWindowLayer`, the last ``window`` keys and values;
    * ``"sink_window"``: :class:`SinkWindowLayer`, the first ``num_sink`` real tokens and the last ``window``;
    * a callable: the layer it builds;
    * ``"dynamic"`` (any other variant), or a layer left exact: transformers' ``DynamicLayer``.

    ``model.generate(...)`` on a reshaped model builds one by itself; build one by hand to drive forwards:

    ```python
    >>> cache = ReshapeCache(model)
    >>> out = model(input_ids, cache=cache, use_cache=True)
    ```

    Args:
        model (`nn.Module`): a reshaped decoder (GPT-2, Llama, Qwen, Mistral, ..., or BERT run as a decoder).
    """

    def __init__(self, model: nn.Module):
        modules = _attention_modules(model)
        layers = [_layer_for(modules.get(i)) for i in range(max(modules) + 1)]
        super().__init__(layers=layers)

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        """Whether `model` has a layer whose variant declares a cache layer other than transformers' `DynamicLayer`
        (a bounded one: causal linearized, `sliding_window`, `sink_window`, or a variant's own)."""
        return any(type(_layer_for(m)) is not DynamicLayer for m in _attention_modules(model).values())

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
