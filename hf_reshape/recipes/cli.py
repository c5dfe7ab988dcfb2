"""``hf-reshape recipe`` and ``hf-reshape card``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

EPILOG = """examples:
  hf-reshape recipe bert-sst2 --quick --out runs/bert-sst2-quick     the main job: ~15 min on 2 CPU cores, offline
  hf-reshape recipe bert-sst2 --variants linformer nystrom --out runs/b   two variants, full schedule
  hf-reshape recipe bert-sst2 --dataset reviews.csv --text-column review --label-column stars --out runs/r
                                                                      your own data: a seeded 90/10 split of one file
  hf-reshape recipe my_recipe.yaml --out runs/mine                    a recipe file (see recipes/README.md)
  torchrun --nproc_per_node 2 -m hf_reshape.cli recipe bert-sst2 --quick --out runs/ddp   two processes (DDP)

A stopped run resumes when started again with the same --out: finished rows are kept, an interrupted
fine-tune continues from its last checkpoint. Results: OUT/results.json, OUT/results.md, OUT/pareto.png,
OUT/models/<variant>-<stage>/ (weights + README.md model card).
"""


def recipe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-reshape recipe", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a model's attention with every variant, recover accuracy (attention transfer + "
        "fine-tuning) and measure the trade-off against the softmax model on the same schedule.",
    )
    p.add_argument("recipe", metavar="NAME_OR_FILE",
                   help="a built-in recipe (bert-sst2, gpt2-lm, vit-mnist) or a YAML/JSON recipe file")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<recipe name>[-quick])")
    p.add_argument("--quick", action="store_true", help="the recipe's short schedule (its `quick:` overrides)")
    p.add_argument("--variants", nargs="+", metavar="V", help="only these variants (names or recipe labels)")
    p.add_argument("--model", metavar="ID_OR_FOLDER", help="a Hub model id or a local folder in place of the recipe's")
    p.add_argument("--dataset", metavar="ID_OR_FILE",
                   help="training rows: a Hub dataset id or a CSV/TSV/JSON/JSONL/parquet file; split 90/10 by seed "
                   "unless --eval-dataset is given")
    p.add_argument("--eval-dataset", metavar="ID_OR_FILE", help="evaluation rows (Hub id or file)")
    p.add_argument("--text-column", metavar="C", help="column holding the text (recipe's default otherwise)")
    p.add_argument("--label-column", metavar="C", help="column holding the label; any values, mapped to class ids")
    p.add_argument("--image-column", metavar="C", help="column holding the image (image tasks)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for data order, splits and initialisation")
    p.add_argument("--lora", action="store_true", help="fine-tune LoRA adapters (PEFT) instead of the whole model")
    p.add_argument("--no-cards", action="store_true", help="do not write model cards")
    p.add_argument("--push-to-hub", metavar="ORG_OR_USER",
                   help="after the run, push each converted model and its card to ORG_OR_USER/<recipe>-<variant>-<stage>")
    return p


def build_recipe(args):
    from .spec import Recipe

    recipe = Recipe.load(args.recipe)
    if args.quick and recipe.quick:
        recipe = recipe.with_overrides(recipe.quick)
    data, schedule, top = {}, {}, {}
    if args.dataset:
        data.update(train=args.dataset, eval=args.eval_dataset, hub_fallback=None)
    elif args.eval_dataset:
        data.update(eval=args.eval_dataset, hub_fallback=None)
    for field, value in (("text_column", args.text_column), ("label_column", args.label_column),
                         ("image_column", args.image_column)):
        if value:
            data[field] = value
    if args.seed is not None:
        schedule["seed"] = args.seed
    if args.lora:
        schedule["lora"] = True
    if args.model:
        top["model"] = args.model
    overrides = {**top, **({"data": data} if data else {}), **({"schedule": schedule} if schedule else {})}
    return recipe.with_overrides(overrides) if overrides else recipe


def recipe_main(argv=None) -> None:
    args = recipe_parser().parse_args(argv)
    from .runner import run
    from .spec import RecipeError

    try:
        recipe = build_recipe(args)
    except (RecipeError, ValueError) as err:
        raise SystemExit(f"hf-reshape recipe: {err}") from None
    out = args.out or os.path.join("runs", recipe.name + ("-quick" if args.quick else ""))
    command = "hf-reshape recipe " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    try:
        results = run(recipe, out, variants=args.variants, command=command, cards=not args.no_cards)
    except RecipeError as err:
        raise SystemExit(f"hf-reshape recipe: {err}") from None
    from .runner import _state

    if not _state().is_main_process:
        return
    print((Path(out) / "results.md").read_text())
    if args.push_to_hub:
        from .cards import push_to_hub

        for folder in sorted((Path(out) / "models").glob("*")):
            url = push_to_hub(folder, f"{args.push_to_hub}/{results['recipe']}-{folder.name}")
            print(f"pushed {folder.name}: {url}")


def card_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="hf-reshape card",
                                description="Rebuild the model cards (README.md) of a recipe run's converted models "
                                "from RUN_DIR/results.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `hf-reshape recipe --out RUN_DIR`")
    args = p.parse_args(argv)
    from .cards import write_cards

    try:
        written = write_cards(args.run_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"hf-reshape card: {err}") from None
    for path in written:
        print(path)
    if not written:
        print(f"no converted model folders under {args.run_dir}/models")
