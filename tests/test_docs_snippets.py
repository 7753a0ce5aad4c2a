"""Every ```python block of README.md, docs/*.md and docs/user-guide/*.md runs as written.

* One test per block, run in a fresh namespace inside a temporary working directory (snippets
  that write ``runs/...`` write there).
* Not run: a block preceded by ``<!-- no-test: reason -->`` (the reason is required), the pages
  in ``PAGES_TESTED_ELSEWHERE`` and the blocks in ``SKIP_BLOCKS``, each with its reason.
  CLI examples are ```bash blocks and are not collected.
* Time budget: the default suite runs the few long training snippets with their step counts
  scaled down by the rules in ``SHORTEN`` (nothing else in the code changes; every rule must
  still match its page, so the rules cannot silently go stale). ``-m slow`` runs every block
  exactly as written, and so does the default test when ``EBMFLOW_DOCS_FULL=1`` is set.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", flags=re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.*?)\s*-->\s*$", flags=re.S)

PAGES_TESTED_ELSEWHERE = {
    "docs/flows.md": "its snippets run in tests/test_docs_flows_snippets.py",
    "docs/discrete-flows.md": "its snippets run in the discrete flows' own test modules",
}
# (page, index, how the block's first line starts): reason
SKIP_BLOCKS: dict[tuple[str, int, str], str] = {}
# page: [(pattern, replacement)]: step counts scaled down in the default suite
SHORTEN = {
    "README.md": [(r"range\(2000\)", "range(20)"), (r"MALA\(n_steps=500\)", "MALA(n_steps=5)")],
    "docs/getting-started.md": [(r"range\(1000\)", "range(20)")],
    "docs/training.md": [
        (r"steps=6000", "steps=20"),
        (r"MALA\(n_steps=300, n_warmup=150\)", "MALA(n_steps=5, n_warmup=2)"),
    ],
}
BUDGET_S = 20.0  # a shortened snippet that takes longer than this needs a SHORTEN rule


def pages() -> list[str]:
    docs = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs/user-guide").glob("*.md"))
    return ["README.md"] + [str(p.relative_to(ROOT)) for p in docs]


def blocks(page: str) -> list[tuple[str, str | None]]:
    """(code, no-test reason or None) for every python block of ``page``."""
    return parse_blocks((ROOT / page).read_text())


def parse_blocks(text: str) -> list[tuple[str, str | None]]:
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = NO_TEST.search(before[before.rfind("\n") + 1:]) if before else None
        out.append((match.group(1), marker.group(1) if marker else None))
    return out


def skip_reason(page: str, index: int, code: str, marker: str | None) -> str | None:
    if page in PAGES_TESTED_ELSEWHERE:
        return PAGES_TESTED_ELSEWHERE[page]
    if marker is not None:
        return marker
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    for (p, i, start), reason in SKIP_BLOCKS.items():
        if (p, i) == (page, index) and first.startswith(start):
            return reason
    return None


def shorten(page: str, code: str) -> str:
    for pattern, repl in SHORTEN.get(page, []):
        code = re.sub(pattern, repl, code)
    return code


def run_snippet(page: str, index: int, code: str, tmp_path: Path, monkeypatch) -> float:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__snippet__"}
    t0 = time.perf_counter()
    exec(compile(code, f"{page}[{index}]", "exec"), namespace)
    return time.perf_counter() - t0


ALL = [(page, i, code, marker) for page in pages() for i, (code, marker) in enumerate(blocks(page))]
CASES = [
    pytest.param(page, i, code, id=f"{page}-{i}",
                 marks=[pytest.mark.skip(reason=r)] if (r := skip_reason(page, i, code, m)) else [])
    for page, i, code, m in ALL
]


@pytest.mark.parametrize(("page", "index", "code"), CASES)
def test_snippet_runs(page, index, code, tmp_path, monkeypatch):
    full = os.environ.get("EBMFLOW_DOCS_FULL") == "1"
    elapsed = run_snippet(page, index, code if full else shorten(page, code), tmp_path,
                          monkeypatch)
    if not full:
        assert elapsed < BUDGET_S * 3, (
            f"{page}[{index}] took {elapsed:.0f} s; add a SHORTEN rule for its step counts")


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index", "code"), CASES)
def test_snippet_runs_as_written(page, index, code, tmp_path, monkeypatch):
    run_snippet(page, index, code, tmp_path, monkeypatch)


def test_every_page_with_python_is_collected():
    """The collection finds blocks on the pages that have them (guards the fence regex)."""
    found = {page for page, *_ in ALL}
    assert {"README.md", "docs/getting-started.md", "docs/energy-discrepancy.md",
            "docs/samplers-continuous.md", "docs/samplers-discrete.md",
            "docs/user-guide/spaces.md"} <= found
    assert len(ALL) >= 18


def test_shorten_rules_still_match_their_pages():
    for page, rules in SHORTEN.items():
        text = "\n".join(code for code, _ in blocks(page))
        for pattern, _ in rules:
            assert re.search(pattern, text), f"SHORTEN rule {pattern!r} no longer matches {page}"


def test_skips_are_explicit_and_give_a_reason():
    for key, reason in SKIP_BLOCKS.items():
        page, index, first = key
        code = blocks(page)[index][0]
        assert code.lstrip().startswith(first), f"{page}[{index}] changed; update SKIP_BLOCKS"
        assert reason
    for page, i, _code, marker in ALL:
        if marker is not None:
            assert len(marker) > 3, f"{page}[{i}]: <!-- no-test: ... --> needs a reason"


def test_no_test_marker_is_recognised():
    text = ("text\n\n<!-- no-test: needs a GPU -->\n```python\nraise SystemExit\n```\n"
            "\n```python\nx = 1\n```\n```bash\nebmflow train\n```\n")
    assert parse_blocks(text) == [("raise SystemExit\n", "needs a GPU"), ("x = 1\n", None)]
