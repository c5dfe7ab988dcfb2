"""The ``hf-reshape`` command.

Each subcommand is one row of :data:`COMMANDS`: its name, the ``"module:function"`` that runs it, and a one-line
help. The function takes the arguments that follow the subcommand's name (``main(argv)``) and parses them with its
own :mod:`argparse` parser, so ``hf-reshape <command> -h`` shows that parser's help; adding a subcommand is adding
a row. The module is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    name: str
    target: str  # "module:function"; the function takes the subcommand's argv
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("demo", "hf_reshape.demo:main",
            "reshape a real pretrained BERT (offline all-MiniLM-L6-v2 by default) with every variant and print "
            "each one's fidelity to softmax and its forward time"),
    Command("bench", "hf_reshape.bench:main",
            "time and measure the memory of every variant against torch SDPA and eager attention, at op and model "
            "level; writes JSON, a markdown table and a plot"),
    Command("recipe", "hf_reshape.recipes.cli:recipe_main",
            "convert a model with every variant, recover accuracy (attention transfer + fine-tuning) and measure "
            "the accuracy/speed/memory trade-off against softmax: the main job"),
    Command("card", "hf_reshape.recipes.cli:card_main",
            "rebuild the model cards of a recipe run's converted models from its results.json"),
    Command("diagnose", "hf_reshape.fidelity:main",
            "per-layer, per-head fidelity of each variant to exact softmax attention on a model's real inputs "
            "(output cosine, relative error, KL); writes JSON, a markdown table and heat maps"),
    Command("variants", "hf_reshape.cli:variants_main",
            "list the registered variants: family, forms, complexity and each parameter with its default"),
)


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to an option's help unless the help already speaks of its default, or the
    default says nothing (``None``, ``False``, an empty list): each default is shown once."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower():
            return text
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or default == []:
            return text
        if isinstance(default, (list, tuple)):  # as it would be typed: --forms bidirectional causal
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: global options and one sub-parser per row of :data:`COMMANDS`. The sub-parsers
    take no options of their own; what follows a subcommand's name is handed to its function."""
    p = argparse.ArgumentParser(
        prog="hf-reshape",
        description="Swap a Hugging Face model's self-attention for sparse, low-rank or linearized variants, "
                    "and measure what that gains and costs.",
        epilog="Run `hf-reshape <command> -h` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", title="commands", metavar="<command>", required=True)
    for c in COMMANDS:
        sub.add_parser(c.name, help=c.help, add_help=False)
    return p


def _load(command: Command):
    module, _, function = command.target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None) -> None:
    """Entry point of the ``hf-reshape`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    return _load(command)(rest)


# ------------------------------------------------------------------------------------------------- variants


def _default_text(f) -> str:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def describe_variants(names: list[str] | None = None) -> str:
    """One block per registered variant: name, family, forms, complexity, then each parameter as
    ``name = default  help`` (read from the variant's ``params_cls`` dataclass fields and their ``help``)."""
    import dataclasses

    from .registry import get_variant, list_variants

    blocks = []
    for name in names or list_variants():
        spec = get_variant(name)
        forms = ", ".join(f for f, ok in (("bidirectional", spec.bidirectional), ("causal", spec.causal)) if ok)
        lines = [f"{name}  (family: {spec.family}; forms: {forms})"]
        if spec.description:
            lines.append(f"    {spec.description}")
        if spec.complexity:
            lines.append(f"    complexity: {spec.complexity}")
        fields = dataclasses.fields(spec.params_cls)
        if not fields:
            lines.append("    parameters: none")
        else:
            lines.append("    parameters (default):")
        rows = [(f"{f.name} = {_default_text(f)}", f.metadata.get("help", "")) for f in fields]
        width = max((len(left) for left, _ in rows), default=0)
        lines += [f"      {left:<{width}}  {help_text}".rstrip() for left, help_text in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def variants_main(argv=None) -> None:
    """``hf-reshape variants``: print :func:`describe_variants`."""
    from .registry import list_variants

    p = argparse.ArgumentParser(
        prog="hf-reshape variants",
        description="List the registered attention variants: family, forms (bidirectional / causal), complexity, "
                    "and each parameter with its default and meaning. Parameters are passed as keywords, e.g. "
                    "hf_reshape.reshape(model, 'sliding_window', window=64).",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help=f"only these variants, out of {list_variants()} "
                                                            "(default: all)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [n for n in args.names if n not in list_variants()]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; registered: {list_variants()}")
    print(describe_variants(args.names))


if __name__ == "__main__":
    main()
