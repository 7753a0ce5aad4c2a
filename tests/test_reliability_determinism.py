"""Determinism on CPU: the same seed gives bit-identical samples, stats and training
trajectories, for every sampler (MCMC classes discovered automatically, learned samplers
listed) and every loss; a different seed gives different results (so the test can fail).
"""

from __future__ import annotations

import pytest
import torch
from test_invariance_all_samplers import APPROX_DISCRETE, ROWS

from ebmflow.discrete_flows import DiscreteFlowSampler, MLPVelocity
from ebmflow.energy import GaussianMixtureEnergy, IsingEnergy, MLPEnergy
from ebmflow.flows import FlowMC, RealNVP
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
)
from ebmflow.samplers import (
    MALA,
    GibbsWithGradients,
    Langevin,
    PersistentSampler,
    ReplayBuffer,
)
from ebmflow.spaces import Binary, Categorical, Continuous
from ebmflow.training import Trainer

MCMC = [pytest.param(s, t, id=cid) for row in ROWS.values() for cid, s, t in row.cases]
MCMC += [pytest.param(s, t, id=cid) for cid, s, t in APPROX_DISCRETE]


def _run(make_sampler, make_target, seed: int):
    target, sampler = make_target(), make_sampler()
    x0 = target.space.noise(64, generator=torch.Generator().manual_seed(0))
    x = sampler.run(target, x0, 5, generator=torch.Generator().manual_seed(seed))
    return x, {k: v.clone() for k, v in sampler.stats.items()}


@pytest.mark.parametrize(("make_sampler", "make_target"), MCMC)
def test_mcmc_samples_and_stats_repeat_under_a_seed(make_sampler, make_target):
    x1, s1 = _run(make_sampler, make_target, 3)
    x2, s2 = _run(make_sampler, make_target, 3)
    assert torch.equal(x1, x2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x3, _ = _run(make_sampler, make_target, 4)
    assert not torch.equal(x1, x3), "a different seed should give different chains"


def _learned(name: str):
    torch.manual_seed(0)
    if name == "flowmc":
        target = GaussianMixtureEnergy(torch.tensor([[1.0, -1.0]]))
        return FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), n_local=2, n_global=2), target
    if name == "discrete-flow":
        return (DiscreteFlowSampler(MLPVelocity(4, 2, hidden=(8,)), batch_size=16),
                IsingEnergy(torch.full((4, 4), 0.3)))
    target = GaussianMixtureEnergy(torch.tensor([[1.0, -1.0]]))
    return PersistentSampler(Langevin(0.05), ReplayBuffer(Continuous(2), capacity=64),
                             n_steps=3), target


@pytest.mark.parametrize("name", ["flowmc", "discrete-flow", "persistent"])
def test_learned_and_persistent_samplers_repeat_under_a_seed(name):
    def draw(seed):
        sampler, target = _learned(name)
        torch.manual_seed(seed)
        sampler.update(target, None if name != "flowmc" else target.sample(
            32, generator=torch.Generator().manual_seed(1)))
        first = sampler.sample(target, 16, generator=torch.Generator().manual_seed(seed))
        second = sampler.sample(target, 16, generator=torch.Generator().manual_seed(seed + 1))
        return first, second

    a, b = draw(5), draw(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = draw(6)
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def _bin_data():
    return (torch.rand(128, 6, generator=torch.Generator().manual_seed(0)) < 0.3).float()


def _cat_data():
    return torch.randint(0, 3, (128, 4), generator=torch.Generator().manual_seed(0))


def _cont_data():
    return torch.randn(128, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0


RECIPES = {
    "ed-gaussian": (Continuous(2), lambda: EnergyDiscrepancy(GaussianPerturbation(1.0)), None,
                    _cont_data),
    "cd-langevin": (Continuous(2), ContrastiveDivergence, lambda: Langevin(0.05, n_steps=3),
                    _cont_data),
    "pcd-mala": (Continuous(2), ContrastiveDivergence, lambda: PersistentSampler(
        MALA(0.05), ReplayBuffer(Continuous(2), capacity=64), n_steps=3), _cont_data),
    "dsm": (Continuous(2), DenoisingScoreMatching, None, _cont_data),
    "ed-bernoulli": (Binary(6), lambda: EnergyDiscrepancy(BernoulliPerturbation(0.1), m=8), None,
                     _bin_data),
    "ed-grid": (Binary(6), lambda: EnergyDiscrepancy(GridPerturbation(), m=8), None, _bin_data),
    "cd-gwg": (Binary(6), ContrastiveDivergence, lambda: GibbsWithGradients(n_steps=3),
               _bin_data),
    "ed-categorical": (Categorical(4, 3), lambda: EnergyDiscrepancy(
        CategoricalPerturbation(3, "cyclic", 0.5), m=8), None, _cat_data),
}


def _train(name: str, seed: int):
    space, make_loss, make_sampler, data = RECIPES[name]
    torch.manual_seed(123)  # same initial weights; the Trainer seed drives the rest
    energy = MLPEnergy(space, hidden=(16,))
    trainer = Trainer(energy, make_loss(), sampler=make_sampler() if make_sampler else None,
                      lr=1e-2, progress=False, quiet=True, seed=seed, log_every=1,
                      tensorboard=False)
    trainer.fit(data(), steps=4, batch_size=32)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    return [p.detach().clone() for p in energy.parameters()], losses


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_trajectory_repeats_under_a_seed(name):
    p1, l1 = _train(name, 0)
    p2, l2 = _train(name, 0)
    assert l1 == l2 and len(l1) == 4
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    p3, _ = _train(name, 1)
    assert not all(torch.equal(a, b) for a, b in zip(p1, p3))
