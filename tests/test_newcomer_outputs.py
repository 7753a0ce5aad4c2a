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


EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text()
                  and p.stem != "replot_docs_figures")  # redraws docs/ figures, no --quick
CLI = [sys.executable, "-c", "import sys; from ebmflow.cli import main; sys.exit(main())"]


def _wrote(stdout: str) -> list[str]:
    """The "wrote ..." lines of a run's output."""
    return [line for line in stdout.splitlines() if line.startswith("wrote ")]


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
    for name in ("flowmc_toys", "discrete_flow_toys"):  # a flowMC and a discrete-flow example
        run = subprocess.run([sys.executable, f"examples/{name}.py", "--quick"],
                             cwd=repo, env=ENV, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        for rel in (f"runs/examples/results/{name}_quick.json",
                    f"runs/examples/figures/{name}_quick.png"):
            assert f"wrote {rel}" in run.stdout, run.stdout[-2000:]
            assert (repo / rel).is_file(), rel
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", f"tracked files changed or unignored files appeared:\n{status}"


def test_every_benchmark_uses_the_output_helper():
    """Every benchmark that run_all.py runs takes --out / --update-reference (``_output.py``)
    and writes through ``write_json``, which prints where."""
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py")
                     if p.name != "run_all.py" and not p.name.startswith("_")
                     and p.name != "gpu_check.py")  # the GPU acceptance command, not a benchmark
    assert len(scripts) >= 5
    for script in scripts:
        text = script.read_text()
        assert "add_output_arguments(" in text and "write_json(" in text, script.name


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_prints_where_it_wrote(name, tmp_path):
    """``python examples/<name>.py --quick --out DIR`` writes only under DIR (results/*.json,
    figures/*.png) and prints a "wrote <path>" line for every file it wrote."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick",
                           "--out", str(out)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.suffix for p in written} == {".json", ".png"}, written
    assert all(p.parent.name in ("results", "figures") for p in written), written
    lines = _wrote(proc.stdout)
    for path in written:
        assert f"wrote {path}" in lines, f"{name} did not say it wrote {path}:\n{lines}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "wrote outside --out"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 5-step ``ebmflow train`` run (small evaluation); its stdout is saved beside it."""
    tmp = tmp_path_factory.mktemp("cli")
    run = tmp / "run"
    proc = _cli("train", "--steps", "5", "--eval-samples", "100", "--eval-steps", "5",
                "--out", str(run), cwd=tmp)
    (tmp / "train.stdout").write_text(proc.stdout)
    return run


def test_cli_train_prints_where_it_wrote(trained_run):
    lines = _wrote((trained_run.parent / "train.stdout").read_text())
    assert len(lines) == 1 and str(trained_run) in lines[0], lines
    for name in ("metrics.json", "checkpoint.pt", "samples.png", "energy.png", "log.jsonl"):
        assert name in lines[0] and (trained_run / name).is_file(), name


def test_cli_sample_prints_where_it_wrote(trained_run, tmp_path):
    out = tmp_path / "samples.csv"
    proc = _cli("sample", "--checkpoint", str(trained_run / "checkpoint.pt"), "--n", "50",
                "--steps", "5", "--out", str(out), cwd=tmp_path)
    lines = _wrote(proc.stdout)
    assert out.is_file() and len(lines) == 1 and lines[0].endswith(f"to {out}"), lines


def test_cli_evaluate_prints_where_it_wrote(trained_run, tmp_path):
    out = tmp_path / "metrics.json"
    proc = _cli("evaluate", "--checkpoint", str(trained_run / "checkpoint.pt"), "--n", "50",
                "--out", str(out), cwd=tmp_path)
    assert out.is_file()
    assert any(str(out) in line for line in _wrote(proc.stdout)), proc.stdout[-500:]
