"""The ``hf-reshape`` command: ``demo`` (fidelity and speed on a real checkpoint), ``bench`` (op and model level
speed/memory against SDPA), ``variants`` (what is registered)."""

from __future__ import annotations

import sys


def _variants(argv) -> None:
    from .registry import get_variant, list_variants

    for name in list_variants():
        spec = get_variant(name)
        forms = "/".join(f for f, ok in (("bidirectional", spec.bidirectional), ("causal", spec.causal)) if ok)
        print(f"{name:16s} {spec.family:9s} {forms:22s} {spec.complexity}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "hf_reshape.demo", "bench": "hf_reshape.bench", "variants": None}
    if not argv or argv[0] not in commands:
        print(f"usage: hf-reshape {{{','.join(commands)}}} [options]   (hf-reshape <command> -h for help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "variants":
        return _variants(rest)
    import importlib

    importlib.import_module(commands[command]).main(rest)


if __name__ == "__main__":
    main()
