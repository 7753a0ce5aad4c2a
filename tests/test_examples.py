"""Every example script has a ``--quick`` mode and a TOML config, and runs in quick mode.

Examples are the ``examples/*.py`` files with an ``if __name__ == "__main__":`` guard (helper
modules such as ``flowmc_common.py`` have none). Every ``examples/configs/*.toml`` follows one
convention (docs/cli.md): ``[train]`` holds only ``ebmflow train`` settings (the closest CLI run
of the recipe) and ``[example]`` / ``[example.<part>]`` hold the script's settings; the CLI
ignores ``[example]`` and refuses any other table or key. The fast tests parse every config
through the CLI and run ``ebmflow train --config <it> --steps 5`` (small evaluation). The quick
runs of the scripts take 10-100 s each on a loaded CPU, so they are marked slow
(``pytest -m slow tests/test_examples.py``). They run on a copy of ``examples/`` inside a
temporary folder: the scripts write under ``<their root>/runs/examples/`` (``--update-docs``:
``<their root>/docs/``), and their root is then the temporary folder, so the committed figures
and JSON in ``docs/`` are never touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(
    p.stem for p in EXAMPLES.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)
QUICK_TIMEOUT_S = 600  # generous: quick modes target < 1 min on an idle CPU
CONFIGS = sorted(p.name for p in (EXAMPLES / "configs").glob("*.toml"))
# Known gaps (reported; strict xfail, so fixing one makes its test fail until it is removed).
NO_CONFIG: set[str] = set()
NOT_CLI_CONFIGS: set[str] = set()


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
    text = (EXAMPLES / "configs" / config).read_text()
    assert text.startswith(f"# ebmflow train --config examples/configs/{config}\n"), (
        f"{config}: the first line must be the command that uses it")
    raw = tomllib.loads(text)
    assert set(raw) <= {"train", "example"} and "train" in raw, sorted(raw)
    if config != "quickstart.toml":
        assert "example" in raw, f"{config}: the example script's settings go under [example]"


@pytest.mark.parametrize(
    "config", _known(CONFIGS, NOT_CLI_CONFIGS, "keys the CLI does not know (script-only config)")
)
def test_config_trains_with_cli(config, tmp_path):
    """``ebmflow train --config <it> --steps 5`` runs end to end (small evaluation) and writes
    finite metrics."""
    from ebmflow.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(EXAMPLES / "configs" / config), "--steps", "5",
                 "--eval-samples", "100", "--eval-steps", "5", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[train]\nsteps = 5\n[data]\nname = 'x'\n", "unknown table(s) [data]"),
        ("[train]\nsteps = 5\n[[runs]]\nname = 'x'\n", "unknown table(s) [runs]"),
        ("[train]\niterations = 5\n", "unknown key(s) iterations in [train]"),
        ("stepz = 5\n", "unknown key(s) stepz in the top level"),
        ("train = 5\n", "must be a table"),
    ],
)
def test_cli_config_refuses_unknown_tables_and_keys(text, match, tmp_path, capsys):
    """Nothing in a config is silently ignored except [example]: one error line, exit 2."""
    from ebmflow.cli import main

    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_cli_config_ignores_example_tables(tmp_path):
    from ebmflow import cli

    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 7\nloss = 'dsm'\n[example]\nsteps = 'anything'\n"
                    "[example.train]\niterations = 3\n")
    args = cli.build_parser().parse_args(["train", "--config", str(path)])
    cfg = cli._resolve_config(args)
    assert (cfg.steps, cfg.loss) == (7, "dsm")


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
    # runs/examples/ by default (docs/ only with --update-docs)
    assert not (tmp_path / "docs").exists(), f"{name} wrote into docs/ without --update-docs"
    folder = tmp_path / "runs" / "examples"
    figures = list((folder / "figures").glob("*.png"))
    results = list((folder / "results").glob("*.json"))
    assert figures and all(f.stat().st_size > 0 for f in figures), f"{name} wrote no figure"
    assert results, f"{name} wrote no JSON results"
