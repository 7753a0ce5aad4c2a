"""Tests of ebmflow.metrics against hand computations, analytic values and exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from ebmflow.energy import (
    BernoulliBaseEnergy,
    EnergyModel,
    GaussianMixtureEnergy,
    IsingEnergy,
    enumerate_binary,
)
from ebmflow.metrics import (
    ais_log_partition,
    annealing_schedule,
    effective_sample_size,
    empirical_probs,
    enumerate_states,
    exact_log_partition,
    exact_log_partition_binary,
    kl_divergence,
    median_bandwidth,
    mmd,
    mode_weights,
    state_index,
    total_variation,
)
from ebmflow.samplers import MCMCSampler
from ebmflow.spaces import Categorical


# -- MMD ------------------------------------------------------------------------------------
def _mmd_loops(x, y, k):
    """Unbiased MMD^2 by explicit loops (the definition)."""
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


@pytest.mark.parametrize("chunk_size", [2, 2048])
def test_mmd_rbf_matches_loops(gen, chunk_size):
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 3, generator=gen, dtype=torch.float64) + 0.5
    h = 1.3

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))

    got = mmd(x, y, bandwidth=h, chunk_size=chunk_size)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_mmd_loops(x, y, k), rel=1e-10, abs=1e-12)


def test_mmd_median_heuristic_matches_loops(gen):
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    z = torch.cat([x, y])
    dists = [float((z[i] - z[j]).norm()) for i in range(11) for j in range(i + 1, 11)]
    h = float(
        torch.tensor(dists, dtype=torch.float64).median()
    )  # torch's median: the lower of the two middles
    assert median_bandwidth(x, y) == pytest.approx(h, rel=1e-12)

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))

    assert float(mmd(x, y)) == pytest.approx(_mmd_loops(x, y, k), rel=1e-10)


@pytest.mark.parametrize("kind", ["binary", "categorical"])
def test_mmd_exp_hamming_matches_loops(gen, kind):
    if kind == "binary":
        x = (torch.rand(6, 10, generator=gen) < 0.5).float()
        y = (torch.rand(5, 10, generator=gen) < 0.3).float()
    else:
        x = torch.randint(0, 4, (6, 10), generator=gen)
        y = torch.randint(0, 3, (5, 10), generator=gen)

    def k(a, b):
        return math.exp(-0.25 * int((a != b).sum()))

    got = mmd(x, y, kernel="exp_hamming", hamming_scale=0.25, chunk_size=3)
    assert float(got) == pytest.approx(_mmd_loops(x, y, k), rel=1e-5, abs=1e-7)


def test_mmd_is_unbiased_for_gaussians(gen):
    """Mean over repeats equals the analytic MMD^2 (and ~0 under the null)."""
    h, d, n, reps = 1.0, 2, 200, 30
    shift = torch.tensor([1.0, 0.0])
    c = (h * h / (h * h + 2.0)) ** (d / 2)  # E k(x, x') for N(0, I), X - X' ~ N(0, 2I)
    exact = 2 * c * (1 - math.exp(-1.0 / (2 * (h * h + 2.0))))
    null, alt = [], []
    for _ in range(reps):
        x = torch.randn(n, d, generator=gen)
        null.append(float(mmd(x, torch.randn(n, d, generator=gen), bandwidth=h)))
        alt.append(float(mmd(x, torch.randn(n, d, generator=gen) + shift, bandwidth=h)))
    null_t, alt_t = torch.tensor(null), torch.tensor(alt)
    se_null = float(null_t.std()) / math.sqrt(reps)
    se_alt = float(alt_t.std()) / math.sqrt(reps)
    assert abs(float(null_t.mean())) < 4 * se_null
    assert abs(float(alt_t.mean()) - exact) < 4 * se_alt
    assert float(alt_t.min()) > float(null_t.max())  # clearly separated
    assert float(alt_t.mean()) > 10 * float(null_t.std())


def test_mmd_bad_input():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="kernel"):
        mmd(x, x, kernel="laplace")
    with pytest.raises(ValueError, match="event shape"):
        mmd(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        mmd(x, torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(x, torch.randn(1, 2))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.randn(0, 2), x)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x, bandwidth=-1.0)
    with pytest.raises(ValueError, match="binary"):
        mmd(x, x, kernel="exp_hamming")
    with pytest.raises(ValueError, match="float"):
        mmd(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long))


# -- mode weights ---------------------------------------------------------------------------
def test_mode_weights_two_modes(gen):
    gmm = GaussianMixtureEnergy.two_modes()
    x = gmm.sample(20000, generator=gen)
    res = mode_weights(x, gmm.means)
    se = math.sqrt(2 / 9 / 20000)
    assert float(res.weights[0]) == pytest.approx(2 / 3, abs=4 * se)
    assert float(res.weights.sum()) == pytest.approx(1.0)
    assert float(res.outliers) == 0.0
    assert res.labels.shape == (20000,)


def test_mode_weights_outliers_by_hand():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[0.5, 0.0], [9.0, 0.0], [5.0, 5.0], [11.0, 0.5], [-0.2, 0.1]])
    res = mode_weights(x, means, max_distance=2.0, chunk_size=2)
    assert res.labels.tolist() == [0, 1, -1, 1, 0]
    assert res.counts.tolist() == [2, 2]
    assert res.weights.tolist() == pytest.approx([0.4, 0.4])
    assert float(res.outliers) == pytest.approx(0.2)
    assert res.inlier_weights.tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="means"):
        mode_weights(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        mode_weights(torch.tensor([[float("inf"), 0.0]]), means)
    with pytest.raises(ValueError, match="at least 1"):
        mode_weights(torch.zeros(0, 2), means)


# -- discrete: enumeration, TV, KL ----------------------------------------------------------
def test_enumeration_order_matches_energy_module():
    assert torch.equal(enumerate_states(5), enumerate_binary(5))
    states = enumerate_states(3, num_classes=3)
    assert states.dtype == torch.long and states.shape == (27, 3)
    assert torch.equal(state_index(states, 3), torch.arange(27))
    assert states[5].tolist() == [0, 1, 2]


def test_tv_and_kl_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])  # states 00, 01, 10, 11
    samples = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    # empirical: (0.25, 0.25, 0, 0.5)
    tv = 0.5 * (0.15 + 0.05 + 0.3 + 0.1)
    assert float(total_variation(samples, probs)) == pytest.approx(tv)
    a = 0.5
    p_hat = (torch.tensor([1.0, 1.0, 0.0, 2.0]) + a) / (4 + 4 * a)
    kl = float((probs * (probs / p_hat).log()).sum())
    assert float(kl_divergence(samples, probs, smoothing=a)) == pytest.approx(kl)
    assert float(kl_divergence(samples, probs, smoothing=0.0)) == math.inf
    assert empirical_probs(samples).tolist() == [0.25, 0.25, 0.0, 0.5]


def test_tv_with_states_and_categorical():
    # categorical K = 3, D = 2: inferred from 9 = 3^2
    probs = torch.full((9,), 1 / 9)
    samples = torch.tensor([[0, 0], [2, 1], [2, 1]])
    emp = torch.zeros(9)
    emp[0], emp[7] = 1 / 3, 2 / 3
    assert float(total_variation(samples, probs)) == pytest.approx(
        0.5 * float((emp - probs).abs().sum())
    )
    # an explicit (permuted) state list gives the same; samples outside the list add mass
    states = enumerate_states(2, 3)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    same = total_variation(samples, probs[perm], states=states[perm])
    assert float(same) == pytest.approx(float(total_variation(samples, probs)))
    sub = total_variation(samples, torch.tensor([0.5, 0.5]), states=torch.tensor([[0, 0], [1, 1]]))
    # empirical on listed states (1/3, 0), outside 2/3 -> 0.5 (1/6 + 1/2 + 2/3)
    assert float(sub) == pytest.approx(0.5 * (1 / 6 + 1 / 2 + 2 / 3))


def test_tv_shrinks_like_inverse_sqrt_n(gen):
    ising = IsingEnergy.lattice(2, 0.3, bias=0.1)  # D = 4, 16 states
    probs = ising.probabilities()
    states = ising.states()
    reps = 20

    def mean_tv(n):
        tvs = []
        for _ in range(reps):
            idx = torch.multinomial(probs, n, replacement=True, generator=gen)
            tvs.append(float(total_variation(states[idx], probs)))
        return sum(tvs) / reps

    small, large = mean_tv(1000), mean_tv(100_000)
    predicted = 0.5 * float((2 * probs * (1 - probs) / (math.pi * 100_000)).sqrt().sum())
    assert large == pytest.approx(predicted, rel=0.15)
    assert 8.0 < small / large < 12.0


def test_kl_of_exact_samples_is_small_and_of_wrong_law_matches(gen):
    ising = IsingEnergy.lattice(2, 0.3, bias=0.1)
    p, states = ising.probabilities(), ising.states()
    n = 200_000
    exact = states[torch.multinomial(p, n, replacement=True, generator=gen)]
    assert 0 <= float(kl_divergence(exact, p)) < 5 * 15 / (2 * n)  # ~ (S - 1) / (2 n)
    q = torch.full((16,), 1 / 16)
    uniform = states[torch.multinomial(q, n, replacement=True, generator=gen)]
    kl_exact = float((p * (p / q).log()).sum())
    # delta method: d KL = -sum_s p_s (q_hat_s - q_s) / q_s, variance (sum_s p_s^2 / q_s - 1) / n
    sd = math.sqrt((float((p**2 / q).sum()) - 1.0) / n)
    assert float(kl_divergence(uniform, p)) == pytest.approx(kl_exact, abs=4 * sd)


def test_discrete_bad_input():
    probs = torch.full((4,), 0.25)
    with pytest.raises(ValueError, match="entries"):
        total_variation(torch.zeros(3, 3), probs)
    with pytest.raises(ValueError, match="sum to 1"):
        total_variation(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="binary"):
        total_variation(torch.full((3, 2), 0.5), probs)
    with pytest.raises(ValueError, match="at least 1"):
        kl_divergence(torch.zeros(0, 2), probs)
    with pytest.raises(ValueError, match="NaN"):
        kl_divergence(torch.full((2, 2), float("nan")), probs)
    with pytest.raises(ValueError, match="non-negative"):
        total_variation(torch.zeros(2, 2), torch.tensor([1.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="states"):
        total_variation(torch.zeros(2, 2), probs, states=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="smoothing"):
        kl_divergence(torch.zeros(2, 2), probs, smoothing=-1.0)
    with pytest.raises(ValueError, match="too many"):
        enumerate_states(40)


# -- exact log Z ----------------------------------------------------------------------------
def test_exact_log_partition_binary_matches_ising():
    ising = IsingEnergy.lattice(3, 0.25, bias=-0.2)  # D = 9
    got = exact_log_partition_binary(ising, 9, chunk_size=100)
    assert float(got) == pytest.approx(float(ising.log_partition()), rel=1e-6)


class _Potts(EnergyModel):
    """Small categorical energy: E(x) = -sum_d w[d, x_d] - c [x_0 == x_1]."""

    def __init__(self, dim, k):
        super().__init__(Categorical(dim, k))
        self.register_buffer("w", torch.randn(dim, k, generator=torch.Generator().manual_seed(3)))

    def energy(self, x):
        oh = self.space.one_hot(x)
        return -(oh * self.w).sum((1, 2)) - 0.7 * (oh[:, 0] * oh[:, 1]).sum(-1)


def test_exact_log_partition_categorical():
    model = _Potts(3, 4)
    brute = torch.logsumexp(
        torch.stack(
            [
                -model(torch.tensor([[a, b, c]]))
                for a in range(4)
                for b in range(4)
                for c in range(4)
            ]
        ).flatten(),
        0,
    )
    got = exact_log_partition(model, 3, num_classes=4, chunk_size=7)
    assert float(got) == pytest.approx(float(brute), rel=1e-6)


# -- ESS ------------------------------------------------------------------------------------
def test_effective_sample_size(gen):
    assert float(effective_sample_size(torch.zeros(50))) == pytest.approx(50.0)
    assert float(effective_sample_size(torch.zeros(50), normalized=True)) == pytest.approx(1.0)
    one = torch.full((10,), float("-inf"))
    one[3] = 0.0
    assert float(effective_sample_size(one)) == pytest.approx(1.0)
    lw = torch.randn(100, generator=gen, dtype=torch.float64) * 2
    w = lw.exp()
    direct = float(w.sum() ** 2 / (w**2).sum())
    assert float(effective_sample_size(lw)) == pytest.approx(direct, rel=1e-10)
    assert float(effective_sample_size(lw + 1000.0)) == pytest.approx(direct, rel=1e-10)
    for bad, msg in [
        (torch.zeros(0), "empty"),
        (torch.zeros(3, 2), "1-d"),
        (torch.tensor([0.0, float("nan")]), "NaN"),
        (torch.tensor([0.0, float("inf")]), "inf"),
        (torch.full((3,), float("-inf")), "-inf"),
    ]:
        with pytest.raises(ValueError, match=msg):
            effective_sample_size(bad)


# -- AIS ------------------------------------------------------------------------------------
class _RandomWalkMH(MCMCSampler):
    """Test-local sampler: Gaussian random-walk Metropolis, only ``step`` is implemented."""

    def __init__(self, step_size: float = 0.5, **kw):
        super().__init__(**kw)
        self.step_size = step_size

    def step(self, energy, x, generator=None):
        prop = x + self.step_size * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        log_alpha = energy(x) - energy(prop)
        accept = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).log() < log_alpha
        return torch.where(accept[:, None], prop, x), {"accept_rate": accept.float()}


class _MetropolisSweep(MCMCSampler):
    """Test-local sampler: one systematic sweep of single-bit Metropolis flips per step."""

    def step(self, energy, x, generator=None):
        e = energy(x)
        accepted = torch.zeros(x.shape[0])
        for i in range(x.shape[1]):
            prop = x.clone()
            prop[:, i] = 1.0 - prop[:, i]
            e_prop = energy(prop)
            accept = torch.rand(x.shape[0], generator=generator).log() < e - e_prop
            x = torch.where(accept[:, None], prop, x)
            e = torch.where(accept, e_prop, e)
            accepted += accept.float()
        return x, {"accept_rate": accepted / x.shape[1]}


class _Offset(EnergyModel):
    """E(x) = E_gmm(x) + c, so log Z = -c."""

    def __init__(self, gmm, c):
        super().__init__(gmm.space)
        self.gmm, self.c = gmm, c

    def energy(self, x):
        return self.gmm(x) + self.c


def test_ais_log_partition_gaussian_mixture(gen):
    # standard error of log Z ~ 0.011 (measured over seeds), so 0.05 is > 4 standard errors
    target = _Offset(GaussianMixtureEnergy.ring(4, radius=2.5, scale=1.0), c=2.5)
    base = GaussianMixtureEnergy(torch.zeros(1, 2), 3.0)
    log_z, stats = ais_log_partition(
        target,
        base,
        _RandomWalkMH(0.7),
        n_particles=1000,
        n_temps=150,
        generator=gen,
        mcmc_steps=2,
    )
    assert log_z.dim() == 0
    assert float(log_z) == pytest.approx(-2.5, abs=0.05)
    assert float(stats["log_z_std_err"]) < 0.025
    assert 0.0 < float(stats["ess_fraction"]) <= 1.0
    assert float(stats["ess"]) == pytest.approx(1000 * float(stats["ess_fraction"]))
    assert stats["log_weights"].shape == (1000,)
    assert 0.05 < float(stats["accept_rate"]) < 1.0
    assert float(stats["log_weight_var"]) >= 0


def test_ais_log_partition_ising_binary(gen):
    # base = independent bits with the field's marginal logits 2 b; standard error ~ 0.008
    ising = IsingEnergy.lattice(3, 0.2, bias=0.15)  # D = 9
    base = BernoulliBaseEnergy(torch.full((9,), 0.3))
    log_z, stats = ais_log_partition(
        ising,
        base,
        _MetropolisSweep(),
        n_particles=1500,
        n_temps=100,
        generator=gen,
        schedule="linear",
    )
    assert float(log_z) == pytest.approx(float(ising.log_partition()), abs=0.05)
    assert float(stats["ess_fraction"]) > 0.5


def test_annealing_schedule_and_bad_input(gen):
    for name in ("sigmoid", "linear"):
        b = annealing_schedule(10, name)
        assert b.shape == (11,) and float(b[0]) == 0.0 and float(b[-1]) == 1.0
        assert bool((b[1:] > b[:-1]).all())
    gmm = GaussianMixtureEnergy.two_modes()
    base = GaussianMixtureEnergy(torch.zeros(1, 2), 4.0)
    with pytest.raises(ValueError, match="schedule"):
        ais_log_partition(gmm, base, _RandomWalkMH(), 10, 5, schedule="cosine")
    with pytest.raises(ValueError, match="n_particles"):
        ais_log_partition(gmm, base, _RandomWalkMH(), 0, 5)
    with pytest.raises(ValueError, match="n_temps"):
        ais_log_partition(gmm, base, _RandomWalkMH(), 10, 0)
    with pytest.raises(ValueError, match="space"):
        ais_log_partition(gmm, BernoulliBaseEnergy(torch.zeros(2)), _RandomWalkMH(), 10, 5)
    with pytest.raises(ValueError, match="MCMCSampler"):
        ais_log_partition(gmm, base, object(), 10, 5)
