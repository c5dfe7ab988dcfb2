"""Model-level benchmark: whole randomly initialised models, stock SDPA against reshaped copies.

* **BERT** (``BertModel``, BERT-base shapes: hidden 768, 12 heads, intermediate 3072; 2 layers by default,
  ``max_position_embeddings = T``), forward on ``[1, T]`` token ids.
* **ViT** (``ViTModel``, ViT-B/16 shapes with a 224-pixel config; 2 of its 12 layers by default, for time),
  forward on one ``S x S`` image with ``interpolate_pos_encoding=True``: ``S = 2048`` gives
  ``(2048 / 16)^2 + 1 = 16385`` tokens.
* **GPT-2** (``GPT2LMHeadModel``, GPT-2-small shapes: 768 wide, 12 layers, 12 heads), greedy
  ``generate`` of ``N`` new tokens after a ``P``-token prompt, with the KV cache ``generate`` picks (the
  report names its class: a reshaped model gets whatever cache hf_reshape registers for its variant). The time
  of ``generate`` with one new token is the prefill; ``(t_N - t_1) / (N - 1)`` is the time per decoded token.
  The same is measured after a short prompt (``gpt2_short_prompt``, 100 tokens by default): the ratio of the two
  per-token times says whether decoding slows down as the context grows (a KV cache does; an O(1) state should
  not).
* **Llama** (``LlamaForCausalLM``, random weights: a Llama-shaped decoder, not a trained checkpoint): grouped-query
  attention (``llama_kv_heads`` key/value heads for ``heads`` query heads), rotary positions, SwiGLU feed-forward
  (``llama_intermediate``), RMSNorm; ``llama_layers`` layers. Two measurements, each side by side with SDPA:
  one forward of ``[1, llama_T]`` token ids (``llama_T = 8192`` by default), and greedy ``generate`` of
  ``llama_new`` tokens after a ``llama_prompt``-token prompt (256 after 4,000 by default) with the cache
  ``generate`` picks, reporting prefill, time per new token (as for GPT-2), total, and the bytes the cache holds
  once all tokens are generated (a KV cache's peak; a bounded cache holds the same after any prompt).

Every candidate is its own copy of the same weights (reshaped once, outside the timed region), and the
candidates are timed round-robin exactly as at op level.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import get_variant, list_variants
from . import op as op_bench
from .timing import PeakMemory, interleaved, paired_ratio


@dataclass
class ModelConfig:
    models: tuple[str, ...] = ("bert", "vit", "gpt2")
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    bert_sizes: tuple[int, ...] = (1024, 4096, 16384)
    bert_layers: int = 2
    vit_image: int = 2048
    vit_layers: int = 2
    vit_patch: int = 16
    gpt2_prompt: int = 4000
    gpt2_new: int = 256
    gpt2_short_prompt: int = 100  # 0: skip the short-prompt latency
    gpt2_layers: int = 12
    llama_T: int = 8192
    llama_prompt: int = 4000
    llama_new: int = 256
    llama_layers: int = 4
    llama_kv_heads: int = 4  # with heads=12: 3 query heads per key/value head
    llama_intermediate: int = 2048
    vocab: int | None = None  # None: each architecture's real vocabulary size
    variants: tuple[str, ...] | None = None
    caps: dict[str, int] | None = None
    quadratic_max_t: int = 16384
    rounds: int = 3
    warmup: int = 1
    quick: bool = False


def quick_config(**overrides) -> ModelConfig:
    """Tiny shapes for smoke runs (seconds)."""
    base = dict(hidden=64, heads=4, intermediate=128, bert_sizes=(32, 64), bert_layers=2, vit_image=64, vit_layers=2,
                gpt2_prompt=16, gpt2_new=4, gpt2_short_prompt=4, gpt2_layers=2, vocab=1000, rounds=1, warmup=1, quick=True,
                llama_T=64, llama_prompt=16, llama_new=4, llama_layers=2, llama_kv_heads=2, llama_intermediate=96)
    base.update(overrides)
    return ModelConfig(**base)


def _op_cfg(cfg: ModelConfig) -> op_bench.OpConfig:
    return op_bench.OpConfig(caps=cfg.caps, quadratic_max_t=cfg.quadratic_max_t, quick=cfg.quick,
                             variants=cfg.variants)


def _variants(cfg: ModelConfig, causal: bool, tokens: int) -> list[str]:
    ocfg = _op_cfg(cfg)
    names = []
    for v in cfg.variants or list_variants():
        spec = get_variant(v)
        if (spec.causal if causal else spec.bidirectional) and op_bench.runs_at(v, tokens, ocfg):
            names.append(v)
    return names


def _copies(model, names: list[str], tokens: int, quick: bool) -> dict[str, Any]:
    """``{"sdpa": model, variant: reshaped deep copy, ...}`` (all in eval mode, same weights)."""
    import hf_reshape

    model.set_attn_implementation("sdpa")
    out = {"sdpa": model.eval()}
    for name in names:
        m = copy.deepcopy(model)
        hf_reshape.reshape(m, name, **op_bench.variant_params(name, tokens, quick))
        out[name] = m.eval()
    return out


def _rows(section: str, tokens: int, timings, extra: dict | None = None) -> list[dict]:
    base = timings.get("sdpa")
    rows = []
    for name, tm in timings.items():
        rows.append({"model": section, "tokens": tokens, "candidate": name, "times_s": tm.times,
                     "median_s": tm.median, "error": tm.error,
                     "speedup_vs_sdpa": (1.0 if tm.times else None) if name == "sdpa" else paired_ratio(base, tm),
                     **(extra or {})})
    return rows


def bert(cfg: ModelConfig, progress=None) -> tuple[list[dict], list]:
    from transformers import BertConfig, BertModel

    rows, memory_jobs = [], []
    for t in cfg.bert_sizes:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.bert_layers, num_attention_heads=cfg.heads,
                            intermediate_size=cfg.intermediate, max_position_embeddings=t,
                            vocab_size=cfg.vocab or 30522, attn_implementation="sdpa")
        model = BertModel(config, add_pooling_layer=False)
        names = _variants(cfg, False, t)
        models = _copies(model, names, t, cfg.quick)
        ids = torch.randint(0, config.vocab_size, (1, t), generator=torch.Generator().manual_seed(1))

        def forward(m, ids=ids):
            with torch.no_grad():
                return m(input_ids=ids).last_hidden_state
        # bind this size's function and inputs now: the memory pass calls these after the loop has moved on
        calls = {n: (lambda m=m, f=forward: f(m)) for n, m in models.items()}
        if progress:
            progress(f"model bert T={t}: {', '.join(calls)}")
        timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"model bert T={t}")
        rows += _rows("bert", t, timings, {"layers": cfg.bert_layers})
        memory_jobs += [("bert", t, n, c) for n, c in calls.items()]
    return rows, memory_jobs


def vit(cfg: ModelConfig, progress=None) -> tuple[list[dict], list]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    image_size = 224 if not cfg.quick else 32
    config = ViTConfig(image_size=image_size, patch_size=cfg.vit_patch, hidden_size=cfg.hidden,
                       num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.heads,
                       intermediate_size=cfg.intermediate, attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False)
    s = cfg.vit_image
    tokens = (s // cfg.vit_patch) ** 2 + 1
    names = _variants(cfg, False, tokens)
    models = _copies(model, names, tokens, cfg.quick)
    pixels = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))

    def forward(m):
        with torch.no_grad():
            return m(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    calls = {n: (lambda m=m: forward(m)) for n, m in models.items()}
    if progress:
        progress(f"model vit {s}x{s} ({tokens} tokens): {', '.join(calls)}")
    timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"model vit {s}x{s}")
    rows = _rows("vit", tokens, timings, {"image": s, "layers": cfg.vit_layers})
    return rows, [("vit", tokens, n, c) for n, c in calls.items()]


def gpt2(cfg: ModelConfig, progress=None) -> tuple[list[dict], list]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    p, n_new = cfg.gpt2_prompt, cfg.gpt2_new
    vocab = cfg.vocab or 50257
    config = GPT2Config(n_embd=cfg.hidden, n_layer=cfg.gpt2_layers, n_head=cfg.heads, n_positions=p + n_new,
                        vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    names = _variants(cfg, True, p + n_new)
    models = _copies(model, names, p + n_new, cfg.quick)
    ids = torch.randint(0, config.vocab_size, (1, p), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def generate(m, new, prompt=p, **kw):
        with torch.no_grad():
            return m.generate(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=config.eos_token_id, **kw)
    cache = {}
    for name, m in models.items():
        out = generate(m, 2, return_dict_in_generate=True)
        # transformers 5.x renamed the output field `past_key_values` to `cache`
        found = next((out[k] for k in ("cache", "past_key_values") if k in out.keys()), None)
        cache[name] = type(found).__name__ if found is not None else "none"
    calls = {}
    for name, m in models.items():
        calls[f"{name}|{n_new}"] = lambda m=m: generate(m, n_new)
        calls[f"{name}|1"] = lambda m=m: generate(m, 1)
    short = cfg.gpt2_short_prompt if 0 < cfg.gpt2_short_prompt < p else 0
    if short:
        for name, m in models.items():
            calls[f"{name}|short|{n_new}"] = lambda m=m: generate(m, n_new, short)
            calls[f"{name}|short|1"] = lambda m=m: generate(m, 1, short)
    if progress:
        progress(f"model gpt2 prompt={p} new={n_new}: {', '.join(models)}")
    timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"model gpt2 prompt={p}")
    rows = []
    full = {name: timings[f"{name}|{n_new}"] for name in models}
    first = {name: timings[f"{name}|1"] for name in models}


    def per_token(name, key=""):
        # per round: (time of N new tokens - time of 1) / (N - 1), i.e. the decode steps without the prefill
        pairs = list(zip(timings[f"{name}|{key}{n_new}"].times, timings[f"{name}|{key}1"].times))
        if not pairs or n_new < 2:
            return None
        return statistics.median((a - b) / (n_new - 1) for a, b in pairs)

    base_tok = per_token("sdpa")
    for name in models:
        tn, t1, tok = full[name].median, first[name].median, per_token(name)
        tok_short = per_token(name, "short|") if short else None
        rows.append({
            "model": "gpt2", "tokens": p + n_new, "prompt": p, "new_tokens": n_new, "layers": cfg.gpt2_layers,
            "candidate": name, "cache": cache[name], "times_s": full[name].times, "median_s": tn,
            "prefill_s": t1, "per_token_s": tok, "error": full[name].error or first[name].error,
            "speedup_vs_sdpa": 1.0 if name == "sdpa" else paired_ratio(full["sdpa"], full[name]),
            "decode_speedup_vs_sdpa": (base_tok / tok) if tok and base_tok and tok > 0 and base_tok > 0 else None,
            "short_prompt": short or None, "per_token_short_s": tok_short,
            # per-token time after the long prompt / after the short one (> 1: decoding slows as context grows)
            "latency_growth": (tok / tok_short) if tok and tok_short and tok > 0 and tok_short > 0 else None,
        })
    return rows, [("gpt2", p + n_new, name, calls[f"{name}|{n_new}"]) for name in models]


def _llama_model(cfg: ModelConfig, positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = cfg.vocab or 32000
    config = LlamaConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.llama_layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.llama_kv_heads, intermediate_size=cfg.llama_intermediate,
                         max_position_embeddings=positions, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), config


def llama(cfg: ModelConfig, progress=None) -> tuple[list[dict], list]:
    """A Llama-shaped decoder with random weights (see the module docstring): forward at ``llama_T`` and
    ``generate`` after ``llama_prompt`` tokens, every causal variant against SDPA."""
    from ..cache import cache_nbytes

    t, p, n_new = cfg.llama_T, cfg.llama_prompt, cfg.llama_new
    model, config = _llama_model(cfg, max(t, p + n_new))
    shape = {"layers": cfg.llama_layers, "kv_heads": cfg.llama_kv_heads, "weights": "random"}
    rows, jobs = [], []

    # one forward at T
    models = _copies(model, _variants(cfg, True, t), t, cfg.quick)
    ids = torch.randint(3, config.vocab_size, (1, t), generator=torch.Generator().manual_seed(1))

    def forward(m):
        with torch.no_grad():
            return m.model(input_ids=ids, use_cache=False).last_hidden_state  # the decoder; no [T, vocab] logits
    calls = {n: (lambda m=m: forward(m)) for n, m in models.items()}
    if progress:
        progress(f"model llama T={t}: {', '.join(calls)}")
    timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"model llama T={t}")
    rows += _rows("llama", t, timings, shape)
    jobs += [("llama", t, n, c) for n, c in calls.items()]
    del models, calls

    # generate after a long prompt
    models = _copies(model, _variants(cfg, True, p + n_new), p + n_new, cfg.quick)
    prompt = torch.randint(3, config.vocab_size, (1, p), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)

    def generate(m, new, **kw):
        with torch.no_grad():
            return m.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=config.pad_token_id, **kw)
    cache, cache_bytes = {}, {}
    for name, m in models.items():  # untimed: the cache generate picks and what it holds after every token
        try:
            out = generate(m, n_new, return_dict_in_generate=True)
            found = next((out[k] for k in ("cache", "past_key_values") if k in out.keys()), None)
            cache[name] = type(found).__name__ if found is not None else "none"
            cache_bytes[name] = cache_nbytes(found) if found is not None else None
        except Exception as err:  # noqa: BLE001 -- reported in the row, as the timing does
            cache[name], cache_bytes[name] = f"error: {type(err).__name__}", None
    calls = {}
    for name, m in models.items():
        calls[f"{name}|{n_new}"] = lambda m=m: generate(m, n_new)
        calls[f"{name}|1"] = lambda m=m: generate(m, 1)
    if progress:
        progress(f"model llama generate prompt={p} new={n_new}: {', '.join(models)}")
    timings = interleaved(calls, cfg.rounds, cfg.warmup, label=f"model llama generate prompt={p}")

    def per_token(name):
        pairs = list(zip(timings[f"{name}|{n_new}"].times, timings[f"{name}|1"].times))
        if not pairs or n_new < 2:
            return None
        return statistics.median((a - b) / (n_new - 1) for a, b in pairs)

    full = {name: timings[f"{name}|{n_new}"] for name in models}
    base_tok = per_token("sdpa")
    for name in models:
        tok = per_token(name)
        rows.append({
            "model": "llama-generate", "tokens": p + n_new, "prompt": p, "new_tokens": n_new, **shape,
            "candidate": name, "cache": cache[name], "cache_bytes": cache_bytes[name],
            "times_s": full[name].times, "median_s": full[name].median, "prefill_s": timings[f"{name}|1"].median,
            "per_token_s": tok, "error": full[name].error or timings[f"{name}|1"].error,
            "speedup_vs_sdpa": 1.0 if name == "sdpa" else paired_ratio(full["sdpa"], full[name]),
            "decode_speedup_vs_sdpa": (base_tok / tok) if tok and base_tok and tok > 0 and base_tok > 0 else None,
        })
    jobs += [("llama-generate", p + n_new, name, calls[f"{name}|{n_new}"]) for name in models]
    return rows, jobs


def llama_markdown(results: dict) -> str:
    """The Llama section of ``bench.md`` (empty when the Llama-shaped decoder was not run)."""
    from .report import _mib, _ms, _table, _vs_sdpa

    model = results.get("model") or {}
    rows = [r for r in model.get("rows", []) if r["model"] in ("llama", "llama-generate")]
    if not rows:
        return ""
    mem = {(r["model"], r["tokens"], r["candidate"]): r.get("peak_bytes") for r in model.get("memory", [])}
    cfgm, r0 = model["config"], rows[0]
    lines = [f"### Llama-shaped decoder (random weights, not a trained model): hidden {cfgm['hidden']}, "
             f"{cfgm['heads']} query heads, {r0['kv_heads']} key/value heads (grouped-query), RoPE, "
             f"{r0['layers']} layers", ""]
    fwd = [r for r in rows if r["model"] == "llama"]
    if fwd:
        lines += [f"One forward of {fwd[0]['tokens']} tokens:", ""]
        body = [[f"`{r['candidate']}`", _ms(r["median_s"]) if r["median_s"] else (r.get("error") or "-"), _vs_sdpa(r),
                 _mib(mem.get(("llama", r["tokens"], r["candidate"])))] for r in fwd]
        lines += _table(["attention", "ms", "x SDPA", "peak MiB"], body) + [""]
    gen = [r for r in rows if r["model"] == "llama-generate"]
    if gen:
        lines += [f"Greedy generate of {gen[0]['new_tokens']} new tokens after a {gen[0]['prompt']}-token prompt:", ""]
        body = [[f"`{r['candidate']}`", r["cache"], _ms(r["median_s"]) if r["median_s"] else (r.get("error") or "-"),
                 _vs_sdpa(r), _ms(r["prefill_s"]), _ms(r["per_token_s"]), _vs_sdpa(r, "decode_speedup_vs_sdpa"),
                 _mib(r.get("cache_bytes")), _mib(mem.get(("llama-generate", r["tokens"], r["candidate"])))]
                for r in gen]
        lines += _table(["attention", "cache", "total ms", "x SDPA", "prefill ms", "ms / new token", "decode x SDPA",
                         "cache MiB at the end", "peak MiB"], body) + [""]
    return "\n".join(lines)


def run_timing(cfg: ModelConfig, progress=None) -> tuple[dict, list]:
    """Time the selected models; returns the ``model`` section and the memory jobs to measure afterwards."""
    rows, jobs = [], []
    for which in cfg.models:
        r, j = {"bert": bert, "vit": vit, "gpt2": gpt2, "llama": llama}[which](cfg, progress)
        rows += r
        jobs += j
    shapes = {"hidden": cfg.hidden, "heads": cfg.heads, "intermediate": cfg.intermediate}
    return {"config": shapes, "rows": rows}, jobs


def run_memory(jobs: list, meter: PeakMemory, progress=None) -> list[dict]:
    out = []
    meter.collect()
    for model, tokens, name, call in jobs:
        if progress:
            progress(f"memory model {model} tokens={tokens} {name}")
        row = {"model": model, "tokens": tokens, "candidate": name, "peak_bytes": None, "error": None}
        try:
            row["peak_bytes"] = meter.measure(call)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
        out.append(row)
    return out
