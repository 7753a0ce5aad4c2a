"""DenoisingScoreMatching: hand computation, analytic Gaussian loss and gradient, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ebmflow.energy import EnergyModel, MLPEnergy
from ebmflow.losses import DenoisingScoreMatching
from ebmflow.spaces import Binary, Continuous


class Quadratic(EnergyModel):
    """E(x) = |x|^2 / (2 v): the model N(0, v I) with a learnable variance v."""

    def __init__(self, dim: int, v: float):
        super().__init__(Continuous(dim))
        self.v = nn.Parameter(torch.tensor(float(v)))

    def energy(self, x):
        return 0.5 * x.pow(2).sum(-1) / self.v


def test_loss_equals_hand_computation():
    energy, s = Quadratic(3, 1.7), 0.3
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    out = DenoisingScoreMatching(s)(energy, x, generator=torch.Generator().manual_seed(9))
    xi = torch.randn(4, 3, generator=torch.Generator().manual_seed(9))  # the same draw
    x_noisy = x + s * xi
    grad = x_noisy / 1.7  # dE/dx of the quadratic
    expected = 0.5 * ((grad - xi / s) ** 2).sum(1).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    energy_noisy = 0.5 * x_noisy.pow(2).sum(1) / 1.7
    assert float(out.stats["energy_pos"]) == pytest.approx(float(energy_noisy.mean()), rel=1e-5)


def _analytic(v: float, s: float, d: int) -> tuple[float, float]:
    """Expected DSM loss and its v-derivative for data N(0, I) and model N(0, v I):
    L(v) = d/2 ((1 + s^2) / v^2 - 2 / v + 1 / s^2)."""
    loss = 0.5 * d * ((1 + s * s) / v**2 - 2 / v + 1 / s**2)
    dloss = 0.5 * d * (-2 * (1 + s * s) / v**3 + 2 / v**2)
    return loss, dloss


@pytest.mark.parametrize("v", [0.6, 1.25, 2.0])
def test_matches_analytic_gaussian_loss_and_gradient(v):
    s, d, n = 0.5, 2, 40_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    energy = Quadratic(d, v)
    out = DenoisingScoreMatching(s)(energy, x, generator=g)
    out.loss.backward()
    loss, dloss = _analytic(v, s, d)
    # per-sample loss terms: 0.5 |a x~ - xi / s|^2 with a = 1/v; Monte Carlo std from samples
    with torch.no_grad():
        xi = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
        xn = torch.randn(n, d, generator=torch.Generator().manual_seed(2)) + s * xi
        per = 0.5 * ((xn / v - xi / s) ** 2).sum(1)
        dper = (-(xn / v - xi / s) * xn / v**2).sum(1)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=5 * float(per.std()) / math.sqrt(n))
    assert float(energy.v.grad) == pytest.approx(dloss, abs=5 * float(dper.std()) / math.sqrt(n))


def test_minimiser_is_noised_data_variance():
    # the analytic minimiser of L(v) is v* = 1 + s^2 (the variance of the noised data)
    s, d = 0.5, 2
    assert _analytic(1 + s * s, s, d)[1] == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    energy = Quadratic(d, 3.0)
    opt = torch.optim.Adam(energy.parameters(), lr=0.05)
    loss_fn = DenoisingScoreMatching(s)
    for _ in range(300):
        x = torch.randn(512, d, generator=g)
        opt.zero_grad()
        loss_fn(energy, x, generator=g).loss.backward()
        opt.step()
    assert float(energy.v.detach()) == pytest.approx(1 + s * s, abs=0.08)


def test_gradients_reach_parameters_not_data():
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(8,))
    x = torch.randn(5, 2).requires_grad_(True)
    out = DenoisingScoreMatching(0.1)(energy, x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert x.grad is None
    # every parameter but the output bias (DSM ignores additive constants) gets a gradient
    named = dict(energy.named_parameters())
    assert named["net.2.bias"].grad is None
    assert all(p.grad is not None for n, p in named.items() if n != "net.2.bias")
    assert not out.stats["energy_pos"].requires_grad and out.stats["energy_pos"].dim() == 0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), "0.1"])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        DenoisingScoreMatching(sigma)


def test_bad_space_and_shape():
    with pytest.raises(ValueError, match="Continuous"):
        DenoisingScoreMatching()(MLPEnergy(Binary(4), hidden=(4,)), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"data has shape \(2, 4\).*\(B, 3\)"):
        DenoisingScoreMatching()(Quadratic(3, 1.0), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="data has dtype torch.int64.*data.float()"):
        DenoisingScoreMatching()(Quadratic(3, 1.0), torch.zeros(2, 3, dtype=torch.long))
