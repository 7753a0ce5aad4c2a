"""CTMC step kernels against closed forms, the exact marginal of the path, the posterior at the
last step and (when installed) flow_matching's ``MixtureDiscreteEulerSolver``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ebmflow.discrete_flows import (
    CTMCSolver,
    DiscreteFlowSampler,
    LinearSchedule,
    MixturePath,
    PolynomialSchedule,
    VelocityModel,
)
from ebmflow.discrete_flows.solver import JUMP_METHODS, time_grid
from ebmflow.energy import MLPEnergy
from ebmflow.spaces import Categorical

S = 3
SCHEDULES = [LinearSchedule(), PolynomialSchedule(2.0), PolynomialSchedule(3.0)]


def all_tokens(vocab: int, dim: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab), repeat=dim)), dtype=torch.long).reshape(-1, dim)


def target(dim: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.rand(S**dim, generator=torch.Generator().manual_seed(seed)) + 0.1
    return all_tokens(S, dim), (p / p.sum()).double()


def likelihood(path: MixturePath, states: torch.Tensor, support: torch.Tensor, t: float) -> torch.Tensor:
    """p_t(x_t | x1) for every (x_t, x1) pair, ``(N_states, N_support)`` float64, from the
    definition of the path: each coordinate is x1 w.p. kappa(t), else a source draw."""
    kappa = float(path.schedule.kappa(torch.tensor(t, dtype=torch.float64)))
    same = (states[:, None, :] == support[None]).double()
    if path.mask_token is not None:
        p0 = (states == path.mask_token).double()[:, None, :].expand_as(same)
    else:
        p0 = torch.full_like(same, 1.0 / S)
    return (kappa * same + (1 - kappa) * p0).prod(-1)


def path_marginal(path, states, support, probs, t) -> torch.Tensor:
    """p_t(x) = sum_x1 p(x1) p_t(x | x1) over ``states``."""
    return likelihood(path, states, support, t) @ probs


def posterior_marginals(path, states, support, probs, t) -> torch.Tensor:
    """p(x1^d = j | x_t) ``(N, D, S)`` by Bayes' rule over the enumerated support."""
    joint = likelihood(path, states, support, t) * probs[None]
    post = (joint / joint.sum(-1, keepdim=True)).nan_to_num(0.0)  # zero rows: p_t(x_t) = 0
    onehot = torch.nn.functional.one_hot(support, S).double()  # (M, D, S)
    return torch.einsum("nm,mds->nds", post, onehot)


def chain_law_errors(path, solver, support, probs) -> list[float]:
    """TV between the exact law of the chain driven by the exact marginal velocity and the
    path's marginal p_t, at every grid time after the start."""
    dim = support.shape[1]
    states = all_tokens(path.vocab_size, dim)
    dist = path_marginal(path, states, support, probs, 0.0)
    times = time_grid(0.0, solver.dt)
    errors = []
    for k in range(len(times) - 1):
        t, dt = times[k], times[k + 1] - times[k]
        u = path.marginal_velocity(states, t, support, probs.float())
        p = solver.step_probs(u, states, t, dt, last=k == len(times) - 2).double()
        trans = torch.ones(len(states), len(states), dtype=torch.float64)
        for d in range(dim):
            trans = trans * p[:, d, states[:, d]]
        dist = dist @ trans
        exact = path_marginal(path, states, support, probs, times[k + 1])
        errors.append(0.5 * (dist - exact).abs().sum().item())
    return errors


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("t,dt", [(0.0, 0.001), (0.3, 0.05), (0.5, 0.2), (0.6, 0.25)])
def test_kernels_match_their_closed_forms(source, t, dt):
    """Off-diagonal P(j) = q p(x1^d = j | x_t) with q = (kappa(t+dt) - kappa(t)) / (1 - kappa(t))
    (exact), 1 - exp(-r dt) (exponential) and r dt (linear), r = kappa'/(1 - kappa)."""
    path = MixturePath(S, source, PolynomialSchedule(2.0) if t > 0 else LinearSchedule())
    support, probs = target(2)
    states = all_tokens(path.vocab_size, 2)
    u = path.marginal_velocity(states, t, support, probs.float())
    post = posterior_marginals(path, states, support, probs, t)
    sched = path.schedule
    kappa, kappa_next = (float(sched.kappa(torch.tensor(v, dtype=torch.float64))) for v in (t, t + dt))
    rate = float(sched.d_kappa(torch.tensor(t, dtype=torch.float64))) / (1 - kappa)
    jump = {
        "exact": (kappa_next - kappa) / (1 - kappa),
        "exponential": -math.expm1(-rate * dt),
        "linear": rate * dt,
    }
    reachable = path_marginal(path, states, support, probs, t) > 0
    active = path.active(states)[..., None] & path.off_diagonal(states) & reachable[:, None, None]
    for method in JUMP_METHODS:
        probs_k = CTMCSolver(path, dt, jump=method).step_probs(u, states, t, dt).double()[..., :S]
        want = jump[method] * post
        assert (probs_k - want)[active].abs().max() < 1e-6, method
    lin = CTMCSolver(path, dt, jump="linear").step_probs(u, states, t, dt)
    exp = CTMCSolver(path, dt, jump="exponential").step_probs(u, states, t, dt)
    gap = (lin - exp)[..., :S][active].abs().max().item()
    # the two kernels differ by (r dt - 1 + exp(-r dt)) p ~ (r dt)^2 / 2 p
    assert gap == pytest.approx((rate * dt + math.expm1(-rate * dt)) * post[active].max().item(), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("jump", JUMP_METHODS)
@pytest.mark.parametrize("t0,h", [(0.0, 0.05), (0.33, 0.3), (0.0, 0.5)])
def test_last_step_samples_the_posterior(source, schedule, jump, t0, h):
    """The step that ends at t = 1 draws each coordinate from p(x1^d | x_t): no source token
    survives and the kernel equals the posterior to float precision."""
    path = MixturePath(S, source, schedule)
    support, probs = target(2)
    states = all_tokens(path.vocab_size, 2)
    times = time_grid(t0, h)
    t, dt = times[-2], times[-1] - times[-2]
    u = path.marginal_velocity(states, t, support, probs.float())
    kernel = CTMCSolver(path, h, jump=jump).step_probs(u, states, t, dt, last=True).double()
    post = posterior_marginals(path, states, support, probs, t)
    assert (kernel[..., :S] - post).abs().max() < 1e-6
    assert torch.allclose(kernel.sum(-1), torch.ones((), dtype=torch.float64))


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_exact_jump_tracks_the_path_marginal_better(source):
    """Law of the chain vs the exact marginal p_t of the path at every grid time (exact
    marginal velocity, kappa = t^2, h = 0.05; worst TV over the grid).

    One coordinate: with the mask source the exact jump follows p_t up to the first step's
    kappa(h) = h^2 (at t = 0 the velocity kappa'(0) p vanishes, so no step can see the
    posterior there; the posterior of a masked coordinate never changes afterwards), and within
    1e-3 with the uniform one; the first-order and exponential kernels are off by 1-5e-2. Two coordinates (the posterior moves as the other
    coordinate jumps): measured 0.010 / 0.032 / 0.087 (mask) and 0.0175 / 0.0171 / 0.028
    (uniform) for exact / linear / exponential.
    """
    path = MixturePath(S, source, PolynomialSchedule(2.0))
    worst = {}
    for dim in (1, 2):
        support, probs = target(dim)
        for method in JUMP_METHODS:
            worst[dim, method] = max(chain_law_errors(path, CTMCSolver(path, 0.05, jump=method), support, probs))
    if source == "mask":
        assert worst[1, "exact"] < 0.05**2 + 1e-6, worst
        assert worst[2, "exact"] < 0.5 * worst[2, "linear"], worst
    else:
        assert worst[1, "exact"] < 1e-3, worst
        assert worst[2, "exact"] < 1.05 * worst[2, "linear"], worst
    assert worst[1, "exact"] < 0.2 * worst[1, "linear"], worst
    assert worst[1, "linear"] > 5e-3 and worst[1, "exponential"] > 5e-3, worst
    assert worst[2, "exact"] < 0.8 * worst[2, "exponential"], worst


class _TableModel(VelocityModel):
    """Exact answers by enumeration: posterior logits (objective "posterior") or the bounded
    velocity u / rate (objective "velocity" with scale_by_rate)."""

    def __init__(self, path, support, probs, kind):
        super().__init__(support.shape[1], S)
        self.path, self.support, self.probs, self.kind = path, support, probs, kind
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the sampler builds an optimiser

    def forward(self, x_t, t):
        t0 = float(t[0])
        if self.kind == "posterior":
            return posterior_marginals(self.path, x_t, self.support, self.probs, t0).clamp_min(1e-30).log().float()
        rate = self.path.schedule.rate(t)[:, None, None]
        return self.path.marginal_velocity(x_t, t0, self.support, self.probs.float()) / rate


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("objective", ["velocity", "posterior"])
def test_sampler_velocity_and_last_step_for_both_model_kinds(source, objective):
    path = MixturePath(S, source, PolynomialSchedule(2.0))
    support, probs = target(2)
    model = _TableModel(path, support, probs, objective)
    flow = DiscreteFlowSampler(model, path, CTMCSolver(path, 0.05), objective=objective)
    states = all_tokens(path.vocab_size, 2)
    for t in (0.3, 0.95):
        tt = torch.full((len(states),), t)
        exact = path.marginal_velocity(states, t, support, probs.float())
        assert torch.allclose(flow.velocity(states, tt), exact, atol=1e-4)
    u = flow.velocity(states, torch.full((len(states),), 0.95))
    kernel = flow.solver.step_probs(u, states, 0.95, 0.05, last=True).double()
    assert (kernel[..., :S] - posterior_marginals(path, states, support, probs, 0.95)).abs().max() < 1e-5
    x = flow.sample(MLPEnergy(Categorical(2, S), hidden=(4,)), 64, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.long and int(x.max()) < S


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_exponential_kernel_matches_flow_matching(source):
    """One step of flow_matching's MixtureDiscreteEulerSolver (x1 ~ posterior, jump w.p.
    1 - exp(-r h)) from fixed states with a fixed posterior model, against our kernel."""
    pytest.importorskip("flow_matching")
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    path = MixturePath(S, source, PolynomialSchedule(2.0))
    v = path.vocab_size
    post = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05], [0.3, 0.3, 0.4]])
    x_state = torch.tensor([v - 1, 0, 2, 1]) if source == "mask" else torch.tensor([0, 1, 2, 2])
    if source == "mask":
        x_state = torch.full((4,), path.mask_token)

    class Fixed(ModelWrapper):
        def __init__(self):
            super().__init__(None)

        def forward(self, x, t, **extras):
            full = torch.zeros(x.shape[0], x.shape[1], v)
            full[..., :S] = post
            return full

    n, t, h = 200_000, 0.5, 0.3  # r h = 0.4: the kernels differ by ~0.08 p
    torch.manual_seed(0)
    fm = MixtureDiscreteEulerSolver(Fixed(), MixtureDiscreteProbPath(PolynomialConvexScheduler(2.0)), v)
    out = fm.sample(x_state.expand(n, 4).clone(), step_size=None, time_grid=torch.tensor([t, t + h, 1.0]),
                    return_intermediates=True)[1]
    freq = torch.nn.functional.one_hot(out, v).double().mean(0)  # (4, V)
    xs = x_state[None]
    u = path.posterior_to_velocity(post.log()[None], xs, t)
    for method, should_match in (("exponential", True), ("linear", False)):
        kernel = CTMCSolver(path, h, jump=method).step_probs(u, xs, t, h)[0].double()
        se = (kernel * (1 - kernel) / n).sqrt()
        close = bool(((freq - kernel).abs() < 5 * se + 1e-4).all())
        assert close == should_match, (method, freq, kernel)


def test_jump_scale_is_host_side_and_finite_at_zero_rate():
    path = MixturePath(S, "uniform", PolynomialSchedule(2.0))  # kappa'(0) = 0
    for method in JUMP_METHODS:
        solver = CTMCSolver(path, 0.1, jump=method)
        assert solver.jump_scale(0.0, 0.1) == pytest.approx(0.1)
        assert isinstance(solver.jump_scale(0.5, 0.1), float)
