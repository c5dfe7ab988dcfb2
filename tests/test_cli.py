"""`hf-reshape` command line: top-level help and version, dispatch, `variants`, and the help texts of the
subcommands (every option explained, every default shown once)."""

import dataclasses
import importlib.metadata
import re
from dataclasses import dataclass, field

import pytest

import hf_reshape
from hf_reshape import cli
from hf_reshape.registry import VariantParams, get_variant, list_variants, register_variant, unregister_variant


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code (0 when main returns), stdout and stderr of ``hf-reshape argv...``."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert {"demo", "bench", "variants"} <= {c.name for c in cli.COMMANDS}
    flat = " ".join(out.split())
    for command in cli.COMMANDS:
        assert re.search(rf"^\s+{command.name}\s", out, re.M), command.name
        assert " ".join(command.help.split()) in flat  # its one-line description, as written in the table
    assert "--version" in out


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"hf-reshape {hf_reshape.__version__}"
    try:
        assert importlib.metadata.version("hf-reshape") == hf_reshape.__version__  # pyproject and package agree
    except importlib.metadata.PackageNotFoundError:
        pass


@pytest.mark.parametrize("argv", [["frobnicate"], ["variant"], []])
def test_unknown_or_missing_subcommand_exits_2_naming_the_accepted_ones(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out
    if argv:
        assert repr(argv[0]) in err
        for command in cli.COMMANDS:
            assert repr(command.name) in err, err
    else:
        assert "<command>" in err


@pytest.mark.parametrize("command", ["demo", "bench", "variants"])
def test_subcommand_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "-h")
    assert code == 0 and out.startswith(f"usage: hf-reshape {command}")


def _variant_blocks(text: str) -> dict[str, str]:
    return {block.split()[0]: block for block in text.strip().split("\n\n")}


def test_variants_lists_family_forms_and_every_parameter_default(capsys):
    code, out, _ = run_cli(capsys, "variants")
    assert code == 0
    blocks = _variant_blocks(out)
    assert sorted(blocks) == list_variants()
    for name, block in blocks.items():
        spec = get_variant(name)
        head = block.splitlines()[0]
        assert f"family: {spec.family}" in head
        forms = [f for f, ok in (("bidirectional", spec.bidirectional), ("causal", spec.causal)) if ok]
        assert f"forms: {', '.join(forms)}" in head
        fields = dataclasses.fields(spec.params_cls)
        assert fields, name
        for f in fields:
            line = next((l for l in block.splitlines() if l.strip().startswith(f"{f.name} = ")), None)
            assert line is not None, (name, f.name)
            assert line.split(" = ", 1)[1].startswith(repr(f.default)), line
            assert f.metadata.get("help", "") in line


@dataclass
class _ToyParams(VariantParams):
    sharpness: float = field(default=2.5, metadata={"help": "toy knob only the registry knows"})
    buckets: list = field(default_factory=lambda: [1, 2])


def test_variants_reads_the_registry(capsys):
    """A variant registered at run time is listed, with its default_factory default, its help, and its forms."""
    forward = get_variant("topk").forward
    register_variant(name="toy_cli", family="low_rank", params_cls=_ToyParams, forward=forward, reference=forward,
                     causal=False)
    try:
        code, out, _ = run_cli(capsys, "variants", "toy_cli")
    finally:
        unregister_variant("toy_cli")
    assert code == 0
    block = _variant_blocks(out)["toy_cli"]
    assert "family: low_rank; forms: bidirectional)" in block
    assert re.search(r"sharpness = 2\.5\s+toy knob only the registry knows", block)
    assert "buckets = [1, 2]" in block


def test_variants_refuses_an_unknown_name(capsys):
    code, _, err = run_cli(capsys, "variants", "nope")
    assert code == 2 and "'nope'" in err and "sliding_window" in err


def _option_entries(help_text: str) -> dict[str, str]:
    """Option -> its whole help entry (first option string as key, wrapped lines joined)."""
    entries, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line.strip()
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _parser(command):
    if command == "demo":
        from hf_reshape.demo import build_parser
    else:
        from hf_reshape.bench import _parser as build_parser
    return build_parser()


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_help_explains_every_option_and_shows_each_default_once(capsys, command):
    code, out, _ = run_cli(capsys, command, "-h")
    assert code == 0
    entries = _option_entries(out)
    actions = [a for a in _parser(command)._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in actions} <= set(entries)
    for action in actions:
        entry = entries[action.option_strings[0]]
        assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help"
        mentions = len(re.findall(r"\bdefaults?\b", entry, re.I))
        assert mentions <= 1, entry
        shows_nothing = action.default is None or action.default is False or action.default == []
        if not shows_nothing:
            assert mentions == 1, entry  # a real default is shown
            if not isinstance(action.default, (list, tuple)) and "(default: " in entry:
                assert f"(default: {action.default})" in entry, entry


def test_demo_refuses_an_unknown_variant_before_loading_anything(capsys):
    code, _, err = run_cli(capsys, "demo", "--variants", "sliding_window", "nope")
    assert code == 2 and "'nope'" in err and "registered" in err
