"""DiscreteFlowSampler: training by velocity regression on data and data-free from an energy,
checked by the exact law of the Euler chain (enumeration), importance weights and errors."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from ebmflow.discrete_flows import (
    CTMCSolver,
    DiscreteFlowSampler,
    FactorizedProposal,
    LowESSWarning,
    MixturePath,
    MLPVelocity,
    importance_weights,
)
from ebmflow.discrete_flows.solver import time_grid
from ebmflow.energy import EnergyModel, IsingEnergy, MLPEnergy, enumerate_binary
from ebmflow.metrics import effective_sample_size
from ebmflow.spaces import Binary, Categorical, Continuous


@torch.no_grad()
def euler_law(velocity_fn, solver: CTMCSolver, dim: int) -> torch.Tensor:
    """Exact law over {0..S-1}^dim (lexicographic) of the mask-source Euler chain.

    A state with m masked coordinates can only move on those, so a step costs
    sum_x V^m(x) = (S + V)^dim products rather than V^(2 dim)."""
    path = solver.path
    v, s = path.vocab_size, path.num_classes
    states = torch.tensor(list(itertools.product(range(v), repeat=dim)))
    powers = v ** torch.arange(dim - 1, -1, -1)
    masked = states == path.mask_token
    n_masked = masked.sum(-1)
    groups = []
    for m in range(dim + 1):
        rows = torch.nonzero(n_masked == m).flatten()
        mdims = torch.nonzero(masked[rows])[:, 1].reshape(len(rows), m)
        combos = torch.tensor(list(itertools.product(range(v), repeat=m)), dtype=torch.long)
        combos = combos.reshape(v**m, m)
        base = (states[rows] * ~masked[rows] * powers).sum(-1)
        target = base[:, None] + (powers[mdims][:, None, :] * combos[None]).sum(-1)
        groups.append((rows, mdims, target.flatten()))
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[-1] = 1.0  # all MASK
    times = time_grid(0.0, solver.dt)
    for k in range(len(times) - 1):
        t, dt = times[k], times[k + 1] - times[k]
        u = velocity_fn(states, torch.full((len(states),), t))
        p = solver.step_probs(u, states, t, dt, k == len(times) - 2).double()
        new = torch.zeros_like(dist)
        for rows, mdims, target in groups:
            a = dist[rows][:, None]
            for j in range(mdims.shape[1]):
                a = (a[:, :, None] * p[rows, mdims[:, j]][:, None, :]).reshape(len(rows), -1)
            new.index_add_(0, target, a.flatten())
        dist = new
    return dist[(states < s).all(-1)].float()


def mixture_8bit() -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy modes on {0,1}^8: p(x) = sum_m pi_m prod_d (0.8 if x_d = mode_md else 0.2)."""
    states = enumerate_binary(8)
    modes = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    match = (states[:, None, :] == modes[None].float()).float()
    p = ((0.8 * match + 0.2 * (1 - match)).prod(-1) * torch.tensor([0.5, 0.3, 0.2])).sum(-1)
    return states, p / p.sum()


def make_sampler(dim: int, lr: float = 5e-3, **kw) -> DiscreteFlowSampler:
    torch.manual_seed(0)
    path = MixturePath(2, "mask")
    model = MLPVelocity(dim, 2, hidden=(128, 128), schedule=path.schedule)
    return DiscreteFlowSampler(model, path, CTMCSolver(path, 0.05), lr=lr, **kw)


def test_regression_on_8bit_samples_reaches_tv_below_005(gen):
    states, p = mixture_8bit()
    sampler = make_sampler(8, fit_to="data")
    steps = 800
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sampler.optimizer, steps)
    energy = MLPEnergy(Binary(8), hidden=(4,))  # only its space is used
    for _ in range(steps):
        data = states[torch.multinomial(p, 256, replacement=True, generator=gen)]
        stats = sampler.update(energy, data, generator=gen)
        sched.step()
    assert set(stats) == {"flow_loss"}
    law = euler_law(sampler.velocity, sampler.solver, 8)
    tv = 0.5 * (law - p).abs().sum().item()
    assert tv < 0.05, tv  # measured 0.04 (Euler h=0.05 alone with the exact velocity: ~0.02)


def test_data_free_ising_3x3_reaches_tv_below_01(gen):
    energy = IsingEnergy.lattice(3, 0.1)
    p = energy.probabilities()
    sampler = make_sampler(9, batch_size=256)
    steps = 500
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sampler.optimizer, steps)
    for _ in range(steps):
        stats = sampler.update(energy, generator=gen)
        sched.step()
    assert {"flow_loss", "ess", "ess_fraction", "weight_max", "log_weight_std"} <= set(stats)
    # uniform proposal: ESS / B is about 1 / (2^9 sum p^2) = 0.26 for this target
    expected_frac = 1.0 / (512 * p.pow(2).sum())
    assert 0.5 * expected_frac < stats["ess_fraction"] < 1.5 * expected_frac
    assert stats["ess"].dim() == 0
    law = euler_law(sampler.velocity, sampler.solver, 9)
    tv = 0.5 * (law - p).abs().sum().item()
    assert tv < 0.1, tv  # measured 0.06


def test_importance_weights_by_hand():
    e = torch.tensor([0.0, 1.0, 2.0])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    w, stats = importance_weights(e, log_q, temperature=2.0)
    raw = torch.exp(-e / 2.0) / torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(w, 3 * raw / raw.sum())
    assert torch.allclose(w.mean(), torch.tensor(1.0))
    ess = raw.sum() ** 2 / raw.pow(2).sum()
    assert torch.allclose(stats["ess"], ess)
    assert torch.allclose(effective_sample_size(-e / 2.0 - log_q), ess)
    assert torch.allclose(stats["weight_max"], raw.max() / raw.sum())


def test_low_ess_warns(gen):
    energy = IsingEnergy.lattice(3, 1.0)  # nearly two ground states: uniform proposal collapses
    sampler = make_sampler(9, batch_size=64)
    with pytest.warns(LowESSWarning, match="ESS") as rec:
        stats = sampler.update(energy, generator=gen)
    assert stats["ess_fraction"] < 0.05
    # the user's line, not a frame inside ebmflow (under mutation testing the caller of a
    # mutated function is mutmut's trampoline: then only "outside ebmflow" can be checked)
    import ebmflow

    assert not Path(rec[0].filename).resolve().is_relative_to(Path(ebmflow.__file__).parent)
    if "mutmut" not in sys.modules:
        assert rec[0].filename == __file__


class _BrokenProposal:
    """Samples states outside its own support (log q = -inf)."""

    def sample(self, n, generator=None):
        return torch.ones(n, 4, dtype=torch.long)

    def log_prob(self, x):
        return torch.full((x.shape[0],), float("-inf"))


def test_proposal_with_minus_inf_log_prob_raises(gen):
    energy = MLPEnergy(Binary(4), hidden=(8,))
    sampler = make_sampler(4, proposal=_BrokenProposal())
    with pytest.raises(ValueError, match="log q"):
        sampler.update(energy, generator=gen)


def test_sample_follows_energy_space_convention(gen):
    binary = MLPEnergy(Binary(5), hidden=(8,))
    sampler = make_sampler(5)
    x = sampler.sample(binary, 16, generator=gen)
    assert x.dtype == torch.float32 and x.shape == (16, 5)
    assert set(x.unique().tolist()) <= {0.0, 1.0}

    cat_space = Categorical(4, 3)
    cat = MLPEnergy(cat_space, hidden=(8,))
    path = MixturePath(3, "uniform")
    cs = DiscreteFlowSampler(MLPVelocity(4, 3, hidden=(16,), schedule=path.schedule), path, fit_to="data")
    y = cs.sample(cat, 32, generator=gen)
    assert y.dtype == torch.long and y.shape == (32, 4) and int(y.max()) < 3
    stats = cs.update(cat, cat_space.noise(8, gen), generator=gen)
    assert torch.isfinite(stats["flow_loss"])


def test_sample_is_deterministic_under_seed():
    energy = MLPEnergy(Binary(6), hidden=(8,))
    sampler = make_sampler(6, fit_to="data")
    sampler.update(energy, Binary(6).noise(32, torch.Generator().manual_seed(1)))
    a = sampler.sample(energy, 20, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(energy, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_renoise_near_one_keeps_most_coordinates(gen):
    energy = MLPEnergy(Binary(20), hidden=(8,))
    sampler = make_sampler(20)
    x0 = Binary(20).noise(200, gen)
    x = sampler.sample(energy, x0=x0, t0=0.9, generator=gen)
    changed = (x != x0).float().mean().item()
    # 10% of coordinates are re-masked, an untrained flow redraws them uniformly: ~5% change
    assert 0.03 < changed < 0.07, changed


def test_posterior_objective_trains(gen):
    states, p = mixture_8bit()
    path = MixturePath(2, "mask")
    torch.manual_seed(0)
    sampler = DiscreteFlowSampler(MLPVelocity(8, 2, hidden=(64,)), path, objective="posterior", lr=5e-3,
                                  fit_to="data")
    energy = MLPEnergy(Binary(8), hidden=(4,))
    first = None
    for _ in range(100):
        data = states[torch.multinomial(p, 128, replacement=True, generator=gen)]
        loss = sampler.update(energy, data, generator=gen)["flow_loss"]
        first = loss if first is None else first
    assert loss < first
    x = sampler.sample(energy, 10, generator=gen)
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_bad_inputs(gen):
    sampler = make_sampler(4)
    cont = MLPEnergy(Continuous(4), hidden=(8,))
    assert not sampler.supports(cont)
    with pytest.raises(ValueError, match="cannot sample"):
        sampler.sample(cont, 3)
    with pytest.raises(ValueError, match="cannot sample"):
        sampler.sample(MLPEnergy(Binary(5), hidden=(8,)), 3)
    binary = MLPEnergy(Binary(4), hidden=(8,))
    with pytest.raises(ValueError, match="outside"):
        make_sampler(4, fit_to="data").update(binary, torch.full((3, 4), 2.0))
    with pytest.raises(ValueError, match="fit_to"):
        make_sampler(4, fit_to="dat")
    with pytest.raises(ValueError, match="scale_by_rate"):
        make_sampler(4, scale_by_rate=True)  # the model already scales by its schedule
    with pytest.raises(ValueError, match="jump"):
        CTMCSolver(MixturePath(2), 0.1, jump="euler")
    with pytest.raises(ValueError, match="t0"):
        sampler.sample(binary, x0=torch.zeros(2, 4), t0=1.5)
    with pytest.raises(ValueError, match="VelocityModel"):
        DiscreteFlowSampler(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="objective"):
        DiscreteFlowSampler(MLPVelocity(4), objective="kl")
    with pytest.raises(ValueError, match="smoothing"):
        FactorizedProposal.fit(torch.zeros(3, 4, dtype=torch.long), 2, smoothing=-1.0)

    class NanEnergy(EnergyModel):
        def __init__(self):
            super().__init__(Binary(4))

        def energy(self, x):
            return torch.full((x.shape[0],), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        sampler.update(NanEnergy(), generator=gen)


def test_fitted_proposal_matches_marginals(gen):
    x = torch.tensor([[0, 1], [0, 1], [1, 1], [0, 0]])
    q = FactorizedProposal.fit(x, 2, smoothing=0.0)
    assert torch.allclose(q.probs, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    draws = q.sample(20_000, generator=gen)
    assert abs(draws[:, 0].float().mean().item() - 0.25) < 0.015
    assert torch.allclose(q.log_prob(torch.tensor([[1, 1]])), torch.log(torch.tensor([0.25 * 0.75])))


def test_no_host_reads_between_checks_on_an_accelerator():
    """On the meta device any read of a value raises, so it stands in for an accelerator where a
    read would synchronise: data-free updates read their checks only at the first update and
    every ``check_every``-th; sampling and the path's input checks read nothing."""
    energy = MLPEnergy(Binary(6), hidden=(8,)).to("meta")
    flow = DiscreteFlowSampler(MLPVelocity(6, 2, hidden=(8,)), check_every=5).to("meta")
    flow.optimizer = torch.optim.SGD(flow.model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="meta"):
        flow.update(energy)  # update 1: checked (read)
    for _ in range(3):
        stats = flow.update(energy)  # updates 2-4: no read
        assert stats["ess"].device.type == "meta"
    with pytest.raises(NotImplementedError, match="meta"):
        flow.update(energy)  # update 5: checked
    x = flow.sample(energy, 4)
    assert x.shape == (4, 6) and x.device.type == "meta"
    tokens = torch.zeros(3, 6, dtype=torch.long, device="meta")
    flow.path.check_tokens(tokens)
    flow.path.sample(tokens, torch.full((3,), 0.5, device="meta"))
    flow.path.conditional_velocity(tokens, tokens, torch.full((3,), 0.5, device="meta"))


def test_checks_on_cpu_every_update(gen):
    """On the CPU reading costs no synchronisation: a NaN energy is caught at any update."""
    calls = {"n": 0}

    class LateNan(EnergyModel):
        def __init__(self):
            super().__init__(Binary(4))

        def energy(self, x):
            calls["n"] += 1
            bad = float("nan") if calls["n"] == 3 else 0.0
            return torch.full((x.shape[0],), bad)

    sampler = make_sampler(4, check_every=100)
    sampler.update(LateNan(), generator=gen)
    sampler.update(LateNan(), generator=gen)
    with pytest.raises(ValueError, match="NaN"):
        sampler.update(LateNan(), generator=gen)


def test_cd_with_flow_negatives_learns_from_the_energy(gen):
    """The default ``fit_to="energy"``: a data batch given to ``update`` (as the Trainer does)
    does not pull the flow towards the data; the flow follows the energy instead."""
    energy = IsingEnergy.lattice(2, 0.2)  # 4 spins
    p = energy.probabilities()
    sampler = make_sampler(4, batch_size=256)
    data = torch.zeros(64, 4)  # one state only: a data-fitted flow would put all its mass there
    for _ in range(200):
        sampler.update(energy, data, generator=gen)
    law = euler_law(sampler.velocity, sampler.solver, 4)
    assert law[0] < p[0] + 0.05, (law[0], p[0])
    assert 0.5 * (law - p).abs().sum().item() < 0.1
