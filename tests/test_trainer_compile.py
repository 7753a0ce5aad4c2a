"""``Trainer(compile=True)``: the compiled loss trains like the eager one; a second batch size in
the same process compiles a second static graph (symbolic shapes, whose random draws fail to
trace, are not used)."""

from __future__ import annotations

import math

import torch

from ebmflow.energy import MLPEnergy
from ebmflow.losses import EBMLoss, EnergyDiscrepancy, GaussianPerturbation, LossOutput
from ebmflow.spaces import Continuous
from ebmflow.training import Trainer


class _Quadratic(EBMLoss):
    """Deterministic: L = mean E(x) + 0.1 mean E(x)^2 (no random draws, so eager and compiled
    runs must agree to rounding)."""

    def forward(self, energy, data, sampler=None):
        e = energy(data)
        return LossOutput(e.mean() + 0.1 * e.pow(2).mean(), {})


def _fit(loss, compile: bool, tmp_path, steps: int = 8, batch_size: int = 64):
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(32, 32))
    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))  # 200 = 3 x 64 + 8
    trainer = Trainer(energy, loss, compile=compile, lr=1e-2, seed=3, progress=False, quiet=True,
                      log_every=1, out_dir=tmp_path / f"c{int(compile)}_{batch_size}",
                      tensorboard=False)
    trainer.fit(data, steps=steps, batch_size=batch_size)
    return trainer


def test_compiled_loss_matches_eager_across_a_short_last_batch(tmp_path):
    eager = _fit(_Quadratic(), False, tmp_path)
    compiled = _fit(_Quadratic(), True, tmp_path)
    assert compiled.step == eager.step == 8
    a = [r["loss"] for r in eager.history]
    b = [r["loss"] for r in compiled.history]
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5)
    for p, q in zip(eager.energy.parameters(), compiled.energy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compiled_energy_discrepancy_with_two_batch_sizes_in_one_process(tmp_path):
    # ED draws Gaussian negatives inside the compiled loss; the second trainer's batch size
    # used to make dynamo retrace with a symbolic batch dimension, and torch.randn failed
    loss = EnergyDiscrepancy(GaussianPerturbation(1.0), m=4, w=1.0)
    for batch_size in (64, 40):
        trainer = _fit(loss, True, tmp_path, steps=3, batch_size=batch_size)
        assert trainer.step == 3
        assert all(math.isfinite(r["loss"]) for r in trainer.history)
