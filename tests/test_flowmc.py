"""FlowMC: exact independence-MH acceptance, mode-weight recovery where MALA fails (with a
RealNVP and with a continuous normalizing flow), persistent state, and clear errors."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy, TiltedEnergy
from ebmflow.flows import ContinuousFlow, Flow, FlowMC, RealNVP
from ebmflow.samplers import MALA, Langevin
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
        flow = ContinuousFlow(2, LinearVelocity(a, mean * a / (scale - 1)), ode_steps=8)
    sampler = FlowMC(flow, MALA(0.1), n_local=2, n_global=4, flow_steps=0)
    x = sampler.sample(target, 500, generator=gen)
    assert x.shape == (500, 2)
    assert float(sampler.stats["global_accept"]) > 0.999
    assert 0.0 < float(sampler.stats["local_accept"]) <= 1.0
    assert sampler.chain_stats["global_accept"].shape == (500,)


def _perturbed_realnvp(seed: int = 0) -> RealNVP:
    torch.manual_seed(seed)
    flow = RealNVP(2, n_layers=2, hidden=(8,), loc=torch.tensor([-1.0, 0.0]),
                   scale=torch.tensor([4.0, 1.2]))
    with torch.no_grad():  # a flow that is not the identity, so acceptances vary
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def _reference_independence_mh(flow, target, x, n_global, per_call, gen):
    """Textbook loop: uniforms (n_global, B) first, then proposals per_call * B at a time,
    each accepted when log u < f(x') - f(x) + log q(x) - log q(x'), f = -E."""
    b = x.shape[0]
    log_u = torch.rand(n_global, b, generator=gen).log()
    f, lq, n_acc = -target(x), flow.log_prob(x), torch.zeros(b)
    for k0 in range(0, n_global, per_call):
        k = min(per_call, n_global - k0)
        xp_all, lqp_all = flow.sample_and_log_prob(k * b, gen)
        for j in range(k):
            xp, lqp = xp_all[j * b:(j + 1) * b], lqp_all[j * b:(j + 1) * b]
            fp = -target(xp)
            acc = log_u[k0 + j] < fp - f + lq - lqp
            x = torch.where(acc[:, None], xp, x)
            f, lq = torch.where(acc, fp, f), torch.where(acc, lqp, lq)
            n_acc += acc
    return x, n_acc / n_global


@pytest.mark.parametrize("batch", [None, 128, 64])  # 5, 2 and 1 proposals per flow call
def test_global_moves_equal_a_hand_written_independence_sampler(batch):
    """Batched proposals + index bookkeeping give exactly the textbook chain (same random
    numbers): same states, same per-chain acceptance."""
    target, flow = _target(), _perturbed_realnvp()
    x0 = target.sample(64, torch.Generator().manual_seed(1))
    sampler = FlowMC(flow, MALA(0.1), n_local=0, n_global=5, flow_steps=0,
                     proposal_batch_size=batch)
    with torch.no_grad():
        x = sampler.sample(target, x0=x0, generator=torch.Generator().manual_seed(2))
        per_call = 5 if batch is None else batch // 64
        x_ref, acc_ref = _reference_independence_mh(flow, target, x0, 5, per_call,
                                                    torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(sampler.chain_stats["global_accept"], acc_ref)
    assert 0.1 < float(acc_ref.mean()) < 0.9  # the test exercises accepts and rejects


def test_local_kernel_energy_cache_is_reused_only_when_valid(gen):
    target = _target()
    x0 = target.sample(32, gen)
    mala = FlowMC(_perturbed_realnvp(), MALA(0.3), n_local=3, n_global=0)
    with torch.no_grad():
        x = mala.local.run(target, x0, 3, generator=gen)
        torch.testing.assert_close(mala._cached_energy(x), target(x))
        assert mala._cached_energy(x.clone()) is None  # not the state the kernel ended at
        ula = FlowMC(_perturbed_realnvp(), Langevin(0.01), n_local=3, n_global=0)
        x = ula.local.run(target, x0, 3, generator=gen)
        assert ula._cached_energy(x) is None  # ULA caches no energy: FlowMC recomputes it


def test_nonfinite_proposal_states_are_rejected(gen):
    """A proposal with an infinite state (finite log q) is never accepted, even for an
    energy that stays finite there; it is reported (or raised with check_finite)."""
    target = _target()

    class InfFlow(MixtureFlow):
        def sample_and_log_prob(self, n, generator=None):
            x, lq = super().sample_and_log_prob(n, generator)
            return x.index_fill(0, torch.arange(0, n, 2), math.inf), lq

    class Saturating(GaussianMixtureEnergy):
        def energy(self, x):  # finite at x = inf
            return torch.tanh(x.abs().sum(-1).nan_to_num())

    sat = Saturating(target.means, target.scales, target.weights)
    lenient = FlowMC(InfFlow(target), MALA(0.1), n_local=0, n_global=4, check_finite=False)
    x = lenient.sample(sat, 16, generator=gen)
    assert bool(torch.isfinite(x).all())
    assert float(lenient.stats["flow_nonfinite"]) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        FlowMC(InfFlow(target), MALA(0.1), n_local=0, n_global=1).sample(sat, 8, generator=gen)


def test_realnvp_functional_conditioner_honours_hooks(gen):
    """The hook-free fast path of the coupling network equals ``net(x)``; a forward hook on
    a sub-module makes the flow use the module call (the hook runs)."""
    flow = _perturbed_realnvp()
    z = torch.randn(16, 2, generator=gen)
    layer = flow.layers[0]
    torch.testing.assert_close(layer._conditioner(z), layer.net(z))
    with torch.no_grad():  # activations applied in place when no graph is recorded
        torch.testing.assert_close(layer._conditioner(z), layer.net(z))
    before = flow(z)[0]
    handle = layer.net[0].register_forward_hook(lambda mod, inp, out: out * 2.0)
    try:
        after = flow(z)[0]
    finally:
        handle.remove()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(flow(z)[0], before)
    layer.scale_bound = 1.5  # the cached b * (1 - m) follows the bound
    torch.testing.assert_close(layer.free_bound, 1.5 * (1 - layer.mask))


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

    # MALA alone: weights stay where they started; from one mode it (almost) never finds
    # the other (a barrier of about 8 nats: at most 1% of the chains are past x = 0)
    mala = MALA(0.5)
    x_mala = mala.sample(target, x0=x0, n_steps=300, generator=gen)
    assert abs(_heavy_fraction(x_mala) - 0.5) < 0.02
    x_one = mala.sample(target, x0=x0[: n // 2], n_steps=300, generator=gen)
    assert _heavy_fraction(x_one) >= 0.99
    assert float(mala.stats["accept_rate"]) > 0.3

    if kind == "realnvp":
        flow = RealNVP(2, n_layers=4, hidden=(32, 32))
        sampler = FlowMC(flow, MALA(0.5), n_local=5, n_global=5, lr=5e-3, flow_steps=10)
        x = _fit_rounds(sampler, target, x0, gen, adapt_rounds=15, rounds=4)
    else:  # the flow is fitted by flow matching; proposals and log q by the ODE (exact trace)
        flow = ContinuousFlow(2, hidden=(32, 32), ode_steps=4)
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
    with pytest.raises(ValueError, match="proposal_batch_size"):
        FlowMC(RealNVP(2), MALA(0.1), proposal_batch_size=0)

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
    """Trainer(TiltedEnergy(...), ContrastiveDivergence(...), FlowMC(...)): no special trainer.
    The flow is fitted to the data and frozen (flow_steps=0); FlowMC samples the tilted
    energy."""
    from ebmflow.losses import ContrastiveDivergence
    from ebmflow.training import Trainer

    target = _target()
    data = target.sample(256, gen)
    flow = RealNVP(2, n_layers=2, hidden=(16,)).init_from_data(data)
    flow.fit(data, 20, generator=gen)
    energy = TiltedEnergy(MLPEnergy(Continuous(2), hidden=(16,)), flow)
    sampler = FlowMC(flow, n_local=2, n_global=2, flow_steps=0)
    trainer = Trainer(energy, ContrastiveDivergence(alpha=0.1), sampler, lr=1e-3, seed=0,
                      progress=False, quiet=True, log_every=2, tensorboard=False)
    before = [p.detach().clone() for p in flow.parameters()]
    record = trainer.fit(data, steps=4, batch_size=64)
    assert math.isfinite(record["loss"])
    assert sampler.chains.shape == (64, 2)
    assert sampler.n_flow_updates == 0  # the flow stays frozen
    assert all((a == b).all() for a, b in zip(before, flow.parameters()))
    assert 0.0 <= float(sampler.stats["global_accept"]) <= 1.0


def test_fitting_the_tilting_flow_to_its_chains_warns(gen):
    """FlowMC.update on an energy tilted by FlowMC's own flow feeds the tilt back: warned once."""
    target = _target()
    flow = RealNVP(2, n_layers=2, hidden=(8,))
    energy = TiltedEnergy(MLPEnergy(Continuous(2), hidden=(8,)), flow)
    sampler = FlowMC(flow, n_local=1, n_global=1, check_every=0)
    with pytest.warns(RuntimeWarning, match="tilted by that same flow"):
        sampler.update(energy, target.sample(32, gen), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.update(energy, generator=gen)  # warned once only
        FlowMC(flow, n_local=1, n_global=1, check_every=0).update(target, target.sample(8, gen))


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


# -- chain history, flowMC's schedule, retuned local kernel ----------------------------------


def _one_sided(n: int, gen) -> Tensor:
    """n chains, all in the heavy mode."""
    return torch.tensor([-4.0, 0.0]) + torch.randn(n, 2, generator=gen)


def test_history_buffer_holds_the_last_snapshots(gen):
    target = _target()
    sampler = FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), MALA(0.3), n_local=2, n_global=2,
                     history=5, flow_steps=0)
    seen = []
    x = sampler.sample(target, x0=_one_sided(16, gen), generator=gen)
    for _ in range(3):  # 2 snapshots per round: after the local and after the global moves
        seen.append(x)
        x = sampler.sample(target, generator=gen)
    assert sampler._hist_len == 5 and sampler.history_states.shape == (5, 16, 2)
    train = sampler._training_set(gen)
    assert train.shape == (80, 2)
    # the newest snapshot is the current chains; each global-phase snapshot is a past state
    newest = sampler.history_states[(sampler._hist_pos - 1) % 5]
    torch.testing.assert_close(newest, sampler.chains)
    assert any(torch.equal(s, seen[-1]) for s in sampler.history_states)
    sampler.train_examples = 1000
    assert sampler._training_set(gen).shape == (1000, 2)
    sampler.reset()
    assert sampler._hist_len == 0 and sampler.history_states.numel() == 0


def test_flowmc_schedule_settings_and_freeze(gen):
    target = _target()
    sampler = FlowMC.flowmc_schedule(RealNVP(2, n_layers=2, hidden=(8,)), n_local=2,
                                     n_global=2, n_epochs=3, train_examples=500,
                                     batch_size=200, train_updates=2)
    assert isinstance(sampler.optimizer, torch.optim.AdamW)
    assert sampler.max_grad_norm == 1.0 and sampler.history == 100
    sampler.sample(target, x0=_one_sided(32, gen), generator=gen)
    assert sampler.update(target, generator=gen) != {}
    assert sampler.n_flow_updates == 9  # 3 epochs of ceil(500 / 200) = 3 minibatches
    sampler.update(target, generator=gen)
    assert sampler.frozen and sampler.update(target, generator=gen) == {}
    assert sampler.n_fits == 2


def test_flowmc_schedule_recovers_weights_from_one_sided_start(gen):
    """flowMC's schedule (history buffer, epochs, AdamW, clip 1) then production with the
    flow frozen: chains that all start in the heavy mode end with the 2:1 weights."""
    torch.manual_seed(0)
    target, n = _target(), 600
    sampler = FlowMC.flowmc_schedule(RealNVP(2, n_layers=4, hidden=(32, 32)), n_local=5,
                                     n_global=5, history=20, train_examples=2000,
                                     batch_size=500, n_epochs=3, train_updates=10)
    sampler.sample(target, x0=_one_sided(n, gen), generator=gen)
    for _ in range(10):
        sampler.update(target, generator=gen)
        sampler.sample(target, generator=gen)
    assert sampler.frozen
    x = sampler.sample(target, generator=gen, n_rounds=3)
    assert float(sampler.stats["global_accept"]) > 0.2
    assert abs(_heavy_fraction(x) - W_HEAVY) < _tol(n)


def test_default_local_kernel_is_retuned_after_each_fit(gen):
    """An energy that sharpens during training (scale 10, then 0.3): the default MALA
    (eta = 0.005, restarted adaptation after every fit) follows it and keeps local
    acceptance useful; a step size adapted on the flat energy only does not."""

    def run(retune: bool) -> float:
        wide = GaussianMixtureEnergy(torch.zeros(1, 2), torch.full((1, 2), 10.0))
        sharp = GaussianMixtureEnergy(torch.zeros(1, 2), torch.full((1, 2), 0.3))
        sampler = FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), n_local=10, n_global=1,
                         retune_local=retune, check_every=0)
        assert isinstance(sampler.local, MALA) and sampler.local.step_size == 0.005
        sampler.sample(wide, x0=torch.randn(128, 2, generator=gen), generator=gen)
        for energy in [wide] * 20 + [sharp] * 5:
            sampler.update(energy, generator=gen)
            sampler.sample(energy, generator=gen)
        return float(sampler.stats["local_accept"])

    assert run(True) > 0.3
    assert run(False) < 0.05


def test_continuous_flow_needs_an_exact_log_density(gen):
    """A Hutchinson trace (trace='auto' above 8 dimensions) or inconsistent forward/inverse
    ODE solves would break the invariance of the independence step: refused."""
    with pytest.raises(ValueError, match="trace='exact'"):
        FlowMC(ContinuousFlow(10))
    with pytest.raises(ValueError, match="trace='exact'"):
        FlowMC(ContinuousFlow(2, trace="hutchinson"))
    torch.manual_seed(0)
    coarse = ContinuousFlow(2, hidden=(16,), method="euler", ode_steps=2)
    with torch.no_grad():
        for p in coarse.parameters():
            p.add_(0.5 * torch.randn_like(p))
    sampler = FlowMC(coarse, MALA(0.1), n_local=1, n_global=1, flow_steps=0)
    with pytest.raises(ValueError, match="ode_steps"):
        sampler.sample(_target(), 8, generator=gen)
    # exact trace in 10-D: the flow equals the target, every proposal is accepted
    mean, scale = torch.linspace(-1, 1, 10), torch.linspace(0.5, 2.1, 10)
    a = scale.log()
    flow = ContinuousFlow(10, LinearVelocity(a, mean * a / (scale - 1)), ode_steps=8,
                          trace="exact")
    target = GaussianMixtureEnergy(mean[None], scale[None])
    ok = FlowMC(flow, MALA(0.05), n_local=1, n_global=2, flow_steps=0)
    x = ok.sample(target, 200, generator=gen)
    assert float(ok.stats["global_accept"]) > 0.999
    assert x.shape == (200, 10)


def test_health_checks_warn_on_collapse_runaway_and_exploding_loss(gen):
    target = _target()
    sampler = FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), MALA(0.1), n_local=1, n_global=1,
                     flow_steps=1, check_every=2)
    sampler.update(target, target.sample(64, gen), generator=gen)  # first check: reference
    sampler.chains = torch.full((64, 2), 1.0) + 1e-5 * torch.randn(64, 2, generator=gen)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        sampler.update(target, generator=gen)  # 2nd fit: checked
    sampler.chains = target.sample(64, gen)
    sampler.chains[0] = 1e5
    with pytest.warns(RuntimeWarning, match="ran away"):
        sampler.check_health()
    sampler.chains = target.sample(64, gen)
    with pytest.warns(RuntimeWarning, match="exploded"):
        sampler.check_health(torch.tensor(4.0e5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.check_health(torch.tensor(3.0))  # healthy: no warning


def test_health_check_before_chains_exist_and_with_one_chain(gen):
    sampler = FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), MALA(0.1), n_local=1, n_global=1)
    assert sampler.check_health() == {}  # no chains yet: nothing to read
    sampler.chains = torch.zeros(1, 2)  # a single chain has no spread: not "collapsed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sampler.check_health()
        sampler.chains = torch.ones(1, 2)
        sampler.check_health()
    assert out["spread"] == 0.0 and out["farthest"] == 0.0
