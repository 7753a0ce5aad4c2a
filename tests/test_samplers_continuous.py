"""Langevin (ULA), MALA and HMC: exact moments and mode weights, ULA bias, adaptation, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy, MLPEnergy
from ebmflow.samplers import HMC, MALA, Langevin, NonFiniteError
from ebmflow.spaces import Binary, Continuous


def mixture() -> GaussianMixtureEnergy:
    """Two overlapping modes (weights 0.7 / 0.3) that MALA and HMC can cross."""
    return GaussianMixtureEnergy(
        torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.6, 0.8]), torch.tensor([0.7, 0.3])
    )


def check_moments(x: Tensor, target: GaussianMixtureEnergy, z: float = 5.0) -> None:
    """Mean, covariance and mode weights of chains ``x`` (n, D) vs the exact values.

    Tolerances are z Monte Carlo standard errors, estimated from an exact sample of the same
    size (the per-state statistics x, (x - mu)(x - mu)^T and p(k | x) have finite variance).
    """
    n = x.shape[0]
    ref = target.sample(n, generator=torch.Generator().manual_seed(123)).double()
    mu = target.mean().double()

    def stats(y: Tensor) -> Tensor:
        c = y - mu
        outer = (c[:, :, None] * c[:, None, :]).flatten(1)
        return torch.cat([y, outer, target.responsibilities(y.float()).double()], 1)

    exact = torch.cat([mu, target.covariance().double().flatten(), target.weights.double()])
    est = stats(x.double()).mean(0)
    se = stats(ref).std(0) / math.sqrt(n)
    gap = (est - exact).abs()
    assert bool((gap < z * se + 1e-9).all()), f"gap {gap.tolist()} vs se {se.tolist()}"


@pytest.mark.parametrize(
    "make", [lambda: MALA(0.05, n_warmup=100), lambda: HMC(0.05, n_leapfrog=4, n_warmup=50)],
    ids=["mala", "hmc"],
)
def test_mixture_moments_and_mode_weights(make, gen: torch.Generator) -> None:
    target, sampler = mixture(), make()
    x = sampler.sample(target, 2000, generator=gen, n_steps=sampler.n_warmup)  # adapt
    assert not sampler.adapting
    x = sampler.run(target, x, 100, generator=gen)  # fixed step: exact kernel
    check_moments(x, target)
    assert 0.4 < float(sampler.stats["accept_rate"]) < 0.85


@pytest.mark.parametrize("eta,s,temp", [(0.5, 1.0, 1.0), (0.2, 0.5, 2.0)])
def test_ula_stationary_variance_bias(eta: float, s: float, temp: float, gen) -> None:
    """ULA on N(0, s^2): x' = (1 - eta/s^2) x + sqrt(2 eta T) xi, so the stationary variance
    is v = 2 eta T / (1 - (1 - eta/s^2)^2), larger than the target's T s^2."""
    target = GaussianMixtureEnergy(torch.zeros(1, 1), s)
    n = 20000
    x = Langevin(eta, temperature=temp).sample(target, n, generator=gen, n_steps=60)
    v = 2 * eta * temp / (1 - (1 - eta / s**2) ** 2)
    se = v * math.sqrt(2 / (n - 1))  # sd of a Gaussian sample variance
    assert abs(float(x.var()) - v) < 5 * se
    assert v - temp * s**2 > 10 * se  # the bias is real and resolved by this test


@pytest.mark.parametrize(
    "sampler,target_acc",
    [(MALA(1e-3, n_warmup=200), 0.574), (HMC(0.02, n_leapfrog=3, n_warmup=200), 0.65)],
    ids=["mala", "hmc"],
)
def test_step_size_adaptation_reaches_target(sampler, target_acc: float, gen) -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 10), torch.linspace(0.5, 2.0, 10)[None])
    x = sampler.sample(target, 256, generator=gen, n_steps=100)
    assert sampler.adapting  # half-way through warm-up, across runs
    x = sampler.run(target, x, 100, generator=gen)
    assert not sampler.adapting and sampler.step_size > 1e-2
    assert float(sampler.stats["step_size"]) == pytest.approx(sampler.step_size, rel=1e-5)
    sampler.run(target, x, 150, generator=gen)  # adaptation off: a fixed kernel
    assert abs(float(sampler.stats["accept_rate"]) - target_acc) < 0.05
    assert sampler.chain_stats["accept_rate"].shape == (256,)
    state = sampler.state_dict()
    fresh = type(sampler)()
    fresh.load_state_dict(state)
    assert fresh.step_size == sampler.step_size and not fresh.adapting


def test_langevin_clip_and_noise_scale_are_hand_computable() -> None:
    """noise_scale=0 and grad_clip=c: x' = x - eta * clamp(grad E, -c, c)."""
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)  # grad E(x) = x
    x0 = torch.tensor([[3.0, 0.05], [-0.2, -5.0]])
    x = Langevin(0.1, noise_scale=0.0, grad_clip=0.5).run(target, x0, 1)
    torch.testing.assert_close(x, x0 - 0.1 * x0.clamp(-0.5, 0.5))


def test_sampling_writes_no_parameter_gradients(gen) -> None:
    energy = MLPEnergy(Continuous(3), hidden=(16, 16))
    for s in (Langevin(), MALA(), HMC(n_leapfrog=2)):
        s.sample(energy, 8, generator=gen, n_steps=2)
    assert all(p.grad is None for p in energy.parameters())


class NaNRegion(EnergyModel):
    """0.5 |x|^2 but NaN for x_0 > 3."""

    def __init__(self) -> None:
        super().__init__(Continuous(2))

    def energy(self, x: Tensor) -> Tensor:
        e = 0.5 * x.square().sum(-1)
        return torch.where(x[:, 0] > 3, torch.full_like(e, math.nan), e)


def test_langevin_nonfinite_energy_raises_naming_step_and_chains() -> None:
    x0 = torch.zeros(5, 2)
    x0[[1, 4], 0] = 3.5  # NaN energy and gradient at the start
    with pytest.raises(NonFiniteError, match=r"2 chain\(s\).*step 0 \(chains \[1, 4\]\)"):
        Langevin(0.01, n_steps=3).run(NaNRegion(), x0)
    s = Langevin(0.01, n_steps=3, on_nonfinite="reset")
    x = s.run(NaNRegion(), x0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and float(s.stats["nonfinite"]) == 6


def test_mh_rejects_and_counts_nonfinite_proposals(gen) -> None:
    x0 = torch.zeros(400, 2)
    x0[:, 0] = 2.9  # close to the NaN region: many proposals land in it
    for s in (MALA(0.3), HMC(0.3, n_leapfrog=3)):
        x = s.run(NaNRegion(), x0, 5, generator=gen)
        assert torch.isfinite(x).all() and bool((x[:, 0] <= 3).all())
        assert float(s.stats["nonfinite_rate"]) > 0.01


def test_mh_raises_when_the_start_is_nonfinite() -> None:
    x0 = torch.zeros(3, 2)
    x0[2, 0] = 4.0
    with pytest.raises(NonFiniteError, match=r"chains \[2\]"):
        MALA(0.1).run(NaNRegion(), x0, 2)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "a"])
def test_invalid_step_sizes(bad) -> None:
    for cls in (Langevin, MALA, HMC):
        with pytest.raises(ValueError, match="step_size"):
            cls(step_size=bad)


def test_invalid_hyperparameters() -> None:
    with pytest.raises(ValueError, match="n_leapfrog"):
        HMC(n_leapfrog=0)
    with pytest.raises(ValueError, match="target_accept"):
        MALA(target_accept=1.0)
    with pytest.raises(ValueError, match="n_warmup"):
        MALA(n_warmup=-3)
    with pytest.raises(ValueError, match="temperature"):
        Langevin(temperature=0)
    with pytest.raises(ValueError, match="grad_clip"):
        Langevin(grad_clip=-1)
    with pytest.raises(ValueError, match="noise_scale"):
        Langevin(noise_scale=-0.1)


def test_wrong_shapes_and_spaces() -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)
    for s in (Langevin(), MALA(), HMC()):
        with pytest.raises(ValueError, match=r"expects \(B, 2\)"):
            s.run(target, torch.zeros(4, 3))
        with pytest.raises(ValueError, match="shape"):
            s.sample(target, x0=torch.zeros(4, 2, 1))
        with pytest.raises(ValueError, match="cannot sample"):
            s.sample(MLPEnergy(Binary(3), hidden=(4,)), 2)


def test_image_shaped_states(gen) -> None:
    """Non-batch dims are the event: (B, C, H, W) states keep their shape."""

    class Quad(EnergyModel):
        def __init__(self) -> None:
            super().__init__(Continuous((1, 3, 3)))

        def energy(self, x: Tensor) -> Tensor:
            return 0.5 * x.square().flatten(1).sum(1)

    for s in (Langevin(0.1), MALA(0.5), HMC(0.3, n_leapfrog=2)):
        x = s.sample(Quad(), 500, generator=gen, n_steps=30)
        assert x.shape == (500, 1, 3, 3)
        assert abs(float(x.var()) - 1.0) < 0.15
