"""The README's and the getting-started page's code blocks run as written (with fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRINK = [
    (r"range\((\d[\d_]*)\)", "range(20)"),
    (r"n_steps=(\d+)", "n_steps=5"),
    (r"steps=(\d[\d_]*)", "steps=20"),
    (r"n=1000\b", "n=50"),
]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _shrink(code: str) -> str:
    for pattern, repl in SHRINK:
        code = re.sub(pattern, repl, code)
    return code


CASES = [(p, i) for p in ("README.md", "docs/getting-started.md", "docs/discrete-flows.md") for i in range(len(_blocks(ROOT / p)))]


@pytest.mark.parametrize("path, index", CASES, ids=[f"{p}-{i}" for p, i in CASES])
def test_snippet_runs(path, index):
    code = _shrink(_blocks(ROOT / path)[index])
    namespace: dict = {"__name__": "__snippet__"}
    exec(compile(code, f"{path}[{index}]", "exec"), namespace)
