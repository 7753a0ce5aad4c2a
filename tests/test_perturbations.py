"""Perturbation kernels: exact statistics, heat kernels against scipy, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    GaussianPerturbation,
    GridPerturbation,
    Perturbation,
)
from ebmflow.losses.perturbations import graph_laplacian, heat_kernel
from ebmflow.spaces import Binary, Categorical, Continuous


def _z_ok(est: float, truth: float, se: float, z: float = 5.0) -> bool:
    return abs(est - truth) <= z * se


# -- Gaussian ---------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.5, 2.0])
def test_gaussian_variance_per_step(gen, t):
    p = GaussianPerturbation(t)
    b, m, d = 2000, 8, 3
    x = torch.randn(b, d, generator=gen) * 3.0
    y = p.perturb(x, gen)
    xn = p.negatives(y, m, gen)
    assert xn.shape == (b, m, d) and xn.dtype == x.dtype
    n1, n2 = (y - x).numel(), (xn - x[:, None]).numel()
    # variance of a sample variance of N normals is 2 var^2 / N
    assert _z_ok(float((y - x).var()), t, t * math.sqrt(2 / n1))
    assert _z_ok(float((xn - y[:, None]).var()), t, t * math.sqrt(2 / n2))
    diff = xn - x[:, None]
    assert _z_ok(float(diff.var()), 2 * t, 2 * t * math.sqrt(2 / n2) * 2)  # rows share y
    assert _z_ok(float(diff.mean()), 0.0, math.sqrt(2 * t / b / d))
    # given y, the M negatives are independent: correlation of x'_1 - y and x'_2 - y ~ 0
    c = torch.corrcoef(torch.stack([(xn[:, 0] - y).flatten(), (xn[:, 1] - y).flatten()]))[0, 1]
    assert abs(float(c)) < 5 / math.sqrt(b * d)


def test_gaussian_images_and_determinism():
    p = GaussianPerturbation(1.0)
    x = torch.zeros(4, 1, 3, 3)
    a = p.negatives(p.perturb(x, torch.Generator().manual_seed(3)), 5,
                    torch.Generator().manual_seed(4))
    b = p.negatives(p.perturb(x, torch.Generator().manual_seed(3)), 5,
                    torch.Generator().manual_seed(4))
    assert a.shape == (4, 5, 1, 3, 3)
    assert torch.equal(a, b)


# -- Bernoulli --------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_bernoulli_flip_probabilities(gen, eps):
    p = BernoulliPerturbation(eps)
    b, m, d = 500, 16, 32
    x = Binary(d).noise(b, gen)
    y = p.perturb(x, gen)
    xn = p.negatives(y, m, gen)
    assert xn.shape == (b, m, d) and xn.dtype == torch.float32
    assert bool(((xn == 0) | (xn == 1)).all())
    f1 = float((y != x).float().mean())
    assert _z_ok(f1, eps, math.sqrt(eps * (1 - eps) / (b * d)))
    q = 2 * eps * (1 - eps)
    f2 = float((xn != x[:, None]).float().mean())
    # negatives of one row share y: the effective sample size is between b*d and b*m*d
    assert _z_ok(f2, q, math.sqrt(q * (1 - q) / (b * d)))


# -- Grid -------------------------------------------------------------------------------------
def test_grid_binary_flips_exactly_one_uniform_bit(gen):
    d, b, m = 8, 4000, 4
    p = GridPerturbation()
    x = Binary(d).noise(b, gen)
    y = p.perturb(x, gen)
    changed = (y != x).float()
    assert bool((changed.sum(1) == 1).all())
    counts = changed.sum(0)
    # each coordinate is picked with probability 1/d
    se = math.sqrt(b * (1 / d) * (1 - 1 / d))
    assert bool(((counts - b / d).abs() <= 5 * se).all())
    xn = p.negatives(y, m, gen)
    ham = (xn != x[:, None]).sum(-1)
    assert set(ham.unique().tolist()) <= {0, 2}
    p0 = float((ham == 0).float().mean())
    assert _z_ok(p0, 1 / d, math.sqrt((1 / d) * (1 - 1 / d) / (b * m)) * 2)


def test_grid_categorical_moves_one_coordinate_to_another_value(gen):
    d, k, b = 6, 5, 6000
    p = GridPerturbation(num_classes=k)
    x = Categorical(d, k).noise(b, gen)
    y = p.perturb(x, gen)
    assert y.dtype == torch.long
    changed = y != x
    assert bool((changed.sum(1) == 1).all())
    # the new value is uniform over the k - 1 others: shift (y - x) mod k uniform on 1..k-1
    shift = ((y - x) % k)[changed]
    freq = torch.bincount(shift, minlength=k).float() / b
    assert float(freq[0]) == 0.0
    se = math.sqrt((1 / (k - 1)) * (1 - 1 / (k - 1)) / b)
    assert bool(((freq[1:] - 1 / (k - 1)).abs() <= 5 * se).all())
    assert p.negatives(y, 3, gen).shape == (b, 3, d)


# -- heat kernels -----------------------------------------------------------------------------
def _laplacian_by_hand(k: int, kind: str) -> np.ndarray:
    a = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            if kind == "uniform":
                a[i, j] = float(i != j)
            elif kind == "ordinal":
                a[i, j] = float(abs(i - j) == 1)
            else:  # cyclic
                a[i, j] = float(i != j and (abs(i - j) == 1 or abs(i - j) == k - 1))
    return a - np.diag(a.sum(1))


@pytest.mark.parametrize("kind", ["uniform", "cyclic", "ordinal"])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("t", [0.3, 2.0])
def test_heat_kernel_matches_expm(kind, k, t):
    lap = _laplacian_by_hand(k, kind)
    np.testing.assert_allclose(graph_laplacian(k, kind), lap)
    h = heat_kernel(k, kind, t)
    np.testing.assert_allclose(h, scipy.linalg.expm(t * lap), atol=1e-12)
    np.testing.assert_allclose(h.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(h, h.T, atol=1e-12)
    assert (h >= 0).all()
    buf = CategoricalPerturbation(k, kind, t).transition
    np.testing.assert_allclose(buf.double().numpy(), h, atol=1e-6)


def test_uniform_heat_kernel_closed_form():
    k, t = 4, 0.7
    h = heat_kernel(k, "uniform", t)
    closed = math.exp(-k * t) * np.eye(k) + (1 - math.exp(-k * t)) / k * np.ones((k, k))
    np.testing.assert_allclose(h, closed, atol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "cyclic", "ordinal"])
def test_categorical_sampling_matches_transition_matrix(gen, kind):
    k, t, d, b = 5, 0.4, 4, 5000
    p = CategoricalPerturbation(k, kind, t)
    x = torch.arange(k).repeat(b * d // k + 1)[: b * d].reshape(b, d)
    y = p.perturb(x, gen)
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < k
    counts = torch.zeros(k, k)
    counts.index_put_((x.flatten(), y.flatten()), torch.ones(b * d), accumulate=True)
    n_rows = counts.sum(1, keepdim=True)
    emp = counts / n_rows
    h = p.transition
    se = (h * (1 - h) / n_rows).sqrt() + 1e-6
    assert bool(((emp - h).abs() <= 5 * se).all())
    # two steps: x' | x follows H @ H = exp(2 t L)
    xn = p.negatives(y, 2, gen)
    h2 = torch.as_tensor(heat_kernel(k, kind, 2 * t), dtype=torch.float32)
    counts2 = torch.zeros(k, k)
    xs = x[:, None].expand_as(xn)
    counts2.index_put_((xs.flatten(), xn.flatten()), torch.ones(xn.numel()), accumulate=True)
    emp2 = counts2 / counts2.sum(1, keepdim=True)
    se2 = (h2 * (1 - h2) / (b * d / k)).sqrt() + 1e-6  # 2 negatives share y: use b*d/k rows
    assert bool(((emp2 - h2).abs() <= 5 * se2).all())


# -- custom kernels, space checks, bad input --------------------------------------------------
def test_custom_perturbation_gets_negatives_for_free(gen):
    class Shift(Perturbation):
        space_kind = Continuous

        def perturb(self, x, generator=None):
            return x + 1.0

    y = Shift().perturb(torch.zeros(3, 2))
    xn = Shift().negatives(y, 4, gen)
    assert xn.shape == (3, 4, 2) and bool((xn == 2.0).all())
    Shift().check_space(Continuous(2))
    with pytest.raises(ValueError, match="Continuous"):
        Shift().check_space(Binary(2))


@pytest.mark.parametrize(
    "perturbation, space",
    [
        (GaussianPerturbation(1.0), Binary(4)),
        (BernoulliPerturbation(0.1), Continuous(4)),
        (BernoulliPerturbation(0.1), Categorical(4, 3)),
        (GridPerturbation(), Continuous(4)),
        (GridPerturbation(), Categorical(4, 3)),
        (GridPerturbation(num_classes=4), Categorical(4, 3)),
        (GridPerturbation(num_classes=3), Binary(4)),
        (CategoricalPerturbation(3), Binary(4)),
        (CategoricalPerturbation(5), Categorical(4, 3)),
    ],
)
def test_space_mismatch_is_a_clear_error(perturbation, space):
    with pytest.raises(ValueError, match="space"):
        perturbation.check_space(space)


def test_matching_spaces_pass():
    GaussianPerturbation().check_space(Continuous((1, 2, 2)))
    BernoulliPerturbation().check_space(Binary(3))
    GridPerturbation().check_space(Binary(3))
    GridPerturbation(num_classes=3).check_space(Categorical(2, 3))
    CategoricalPerturbation(3, "ordinal").check_space(Categorical(2, 3))


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_t(t):
    with pytest.raises(ValueError, match="t"):
        GaussianPerturbation(t)
    with pytest.raises(ValueError, match="t"):
        CategoricalPerturbation(3, "uniform", t)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        BernoulliPerturbation(eps)


def test_bad_categorical_arguments():
    with pytest.raises(ValueError, match="kind"):
        CategoricalPerturbation(3, "random")
    with pytest.raises(ValueError, match="num_classes"):
        CategoricalPerturbation(1)
    with pytest.raises(ValueError, match="num_classes"):
        GridPerturbation(num_classes=1)
    with pytest.raises(ValueError, match="num_classes"):
        GridPerturbation().perturb(torch.zeros(2, 3, dtype=torch.long))
