"""Docstring examples (``>>>``) of every ebmflow module run as doctests, and the user guide's
code blocks run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import ebmflow

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(ebmflow.__path__, prefix="ebmflow.")
)
GUIDE = sorted((ROOT / "docs" / "user-guide").glob("*.md"))


def test_modules_found():
    assert "ebmflow.spaces" in MODULES and "ebmflow.energy.base" in MODULES


def test_docstring_examples():
    """Every ``>>>`` example in every ebmflow module gives the output it shows."""
    finder = doctest.DocTestFinder(exclude_empty=True)  # objects defined in the module only
    failed, attempted = [], 0
    for name in MODULES:
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if not test.examples:
                continue
            torch.manual_seed(0)
            runner = doctest.DocTestRunner(
                optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
            )
            result = runner.run(test, out=lambda text: None)
            attempted += result.attempted
            if result.failed:
                failed.append(f"{test.name} ({test.filename}:{test.lineno})")
    assert not failed, "doctests failed (run `python -m doctest -v FILE` to see why): " + ", ".join(failed)
    assert attempted >= 20, f"only {attempted} doctest examples found"


def test_spaces_has_examples():
    """spaces.py documents each space with runnable examples."""
    import ebmflow.spaces as spaces

    tests = doctest.DocTestFinder().find(spaces)
    names = {t.name.split(".")[-1] for t in tests if t.examples}
    assert {"Continuous", "Binary", "Categorical"} <= names


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


GUIDE_CASES = [(p.name, i) for p in GUIDE for i in range(len(_blocks(p)))]


@pytest.mark.parametrize("page, index", GUIDE_CASES, ids=[f"{p}-{i}" for p, i in GUIDE_CASES])
def test_user_guide_snippet_runs(page, index):
    code = _blocks(ROOT / "docs" / "user-guide" / page)[index]
    exec(compile(code, f"docs/user-guide/{page}[{index}]", "exec"), {"__name__": "__snippet__"})
