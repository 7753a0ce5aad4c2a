"""FlowMC: exact independence-MH acceptance, mode-weight recovery where MALA fails (with a
RealNVP and with a continuous normalizing flow), persistent state, and clear errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy, TiltedEnergy
from ebmflow.flows import ContinuousFlow, Flow, FlowMC, RealNVP
from ebmflow.samplers import MALA
from ebmflow.spaces import Binary, Continuous

W_HEAVY = 2 / 3


def _target() -> GaussianMixtureEnergy:
    """Modes at (-4, 0) (weight 2/3) and (4, 0) (weight 1/3), unit scale: MALA cannot cross."""
    return GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)


def _heavy_fraction(x: Tensor) -> float:
    return float((x[:, 0] < 0).float().mean())


def _tol(n: int, p: float = W_HEAVY) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


class MixtureFlow(Flow):
    """A 'flow' that is exactly a Gaussian mixture (exact sampler and density, no map)."""

    def __init__(self, mixture: GaussianMixtureEnergy):
        super().__init__(mixture.space.dim)
        self.mixture = mixture

    def log_prob(self, x: Tensor) -> Tensor:
        return self.mixture.log_prob(x)

    def sample_and_log_prob(self, n, generator=None):
        x = self.mixture.sample(n, generator)
        return x, self.mixture.log_prob(x)


class LinearVelocity(nn.Module):
    """v(t, x) = a * x + b: the CNF map is x = e^a z + b (e^a - 1) / a, a Gaussian."""

    def __init__(self, a: Tensor, b: Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)

    def forward(self, t, x):
        return self.a * x + self.b


def test_global_acceptance_is_one_when_flow_equals_target(gen):
    target = _target()
    sampler = FlowMC(MixtureFlow(target), MALA(0.5), n_local=0, n_global=3, flow_steps=0)
    x0 = torch.tensor([-4.0, 0.0]).expand(2000, 2).clone()  # all chains in the heavy mode
    x = sampler.sample(target, x0=x0, generator=gen)
    assert float(sampler.stats["global_accept"]) == 1.0
    # every chain now holds an exact independent draw: the weights are right after one round
    assert abs(_heavy_fraction(x) - W_HEAVY) < _tol(2000)


@pytest.mark.parametrize("kind", ["realnvp", "cnf"])
def test_gaussian_flow_exact_acceptance(kind, gen):
    mean, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    target = GaussianMixtureEnergy(mean[None], scale[None])
    if kind == "realnvp":
        flow = RealNVP(2, n_layers=2, loc=mean, scale=scale)
    else:  # linear velocity: e^a = scale, b (e^a - 1) / a = mean
        a = scale.log()
        flow = ContinuousFlow(2, LinearVelocity(a, mean * a / (scale - 1)), n_steps=8)
    sampler = FlowMC(flow, MALA(0.1), n_local=2, n_global=4, flow_steps=0)
    x = sampler.sample(target, 500, generator=gen)
    assert x.shape == (500, 2)
    assert float(sampler.stats["global_accept"]) > 0.999
    assert 0.0 < float(sampler.stats["local_accept"]) <= 1.0
    assert sampler.chain_stats["global_accept"].shape == (500,)


def _fit_rounds(sampler: FlowMC, target, x0, gen, adapt_rounds: int, rounds: int) -> Tensor:
    sampler.sample(target, x0=x0, generator=gen, n_rounds=1)
    for _ in range(adapt_rounds):
        sampler.update(target, generator=gen)
        sampler.sample(target, generator=gen, n_rounds=1)
    return sampler.sample(target, generator=gen, n_rounds=rounds)


@pytest.mark.parametrize("kind", ["realnvp", "cnf"])
def test_flowmc_recovers_mode_weights_where_mala_fails(kind, gen):
    target = _target()
    n = 600
    # chains start with the wrong weights (1:1), one half in each mode
    x0 = torch.cat([torch.tensor([-4.0, 0.0]).expand(n // 2, 2),
                    torch.tensor([4.0, 0.0]).expand(n // 2, 2)])
    x0 = x0 + 0.5 * torch.randn(n, 2, generator=gen)

    # MALA alone: weights stay where they started; from one mode it never finds the other
    mala = MALA(0.5)
    x_mala = mala.sample(target, x0=x0, n_steps=300, generator=gen)
    assert abs(_heavy_fraction(x_mala) - 0.5) < 0.02
    x_one = mala.sample(target, x0=x0[: n // 2], n_steps=300, generator=gen)
    assert _heavy_fraction(x_one) == 1.0
    assert float(mala.stats["accept_rate"]) > 0.3

    if kind == "realnvp":
        flow = RealNVP(2, n_layers=4, hidden=(32, 32))
        sampler = FlowMC(flow, MALA(0.5), n_local=5, n_global=5, lr=5e-3, flow_steps=10)
        x = _fit_rounds(sampler, target, x0, gen, adapt_rounds=15, rounds=4)
    else:  # the flow is fitted by flow matching; proposals and log q by the ODE (exact trace)
        flow = ContinuousFlow(2, hidden=(32, 32), n_steps=4)
        sampler = FlowMC(flow, MALA(0.5), n_local=5, n_global=3, lr=5e-3, flow_steps=40,
                         flow_loss="flow_matching")
        x = _fit_rounds(sampler, target, x0, gen, adapt_rounds=7, rounds=4)
    assert float(sampler.stats["global_accept"]) > 0.2
    assert abs(_heavy_fraction(x) - W_HEAVY) < _tol(n)
    assert "flow_loss" in sampler.stats


def test_update_reduces_flow_loss_and_can_freeze(gen):
    target = _target()
    sampler = FlowMC(RealNVP(2, n_layers=2, hidden=(16,)), MALA(0.5), n_local=1, n_global=1,
                     lr=1e-2, flow_steps=5, adapt_steps=10, flow_batch_size=128)
    assert sampler.update(target) == {}  # no chains yet, no data: nothing to fit
    data = target.sample(256, gen)
    first = sampler.update(target, data, generator=gen)["flow_loss"]
    assert sampler.chains.shape == (256, 2)  # chains start at the data
    second = sampler.update(target, generator=gen)["flow_loss"]
    assert float(second) < float(first)
    assert sampler.update(target) == {}  # frozen after adapt_steps=10 flow steps
    assert sampler.n_flow_updates == 10


def test_state_dict_round_trip_and_determinism(gen):
    target = _target()

    def make():
        torch.manual_seed(0)
        return FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), MALA(0.3), n_local=2, n_global=2,
                      flow_steps=2, n_chains=64)

    a = make()
    a.sample(target, generator=gen)
    a.update(target, generator=gen)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=False))
    torch.testing.assert_close(b.chains, a.chains)
    assert b.n_flow_updates == a.n_flow_updates == 2
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    xa = a.sample(target, 32, generator=torch.Generator().manual_seed(7))
    xb = b.sample(target, 32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(xa, xb)
    assert xa.shape == (32, 2)


def test_tilted_energy_with_flow_proposals(gen):
    """With E_tilt = E_theta - log q and E_theta = 0, flow proposals are always accepted."""
    flow = RealNVP(2, n_layers=2, hidden=(8,))
    zero = MLPEnergy(Continuous(2), hidden=(4,))
    with torch.no_grad():
        zero.net[-1].weight.zero_()
    tilted = TiltedEnergy(zero, flow)
    sampler = FlowMC(flow, MALA(0.3), n_local=1, n_global=2, flow_steps=0)
    sampler.sample(tilted, 100, generator=gen)
    assert float(sampler.stats["global_accept"]) > 0.9999


def test_clear_errors(gen):
    target = _target()
    with pytest.raises(ValueError, match="dim=3"):
        FlowMC(RealNVP(3), MALA(0.1)).sample(target, 4)
    with pytest.raises(ValueError, match="continuous"):
        FlowMC(RealNVP(2), MALA(0.1)).sample(MLPEnergy(Binary(2), hidden=(4,)), 4)
    with pytest.raises(ValueError, match="Flow"):
        FlowMC(nn.Linear(2, 2), MALA(0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MCMCSampler"):
        FlowMC(RealNVP(2), local=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flow_matching_loss"):
        FlowMC(RealNVP(2), MALA(0.1), flow_loss="flow_matching")
    sampler = FlowMC(RealNVP(2), MALA(0.1), n_chains=8)
    with pytest.raises(ValueError, match="n_chains"):
        sampler.sample(target, 16)

    class NaNFlow(MixtureFlow):
        def log_prob(self, x):
            return super().log_prob(x) * float("nan")

    bad = FlowMC(NaNFlow(target), MALA(0.1), n_local=0, n_global=1)
    with pytest.raises(ValueError, match="non-finite"):
        bad.sample(target, 8, generator=gen)
    lenient = FlowMC(NaNFlow(target), MALA(0.1), n_local=0, n_global=1, check_finite=False)
    lenient.sample(target, 8, generator=gen)
    assert float(lenient.stats["flow_nonfinite"]) == 1.0


def test_paper_recipe_is_a_trainer_composition(tmp_path, gen):
    """Trainer(TiltedEnergy(...), ContrastiveDivergence(...), FlowMC(...)): no special trainer."""
    from ebmflow.losses import ContrastiveDivergence
    from ebmflow.training import Trainer

    target = _target()
    data = target.sample(256, gen)
    flow = RealNVP(2, n_layers=2, hidden=(16,))
    energy = TiltedEnergy(MLPEnergy(Continuous(2), hidden=(16,)), flow)
    sampler = FlowMC(flow, MALA(0.3), n_local=2, n_global=2, flow_steps=2)
    trainer = Trainer(energy, ContrastiveDivergence(alpha=0.1), sampler, lr=1e-3, seed=0,
                      progress=False, quiet=True, log_every=2, tensorboard=False)
    before = [p.detach().clone() for p in flow.parameters()]
    record = trainer.fit(data, steps=4, batch_size=64)
    assert math.isfinite(record["loss"])
    assert sampler.chains.shape == (64, 2)
    assert sampler.n_flow_updates == 8  # FlowMC.update ran at every step, with its optimiser
    assert any((a != b).any() for a, b in zip(before, flow.parameters()))
    assert 0.0 <= float(sampler.stats["global_accept"]) <= 1.0


def _quadrature_heavy(energy, box: float = 9.0, n: int = 120) -> float:
    """Weight of the x < 0 half-plane under p ∝ exp(-E), by quadrature on an n x n grid."""
    lin = torch.linspace(-box, box, n)
    pts = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        p = torch.softmax(-energy(pts), 0)
    return float(p[pts[:, 0] < 0].sum())


def _train_two_modes_flowmc(iters: int, gen) -> tuple[list[float], list[float], FlowMC]:
    """CD (alpha = 0) training of an MLP energy on the 2:1 mixture with flowMC negatives
    (persistent chains started at the data). Every 25 iterations after the first half: the
    learned heavy-mode weight and the fraction of negatives in the heavy mode."""
    from ebmflow.losses import ContrastiveDivergence

    torch.manual_seed(0)
    target = _target()
    data = target.sample(4096, gen)
    model = MLPEnergy(Continuous(2), hidden=(64, 64))
    flow = RealNVP(2, n_layers=4, hidden=(32, 32)).init_from_data(data)
    # MALA keeps adapting while the energy is learned: adapted only on the flat initial
    # energy its step size grows to ~100 and local moves are never accepted
    sampler = FlowMC(flow, MALA(0.1, n_warmup=5 * iters), n_local=5, n_global=10, lr=2e-3)
    sampler.update(model, data[:256].clone())
    loss_fn = ContrastiveDivergence(alpha=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights, fractions = [], []
    for it in range(1, iters + 1):
        if it > 1:
            sampler.update(model, generator=gen)
        x_pos = data[torch.randint(0, data.shape[0], (256,), generator=gen)]
        out = loss_fn(model, x_pos, sampler, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if it > iters // 2 and it % 25 == 0:
            weights.append(_quadrature_heavy(model))
            fractions.append(_heavy_fraction(out.x_neg))
    return weights, fractions, sampler


@pytest.mark.slow
def test_flowmc_training_keeps_the_heavy_mode_weight(gen):
    """The paper's motivating example, short: CD + flowMC negatives keeps the learned weight of
    the heavy mode at 2/3 (mean over the second half of 400 iterations), with substantial
    global and local acceptance; the negatives' mode fraction stays within binomial error
    of 2/3."""
    weights, fractions, sampler = _train_two_modes_flowmc(400, gen)
    assert float(sampler.stats["global_accept"]) > 0.3
    assert float(sampler.stats["local_accept"]) > 0.2
    assert abs(sum(fractions) / len(fractions) - W_HEAVY) < _tol(256 * len(fractions)) + 0.02
    assert abs(sum(weights) / len(weights) - W_HEAVY) < 0.06, weights
