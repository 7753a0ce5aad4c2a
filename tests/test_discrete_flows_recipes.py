"""The three EBM training recipes on the 32-bit Gray-coded toy, and exactness of the
back-and-forth Metropolis-Hastings move on an enumerable target."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ebmflow.data import gray_encode, toy_2d
from ebmflow.discrete_flows import (
    BackAndForth,
    BootstrapFlow,
    DiscreteFlowSampler,
    FlowNegatives,
    MixturePath,
    MLPVelocity,
    ebm_step,
)
from ebmflow.energy import IsingEnergy, MLPEnergy
from ebmflow.losses import ContrastiveDivergence
from ebmflow.spaces import Binary


@torch.no_grad()
def nll_uniform_is(energy, data, n, generator):
    """NLL = mean E(data) + log Z, log Z by importance sampling over uniform bit strings."""
    d = data.shape[1]
    u = Binary(d).noise(n, generator)
    log_z = torch.logsumexp(-energy(u), 0) - math.log(n) + d * math.log(2)
    return (energy(data).mean() + log_z).item()


def build(recipe: str, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    energy = MLPEnergy(Binary(32), hidden=(hidden, hidden))
    path = MixturePath(2, "mask")
    flow = DiscreteFlowSampler(MLPVelocity(32, 2, hidden=(hidden, hidden), schedule=path.schedule),
                               path, lr=1e-3, batch_size=128)
    sampler = {"negatives": lambda: FlowNegatives(flow, k=1),
               "bootstrap": lambda: BootstrapFlow(flow, n_steps=5),
               "back_and_forth": lambda: BackAndForth(flow, t_star=0.5)}[recipe]()
    return energy, sampler


def run_recipe(recipe: str, steps: int, hidden: int, gen: torch.Generator):
    energy, sampler = build(recipe, hidden)
    loss = ContrastiveDivergence(alpha=0.1)
    opt = torch.optim.Adam(energy.parameters(), lr=1e-3)
    test = gray_encode(toy_2d("2spirals", 2000, gen))
    before = nll_uniform_is(energy, test, 20_000, gen)
    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LowESSWarning is expected once the EBM sharpens
        for _ in range(steps):
            batch = gray_encode(toy_2d("2spirals", 128, gen))
            stats = ebm_step(energy, loss, sampler, batch, opt, gen)
    after = nll_uniform_is(energy, test, 20_000, gen)
    return before, after, stats


@pytest.mark.parametrize("recipe", ["negatives", "bootstrap", "back_and_forth"])
def test_recipe_runs_end_to_end(recipe, gen):
    before, after, stats = run_recipe(recipe, 3, 32, gen)
    assert math.isfinite(before) and math.isfinite(after)
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert {"loss", "energy_pos", "energy_neg", "flow_loss"} <= set(stats)
    if recipe == "negatives":
        assert "ess" in stats
    if recipe == "back_and_forth":
        assert 0.0 <= stats["accept_rate"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["negatives", "bootstrap", "back_and_forth"])
def test_recipe_improves_nll(recipe, gen):
    before, after, _ = run_recipe(recipe, 400, 128, gen)
    assert after < before - 0.3, (before, after)  # uniform model: 22.18 nats


def test_back_and_forth_move_keeps_target_invariant(gen):
    """Exact samples of a 4-bit target stay exact after one MH move with an arbitrary flow."""
    energy = IsingEnergy.lattice(2, 0.4, bias=0.3)  # 4 bits, exact probabilities
    p = energy.probabilities()
    torch.manual_seed(3)
    path = MixturePath(2, "mask")
    model = MLPVelocity(4, 2, hidden=(16,), schedule=path.schedule)
    torch.nn.init.normal_(model.net[-1].weight, std=1.0)  # an arbitrary (untrained) velocity
    flow = DiscreteFlowSampler(model, path)
    move = BackAndForth(flow, t_star=0.4)
    n = 40_000
    x0 = energy.sample(n, generator=gen)
    x, accept = move.mh_move(energy, x0, gen)
    assert 0.05 < accept.float().mean() < 0.95  # the move does something
    codes = (x * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(-1).long()
    freq = torch.bincount(codes, minlength=16).float() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * se + 1e-4).all(), (freq, p)


def test_recipe_bad_inputs():
    path = MixturePath(2, "uniform")
    flow = DiscreteFlowSampler(MLPVelocity(4, 2, hidden=(8,)), path)
    with pytest.raises(ValueError, match="mask source"):
        BackAndForth(flow)
    mask_flow = DiscreteFlowSampler(MLPVelocity(4, 2, hidden=(8,)))
    with pytest.raises(ValueError, match="t_star"):
        BackAndForth(mask_flow, t_star=1.0)
    with pytest.raises(ValueError, match="k must"):
        FlowNegatives(mask_flow, k=0)
    with pytest.raises(ValueError, match="needs a data batch"):
        BackAndForth(mask_flow).update(MLPEnergy(Binary(4), hidden=(8,)))
    with pytest.raises(ValueError, match="DiscreteFlowSampler"):
        FlowNegatives(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
