"""The built documentation site, as a reader sees it.

Builds the site once with ``mkdocs build --strict`` (a few seconds) into a temporary folder and
checks the HTML:

* the formulas of the pages that explain methods, samplers, training and results are typeset:
  the math extension (``pymdownx.arithmatex``) wrapped them in ``arithmatex`` spans/divs, and
  no code block on those pages holds LaTeX (``\\frac``, ``\\sum``, ``_{``) that the reader
  would see raw;
* every figure under ``docs/figures`` is shown by some built page, and each method page shows
  at least one, as a link to the full-size image;
* files of the repository (``examples/``, ``benchmarks/``, ``tests/``) named in prose are
  links (commands in code blocks stay as typed);
* no page talks about how the work was organised rather than about the library
  (phrases such as "this session" or "device tool").
* no line of a code block in the sources (``docs/**/*.md``) is longer than 88 characters,
  so code does not run off the page (``docs/reliability.md`` is exempt for now).

Skipped when mkdocs (the ``docs`` extra) is not installed.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHOD_PAGES = ["energy-discrepancy.md", "discrete-flows.md", "flows.md"]
# Pages whose formulas must be typeset (every page that states one).
MATH_PAGES = METHOD_PAGES + [
    "samplers-continuous.md", "samplers-discrete.md", "training.md", "design.md",
    "user-guide/energies.md", "user-guide/losses.md", "user-guide/samplers.md",
    "user-guide/spaces.md",
    "results.md", "results-energy-discrepancy.md", "results-discrete-flows.md",
    "results-flowmc.md", "results-ising.md",
]
# Pages whose prose names repository files; those maintained with the benchmarks and the
# command line are checked by their own owners' conventions.
LINK_EXEMPT = {"benchmarks.md", "benchmarks-samplers.md"}
REPO_FILE = re.compile(r"(?<![\w/.-])(?:examples|benchmarks|tests)/[\w./-]*\w\.(?:py|toml|json|md)\b")
ANCHOR = re.compile(r"<a\b.*?</a>", flags=re.S)
# Inline commands (``python examples/x.py --quick``) stay as typed, like code blocks.
COMMAND = re.compile(r"<code>\s*(?:python|ebmflow|pytest|torchrun|pip)\b.*?</code>", flags=re.S)
LATEX_IN_CODE = re.compile(r"\\frac|\\sum|_\{")
FORBIDDEN = ["this session", "the issue", "lent to", "device tool", "was not drawn"]
PRE = re.compile(r"<pre\b.*?</pre>", flags=re.S)
# Code blocks of the sources are wrapped at this width (docs/stylesheets/extra.css wraps any
# longer line in the browser rather than letting it overflow).
CODE_WIDTH = 88
CODE_FENCE = re.compile(r"```[a-z]*\n(.*?)```", flags=re.S)
CODE_WIDTH_EXEMPT = {"reliability.md"}
TAG = re.compile(r"<[^>]+>")

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")


def source_pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))


def built_path(site: Path, page: str) -> Path:
    """Where mkdocs (``use_directory_urls``) writes ``page``: a.md -> a/index.html."""
    stem = page[: -len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / (stem + ".html")
    return site / stem / "index.html"


def article(text: str) -> str:
    """The page's content (the article), without navigation, header and footer."""
    start = text.find('<article class="md-content__inner')
    end = text.find("</article>", start)
    return text[start:end] if start >= 0 and end > start else text


def visible_text(fragment: str) -> str:
    fragment = re.sub(r"<script\b.*?</script>", " ", fragment, flags=re.S)
    return html.unescape(TAG.sub(" ", fragment))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out


def test_site_builds_every_page(site):
    missing = [p for p in source_pages() if not built_path(site, p).is_file()]
    assert not missing, f"pages not built: {missing}"


@pytest.mark.parametrize("page", MATH_PAGES)
def test_page_formulas_are_typeset(site, page):
    text = article(built_path(site, page).read_text())
    n_math = len(re.findall(r'class="arithmatex"', text))
    assert n_math > 0, f"{page}: no formula is typeset (write them as $...$ or $$...$$)"
    raw = []
    for block in PRE.findall(text):
        code = visible_text(block)
        for line in code.splitlines():
            if LATEX_IN_CODE.search(line):
                raw.append(line.strip())
    assert not raw, (f"{page}: LaTeX shown raw in code blocks (move it to $$...$$):\n  "
                     + "\n  ".join(raw[:10]))


@pytest.mark.parametrize("page", METHOD_PAGES)
def test_method_page_shows_a_clickable_figure(site, page):
    text = article(built_path(site, page).read_text())
    linked = re.findall(r'<a\b[^>]*href="[^"]*figures/([^"/]+\.png)"[^>]*>\s*<img\b', text)
    assert linked, f"{page}: no figure, or none links to its full-size image"


@pytest.mark.parametrize("page", [p for p in source_pages() if p not in LINK_EXEMPT])
def test_repository_files_in_prose_are_links(site, page):
    text = article(built_path(site, page).read_text())
    text = PRE.sub(" ", text)
    text = ANCHOR.sub(" ", text)
    text = COMMAND.sub(" ", text)
    plain = sorted(set(REPO_FILE.findall(visible_text(text))))
    assert not plain, (f"{page}: repository files named without a link "
                       f"(https://github.com/ebmflow/ebmflow/blob/main/<path>): {plain}")


def test_every_figure_is_shown(site):
    shown: set[str] = set()
    for page in site.rglob("*.html"):
        shown.update(re.findall(r'<img[^>]*\bsrc="[^"]*?figures/([^"/]+\.png)"', page.read_text()))
    figures = sorted(p.name for p in (DOCS / "figures").glob("*.png"))
    assert figures, "docs/figures holds no figure"
    unshown = [f for f in figures if f not in shown]
    assert not unshown, f"figures shown on no page: {unshown}"


@pytest.mark.parametrize("page", source_pages())
def test_page_speaks_of_the_library_only(site, page):
    text = visible_text(article(built_path(site, page).read_text())).lower()
    text = re.sub(r"\s+", " ", text)
    found = [phrase for phrase in FORBIDDEN if phrase in text]
    context = [text[max(0, i - 60): i + 60] for phrase in found for i in [text.find(phrase)]]
    assert not found, f"{page}: {found}: " + " | ".join(context)


@pytest.mark.parametrize("page", [p for p in source_pages() if p not in CODE_WIDTH_EXEMPT])
def test_code_block_lines_fit_the_page(page):
    text = (DOCS / page).read_text()
    long = [(len(line), line) for block in CODE_FENCE.findall(text)
            for line in block.splitlines() if len(line) > CODE_WIDTH]
    assert not long, (f"{page}: code-block lines longer than {CODE_WIDTH} characters "
                      "(break inside parentheses, move a comment above, or use \\ in shell):\n  "
                      + "\n  ".join(f"{n}: {line[:80]}" for n, line in long))
