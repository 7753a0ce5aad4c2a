"""Every example script has a ``--quick`` mode and a TOML config, and runs in quick mode.

Examples are the ``examples/*.py`` files with an ``if __name__ == "__main__":`` guard (helper
modules such as ``flowmc_common.py`` have none). The quick runs take 10-100 s each on a loaded
CPU, so they are marked slow (``pytest -m slow tests/test_examples.py``). They run on a copy of
``examples/`` inside a temporary folder: the scripts write under ``<their root>/docs/``, which
is then the temporary folder, so the committed figures and JSON in ``docs/`` are never touched.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(
    p.stem for p in EXAMPLES.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)
QUICK_TIMEOUT_S = 600  # generous: quick modes target < 1 min on an idle CPU
CONFIGS = sorted(p.name for p in (EXAMPLES / "configs").glob("*.toml"))
# Known gaps (reported; strict xfail, so fixing one makes its test fail until it is removed).
NO_CONFIG = {"ed_nearsightedness"}
NOT_CLI_CONFIGS = {
    "ed_25gaussians.toml", "ed_categorical.toml", "ed_discrete_toys.toml",
    "flowmc_highdim.toml", "flowmc_toys.toml", "flowmc_two_modes.toml", "ising_recovery.toml",
}


def _known(names: list[str], gaps: set[str], reason: str) -> list:
    mark = pytest.mark.xfail(strict=True, reason=reason)
    return [pytest.param(n, marks=mark) if n in gaps else n for n in names]


def test_examples_found():
    assert len(SCRIPTS) >= 5, SCRIPTS
    assert "flowmc_common" not in SCRIPTS


def _help_text(name: str) -> str:
    """``python examples/<name>.py --help``, in process (torch is already imported)."""
    out = io.StringIO()
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path = [str(EXAMPLES / f"{name}.py"), "--help"], [str(EXAMPLES), *sys.path]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv, sys.path = argv, path
    assert exit_info.value.code in (0, None), f"{name}.py --help exited with {exit_info.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("name", _known(SCRIPTS, NO_CONFIG, "example has no TOML config yet"))
def test_example_has_quick_flag_and_config(name):
    text = _help_text(name)
    assert "--quick" in text, f"examples/{name}.py --help does not list --quick:\n{text}"
    config = EXAMPLES / "configs" / f"{name}.toml"
    assert config.is_file(), f"examples/{name}.py has no config {config.relative_to(ROOT)}"


@pytest.mark.parametrize(
    "config", _known(CONFIGS, NOT_CLI_CONFIGS, "keys the CLI does not know (script-only config)")
)
def test_config_usable_by_cli(config):
    """``ebmflow train --config examples/configs/<name>.toml`` accepts the file (no training)."""
    from ebmflow import cli

    args = cli.build_parser().parse_args(["train", "--config", str(EXAMPLES / "configs" / config)])
    cli._resolve_config(args)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_quick(name, tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "examples" / f"{name}.py"), "--quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    figures = list((tmp_path / "docs" / "figures").glob("*.png"))
    results = list((tmp_path / "docs" / "results").glob("*.json"))
    assert figures and all(f.stat().st_size > 0 for f in figures), f"{name} wrote no figure"
    assert results, f"{name} wrote no JSON results"
