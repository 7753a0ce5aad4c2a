"""Benchmarks and example scripts write to ``runs/`` (git-ignored) and say where; the committed
reference results change only with ``--update-reference`` / ``--update-docs``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("folder", "flag", "reference"), [
    ("benchmarks", "--update-reference", ROOT / "benchmarks" / "results"),
    ("examples", "--update-docs", ROOT / "docs"),
])
def test_output_helpers_default_to_runs(folder, flag, reference):
    helper = "_output.py" if folder == "benchmarks" else "example_output.py"
    out = _module(ROOT / folder / helper, f"_output_{folder}")
    parser = argparse.ArgumentParser()
    out.add_output_arguments(parser)
    default = parser.parse_args([])
    if folder == "benchmarks":
        where = out.output_path(default, "x").parent
        assert out.output_path(parser.parse_args([flag]), "x") == reference / "x.json"
        assert out.output_path(parser.parse_args(["--out", "/tmp/y.json"]), "x") == Path("/tmp/y.json")
    else:
        where = out.output_dir(default)
        assert out.output_dir(parser.parse_args([flag])) == reference
    assert where.is_relative_to(ROOT / "runs")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(where / "x.json")], cwd=ROOT)
    assert ignored.returncode == 0, f"{where} is not ignored by git"


def test_run_all_passes_update_reference_only_when_asked(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        run_all = _module(ROOT / "benchmarks" / "run_all.py", "run_all_under_test")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("_output", None)  # benchmarks' helper, imported by run_all
    calls = []
    monkeypatch.setattr(run_all.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert run_all.main(["--only", "training", "--quick"]) == 0
    assert run_all.main(["--only", "training", "--update-reference"]) == 0
    assert "--update-reference" not in calls[0] and "--quick" in calls[0]
    assert calls[1][-1] == "--update-reference"


def _copy_tree(dest: Path) -> Path:
    """The working tree's tracked and untracked (not ignored) files, committed in a new repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


@pytest.mark.slow
def test_bench_and_an_example_leave_the_tracked_files_unchanged(tmp_path):
    repo = _copy_tree(tmp_path / "repo")
    bench = subprocess.run(
        [sys.executable, "-c", "import sys; from ebmflow.cli import main; sys.exit(main())",
         "bench", "--only", "training"],
        cwd=repo, env=ENV, capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    assert "wrote runs/benchmarks/training.json" in bench.stdout
    assert (repo / "runs" / "benchmarks" / "training.json").is_file()
    example = subprocess.run(
        [sys.executable, "examples/ed_nearsightedness.py", "--quick"],
        cwd=repo, env=ENV, capture_output=True, text=True, timeout=600)
    assert example.returncode == 0, example.stdout[-2000:] + example.stderr[-2000:]
    assert "wrote runs/examples/results/ed_nearsightedness_quick.json" in example.stdout
    assert (repo / "runs" / "examples" / "figures" / "ed_nearsightedness_quick.png").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", f"tracked files changed or unignored files appeared:\n{status}"
