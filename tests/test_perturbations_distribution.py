"""Exact laws of the energy-discrepancy negatives, for every perturbation kernel.

The negatives are drawn as y ~ q(. | x), then x'_j ~ q(. | y), j = 1..M. These tests check the
draws against transition probabilities computed here from the kernels' definitions (not from
the library's own matrices), both for one step (``perturb``: y | x) and for the two-step law of
the negatives that ``EnergyDiscrepancy`` actually returns (x' | x), including the joint law of
two negatives of the same data point (they share y, so they are dependent given x: this is
what tells "negatives around y" from "negatives around x").

Counts are compared with the exact laws by a chi-square test (scipy.stats) over all start states
at once; a transition of probability 0 that occurs fails at once. Everything is seeded, so the
p-values are fixed numbers; the threshold 1e-4 leaves room for the correct kernels and none for
the wrong ones (a wrong kernel gives p ~ 1e-100 or less at these sample sizes).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import nn

from ebmflow.energy import EnergyModel
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
)
from ebmflow.spaces import Binary, Categorical, Continuous, Space

P_MIN = 1e-4


class Flat(EnergyModel):
    """E(x) = 0 * sum(x): a trainable energy whose value does not matter here."""

    def __init__(self, space: Space):
        super().__init__(space)
        self.w = nn.Parameter(torch.zeros(()))

    def energy(self, x):
        return self.w * x.flatten(1).float().sum(-1)


# -- exact laws, from the definitions ---------------------------------------------------------
def _states(d: int, k: int) -> np.ndarray:
    """All K^D states, one per row, in lexicographic order (index = base-K number)."""
    return np.array(list(itertools.product(range(k), repeat=d)), dtype=np.int64)


def _index(x: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise base-K index of states ``(N, D)`` (first coordinate most significant)."""
    d = x.shape[1]
    w = torch.tensor([k ** (d - 1 - i) for i in range(d)])
    return (x.long() * w).sum(1)


def _hamming(states: np.ndarray) -> np.ndarray:
    return (states[:, None, :] != states[None, :, :]).sum(-1)


def bernoulli_matrix(d: int, eps: float) -> np.ndarray:
    h = _hamming(_states(d, 2))
    return eps**h * (1 - eps) ** (d - h)


def grid_matrix(d: int, k: int) -> np.ndarray:
    """Uniform over the D (K - 1) states at Hamming distance exactly 1."""
    return (_hamming(_states(d, k)) == 1) / (d * (k - 1))


def laplacian(k: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        adj = 1.0 - np.eye(k)
    else:
        adj = np.zeros((k, k))
        for a in range(k - 1):
            adj[a, a + 1] = adj[a + 1, a] = 1.0
        if kind == "cyclic":
            adj[0, k - 1] = adj[k - 1, 0] = 1.0
    return adj - np.diag(adj.sum(1))


def heat_matrix(d: int, k: int, kind: str, t: float) -> np.ndarray:
    """exp(t L) on each coordinate independently, as a (K^D, K^D) matrix."""
    h1 = scipy.linalg.expm(t * laplacian(k, kind))
    s = _states(d, k)
    return np.prod(h1[s[:, None, :], s[None, :, :]], axis=-1)


# -- the test statistic -----------------------------------------------------------------------
def chi_square_p(start: torch.Tensor, end: torch.Tensor, law: np.ndarray) -> float:
    """p-value of counts of (start, end) index pairs against rows of ``law`` (rows: start).

    Pooled over the start states: sum of the per-row chi-square statistics with
    sum(cells - 1) degrees of freedom. A count in a cell of probability 0 returns 0.0.
    """
    counts = np.zeros(law.shape)
    np.add.at(counts, (start.numpy(), end.numpy()), 1.0)
    stat, dof = 0.0, 0
    for row, probs in zip(counts, law):
        total = row.sum()
        if total == 0:
            continue
        support = probs > 1e-12
        if row[~support].sum() > 0:
            return 0.0
        expected = total * probs[support] / probs[support].sum()
        stat += float(((row[support] - expected) ** 2 / expected).sum())
        dof += int(support.sum()) - 1
    return float(scipy.stats.chi2.sf(stat, max(dof, 1)))


def pair_law(law: np.ndarray) -> np.ndarray:
    """Joint law of two negatives sharing y: P(a, b | x) = sum_y Q[x, y] Q[y, a] Q[y, b],
    flattened to rows x and columns a * n + b."""
    joint = np.einsum("xy,ya,yb->xab", law, law, law)
    return joint.reshape(law.shape[0], -1)


def _starts(n_states: int, reps: int) -> torch.Tensor:
    return torch.arange(n_states).repeat_interleave(reps)


def _decode(idx: torch.Tensor, d: int, k: int, float_bits: bool) -> torch.Tensor:
    s = torch.as_tensor(_states(d, k))[idx]
    return s.float() if float_bits else s


# -- the discrete kernels ---------------------------------------------------------------------
DISCRETE = [
    # (id, perturbation, space, d, k, exact one-step law)
    ("bernoulli-0.1", BernoulliPerturbation(0.1), Binary(3), 3, 2, bernoulli_matrix(3, 0.1)),
    ("bernoulli-0.3", BernoulliPerturbation(0.3), Binary(2), 2, 2, bernoulli_matrix(2, 0.3)),
    ("grid-binary", GridPerturbation(), Binary(3), 3, 2, grid_matrix(3, 2)),
    ("grid-categorical", GridPerturbation(num_classes=3), Categorical(2, 3), 2, 3,
     grid_matrix(2, 3)),
    ("heat-uniform", CategoricalPerturbation(3, "uniform", 0.4), Categorical(2, 3), 2, 3,
     heat_matrix(2, 3, "uniform", 0.4)),
    ("heat-cyclic", CategoricalPerturbation(4, "cyclic", 0.3), Categorical(1, 4), 1, 4,
     heat_matrix(1, 4, "cyclic", 0.3)),
    ("heat-ordinal", CategoricalPerturbation(4, "ordinal", 0.5), Categorical(2, 4), 2, 4,
     heat_matrix(2, 4, "ordinal", 0.5)),
]
IDS = [c[0] for c in DISCRETE]


def test_exact_laws_are_symmetric_stochastic_matrices():
    for _name, _p, _space, _d, _k, law in DISCRETE:
        np.testing.assert_allclose(law.sum(1), 1.0, atol=1e-12)
        np.testing.assert_allclose(law, law.T, atol=1e-12)


@pytest.mark.parametrize(("name", "pert", "space", "d", "k", "law"), DISCRETE, ids=IDS)
def test_one_step_law(name, pert, space, d, k, law):
    """y | x from ``perturb`` follows q exactly."""
    g = torch.Generator().manual_seed(1)
    start = _starts(law.shape[0], 3000)
    y = pert.perturb(_decode(start, d, k, isinstance(space, Binary)), g)
    assert y.dtype == space.dtype and y.shape == (start.shape[0], d)
    assert chi_square_p(start, _index(y, k), law) > P_MIN


@pytest.mark.parametrize(("name", "pert", "space", "d", "k", "law"), DISCRETE, ids=IDS)
def test_energy_discrepancy_negatives_follow_the_two_step_law(name, pert, space, d, k, law):
    """x'_j | x from ``EnergyDiscrepancy`` follows Q^2, and two negatives of one data point
    follow sum_y Q[x, y] Q[y, a] Q[y, b] (they share y)."""
    g = torch.Generator().manual_seed(2)
    n, m = law.shape[0], 2
    start = _starts(n, 3000)
    data = _decode(start, d, k, isinstance(space, Binary))
    out = EnergyDiscrepancy(pert, m=m)(Flat(space), data, generator=g)
    idx = _index(out.x_neg, k).view(-1, m)  # row i * M + j is x'_ij
    assert chi_square_p(start.repeat_interleave(m), idx.flatten(), law @ law) > P_MIN
    assert chi_square_p(start, idx[:, 0] * n + idx[:, 1], pair_law(law)) > P_MIN


@pytest.mark.parametrize(("name", "pert", "space", "d", "k", "law"), DISCRETE, ids=IDS)
def test_negatives_method_follows_the_one_step_law_around_y(name, pert, space, d, k, law):
    """``negatives(y, m)``: M independent draws of q(. | y) per row."""
    g = torch.Generator().manual_seed(5)
    n, m = law.shape[0], 2
    start = _starts(n, 3000)
    xn = pert.negatives(_decode(start, d, k, isinstance(space, Binary)), m, g)
    assert xn.shape == (start.shape[0], m, d)
    idx = _index(xn.reshape(-1, d), k).view(-1, m)
    assert chi_square_p(start.repeat_interleave(m), idx.flatten(), law) > P_MIN
    # independent given y: the pair law is the product
    prod = np.einsum("xa,xb->xab", law, law).reshape(n, -1)
    assert chi_square_p(start, idx[:, 0] * n + idx[:, 1], prod) > P_MIN


def test_bernoulli_bits_flip_with_probability_eps_binomial():
    """Each bit of y flips with probability eps; each bit of x' differs from x with
    probability 2 eps (1 - eps) (binomial tolerance, two-sided p > 1e-4)."""
    eps, b, d = 0.15, 4000, 8
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(b, d, generator=g) < 0.5).float()
    pert = BernoulliPerturbation(eps)
    flips = int((pert.perturb(x, g) != x).sum())
    assert scipy.stats.binomtest(flips, b * d, eps).pvalue > P_MIN
    out = EnergyDiscrepancy(pert, m=4)(Flat(Binary(d)), x, generator=g)
    diff = int((out.x_neg.view(b, 4, d) != x[:, None]).sum())
    # negatives of one row share y: count over the first negative only for independence
    first = int((out.x_neg.view(b, 4, d)[:, 0] != x).sum())
    assert scipy.stats.binomtest(first, b * d, 2 * eps * (1 - eps)).pvalue > P_MIN
    assert abs(diff / (4 * b * d) - 2 * eps * (1 - eps)) < 0.01


# -- Gaussian ---------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.3, 2.5])
def test_gaussian_one_step_law(t):
    """y - x ~ N(0, t I) (t is a variance; t != 1 tells variance from std)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20000, 2, generator=g) * 3.0
    z = (GaussianPerturbation(t).perturb(x, g) - x) / math.sqrt(t)
    assert scipy.stats.kstest(z.flatten().double().numpy(), "norm").pvalue > P_MIN
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / z.numel())


@pytest.mark.parametrize("t", [0.3, 2.5])
def test_gaussian_energy_discrepancy_negatives(t):
    """x' - x ~ N(0, 2 t I); two negatives of one data point have covariance t I (the shared
    y - x ~ N(0, t I)); given y, x'_j - y ~ N(0, t I) independent of y - x."""
    g = torch.Generator().manual_seed(6)
    b, m, d = 20000, 3, 2
    x = torch.randn(b, d, generator=g) * 3.0
    out = EnergyDiscrepancy(GaussianPerturbation(t), m=m)(Flat(Continuous(d)), x, generator=g)
    diff = out.x_neg.view(b, m, d) - x[:, None]  # (B, M, D)
    z = diff[:, 0] / math.sqrt(2 * t)
    assert scipy.stats.kstest(z.flatten().double().numpy(), "norm").pvalue > P_MIN
    se = 5 * math.sqrt(2 / (b * d))  # relative tolerance of a variance estimate, 5 s.e.
    assert abs(float(diff.var()) / (2 * t) - 1.0) < 2 * se
    # covariance of two negatives of the same data point: Var(y - x) = t
    cov = float((diff[:, 0] * diff[:, 1]).mean())
    assert abs(cov / t - 1.0) < 5 * math.sqrt(5 / (b * d)), cov
    # coordinates stay independent
    assert abs(float((diff[:, 0, 0] * diff[:, 0, 1]).mean())) < 5 * 2 * t / math.sqrt(b)
    # y = (mean of the M negatives, a noisy estimate of it): reconstruct y - x exactly from
    # the same seed, then x' - y is N(0, t I) and uncorrelated with y - x
    g2 = torch.Generator().manual_seed(6)
    x2 = torch.randn(b, d, generator=g2) * 3.0
    y = GaussianPerturbation(t).perturb(x2, g2)
    step2 = out.x_neg.view(b, m, d) - y[:, None]
    assert abs(float(step2.var()) / t - 1.0) < se
    c = np.corrcoef((y - x).flatten().numpy(), step2[:, 0].flatten().numpy())[0, 1]
    assert abs(c) < 5 / math.sqrt(b * d)


def test_gaussian_images_two_step_variance():
    """Images ``(B, C, H, W)``: every pixel of x' - x has variance 2 t."""
    t, b = 0.2, 4000
    g = torch.Generator().manual_seed(7)
    x = torch.rand(b, 1, 3, 3, generator=g)
    out = EnergyDiscrepancy(GaussianPerturbation(t), m=2)(Flat(Continuous((1, 3, 3))), x,
                                                          generator=g)
    diff = out.x_neg.view(b, 2, 9) - x.view(b, 1, 9)
    per_pixel = diff[:, 0].var(0) / (2 * t)
    assert bool(((per_pixel - 1).abs() < 5 * math.sqrt(2 / b)).all()), per_pixel
