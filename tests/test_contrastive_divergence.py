"""ContrastiveDivergence: the formula, detached negatives, inits, and training an MLPEnergy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy, MLPEnergy
from ebmflow.losses import ContrastiveDivergence, EBMLoss
from ebmflow.samplers import MALA, Langevin, PersistentSampler, ReplayBuffer, Sampler
from ebmflow.spaces import Continuous


class Fixed(Sampler):
    """Returns given negatives (records the x0 it was called with)."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.x, self.seen = x, "unset"

    def sample(self, energy, n=None, *, x0=None, generator=None):
        self.seen = x0
        self.stats = {"accept_rate": torch.tensor(0.5)}
        return self.x.clone().requires_grad_(True)


class Quadratic(EnergyModel):
    def __init__(self) -> None:
        super().__init__(Continuous(1))
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.m = torch.nn.Parameter(torch.tensor(0.3))

    def energy(self, x: Tensor) -> Tensor:
        return self.a * (x[:, 0] - self.m).square()


def test_loss_matches_hand_formula_and_gradient() -> None:
    data, neg = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[-1.0], [0.5], [3.0]])
    energy, alpha = Quadratic(), 0.1
    out = ContrastiveDivergence(alpha=alpha)(energy, data, Fixed(neg))
    ep, en = 0.7 * (data[:, 0] - 0.3) ** 2, 0.7 * (neg[:, 0] - 0.3) ** 2
    expected = ep.mean() - en.mean() + alpha * (ep.square().mean() + en.square().mean())
    torch.testing.assert_close(out.loss, expected)
    assert out.x_neg is not None and not out.x_neg.requires_grad
    assert set(out.stats) >= {"energy_pos", "energy_neg", "energy_gap", "accept_rate"}
    torch.testing.assert_close(out.stats["energy_neg"], en.mean())
    out.loss.backward()
    # d/dm of mean a (x - m)^2 terms: -2a mean(x - m) for pos, + for neg, plus the regulariser
    dm = (-2 * 0.7 * (data[:, 0] - 0.3)).mean() + (2 * 0.7 * (neg[:, 0] - 0.3)).mean()
    dm = dm + alpha * ((2 * ep * -2 * 0.7 * (data[:, 0] - 0.3)).mean()
                       + (2 * en * -2 * 0.7 * (neg[:, 0] - 0.3)).mean())
    torch.testing.assert_close(energy.m.grad, dm)


def test_inits_and_interface(gen: torch.Generator) -> None:
    data = torch.randn(4, 1, generator=gen)
    cd = ContrastiveDivergence(init="data")
    assert isinstance(cd, EBMLoss) and cd.requires_sampler
    s = Fixed(torch.zeros(4, 1))
    cd(Quadratic(), data, s)
    assert torch.equal(s.seen, data)
    ContrastiveDivergence()(Quadratic(), data, s)
    assert s.seen is None
    ContrastiveDivergence(init="noise")(Quadratic(), data, s, generator=gen)
    assert s.seen.shape == (4, 1)
    ContrastiveDivergence(init=lambda d, g: d + 1)(Quadratic(), data, s)
    assert torch.equal(s.seen, data + 1)
    # CD-0 from data: negatives equal data, so the plain loss is exactly 0
    out = ContrastiveDivergence(init="data", n_steps=0)(Quadratic(), data, MALA())
    assert torch.equal(out.x_neg, data) and float(out.loss.detach()) == 0.0


def test_bad_input() -> None:
    data = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="needs a sampler"):
        ContrastiveDivergence()(Quadratic(), data)
    with pytest.raises(ValueError, match="shape"):
        ContrastiveDivergence()(Quadratic(), torch.zeros(4, 2), Langevin())
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDivergence(alpha=-1)
    with pytest.raises(ValueError, match="init"):
        ContrastiveDivergence(init="buffer")
    with pytest.raises(ValueError, match="n_steps"):
        ContrastiveDivergence(n_steps=3)(Quadratic(), data, Fixed(data))


def _grid_moments(energy: EnergyModel) -> tuple[float, float]:
    """Mean and sd of p ∝ exp(-E) on [-4, 8] by quadrature (exact up to the grid)."""
    x = torch.linspace(-4.0, 8.0, 2401)[:, None]
    with torch.no_grad():
        w = torch.softmax(-energy(x), 0)
    mean = (w * x[:, 0]).sum()
    return float(mean), float((w * (x[:, 0] - mean).square()).sum().sqrt())


def _fit_gaussian(sampler: Sampler, init: str, steps: int, seed: int = 0) -> tuple[float, float]:
    """Train a small MLPEnergy on N(2, 0.5^2) with CD; return the learned law's mean and sd."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    energy = MLPEnergy(Continuous(1), hidden=(32, 32))
    opt = torch.optim.Adam(energy.parameters(), lr=1e-2)
    loss = ContrastiveDivergence(alpha=0.01, init=init)
    for _ in range(steps):
        data = 2.0 + 0.5 * torch.randn(256, 1, generator=gen)
        out = loss(energy, data, sampler, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return _grid_moments(energy)


def test_persistent_cd_learns_a_gaussian() -> None:
    """PCD: MALA chains continued from a replay buffer (5 steps per update)."""
    ps = PersistentSampler(MALA(0.05), ReplayBuffer(Continuous(1), 2048, reinit_prob=0.05),
                           n_steps=5)
    mean, sd = _fit_gaussian(ps, "default", 200)
    assert abs(mean - 2.0) < 0.1 and abs(sd - 0.5) < 0.05, (mean, sd)


def test_short_run_cd_from_data_learns_a_gaussian() -> None:
    """CD-k from data with ULA (k = 5)."""
    mean, sd = _fit_gaussian(Langevin(0.01, n_steps=5), "data", 150)
    assert abs(mean - 2.0) < 0.1 and abs(sd - 0.5) < 0.05, (mean, sd)


def _mmd(x: Tensor, y: Tensor, bandwidth: float = 1.0) -> float:
    """Unbiased squared MMD with a Gaussian kernel exp(-|a - b|^2 / (2 h^2))."""
    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2))

    n, m = x.shape[0], y.shape[0]
    kxx = (k(x, x).sum() - n) / (n * (n - 1))
    kyy = (k(y, y).sum() - m) / (m * (m - 1))
    return float(kxx + kyy - 2 * k(x, y).mean())


@pytest.mark.slow
def test_pcd_trains_on_8gaussians() -> None:
    """PCD with a replay buffer on the 8-Gaussians ring: MMD to held-out data near the
    data-vs-data level and mode weights near 1/8 each."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    truth = GaussianMixtureEnergy.ring(8, radius=4.0, scale=0.3)
    energy = MLPEnergy(Continuous(2), hidden=(128, 128, 128))
    opt = torch.optim.Adam(energy.parameters(), lr=1e-3, betas=(0.0, 0.999))
    ps = PersistentSampler(Langevin(0.01, grad_clip=None),
                           ReplayBuffer(Continuous(2), 10000, reinit_prob=0.05), n_steps=20)
    cd = ContrastiveDivergence(alpha=0.1)
    for _ in range(2500):
        out = cd(energy, truth.sample(256, generator=gen), ps, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x = MALA(0.01, n_warmup=200).sample(energy, 2000, generator=gen, n_steps=1000)
    held_out, other = truth.sample(2000, generator=gen), truth.sample(2000, generator=gen)
    mmd_model, mmd_ref = _mmd(x, held_out), _mmd(other, held_out)
    assert mmd_model < 0.01, (mmd_model, mmd_ref)
    # Mode weights of the learned density itself, by quadrature of exp(-E) on a grid (MCMC
    # chains cannot be trusted to cross between modes, so their allocation would test the
    # sampler, not the model).
    g = torch.linspace(-7, 7, 281)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = torch.softmax(-energy(grid), 0)
    nearest = torch.cdist(grid, truth.means).argmin(1)
    weights = torch.zeros(8).index_add_(0, nearest, mass)
    # Every mode is recovered with a weight within a factor 2 of 1/8 and almost no mass lies
    # between modes. PCD with local Langevin chains is known NOT to balance separated modes
    # exactly (the motivation of flowMC, see docs/results-flowmc.md): measured here, weights
    # 0.083-0.186 (max deviation 0.09), so a tighter bound would test a property PCD lacks.
    assert float(weights.min()) > 1 / 16 and float(weights.max()) < 1 / 4, weights.tolist()
    near = torch.cdist(grid, truth.means).min(1).values < 1.5
    assert float(mass[near].sum()) > 0.95
    assert math.isfinite(float(out.loss))
