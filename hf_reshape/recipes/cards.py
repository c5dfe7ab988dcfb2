"""Model cards for the models a recipe converted (``huggingface_hub.ModelCard``), and pushing them to the Hub.

Each card carries ``library_name: hf_reshape``, ``base_model``, tags, the dataset, a ``model-index`` with the
measured metrics, the run's retained-metric table and how to load the model with ``hf_reshape.from_pretrained``.
``hf-reshape card RUN_DIR`` rebuilds them from ``RUN_DIR/results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import markdown_table

_TASK_TYPES = {"accuracy": "text-classification", "perplexity": "text-generation"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ model_label }} with its self-attention swapped for **{{ variant }}** ({{ params }}) by
[hf_reshape](https://github.com/), converted by the `{{ recipe }}` recipe: {{ stage_text }}.

## Results

{{ metric_name }} on {{ dataset }}: **{{ value }}**, {{ retained }} of the softmax baseline fine-tuned on the same
schedule ({{ baseline }}); {{ speed }}.

Every variant and stage of the run:

{{ table }}

## How to load it

```python
import hf_reshape
model = hf_reshape.from_pretrained("{{ repo_or_folder }}")   # the variant and its state come back with the weights
```

A plain `from_pretrained` of transformers loads the weights but runs softmax attention.

## How it was made

Command: `{{ command }}` (seed {{ seed }}, world size {{ world_size }}; machine: {{ machine }}).
"""


def _stage_text(stage: str) -> str:
    return {
        "none": "the attention swapped with no training",
        "transfer": "attention transfer only (the new attention's parameters trained to match softmax)",
        "finetune": "the attention swapped, then the model fine-tuned on the task",
        "transfer+finetune": "attention transfer, then fine-tuning on the task",
    }[stage]


def card_for(results: dict, row: dict, folder: str):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metric = results["metric"]
    task_type = "image-classification" if "image" in results["recipe"] or "vit" in results["recipe"] else \
        _TASK_TYPES.get(metric, "text-classification")
    base = results["model_source"]
    data = ModelCardData(
        library_name="hf_reshape",
        base_model=None if base.startswith("local:") else base,
        tags=["hf_reshape", row["variant"], "efficient-attention", results["recipe"]],
        datasets=[results["dataset"].split(" ")[0]],
        model_name=f"{results['recipe']}-{row['variant']}-{row['stage']}",
        eval_results=[
            EvalResult(task_type=task_type, dataset_type=results["dataset"].split(" ")[0], dataset_name=results["dataset"],
                       metric_type=metric, metric_value=round(row["metric"]["value"], 4), metric_name=metric),
        ],
    )
    base_row = next(r for r in results["rows"] if r["variant"] == "softmax")
    speed = row.get("speedup_long")
    return ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{results['recipe']}: {row['variant']} ({row['stage']})",
        model_label=results["model"], variant=row["variant"],
        params=", ".join(f"{k}={v}" for k, v in row["params"].items()) or "default parameters",
        recipe=results["recipe"], stage_text=_stage_text(row["stage"]), metric_name=metric,
        dataset=results["dataset"], value=f"{row['metric']['value']:.4f}", retained=f"{row['retained']:.1%}",
        baseline=f"{base_row['metric']['value']:.4f}",
        speed="speed not measured" if speed is None else
        f"{speed:.2f}x softmax's forward speed at {row.get('latency_inputs', {}).get('long', 'the long length')}",
        table=markdown_table(results), repo_or_folder=folder, command=results["command"], seed=results["seed"],
        world_size=results["world_size"],
        machine=f"{results['machine']['cpu_count']} CPU cores, accelerator {results['machine']['accelerator']}",
    )


def write_cards(run_dir: str | Path) -> list[Path]:
    """Write ``README.md`` (the card) into every converted model folder of a run; returns their paths."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no results.json: is it a recipe run folder (hf-reshape recipe --out)?")
    results = json.loads(results_path.read_text())
    written = []
    for folder in sorted((run_dir / "models").glob("*")) if (run_dir / "models").is_dir() else []:
        row = next((r for r in results["rows"] if f"{r.get('label', r['variant'])}-{r['stage'].replace('+', '-')}" == folder.name), None)
        if row is None:
            continue
        card = card_for(results, row, folder.name)
        card.save(str(folder / "README.md"))
        written.append(folder / "README.md")
    return written


def push_to_hub(model_folder: str | Path, repo_id: str, *, api=None, private: bool | None = None) -> str:
    """Upload a converted model folder (weights, config with the variant record, card) to ``repo_id``."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(model_folder), repo_id=repo_id,
                             commit_message="Upload a model converted by hf_reshape")
    return str(info)
