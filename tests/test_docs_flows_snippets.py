"""Every code block of docs/flows.md runs as written (with fewer steps), in a temporary
working directory (the recipe writes its run folder under ``runs/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flows.md"
SHRINK = [
    (r"range\((\d[\d_]*)\)", "range(3)"),
    (r"train_updates=(\d+)\)", "train_updates=3, train_examples=1_000)"),
    (r"n_steps=(\d+)", "n_steps=5"),
    (r"\bsteps=(\d[\d_]*)", "steps=5"),  # not flow_steps=0
    (r"sample\(10_000", "sample(1_000"),
]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def _shrink(code: str) -> str:
    for pattern, repl in SHRINK:
        code = re.sub(pattern, repl, code)
    return code


def test_page_has_snippets():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_flows_snippet_runs(index, tmp_path, monkeypatch):
    code = _blocks()[index]
    if "import zuko" in code:
        pytest.importorskip("zuko")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    exec(compile(_shrink(code), f"docs/flows.md[{index}]", "exec"), namespace)
