"""EnergyDiscrepancy: hand computations, cross-entropy identity, gradients, spaces, bad input,
and the nearsightedness property (minimum near the true mixture weight)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy, MLPEnergy
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
)
from ebmflow.spaces import Binary, Categorical, Continuous


class ConstantEnergy(EnergyModel):
    def __init__(self, space, value=0.7):
        super().__init__(space)
        self.c = nn.Parameter(torch.tensor(float(value)))

    def energy(self, x):
        return self.c.expand(x.shape[0])


class CountingEnergy(EnergyModel):
    """Wraps an energy and counts forward calls."""

    def __init__(self, inner):
        super().__init__(inner.space)
        self.inner = inner
        self.calls = 0

    def energy(self, x):
        self.calls += 1
        return self.inner(x)


def _mlp(space=None, seed=0):
    torch.manual_seed(seed)
    return MLPEnergy(space or Continuous(2), hidden=(16, 16))


def _hand_loss(energy, x, x_neg, m, w):
    total = 0.0
    for i in range(x.shape[0]):
        e_i = float(energy(x[i : i + 1]))
        s = w
        for j in range(m):
            s += math.exp(e_i - float(energy(x_neg[i * m + j : i * m + j + 1])))
        total += math.log(s)
    return total / x.shape[0] - math.log(m)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("m", [1, 3])
def test_loss_equals_hand_computation(gen, w, m):
    energy = _mlp()
    x = torch.randn(3, 2, generator=gen)
    out = EnergyDiscrepancy(GaussianPerturbation(2.0), m=m, w=w)(energy, x, generator=gen)
    assert out.loss.dim() == 0 and out.x_neg.shape == (3 * m, 2)
    assert not out.x_neg.requires_grad
    with torch.no_grad():
        expected = _hand_loss(energy, x, out.x_neg, m, w)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    with torch.no_grad():
        e_pos, e_neg = energy(x).mean(), energy(out.x_neg).mean()
    assert float(out.stats["energy_pos"]) == pytest.approx(float(e_pos), rel=1e-5)
    assert float(out.stats["energy_neg"]) == pytest.approx(float(e_neg), rel=1e-5)
    assert out.stats["energy_pos"].dim() == 0 and not out.stats["energy_neg"].requires_grad


def test_w1_equals_cross_entropy_over_candidates(gen):
    energy, b, m = _mlp(), 5, 4
    x = torch.randn(b, 2, generator=gen) * 2
    out = EnergyDiscrepancy(GaussianPerturbation(1.0), m=m, w=1.0)(energy, x, generator=gen)
    cand = torch.cat([x[:, None], out.x_neg.reshape(b, m, 2)], dim=1)  # (B, M+1, 2)
    logits = -energy(cand.reshape(-1, 2)).reshape(b, m + 1)
    ce = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    assert float(out.loss.detach()) == pytest.approx(float(ce.detach()) - math.log(m), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("m", [1, 4, 32])
def test_constant_energy(gen, w, m):
    energy = ConstantEnergy(Binary(6))
    x = Binary(6).noise(7, gen)
    out = EnergyDiscrepancy(BernoulliPerturbation(0.2), m=m, w=w)(energy, x, generator=gen)
    assert float(out.loss.detach()) == pytest.approx(math.log(w + m) - math.log(m), abs=1e-6)


def test_gradients_reach_parameters_only(gen):
    energy = _mlp()
    x = torch.randn(6, 2, generator=gen).requires_grad_(True)
    g2 = torch.Generator().manual_seed(11)
    out = EnergyDiscrepancy(GaussianPerturbation(1.0), m=3)(energy, x, generator=g2)
    out.loss.backward()
    assert x.grad is None
    grads = [p.grad.clone() for p in energy.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    # same gradient as the hand formula evaluated with detached inputs
    energy.zero_grad()
    b, m = 6, 3
    e_pos = energy(x.detach())
    e_neg = energy(out.x_neg).reshape(b, m)
    hand = torch.log(1 + torch.exp(e_pos[:, None] - e_neg).sum(1)).mean() - math.log(m)
    hand.backward()
    for g, p in zip(grads, energy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_one_batched_energy_call(gen):
    energy = CountingEnergy(_mlp())
    EnergyDiscrepancy(GaussianPerturbation(1.0), m=8)(energy, torch.randn(4, 2), generator=gen)
    assert energy.calls == 1


def test_deterministic_under_seed():
    energy, x = _mlp(), torch.randn(8, 2)
    loss = EnergyDiscrepancy(GaussianPerturbation(1.0), m=4)
    a = loss(energy, x, generator=torch.Generator().manual_seed(5))
    b = loss(energy, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x_neg, b.x_neg) and torch.equal(a.loss, b.loss)


@pytest.mark.parametrize(
    "space, perturbation",
    [
        (Binary(10), BernoulliPerturbation(0.1)),
        (Binary(10), GridPerturbation()),
        (Categorical(10, 4), GridPerturbation(num_classes=4)),
        (Categorical(10, 4), CategoricalPerturbation(4, "ordinal", 0.5)),
        (Continuous((1, 4, 4)), GaussianPerturbation(0.5)),
    ],
)
def test_all_spaces(gen, space, perturbation):
    energy = _mlp(space)
    x = space.noise(5, gen)
    out = EnergyDiscrepancy(perturbation, m=6)(energy, x, generator=gen)
    assert out.x_neg.shape == (30, *space.shape) and out.x_neg.dtype == x.dtype
    space.validate(out.x_neg)
    assert math.isfinite(float(out.loss.detach()))
    out.loss.backward()


def test_sampler_argument_is_ignored(gen):
    energy, x = _mlp(), torch.randn(4, 2)
    loss = EnergyDiscrepancy(GaussianPerturbation(1.0))
    assert loss.requires_sampler is False
    out = loss(energy, x, None, generator=gen)
    assert math.isfinite(float(out.loss.detach()))


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, -2, 2.0, True])
def test_bad_m(m):
    with pytest.raises(ValueError, match="m "):
        EnergyDiscrepancy(GaussianPerturbation(), m=m)


@pytest.mark.parametrize("w", [-0.1, float("nan"), float("inf")])
def test_bad_w(w):
    with pytest.raises(ValueError, match="w "):
        EnergyDiscrepancy(GaussianPerturbation(), w=w)


def test_not_a_perturbation():
    with pytest.raises(ValueError, match="Perturbation"):
        EnergyDiscrepancy(lambda x: x)


@pytest.mark.parametrize(
    "space, perturbation",
    [
        (Binary(4), GaussianPerturbation()),
        (Continuous(4), BernoulliPerturbation()),
        (Categorical(4, 3), GridPerturbation()),
        (Categorical(4, 3), CategoricalPerturbation(5)),
    ],
)
def test_perturbation_space_mismatch(gen, space, perturbation):
    energy = _mlp(space)
    with pytest.raises(ValueError, match="space"):
        EnergyDiscrepancy(perturbation)(energy, space.noise(3, gen), generator=gen)


def test_data_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        EnergyDiscrepancy(GaussianPerturbation())(_mlp(), torch.randn(4, 3))


# -- the nearsightedness property (Schroeder et al. 2023, Fig. 1) ----------------------------
def _mixture(rho: float) -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(torch.tensor([[-5.0], [5.0]]), 1.0, torch.tensor([rho, 1 - rho]))


def test_ed_minimum_near_true_weight_and_score_matching_is_flat():
    data = _mixture(0.2).sample(4096, torch.Generator().manual_seed(0))
    rhos = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    ed, sm = [], []
    for rho in rhos:
        model = _mixture(rho)
        with torch.no_grad():
            ed.append(float(EnergyDiscrepancy(GaussianPerturbation(32.0), m=4)(
                model, data, generator=torch.Generator().manual_seed(1)).loss))
        sm.append(float(DenoisingScoreMatching(0.1)(
            model, data, generator=torch.Generator().manual_seed(1)).loss.detach()))
    assert rhos[min(range(len(rhos)), key=ed.__getitem__)] == 0.2
    assert ed[-1] - min(ed) > 0.1  # clearly curved
    assert max(sm) - min(sm) < 0.01 * abs(sm[0]) + 0.05  # flat in rho


# -- paper reproductions (slow; run with -m slow) ----------------------------------------------
def _load_example(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up in sys.modules
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@pytest.mark.slow
def test_example_nearsightedness(tmp_path):
    res = _load_example("ed_nearsightedness").main(["--quick", "--out", str(tmp_path)])
    s = res["summary"]
    for t in ("2", "4", "8", "32"):
        assert 0.1 <= s[f"ed_t{t}"]["argmin_rho"] <= 0.3
    ranges = [s[f"ed_t{t}"]["range"] for t in ("2", "4", "8", "32")]
    assert ranges == sorted(ranges)  # sharper as t grows
    assert s["score_matching"]["range"] < 0.01 < s["ed_t8"]["range"]
    assert (tmp_path / "figures" / "ed_nearsightedness_quick.png").exists()


@pytest.mark.slow
def test_example_25gaussians_ed_beats_score_matching(tmp_path):
    res = _load_example("ed_25gaussians").main(
        ["--quick", "--iterations", "1500", "--methods", "ed,cd,dsm", "--out", str(tmp_path)])
    ed, cd, dsm = (res["methods"][m] for m in ("ed", "cd", "dsm"))
    assert ed["final_mse"] < dsm["final_mse"]
    assert ed["final_mse"] < ed["history"][0]["mse"]
    # CD (ContrastiveDivergence + Langevin from data, alpha = 0.1) stays finite and learns
    assert math.isfinite(cd["final_mse"]) and cd["final_mse"] < cd["history"][0]["mse"]
    assert (tmp_path / "figures" / "ed_25gaussians_quick.png").exists()


@pytest.mark.slow
def test_example_discrete_toys_learns(tmp_path):
    res = _load_example("ed_discrete_toys").main(
        ["--quick", "--iterations", "300", "--methods", "ed_bern,ed_grid,pcd", "--out",
         str(tmp_path)])
    runs = res["runs"]["2spirals"]
    assert {"ed_bern", "ed_grid", "pcd"} <= set(runs)
    for name in ("ed_bern", "ed_grid", "pcd"):
        assert runs[name]["nll"] < 32 * math.log(2) - 0.3  # better than the uniform model
        assert math.isfinite(runs[name]["mmd_1e4"])
    assert (tmp_path / "figures" / "ed_discrete_toys_quick.png").exists()


@pytest.mark.slow
def test_example_categorical_learns(tmp_path):
    res = _load_example("ed_categorical").main(
        ["--quick", "--iterations", "200", "--methods", "ed_grid,ed_uniform,ed_ordinal,pcd",
         "--out", str(tmp_path)])
    runs = res["runs"]["2spirals"]
    for name in ("ed_grid", "ed_uniform", "ed_ordinal", "pcd"):
        assert runs[name]["nll"] < 16 * math.log(5) - 0.3  # better than the uniform model
