"""The ebmflow command line: the main job's files, config files, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ebmflow.cli import main
from ebmflow.training.registry import RunConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "20", "--eval-samples", "200", "--eval-steps", "10", "--quiet"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_train_writes_the_main_job_files_with_finite_metrics(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    for name in ("metrics.json", "samples.png", "energy.png", "checkpoint.pt", "log.jsonl"):
        assert (out / name).stat().st_size > 0, name
    m = _metrics(out)
    nums = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    assert {"mmd", "nll", "mode_tv", "steps"} <= set(nums)
    assert all(math.isfinite(v) for v in nums.values())
    assert m["steps"] == 20 and m["config"]["loss"] == "ed"
    # the exact 8-Gaussians NLL is the floor of a model's NLL (up to quadrature error)
    assert m["nll"] > m["nll_true"] - 0.05

    # sample and evaluate from the checkpoint
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "50",
                 "--steps", "5", "--out", str(tmp_path / "s.pt")]) == 0
    assert torch.load(tmp_path / "s.pt").shape == (50, 2)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--n", "100",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert math.isfinite(json.loads((tmp_path / "e.json").read_text())["mmd"])


def test_existing_output_is_refused_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert "Traceback" not in err
    # resume continues the saved run to a larger step count
    assert main(["train", "--out", str(out), "--resume", *TINY[:-1], "--quiet", "--steps", "30"]) == 0
    assert _metrics(out)["steps"] == 30
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 30 and 20 in steps
    assert main(["train", "--out", str(out), "--overwrite", *TINY]) == 0
    assert _metrics(out)["steps"] == 20


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "nope"], "valid names: swissroll"),
        (["--loss", "mle"], "valid names: ed, cd, pcd, dsm"),
        (["--sampler", "slice"], "valid names: langevin, mala"),
        (["--encoding", "gray", "--sampler", "langevin"], "moves continuous states"),
        (["--sampler", "gibbs"], "moves binary states"),
        (["--encoding", "gray", "--loss", "dsm"], "continuous data"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--batch", "0"], "cuda" if not torch.cuda.is_available() else "batch"),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, capsys, args, needle):
    assert main(["train", "--out", str(tmp_path / "r"), *args, *TINY]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("ebmflow: error:") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing created for a bad configuration


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        main(["--debug", "train", "--out", str(tmp_path / "r"), "--data", "nope"])


def test_config_file_sets_values_and_flags_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\ndata = "moons"\nsteps = 5\nhidden = [16, 16]\nbatch = 64\n'
                   'eval_samples = 100\neval_steps = 5\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "12", "--out", str(out), "--quiet"]) == 0
    m = _metrics(out)
    assert m["config"]["data"] == "moons" and m["config"]["hidden"] == [16, 16]
    assert m["steps"] == 12  # the flag wins over the file
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2


def test_every_cli_example_config_is_valid():
    # example scripts keep their own TOML schemas; configs for `ebmflow train` say so on line 1
    configs = [p for p in sorted((REPO / "examples").rglob("*.toml"))
               if p.read_text().startswith("# ebmflow train --config")]
    assert REPO / "examples" / "configs" / "quickstart.toml" in configs
    from ebmflow.cli import _load_toml
    from ebmflow.training.registry import check_config

    for path in configs:
        check_config(RunConfig.from_dict(_load_toml(str(path)), source=str(path)))


@pytest.mark.parametrize(
    "combo",
    [
        ["--loss", "cd", "--sampler", "langevin"],
        ["--loss", "pcd", "--sampler", "mala"],
        ["--loss", "dsm", "--sampler", "hmc"],
    ],
)
def test_losses_and_samplers_compose_through_the_cli(tmp_path, combo):
    out = tmp_path / "run"
    small = ["--steps", "6", "--eval-samples", "100", "--eval-steps", "4", "--quiet",
             "--hidden", "16,16", "--sampler-steps", "2"]
    assert main(["train", "--out", str(out), *combo, *small]) == 0
    nums = [v for v in _metrics(out).values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in nums)


def test_bench_without_benchmarks_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--path", str(tmp_path)]) == 2
    assert "run_all.py" in capsys.readouterr().err


def test_list_names_components(capsys):
    assert main(["train", "--list"]) == 0
    text = capsys.readouterr().out
    assert "8gaussians" in text and "pcd" in text and "discrete-flow" in text
