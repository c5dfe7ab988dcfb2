"""The README quick start runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README-quickstart", "exec"), scope)
    model = scope["model"]
    assert model.config.hf_reshape["method"] == "sliding_window"
    assert (tmp_path / "out" / "config.json").is_file()
    assert torch.isfinite(scope["hidden"]).all()
