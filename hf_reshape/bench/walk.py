"""Walk every model type whose modeling file uses transformers' attention interface and say what hf_reshape does
with it: reshapes it and passes, refuses it up front (with which reason), refuses it at a call, or fails.

```bash
python -m hf_reshape.bench.walk --out walk.json            # every such model type (minutes, random weights)
python -m hf_reshape.bench.walk --only llama bert clip     # a few
```

For each model type (``transformers.models.auto.CONFIG_MAPPING_NAMES``) whose ``modeling_*.py`` mentions
``ALL_ATTENTION_FUNCTIONS``: build the default config shrunk to a tiny model (hidden 64, 2 layers, 4 heads, 2
key/value heads, small feed-forward, sub-configs alike), build ``AutoModel.from_config`` in float32 with random
weights, run the stock model (its default attention) on dummy inputs made from its ``main_input_name``, then

1. reshape with ``sliding_window`` at its degenerate setting (a window longer than any input, which also serves a
   model's own window) and check the forward is finite and equals the stock model (``--atol``);
2. reshape with ``linear`` and check the forward is finite.

Outcomes per model type: ``pass`` (both), ``pass-exact-only`` (1 passes, ``linear`` refused up front with a
reason), ``refused`` (``reshape`` refused the model up front; the reason is kept), ``refused-at-call`` (the
reshaped forward raised hf_reshape's error naming what it cannot serve), ``mismatch`` (the degenerate setting
differs from stock: a silent difference, a bug to look at), ``error`` (another exception after reshaping), and
``skipped`` (the walk itself could not build or run the stock model: its shrunk config or dummy inputs do not fit
that model; no statement about hf_reshape). The counts and each model's outcome and reason go to ``--out`` as JSON
and to stdout as a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, SEQ = 64, 2, 4, 2, 64, 12
_HIDDEN = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "model_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
           "num_encoder_layers", "num_decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
          "num_heads")
_FFN = ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "d_ff", "n_inner",
        "moe_intermediate_size", "shared_expert_intermediate_size")


def interface_model_types() -> list[str]:
    """Model types whose modeling file mentions ``ALL_ATTENTION_FUNCTIONS``, sorted."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        folder = root / model_type_to_module_name(model_type)
        files = list(folder.glob("modeling_*.py")) if folder.is_dir() else []
        if any("ALL_ATTENTION_FUNCTIONS" in f.read_text(encoding="utf-8") for f in files):
            found.append(model_type)
    return sorted(found)


def _shrink(d: dict) -> dict:
    """A config dict with its sizes made tiny (sub-config dicts alike)."""
    out = dict(d)
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value)
    present = lambda names: [n for n in names if isinstance(d.get(n), int) and not isinstance(d.get(n), bool)]
    for n in present(_HIDDEN):
        out[n] = HIDDEN
    for n in present(_LAYERS):
        out[n] = min(d[n], LAYERS)
    for n in present(_HEADS):
        out[n] = HEADS
    for n in _HEADS:  # per-stage heads (Swin): 4 each, the width doubling per stage keeps them whole
        if isinstance(d.get(n), list) and all(isinstance(v, int) for v in d[n]):
            out[n] = [HEADS] * len(d[n])
    for n in ("out_features", "out_indices"):  # backbone outputs named after the full depth: recomputed
        if n in d:
            out[n] = None
    for n in present(_FFN):
        out[n] = FFN
    if isinstance(d.get("num_key_value_heads"), int):
        out["num_key_value_heads"] = KV_HEADS
    if isinstance(d.get("head_dim"), int):
        out["head_dim"] = HIDDEN // HEADS
    for n in ("layer_types", "mlp_layer_types"):
        if isinstance(d.get(n), list):
            out[n] = d[n][:LAYERS]
    for n in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(d.get(n), int) and d[n] > 4:
            out[n] = 4
    for key, value in d.items():  # multimodal rotary sections (Qwen2-VL) must add up to the new head_dim / 2
        if isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            out[key] = dict(value, mrope_section=_split(HIDDEN // HEADS // 2, value["mrope_section"]))
    for n in ("num_experts_per_tok",):
        if isinstance(d.get(n), int) and d[n] > 2:
            out[n] = 2
    return out


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in proportion to ``parts``."""
    scaled = [max(1, p * total // max(1, sum(parts))) for p in parts]
    scaled[-1] += total - sum(scaled)
    return scaled


def build(model_type: str):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)
    config = type(config).from_dict(_shrink(config.to_dict()))
    torch.manual_seed(0)
    try:
        model = AutoModel.from_config(config)
    except ValueError:  # no AutoModel entry: the family's `<Name>Model` class, if it has one
        import transformers

        cls = getattr(transformers, type(config).__name__.removesuffix("Config") + "Model", None)
        if cls is None:
            raise
        model = cls(config)
    return model.float().eval()


def _side(config, name, default):
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value if isinstance(value, int) and value > 0 else default


def _input(name: str, config, g) -> torch.Tensor:
    vision = getattr(config, "vision_config", None) or config
    if name == "pixel_values":
        size = _side(vision, "image_size", 32)
        return torch.randn(2, _side(vision, "num_channels", 3), size, size, generator=g)
    if name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", SEQ)  # Whisper reads exactly its 2 x positions
        return torch.randn(2, _side(config, "num_mel_bins", 80), frames, generator=g)
    if name == "input_values":
        return torch.randn(2, 4000, generator=g)
    if name == "inputs_embeds":
        text = getattr(config, "text_config", None) or config
        width = next((getattr(text, n) for n in _HIDDEN if isinstance(getattr(text, n, None), int)), HIDDEN)
        return torch.randn(2, SEQ, width, generator=g)
    vocab = _side(getattr(config, "text_config", None) or config, "vocab_size", 100)
    length = 5 if name == "decoder_input_ids" else SEQ
    return torch.randint(3, max(4, min(vocab, 1000)), (2, length), generator=g)


def input_candidates(model) -> list[dict]:
    """Dummy inputs to try, in order: the ``main_input_name`` alone, then with decoder ids, then text with
    images (two-tower models such as CLIP need both)."""
    import inspect

    config = model.config
    accepted = set(inspect.signature(model.forward).parameters)
    main = getattr(model, "main_input_name", "input_ids")
    sets = [[main], [main, "decoder_input_ids"], ["input_ids", "pixel_values"], ["input_ids", "decoder_input_ids"],
            ["inputs_embeds"]]
    out = []
    for names in sets:
        if all(n in accepted for n in names):
            g = torch.Generator().manual_seed(1)
            inputs = {n: _input(n, config, g) for n in names}
            if "use_cache" in accepted:  # no cache: hybrid models' caches are not what the walk checks
                inputs["use_cache"] = False
            out.append(inputs)
    return out


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    for value in values:
        found = _first_tensor(value) if isinstance(value, (tuple, list, dict)) or hasattr(value, "values") else value
        if isinstance(found, torch.Tensor) and found.is_floating_point():
            return found
    raise ValueError("no floating output")


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return re.sub(r"\s+", " ", text)[:400]


def walk_one(model_type: str, atol: float = 1e-4) -> dict:
    import hf_reshape
    from hf_reshape.errors import ReshapeError

    row = {"model_type": model_type}
    try:
        stock = build(model_type)
    except Exception as err:  # the walk's tiny config does not fit this model
        return {**row, "outcome": "skipped", "reason": "build: " + _reason(err)}
    expected, failure = None, None
    for inputs in input_candidates(stock):
        try:
            with torch.no_grad():
                torch.manual_seed(2)  # models that draw at forward time (ViT-MAE's patch masking) draw alike
                expected = _first_tensor(stock(**inputs))
            break
        except Exception as err:  # these dummy inputs do not fit this model: try the next
            failure = err
    if expected is None:
        return {**row, "outcome": "skipped", "reason": "stock forward: " + _reason(failure or ValueError("no inputs"))}
    row["model_class"] = type(stock).__name__
    model = copy.deepcopy(stock)
    try:
        hf_reshape.reshape(model, "sliding_window", window=1 << 20)
    except ReshapeError as err:
        return {**row, "outcome": "refused", "reason": _reason(err)}
    except Exception as err:
        return {**row, "outcome": "error", "stage": "reshape", "reason": _reason(err), "trace": traceback.format_exc(-3)}
    row["layers"] = len([m for m in model.modules() if isinstance(getattr(m, "hf_reshape", None), torch.nn.Module)])
    try:
        with torch.no_grad():
            torch.manual_seed(2)
            got = _first_tensor(model(**inputs))
    except ReshapeError as err:
        return {**row, "outcome": "refused-at-call", "reason": _reason(err)}
    except Exception as err:
        return {**row, "outcome": "error", "stage": "forward", "reason": _reason(err), "trace": traceback.format_exc(-3)}
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return {**row, "outcome": "error", "stage": "forward", "reason": "non-finite or misshapen output"}
    diff = (got - expected).abs().max().item() if got.numel() else 0.0
    row["max_abs_diff"] = diff
    if not diff <= atol:
        return {**row, "outcome": "mismatch", "reason": f"degenerate sliding_window differs from stock by {diff:.3g}"}
    model = copy.deepcopy(stock)
    try:
        hf_reshape.reshape(model, "linear")
    except ReshapeError as err:
        return {**row, "outcome": "pass-exact-only", "reason": _reason(err)}
    try:
        with torch.no_grad():
            torch.manual_seed(2)
            got = _first_tensor(model(**inputs))
    except ReshapeError as err:
        return {**row, "outcome": "refused-at-call", "stage": "linear", "reason": _reason(err)}
    except Exception as err:
        return {**row, "outcome": "error", "stage": "linear forward", "reason": _reason(err),
                "trace": traceback.format_exc(-3)}
    if not torch.isfinite(got).all():
        return {**row, "outcome": "error", "stage": "linear forward", "reason": "non-finite output"}
    return {**row, "outcome": "pass"}


def _bucket(reason: str) -> str:
    """A short key grouping similar reasons."""
    for pattern in (r"`(\w+)[=`]", r"passes its attention function \[([^\]]*)\]", r"argument\(s\) \[([^\]]*)\]",
                    r"none of its modules calls", r"runs causal attention", r"cannot switch", r"not supported: (.{40})"):
        m = re.search(pattern, reason)
        if m:
            return m.group(0)[:60]
    return reason.split(":")[0][:60]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_reshape.bench.walk", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="model types to walk (default: every one on the interface)")
    parser.add_argument("--out", default=None, help="write the rows and counts as JSON here")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    types = args.only or interface_model_types()
    rows, start = [], time.time()
    for i, model_type in enumerate(types):
        t0 = time.time()
        row = walk_one(model_type, args.atol)
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        print(f"[{i + 1}/{len(types)}] {model_type}: {row['outcome']} {row.get('reason', '')[:150]}", flush=True)
    counts = Counter(r["outcome"] for r in rows)
    reasons = Counter((r["outcome"], _bucket(r.get("reason", ""))) for r in rows if r["outcome"] != "pass")
    summary = {"transformers": transformers.__version__, "model_types": len(rows), "counts": dict(counts),
               "reasons": [{"outcome": o, "reason": b, "count": c} for (o, b), c in reasons.most_common()],
               "seconds": round(time.time() - start, 1), "rows": rows}
    print(f"\n{len(rows)} model types on the attention interface (transformers {transformers.__version__}):")
    for outcome, count in counts.most_common():
        print(f"  {outcome:16s} {count}")
    print("\nreasons (outcome, reason, count):")
    for (outcome, bucket), count in reasons.most_common():
        print(f"  {outcome:16s} {count:4d}  {bucket}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
