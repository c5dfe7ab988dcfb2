"""Streaming generation past a GPT-2's trained length with attention sinks (``sink_window``, StreamingLLM: Xiao et
al. 2024, "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

Two parts, each optional:

* **Latency and memory** (``--tokens N``, default 20,000): a GPT-2-small-shaped model (12 layers, hidden 768,
  12 heads, 50,257 tokens, random weights; or ``--model FOLDER``, a trained checkpoint) reshaped to
  ``sink_window(num_sink, window)`` (default 4 and 1,020: 1,024 keys kept) generates ``N`` tokens greedily, one
  forward per token through a :class:`hf_reshape.ReshapeCache`. Per token: wall time of the forward and the bytes
  the cache holds. Reported: the median per-token latency and the mean cache bytes over the first and the last
  ``--edge`` (1,000) tokens and their ratio (flat: within 10%), and a PNG of both over time. The positions are the
  model's learned table extended by copying (``max_positions=``, Longformer's initialisation) to the prompt plus
  ``N`` tokens. Measure it on a quiet machine: other processes move the per-token times.
* **Perplexity past the trained length** (``--ppl-tokens M``; needs ``--model``: random weights have no
  perplexity to speak of): held-out text (WikiText-2 test from the offline data folder, or ``--ppl-text FILE``),
  tokenized with the checkpoint's own tokenizer, scored as one stream of ``M`` tokens by

  - ``sink_window(num_sink, window)``,
  - the same cache size without sinks (``sink_window(0, num_sink + window)``, a plain sliding window),
  - exact SDPA attention over the whole stream (every past token; the cache grows without bound),
  - exact SDPA over a window recomputed for each token (StreamingLLM's "sliding window with re-computation":
    the last ``L - 1`` tokens re-encoded from position 0, ``--recompute`` targets spread over the stream),
  - exact SDPA inside the trained length: the text cut into blocks of the trained length, each scored alone
    (the model's perplexity where it was trained).

  Each streamed row is one forward over the stream with the variant's own attention, which equals feeding the
  tokens one at a time through the cache (``tests/test_long_inputs.py``: cached equals recomputed). GPT-2 adds a
  learned position to its input and a cache cannot re-map it (see the README's long-input section), so past the
  trained length the stream reads position ``p mod L`` (``L``: ``--trained-length``), the trained rows the
  extension by copying would give. The ``window`` used for perplexity is ``--ppl-window`` (default: the trained
  length minus the sinks, so the kept keys fit what the model was trained on).

The trained length of a checkpoint is ``--trained-length``; when not given it is read from a ``recipe.json`` beside
the checkpoint folder (a run of the ``gpt2-lm`` recipe trains on blocks of its ``schedule.max_length``, 128 tokens,
although its config says 1,024 positions), else the config's ``n_positions``. Run::

    HF_HUB_OFFLINE=1 python -m hf_reshape.bench.streaming --out docs/bench/streaming             # latency, random
    HF_HUB_OFFLINE=1 python -m hf_reshape.bench.streaming --model runs/gpt2-lm/pretrained --tokens 0 \\
        --ppl-text shared:tiny_shakespeare/input.txt --ppl-start 0.9 --ppl-tokens 20000 --out OUT   # perplexity

(``runs/gpt2-lm/pretrained``: the small GPT-2 a ``gpt2-lm`` recipe run trains, wherever its ``--out`` put it.)

Writes ``streaming.json``, ``streaming.md`` and (latency) ``streaming.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


# ---- the model ---------------------------------------------------------------------------------------------------
def load_model(model: str | None, seed: int = 0, config: dict | None = None):
    """``(model, tokenizer or None, label)``: a random GPT-2 of ``config`` (GPT-2 small by default) or the causal LM
    in the folder/repo ``model`` with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if model is None:
        torch.manual_seed(seed)
        cfg = GPT2Config(**(config or GPT2_SMALL))
        shape = f"{cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}"
        return GPT2LMHeadModel(cfg).eval(), None, f"GPT-2-shaped, RANDOM weights (seed {seed}; {shape})"
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        tok = None
    c = m.config
    shape = f"{getattr(c, 'n_layer', '?')} layers, hidden {getattr(c, 'n_embd', '?')}, vocab {c.vocab_size}"
    return m, tok, f"trained checkpoint {Path(model).name or model} ({shape})"


def trained_length(model_path: str | None, config, given: int | None) -> tuple[int, str]:
    """The length the checkpoint was trained on, and where that figure comes from."""
    if given is not None:
        return given, "--trained-length"
    if model_path is not None:
        recipe = Path(model_path).resolve().parent / "recipe.json"
        if recipe.is_file():
            try:
                data = json.loads(recipe.read_text())
                if data.get("task") == "causal-lm":
                    return int(data["schedule"]["max_length"]), f"schedule.max_length of {recipe.name} beside the model"
            except (ValueError, KeyError, TypeError):
                pass
    return int(config.n_positions), "the config's n_positions"


# ---- latency and memory --------------------------------------------------------------------------------------------
def stream(model, tokens: int, num_sink: int, window: int, prompt_len: int | None = None, seed: int = 0,
           progress=None) -> dict:
    """Greedy generation of ``tokens`` tokens one forward at a time through a ReshapeCache (the model is reshaped
    to ``sink_window`` in place, its positions extended to cover the stream), after a random prompt of
    ``prompt_len`` tokens (default ``num_sink + window``: the cache is full from the first generated token, so the
    first and last tokens compare a full cache with a full cache). Returns per-token seconds and cache bytes."""
    if prompt_len is None:
        prompt_len = num_sink + window
    import hf_reshape
    from hf_reshape.cache import ReshapeCache, cache_nbytes

    need = prompt_len + tokens
    extend = need if need > model.config.n_positions else None
    hf_reshape.reshape(model, "sink_window", num_sink=num_sink, window=window, max_positions=extend)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    cache = ReshapeCache(model)
    times, sizes = [], []
    with torch.no_grad():
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(tokens):
            t0 = time.perf_counter()
            logits = model(input_ids=token, cache=cache, use_cache=True).logits
            times.append(time.perf_counter() - t0)
            sizes.append(cache_nbytes(cache))
            token = logits[:, -1].argmax(-1, keepdim=True)
            if progress and (i + 1) % max(1, tokens // 10) == 0:
                progress(f"  {i + 1}/{tokens} tokens, last {1e3 * times[-1]:.1f} ms, cache {sizes[-1] / 2**20:.2f} MiB")
    return {"times_s": times, "cache_bytes": sizes, "seen": cache.get_seq_length(), "extended_to": extend,
            "prompt_tokens": prompt_len}


def flatness(times: list[float], sizes: list[int], edge: int) -> dict:
    """First ``edge`` tokens against the last ``edge``: median latency and mean cache bytes, and the ratios."""
    edge = max(1, min(edge, len(times) // 2))
    first_t, last_t = statistics.median(times[:edge]), statistics.median(times[-edge:])
    first_m, last_m = statistics.fmean(sizes[:edge]), statistics.fmean(sizes[-edge:])
    return {"edge": edge, "first_ms": 1e3 * first_t, "last_ms": 1e3 * last_t, "latency_ratio": last_t / first_t,
            "first_cache_mib": first_m / 2**20, "last_cache_mib": last_m / 2**20,
            "cache_ratio": last_m / first_m if first_m else float("nan"),
            "within_10pct": abs(last_t / first_t - 1) <= 0.10 and abs(last_m / first_m - 1) <= 0.10}


def plot(result: dict, path: Path) -> bool:
    """Per-token latency (a rolling median) and cache MiB over the generated tokens; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (the JSON and markdown are still written)")
        return False
    times, sizes = result["stream"]["times_s"], result["stream"]["cache_bytes"]
    k = max(1, len(times) // 200)
    xs = list(range(0, len(times), k))
    roll = [1e3 * statistics.median(times[i:i + k]) for i in xs]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a.plot(xs, roll, lw=1)
    a.set_ylabel(f"ms / token (median of {k})")
    a.set_title(f"sink_window({result['num_sink']}, {result['window']}) streaming: {result['model']}", fontsize=8)
    b.plot(range(len(sizes)), [s / 2**20 for s in sizes], lw=1, color="tab:orange")
    b.set_ylabel("cache MiB")
    b.set_xlabel("generated token")
    b.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- perplexity --------------------------------------------------------------------------------------------------
def read_heldout(path: str | None, start: float = 0.0) -> tuple[str, str]:
    """The held-out text (from the fraction ``start`` of its characters on) and its label. ``path``: a file, or
    ``shared:<path>`` in the offline data folder; default WikiText-2 test."""
    if path is not None and path.startswith("shared:"):
        from ..recipes.data import resolve_source

        label, path = path[len("shared:"):], resolve_source(path)
    elif path is not None:
        label = Path(path).name
    if path is None:
        from ..data import data_dir

        root = data_dir()
        if root is None or not (root / "wikitext-2" / "test.txt").is_file():
            raise FileNotFoundError("WikiText-2 test not found: set HF_RESHAPE_DATA to the folder holding "
                                    "wikitext-2/test.txt, or pass --ppl-text FILE")
        path, label = str(root / "wikitext-2" / "test.txt"), "WikiText-2 test"
    text = Path(path).read_text(encoding="utf-8")
    if start:
        text, label = text[int(len(text) * start):], f"{label} from {start:.0%} of its characters on"
    return text, label


def _nll(model, ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Per-token negative log-likelihood ``[T-1]`` of ``ids`` ``[1, T]`` (token t+1 given tokens <= t)."""
    mask = torch.ones_like(ids)  # with position ids that restart: not read as packed sequences
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=position_ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")


def perplexities(model, ids: torch.Tensor, trained: int, num_sink: int, window: int, segments: int = 8,
                 max_exact: int = 4096, recompute: int = 0, progress=print) -> dict:
    """Perplexity of one stream ``ids`` ``[1, M]`` under sink_window, the sink-less window of the same cache size,
    exact attention over the whole stream (all three with positions ``p mod trained``), and exact attention in
    blocks of the trained length. Also per segment of the stream, to see where a row degrades."""
    import copy

    import hf_reshape

    m = ids.shape[1]
    wrapped = (torch.arange(m) % trained)[None]
    rows = {}
    candidates = {
        f"sink_window({num_sink}, {window})": ("sink_window", {"num_sink": num_sink, "window": window}),
        f"window without sinks ({num_sink + window})": ("sink_window", {"num_sink": 0, "window": num_sink + window}),
    }
    if m <= max_exact:
        candidates["sdpa, whole stream"] = (None, None)
    else:
        rows["sdpa, whole stream"] = {"error": f"not run: {m} tokens > --max-exact {max_exact} (a {m} x {m} score "
                                      "matrix per head)"}
    for label, (name, params) in candidates.items():
        progress(f"perplexity: {label} over {m} tokens")
        mdl = copy.deepcopy(model)
        if name is not None:
            hf_reshape.reshape(mdl, name, **params)
        t0 = time.time()
        try:
            nll = _nll(mdl, ids, wrapped)
        except (RuntimeError, MemoryError) as err:  # exact attention over a very long stream may not fit
            rows[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
        rows[label] = _summary(nll, trained, segments, time.time() - t0)
    if recompute:
        rows[f"sdpa, window of {trained} recomputed per token"] = recomputed(model, ids, trained, recompute, progress)
    progress(f"perplexity: sdpa in blocks of the trained length ({trained})")
    t0 = time.time()
    parts = [_nll(model, ids[:, i:i + trained], None) for i in range(0, m - trained + 1, trained)]
    nll = torch.cat(parts)
    rows[f"sdpa, blocks of {trained} (inside the trained length)"] = {
        "ppl": math.exp(nll.mean().item()), "tokens_scored": int(nll.numel()), "seconds": round(time.time() - t0, 1)}
    return rows


def recomputed(model, ids: torch.Tensor, trained: int, count: int, progress=print, batch: int = 64) -> dict:
    """StreamingLLM's "sliding window with re-computation" reference: each scored token is predicted from its last
    ``trained - 1`` tokens re-encoded from position 0 (exact attention, positions inside the trained range, no
    cache: ``trained`` times the work of a cached step). Scores ``count`` targets spread evenly over the positions
    past the trained length."""
    m = ids.shape[1]
    targets = torch.linspace(trained, m - 1, steps=min(count, m - trained)).round().long().unique()
    progress(f"perplexity: sdpa, window of {trained} recomputed for {len(targets)} tokens")
    t0 = time.time()
    nll = []
    with torch.no_grad():
        for i in range(0, len(targets), batch):
            t = targets[i:i + batch]
            windows = torch.stack([ids[0, j - trained + 1:j + 1] for j in t.tolist()])  # last token is the target
            logits = model(input_ids=windows[:, :-1], use_cache=False).logits[:, -1]
            nll.append(torch.nn.functional.cross_entropy(logits.float(), windows[:, -1], reduction="none"))
    nll = torch.cat(nll)
    return {"ppl": math.exp(nll.mean().item()), "ppl_past_trained": math.exp(nll.mean().item()),
            "tokens_scored": int(nll.numel()), "seconds": round(time.time() - t0, 1),
            "note": f"{int(nll.numel())} targets spread over positions {trained}..{m - 1}"}


def _summary(nll: torch.Tensor, trained: int, segments: int, seconds: float) -> dict:
    n = nll.numel()
    past = nll[trained:]  # targets at positions > trained
    bounds = [round(i * n / segments) for i in range(segments + 1)]
    return {
        "ppl": math.exp(nll.mean().item()),
        "ppl_past_trained": math.exp(past.mean().item()) if past.numel() else None,
        "ppl_inside_trained": math.exp(nll[:trained].mean().item()),
        "segments": [{"from": bounds[i] + 1, "to": bounds[i + 1], "ppl": math.exp(nll[bounds[i]:bounds[i + 1]].mean().item())}
                     for i in range(segments) if bounds[i + 1] > bounds[i]],
        "tokens_scored": int(n), "seconds": round(seconds, 1),
    }


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`", ""] if result.get("command") else []
    lines += [f"Model: {result['model']}; {result['threads']} threads; {result['machine']}.", ""]
    if "flat" in result:
        f = result["flat"]
        lines += [
            f"**Streaming** {result['tokens']} generated tokens, `sink_window(num_sink={result['num_sink']}, "
            f"window={result['window']})`, greedy, one forward per token through `ReshapeCache`, after a prompt of "
            f"{result['stream']['prompt_tokens']} tokens (positions extended by copying to "
            f"{result['stream']['extended_to'] or 'the model table'}):",
            "",
            "| tokens | median ms / token | cache MiB (mean) |",
            "|---|---|---|",
            f"| first {f['edge']} | {f['first_ms']:.2f} | {f['first_cache_mib']:.3f} |",
            f"| last {f['edge']} | {f['last_ms']:.2f} | {f['last_cache_mib']:.3f} |",
            f"| last / first | {f['latency_ratio']:.3f} | {f['cache_ratio']:.3f} |",
            "",
            f"Flat within 10% (latency and cache): {f['within_10pct']}. Wall time of the stream: "
            f"{result['stream_wall_s']:.0f} s.",
            "",
        ]
    if "perplexity" in result:
        p = result["perplexity"]
        lines += [
            f"**Perplexity** on {p['text']} ({p['tokens']} tokens, the checkpoint's tokenizer), trained length "
            f"{p['trained_length']} ({p['trained_length_from']}); streamed rows read positions p mod "
            f"{p['trained_length']}:",
            "",
            "| attention | ppl (whole stream) | ppl inside the trained length | ppl past it | per segment |",
            "|---|---|---|---|---|",
        ]
        for label, r in p["rows"].items():
            if "error" in r:
                lines.append(f"| {label} | - | - | - | {r['error']} |")
                continue
            seg = ", ".join(f"{s['ppl']:.1f}" for s in r.get("segments", [])) or "-"
            inside = f"{r['ppl_inside_trained']:.2f}" if "ppl_inside_trained" in r else "-"
            past = "-" if r.get("ppl_past_trained") is None else f"{r['ppl_past_trained']:.2f}"
            lines.append(f"| {label} | {r['ppl']:.2f} | {inside} | {past} | {seg} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_reshape.bench.streaming", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="FOLDER", help="a trained GPT-2 checkpoint (folder or repo id) with its "
                   "tokenizer; default: GPT-2-small-shaped random weights (latency only)")
    p.add_argument("--tokens", type=int, default=20000, help="tokens to generate for latency/memory (0: skip)")
    p.add_argument("--num-sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020, help="window of the latency stream")
    p.add_argument("--edge", type=int, default=1000, help="first/last tokens compared")
    p.add_argument("--ppl-tokens", type=int, default=0, help="tokens of held-out text to score (needs --model)")
    p.add_argument("--ppl-window", type=int, default=None, help="window for perplexity (default: trained length - sinks)")
    p.add_argument("--ppl-text", metavar="FILE", help="held-out text (default: WikiText-2 test, offline data folder)")
    p.add_argument("--ppl-start", type=float, default=0.0, metavar="F",
                   help="score the text from this fraction of its characters on (0.9 with tiny Shakespeare: the "
                   "10%% the gpt2-lm recipe holds out)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens of the latency stream (default "
                   "num_sink + window: the cache is full when generation starts)")
    p.add_argument("--trained-length", type=int, default=None,
                   help="tokens the checkpoint was trained on (default: recipe.json beside it, else n_positions)")
    p.add_argument("--recompute", type=int, default=2000, metavar="N", help="targets scored by the sliding window "
                   "with re-computation (positions kept in range; 0: skip)")
    p.add_argument("--max-exact", type=int, default=4096, help="longest stream scored with exact attention")
    p.add_argument("--config", type=json.loads, default=None, metavar="JSON",
                   help='GPT2Config fields of the random model (default GPT-2 small), e.g. \'{"n_layer": 2}\'')
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for streaming.json/.md/.png (default: print only)")
    args = p.parse_args(argv)
    for name in ("tokens", "ppl_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.ppl_tokens and args.model is None:
        p.error("--ppl-tokens needs --model (a trained checkpoint and its tokenizer): random weights have no "
                "perplexity worth reporting")
    if args.tokens == 0 and args.ppl_tokens == 0:
        p.error("nothing to do: give --tokens > 0 (latency) and/or --ppl-tokens > 0 (perplexity)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import copy

    model, tok, label = load_model(args.model, args.seed, args.config)
    result = {"model": label, "model_source": args.model or "random", "num_sink": args.num_sink,
              "window": args.window, "tokens": args.tokens, "seed": args.seed, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "command": "python -m hf_reshape.bench.streaming " + " ".join(sys.argv[1:] if argv is None else argv)}
    start = time.time()
    if args.ppl_tokens:
        if tok is None:
            p.error(f"--model {args.model} has no tokenizer to read the held-out text with")
        trained, source = trained_length(args.model, model.config, args.trained_length)
        window = args.ppl_window if args.ppl_window is not None else trained - args.num_sink
        text, text_label = read_heldout(args.ppl_text, args.ppl_start)
        ids = tok(text, return_attention_mask=False)["input_ids"][: args.ppl_tokens]
        if len(ids) < 2 * trained:
            p.error(f"the held-out text has {len(ids)} tokens: give at least twice the trained length ({trained})")
        ids = torch.tensor([ids])
        rows = perplexities(model, ids, trained, args.num_sink, window, max_exact=args.max_exact,
                            recompute=args.recompute)
        result["perplexity"] = {"text": text_label, "tokens": ids.shape[1], "trained_length": trained,
                                "trained_length_from": source, "window": window, "rows": rows}
    if args.tokens:
        print(f"streaming {args.tokens} tokens with sink_window({args.num_sink}, {args.window}): {label}")
        t0 = time.time()
        result["stream"] = stream(copy.deepcopy(model), args.tokens, args.num_sink, args.window, args.prompt,
                                  seed=args.seed, progress=print)
        result["stream_wall_s"] = time.time() - t0
        result["flat"] = flatness(result["stream"]["times_s"], result["stream"]["cache_bytes"], args.edge)
    result["wall_s"] = round(time.time() - start, 1)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "streaming.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / "streaming.md").write_text(text, encoding="utf-8")
        if "stream" in result and plot(result, out / "streaming.png"):
            print(f"plot: {out / 'streaming.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
