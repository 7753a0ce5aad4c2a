"""Mixture path, schedules, CTMC solver and losses against exact answers on tiny spaces."""

from __future__ import annotations

import itertools

import pytest
import torch

from ebmflow.discrete_flows import (
    CTMCSolver,
    LinearSchedule,
    MixturePath,
    PolynomialSchedule,
    posterior_loss,
    velocity_regression_loss,
)
from ebmflow.discrete_flows.solver import time_grid

D, S = 2, 3


def all_tokens(vocab: int, dim: int = D) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab), repeat=dim)), dtype=torch.long)


def target_probs() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    p = torch.rand(S**D, generator=g) + 0.1
    return p / p.sum()


def exact_euler_law(path: MixturePath, solver: CTMCSolver, support, probs) -> torch.Tensor:
    """Exact law of the Euler chain driven by the exact marginal velocity, over all input
    tokens (V^D states), by propagating the distribution through each step's transition."""
    states = all_tokens(path.vocab_size)
    idx = {tuple(s.tolist()): i for i, s in enumerate(states)}
    dist = torch.zeros(len(states), dtype=torch.float64)
    x0 = path.sample_source(1, D, torch.Generator().manual_seed(0))
    if path.mask_token is not None:
        dist[idx[tuple(x0[0].tolist())]] = 1.0
    else:
        dist[:] = 1.0 / len(states)
    times = time_grid(0.0, solver.dt)
    for k in range(len(times) - 1):
        t, dt = times[k], times[k + 1] - times[k]
        u = path.marginal_velocity(states, t, support, probs)
        p = solver.step_probs(u, states, t, dt, last=k == len(times) - 2).double()  # (N, D, V)
        # joint transition: product over coordinates of the per-coordinate jump law
        trans = torch.ones(len(states), len(states), dtype=torch.float64)
        for d in range(D):
            trans = trans * p[:, d, states[:, d]]
        dist = dist @ trans
    return dist


@pytest.mark.parametrize(
    "source,schedule",
    [("mask", LinearSchedule()), ("uniform", LinearSchedule()), ("mask", PolynomialSchedule(2.0))],
)
def test_euler_with_exact_velocity_converges_to_target(source, schedule):
    path = MixturePath(S, source, schedule)
    support, probs = all_tokens(S), target_probs()
    tvs = []
    for h in (0.2, 0.05, 0.01, 0.002):
        law = exact_euler_law(path, CTMCSolver(path, h), support, probs)
        states = all_tokens(path.vocab_size)
        data_rows = (states < S).all(-1)
        assert law[~data_rows].sum() < 1e-12  # no MASK survives the last step
        assert torch.allclose(law.sum(), torch.tensor(1.0, dtype=torch.float64))
        tvs.append(0.5 * (law[data_rows] - probs.double()).abs().sum().item())
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs
    assert tvs[-1] < 0.01, tvs
    # first-order method: TV shrinks roughly linearly in h
    assert tvs[-1] < tvs[1] / 10, tvs


def test_solver_samples_follow_exact_euler_law():
    path = MixturePath(S, "mask")
    solver = CTMCSolver(path, 0.25)
    support, probs = all_tokens(S), target_probs()
    law = exact_euler_law(path, solver, support, probs)
    law = law[(all_tokens(path.vocab_size) < S).all(-1)]
    n = 40_000
    g = torch.Generator().manual_seed(1)
    out = solver.sample(
        lambda x, t: path.marginal_velocity(x, float(t[0]), support, probs),
        path.sample_source(n, D),
        generator=g,
        return_log_prob=True,
    )
    codes = out.x[:, 0] * S + out.x[:, 1]
    freq = torch.bincount(codes, minlength=S**D).double() / n
    se = (law * (1 - law) / n).sqrt()
    assert ((freq - law).abs() < 5 * se + 1e-4).all(), (freq, law)
    assert torch.isfinite(out.log_prob).all() and (out.log_prob <= 0).all()


def test_path_log_prob_matches_trajectory_log_prob():
    path = MixturePath(S, "mask")
    solver = CTMCSolver(path, 0.1)
    support, probs = all_tokens(S), target_probs()
    vel = lambda x, t: path.marginal_velocity(x, float(t[0]), support, probs)  # noqa: E731
    out = solver.sample(vel, path.sample_source(64, D), generator=torch.Generator().manual_seed(2),
                        return_log_prob=True, return_trajectory=True)
    lp = solver.trajectory_log_prob(vel, out.trajectory)
    assert torch.allclose(lp, out.log_prob, atol=1e-5)


def test_path_marginal_matches_kappa(gen):
    path = MixturePath(4, "uniform", PolynomialSchedule(3.0))
    x1 = torch.zeros(20_000, 5, dtype=torch.long)
    x_t = path.sample(x1, 0.7, generator=gen)
    kappa = 0.7**3
    expected = kappa + (1 - kappa) / 4  # stays 0 if kept or if the uniform source drew 0
    assert abs((x_t == 0).float().mean().item() - expected) < 4 * (expected * (1 - expected) / 1e5) ** 0.5
    xm = MixturePath(4, "mask").sample(x1, 0.3, generator=gen)
    assert abs((xm == 4).float().mean().item() - 0.7) < 0.01
    assert set(xm.unique().tolist()) <= {0, 4}


def test_conditional_velocity_formula():
    path = MixturePath(3, "mask")
    x_t = torch.tensor([[3, 1]])
    x1 = torch.tensor([[2, 1]])
    u = path.conditional_velocity(x_t, x1, 0.5)  # rate 1 / (1 - 0.5) = 2
    assert torch.allclose(u, torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]]))
    up = MixturePath(3, "uniform", PolynomialSchedule(2.0)).conditional_velocity(
        torch.tensor([[0]]), torch.tensor([[2]]), 0.5
    )  # rate = 2 * 0.5 / (1 - 0.25)
    assert torch.allclose(up, torch.tensor([[[-4 / 3, 0.0, 4 / 3]]]))


def _pairs(path: MixturePath, t: float):
    """All (x1, x_t) pairs with joint weights p(x1) p_t(x_t | x1)."""
    support, probs = all_tokens(S), target_probs()
    states = all_tokens(path.vocab_size)
    kappa = path.schedule.kappa(torch.tensor(t))
    x1s, xts, ws = [], [], []
    for i, x1 in enumerate(support):
        for xt in states:
            p = 1.0
            for d in range(D):
                if path.mask_token is not None:
                    p *= kappa if xt[d] == x1[d] else ((1 - kappa) if xt[d] == path.mask_token else 0.0)
                else:
                    p *= kappa * (xt[d] == x1[d]) + (1 - kappa) / S
            if p > 0:
                x1s.append(x1)
                xts.append(xt)
                ws.append(probs[i] * p)
    return support, probs, torch.stack(x1s), torch.stack(xts), torch.stack(ws).float()


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_velocity_regression_minimised_by_marginal_velocity(source):
    path = MixturePath(S, source, PolynomialSchedule(1.5))
    t = 0.4
    support, probs, x1, x_t, w = _pairs(path, t)
    tt = torch.full((len(x1),), t)
    weights = w * len(w)  # mean_b w_b f_b = sum_b p_b f_b
    # one free velocity table per state x_t, shared by all pairs with that x_t
    states = all_tokens(path.vocab_size)
    row = (x_t[:, None, :] == states[None]).all(-1).float().argmax(-1)
    exact = path.marginal_velocity(states, t, support, probs).clone().requires_grad_(True)
    loss = velocity_regression_loss(exact[row], x_t, x1, tt, path, weights)
    (grad,) = torch.autograd.grad(loss, exact)
    assert grad.abs().max() < 1e-5
    noise = 0.05 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    perturbed = (exact.detach() + noise).requires_grad_(True)
    loss_p = velocity_regression_loss(perturbed[row], x_t, x1, tt, path, weights)
    (grad_p,) = torch.autograd.grad(loss_p, perturbed)
    assert loss_p > loss.detach() + 1e-5
    assert grad_p.abs().max() > 1e-3


def test_posterior_loss_minimised_by_true_posterior():
    path = MixturePath(S, "mask")
    t = 0.5
    support, probs, x1, x_t, w = _pairs(path, t)
    tt = torch.full((len(x1),), t)
    rate = path.schedule.rate(torch.tensor(t))
    # posterior of x1^d given x_t from the exact velocity: u / rate + delta(x_t)
    states = all_tokens(path.vocab_size)
    row = (x_t[:, None, :] == states[None]).all(-1).float().argmax(-1)
    post = path.marginal_velocity(states, t, support, probs) / rate + path.one_hot_data(states)
    table = post.clamp_min(1e-12).log().requires_grad_(True)
    logits = table[row]
    loss = posterior_loss(logits, x_t, x1, tt, path, w * len(w))
    (grad,) = torch.autograd.grad(loss, table)
    assert grad.abs().max() < 1e-5
    # and the velocity it induces is the marginal one on masked coordinates
    u = path.posterior_to_velocity(logits.detach(), x_t, tt)
    exact = path.marginal_velocity(x_t, t, support, probs)
    masked = path.is_masked(x_t)
    assert torch.allclose(u[masked], exact[masked], atol=1e-5)


def test_time_grid_last_step_shortened():
    assert time_grid(0.0, 0.3) == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])
    assert time_grid(0.5, 0.25) == pytest.approx([0.5, 0.75, 1.0])


def test_bad_inputs():
    path = MixturePath(3, "mask")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        path.sample(torch.tensor([[0, 3]]), 0.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        path.sample(torch.tensor([[-1, 0]]), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        path.sample(torch.tensor([[0, 1]]), 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        path.conditional_velocity(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), -0.1)
    with pytest.raises(ValueError, match="long"):
        path.sample(torch.tensor([[0.0, 1.0]]), 0.5)
    for h in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dt"):
            CTMCSolver(path, h)
    solver = CTMCSolver(path, 0.1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        solver.sample(lambda x, t: torch.zeros(1, 2, 3), torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="t0"):
        solver.sample(lambda x, t: torch.zeros(1, 2, 3), torch.tensor([[0, 3]]), t0=1.0)
    with pytest.raises(ValueError, match="source"):
        MixturePath(3, "gaussian")
    with pytest.raises(ValueError, match="exponent"):
        PolynomialSchedule(0.0)
    with pytest.raises(ValueError, match=r"\(B, D, S\)"):
        velocity_regression_loss(torch.zeros(1, 2, 4), torch.tensor([[3, 3]]), torch.tensor([[0, 1]]),
                                 torch.tensor([0.5]), path)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_velocity_regression_equals_hand_computed_sum(source):
    """L = mean_b w_b sum_{d, j != x_t^d, row active} ((1 - kappa) u_theta - kappa' (d(j=x1) - d(j=x_t)))^2"""
    path = MixturePath(3, source, PolynomialSchedule(2.0))
    gen = torch.Generator().manual_seed(1)
    b, d = 5, 4
    x1 = torch.randint(0, 3, (b, d), generator=gen)
    t = torch.rand(b, generator=gen) * 0.9
    x_t = path.sample(x1, t, generator=gen)
    u = torch.randn(b, d, 3, generator=gen)
    w = torch.rand(b, generator=gen) + 0.5
    total = 0.0
    for i in range(b):
        kappa, dk = float(t[i]) ** 2, 2 * float(t[i])
        for k in range(d):
            if source == "mask" and int(x_t[i, k]) != path.mask_token:
                continue
            for j in range(3):
                if j == int(x_t[i, k]):
                    continue
                target = dk * ((j == int(x1[i, k])) - (j == int(x_t[i, k])))
                total += float(w[i]) * ((1 - kappa) * float(u[i, k, j]) - target) ** 2
    want = total / b
    got = velocity_regression_loss(u, x_t, x1, t, path, w)
    assert abs(float(got) - want) < 1e-4 * max(1.0, abs(want))
