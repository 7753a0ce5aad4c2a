"""Every shipped config in examples/configs/ learns: ``ebmflow train --config FILE`` at a reduced
budget must beat the trivial baseline of its metric by a stated margin.

Metric: the held-out NLL that ``ebmflow train`` writes to metrics.json. Trivial baselines:

* binary data (``encoding = "gray"``, 32 bits): the uniform law, NLL = 32 log 2 = 22.18 nats
  (what an energy that learnt nothing gives);
* 2-D data: the Gaussian with the training data's mean and covariance,
  NLL = log(2 pi e) + log det(Sigma) / 2.

The default suite runs the cheap configs; the others are ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ebmflow.cli import main
from ebmflow.data import toy_2d

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
UNIFORM_32_BITS = 32 * math.log(2.0)

# name: (steps for the test, margin in nats below the baseline, slow)
CASES: dict[str, tuple[int, float, bool]] = {
    "discrete_flow_toys": (250, 0.5, False),  # measured 21.10 (shipped 400 steps: 20.92)
    "quickstart": (1000, 0.3, False),
    "discrete_flow_digits": (400, 0.5, True),
    "discrete_flow_budget": (800, 0.5, True),
    "ed_discrete_toys": (600, 0.5, True),
    "ed_categorical": (600, 0.5, True),
    "ising_recovery": (600, 0.3, True),
    "ed_25gaussians": (4000, 0.2, True),
    "ed_nearsightedness": (3000, 0.2, True),
    "flowmc_toys": (1500, 0.2, True),
    "flowmc_two_modes": (1000, 0.2, True),
    "flowmc_highdim": (600, 0.2, True),
    "flowmc_schedules": (400, 0.2, True),
}


def _read_train(path: Path) -> dict:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)["train"]


def gaussian_nll(data: str, seed: int, n: int = 50_000) -> float:
    """NLL of the moment-matched Gaussian on the run's training data (nats per point)."""
    x = toy_2d(data, n, generator=torch.Generator().manual_seed(seed)).double()
    cov = torch.cov(x.T)
    return math.log(2 * math.pi * math.e) + 0.5 * float(torch.logdet(cov))


def baseline(train: dict) -> float:
    if train.get("encoding", "none") == "gray":
        return UNIFORM_32_BITS
    return gaussian_nll(train.get("data", "8gaussians"), int(train.get("seed", 0)))


def test_every_shipped_config_has_a_case():
    assert sorted(p.stem for p in CONFIGS.glob("*.toml")) == sorted(CASES)


def _params():
    for name, (steps, margin, slow) in CASES.items():
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(name, steps, margin, id=name, marks=marks)


@pytest.mark.parametrize("name,steps,margin", list(_params()))
def test_config_learns(name, steps, margin, tmp_path):
    path = CONFIGS / f"{name}.toml"
    train = _read_train(path)
    out = tmp_path / "run"
    code = main(["train", "--config", str(path), "--steps", str(steps), "--out", str(out), "--quiet",
                 "--eval-samples", "500", "--eval-steps", "100"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    base = baseline(train)
    assert math.isfinite(metrics["nll"])
    assert metrics["nll"] < base - margin, (
        f"{name}: NLL {metrics['nll']:.3f} after {steps} steps does not beat the trivial baseline "
        f"{base:.3f} by {margin} nats"
    )
