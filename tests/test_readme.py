"""The README runs as written: every ```python block, in order, in one scope (later blocks continue with the
quick start's `model`), from a fresh working directory; none is exempt. And no committed text names a path of
one machine."""

import ast
import re
from pathlib import Path

import pytest
import torch

import hf_reshape
from hf_reshape.registry import list_variants, unregister_variant

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!--(?P<marker>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, the `<!-- ... -->` comment just above it or "", code) of each ```python block."""
    return [(text.count("\n", 0, m.start("code")) + 1, (m.group("marker") or "").strip(), m.group("code"))
            for m in BLOCK.finditer(text)]


def test_readme_python_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3  # quick start, more of the API, adding a variant
    assert blocks[0][1].startswith("quickstart")
    assert len(blocks[0][2].strip().splitlines()) <= 10  # the quick start stays quick


@pytest.fixture
def restore_registry():
    before = set(list_variants())
    yield
    for name in set(list_variants()) - before:
        unregister_variant(name)


def test_readme_python_blocks_run(tmp_path, monkeypatch, restore_registry):
    monkeypatch.chdir(tmp_path)
    scope = {}
    for i, (line, _, code) in enumerate(python_blocks(README.read_text())):
        # compiled under the README's name with its line numbers: a traceback points at the README line
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), scope)
        if i == 0:  # quick start
            assert hf_reshape.get_reshape_config(scope["model"]).method == "sliding_window"
            assert (tmp_path / "out" / "config.json").is_file()
            assert torch.isfinite(scope["hidden"]).all()
    # more of the API: a real folder, a real call, the shapes the text states
    assert (tmp_path / "cfg" / "reshape_config.json").is_file()
    assert scope["cfg"].method == "linear" and scope["cfg"].layers == [0, 1]
    out, key_mask = scope["out"], scope["key_mask"]
    assert out.shape == scope["q"].shape and torch.isfinite(out).all()
    assert not key_mask.all()  # the example does pad
    # adding a variant: the example variant is registered and the model runs it
    model = scope["model"]
    got = hf_reshape.get_reshape_config(model)
    assert (got.method, got.window, got.dilation) == ("dilated_window", 16, 2)
    model.save_pretrained("dilated/")  # "saves and reloads like the built-ins"
    again = hf_reshape.from_pretrained("dilated/")
    assert hf_reshape.get_reshape_config(again) == got
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_readme_list_variants_comment_is_current():
    """The comment beside `hf_reshape.list_variants()` shows what it returns."""
    line = next(l for l in README.read_text().splitlines() if l.startswith("hf_reshape.list_variants()"))
    shown = ast.literal_eval(line.split("#", 1)[1].strip())
    assert shown == hf_reshape.list_variants(), "README.md: update the list_variants() comment (and the variants table)"


def test_readme_example_variant_matches_softmax_where_it_should(restore_registry):
    """The README's dilated window is a correct variant: with dilation 1 and a window over everything it is exact
    softmax, padded and causal alike, and a query with no key gets zeros."""
    scope = {}
    block = next(code for _, _, code in python_blocks(README.read_text()) if "register_variant" in code)
    exec(compile(block.rsplit("hf_reshape.reshape(", 1)[0], "README-adding-a-variant", "exec"), scope)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    for causal in (False, True):
        got = hf_reshape.functional.attention(q, k, v, "dilated_window", window=9, dilation=1,
                                              attention_mask=mask, is_causal=causal)
        want = hf_reshape.functional.reference(q, k, v, "sliding_window", window=9, attention_mask=mask,
                                               is_causal=causal)
        torch.testing.assert_close(got, want)
    empty = hf_reshape.functional.attention(q, k, v, "dilated_window", window=2, dilation=2,
                                            attention_mask=mask, is_causal=True)
    assert torch.isfinite(empty).all() and empty[1, :, :4].abs().max() == 0  # pads see no key: zeros


# ------------------------------------------------------------------------------- no machine-specific paths

ROOT = README.parent
SCANNED = ["README.md", "docs", "model_cards", "recipes", "hf_reshape", "pyproject.toml"]
# absolute paths of one machine: its home, scratch and work folders, and any absolute path into a virtualenv
MACHINE_PATH = re.compile(
    r"(?<![\w.:/])(?:/(?:work|tmp|root|home|Users|mnt|scratch)/"
    r"|/(?:[\w.+-]+/)*[\w.+-]*venv\b)"
    r"|\b[A-Za-z]:\\(?:Users|tmp)\\"
)


def committed_files(paths: list[str]) -> list[Path]:
    """Files under ``paths`` that git tracks or would add (not ignored), or every file there outside a checkout."""
    import subprocess

    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard", "--", *paths],
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        files = [ROOT / f for f in listed if f]
    except (OSError, subprocess.SubprocessError):
        files = [p for name in paths
                 for p in ([ROOT / name] if (ROOT / name).is_file() else sorted((ROOT / name).rglob("*")))]
    return [f for f in files if f.is_file()]


def machine_paths(text: str) -> list[str]:
    return [m.group(0) for m in MACHINE_PATH.finditer(text)]


def test_machine_path_pattern():
    for bad in ("--peers-python /work/peers-venv/bin/python", "written to /tmp/bench_op3", "`/root/x`",
                "Model: `/work/venv/lib/python3.11/site-packages/m`", '"python": "/opt/peers-venv/bin/python"',
                "/home/me/hf", "C:\\Users\\me\\x"):
        assert machine_paths(bad), bad
    for ok in ("python3 -m venv .venv && . .venv/bin/activate", "--peers-python peers-venv/bin/python",
               "/proc/self/clear_refs", "https://github.com/org/venv-tools", "docs/bench/README.md",
               "tempfile.gettempdir()", "HF_RESHAPE_PEERS_PYTHON=peers-venv/bin/python"):
        assert not machine_paths(ok), ok


def test_no_machine_specific_paths_in_committed_files():
    files = committed_files(SCANNED)
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".json" for f in files)
    found = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found += [f"{f.relative_to(ROOT)}:{n}: {p}" for p in machine_paths(line)]
    assert not found, "machine-specific paths (write relative ones, or say how to make them):\n" + "\n".join(found)
