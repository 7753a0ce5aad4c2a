"""Energy bases and analytic targets checked against exact answers."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ebmflow.energy import (
    BernoulliBaseEnergy,
    ConvEnergy,
    EnergyModel,
    GaussianMixtureEnergy,
    IsingEnergy,
    MLPEnergy,
    SumEnergy,
    enumerate_binary,
    lattice_adjacency,
)
from ebmflow.spaces import Binary, Categorical, Continuous


def _grid(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    g = torch.linspace(lo, hi, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1), float(g[1] - g[0]) ** 2


@pytest.mark.parametrize(
    "scales",
    [0.7, torch.tensor([0.5, 1.0, 0.8]), torch.tensor([[0.5, 1.2], [1.0, 0.6], [0.8, 0.8]])],
    ids=["shared", "isotropic", "diagonal"],
)
def test_mixture_log_prob_integrates_to_one(scales):
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    gmm = GaussianMixtureEnergy(means, scales, torch.tensor([0.2, 0.5, 0.3])).double()
    x, cell = _grid(-9, 9, 401)
    total = gmm.log_prob(x).exp().sum() * cell
    assert abs(float(total) - 1.0) < 1e-4


def test_mixture_matches_scipy_density():
    from scipy.stats import multivariate_normal

    means = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]])
    scales = torch.tensor([[1.0, 0.5, 2.0], [0.3, 0.3, 0.3]])
    w = torch.tensor([0.7, 0.3])
    gmm = GaussianMixtureEnergy(means, scales, w).double()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sum(
        w[k].item() * multivariate_normal(means[k].numpy(), torch.diag(scales[k] ** 2).numpy()).pdf(x.numpy())
        for k in range(2)
    )
    assert torch.allclose(gmm.log_prob(x), torch.as_tensor(ref).log(), atol=1e-8)
    assert torch.allclose(gmm.energy(x), -gmm.log_prob(x))


def test_mixture_exact_samples_match_weights_mean_and_covariance(gen):
    gmm = GaussianMixtureEnergy(
        torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]), torch.tensor([0.5, 1.0, 0.7]),
        torch.tensor([0.5, 0.3, 0.2]),
    )
    n = 40000
    x, labels = gmm.sample_with_labels(n, generator=gen)
    freq = torch.bincount(labels, minlength=3).float() / n
    se = (gmm.weights * (1 - gmm.weights) / n).sqrt()
    assert ((freq - gmm.weights).abs() < 5 * se).all()
    cov = gmm.covariance()
    se_mean = (torch.diag(cov) / n).sqrt()
    assert ((x.mean(0) - gmm.mean()).abs() < 5 * se_mean).all()
    emp_cov = torch.cov(x.T)
    assert torch.allclose(emp_cov, cov, atol=0.1 * float(cov.abs().max()))


def test_mixture_score_is_minus_grad_energy_and_leaks_nothing():
    gmm = GaussianMixtureEnergy(torch.zeros(1, 2), 2.0)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    # single Gaussian N(0, 4 I): score = -x / 4
    assert torch.allclose(gmm.score(x), -x / 4, atol=1e-6)
    mlp = MLPEnergy(Continuous(2), hidden=(8,))
    with torch.no_grad():
        s = mlp.score(x)
    assert s.shape == x.shape
    assert all(p.grad is None for p in mlp.parameters())


def test_energy_and_grad_matches_finite_differences():
    torch.manual_seed(0)
    mlp = MLPEnergy(Continuous(3), hidden=(16, 16)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    e, g = mlp.energy_and_grad(x)
    assert not e.requires_grad and not g.requires_grad
    h = 1e-6
    for i in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[i] = h
        fd = (mlp(x + d) - mlp(x - d)) / (2 * h)
        assert torch.allclose(g[:, i], fd, atol=1e-6)


def test_mixture_bad_arguments():
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\)"):
        GaussianMixtureEnergy(torch.zeros(3))
    with pytest.raises(ValueError, match="scales must be"):
        GaussianMixtureEnergy(torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureEnergy(torch.zeros(2, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        GaussianMixtureEnergy(torch.zeros(2, 2), 1.0, torch.tensor([1.0, -0.5]))


def _brute_force_ising(j: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = j.shape[0]
    logits = []
    for bits in itertools.product([0, 1], repeat=d):
        s = [2 * v - 1 for v in bits]
        val = sum(j[i, k].item() * s[i] * s[k] for i in range(d) for k in range(d))
        val += sum(b[i].item() * s[i] for i in range(d))
        logits.append(val)
    return torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)


def test_ising_enumeration_matches_brute_force(gen):
    d = 5
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    model = IsingEnergy(a, b).double()
    j = 0.5 * (a + a.T)
    j.fill_diagonal_(0)
    p = model.probabilities()
    assert abs(float(p.sum()) - 1) < 1e-12
    assert torch.allclose(p, _brute_force_ising(j, b), atol=1e-12)
    assert torch.allclose(model.log_prob(model.states()).exp(), p, atol=1e-12)


def test_ising_exact_samples_match_probabilities(gen):
    model = IsingEnergy.lattice(2, 0.4, bias=0.1)
    n = 50000
    x = model.sample(n, generator=gen)
    codes = (x * (2 ** torch.arange(3, -1, -1).float())).sum(1).long()
    freq = torch.bincount(codes, minlength=16).float() / n
    p = model.probabilities()
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()


def test_lattice_adjacency_degrees():
    a = lattice_adjacency(4, periodic=True)
    assert torch.equal(a, a.T) and (a.sum(1) == 4).all() and a.diag().abs().sum() == 0
    a = lattice_adjacency(4, periodic=False)
    assert a.sum() / 2 == 2 * 4 * 3  # horizontal + vertical edges
    assert int(a.sum(1).min()) == 2 and int(a.sum(1).max()) == 4


def test_ising_learnable_and_too_large():
    model = IsingEnergy.lattice(3, 0.1, learnable=True)
    assert sum(p.numel() for p in model.parameters()) == 81 + 9
    x = Binary(9).noise(4)
    model(x).sum().backward()
    assert model._coupling.grad is not None
    big = IsingEnergy.lattice(5, 0.1)
    with pytest.raises(ValueError, match="D <= 20"):
        big.log_partition()
    with pytest.raises(ValueError, match="too large"):
        enumerate_binary(21)


def test_bernoulli_base_is_normalised_and_fits_marginals(gen):
    p = torch.tensor([0.1, 0.5, 0.8, 0.95])
    base = BernoulliBaseEnergy.from_probs(p).double()
    states = enumerate_binary(4).double()
    assert abs(float(base.log_prob(states).exp().sum()) - 1) < 1e-12
    data = base.sample(20000, generator=gen)
    fit = BernoulliBaseEnergy.from_data(data.float())
    assert torch.allclose(fit.probs, p.float(), atol=0.02)
    with pytest.raises(ValueError, match=r"outside \{0, 1\}"):
        BernoulliBaseEnergy.from_data(torch.full((3, 4), 0.5))


def test_energy_sum_is_product_of_experts():
    base = BernoulliBaseEnergy.from_probs(torch.tensor([0.2, 0.7, 0.4]))
    mlp = MLPEnergy(Binary(3), hidden=(8,))
    both = mlp + base
    assert isinstance(both, SumEnergy)
    x = enumerate_binary(3)
    assert torch.allclose(both(x), mlp(x) + base(x))
    with pytest.raises(ValueError, match="different spaces"):
        _ = mlp + BernoulliBaseEnergy(torch.zeros(4))


def test_mlp_energy_all_spaces():
    torch.manual_seed(0)
    for space in (Continuous(3), Binary(5), Categorical(4, 3)):
        m = MLPEnergy(space, hidden=(8, 8))
        x = space.noise(6)
        assert m(x).shape == (6,)
    cat = Categorical(4, 3)
    m = MLPEnergy(cat, hidden=(8,))
    x = cat.noise(6)
    assert torch.allclose(m(x), m(cat.one_hot(x)))
    assert m.score(x).shape == (6, 4, 3)


def test_conv_energy_images_and_flat_binary():
    torch.manual_seed(0)
    c = ConvEnergy(Continuous((1, 8, 8)), channels=(4, 8))
    assert c(torch.randn(3, 1, 8, 8)).shape == (3,)
    assert c.score(torch.randn(3, 1, 8, 8)).shape == (3, 1, 8, 8)
    b = ConvEnergy(Binary(64), channels=(4,), image_shape=(1, 8, 8))
    assert b(Binary(64).noise(2)).shape == (2,)
    with pytest.raises(ValueError, match="image states"):
        ConvEnergy(Continuous(4))


class Quadratic(EnergyModel):
    """A user energy: a few lines, only energy() implemented."""

    def __init__(self):
        super().__init__(Continuous(2))
        self.scale = nn.Parameter(torch.tensor(2.0))

    def energy(self, x):
        return 0.5 * self.scale * x.pow(2).sum(-1)


def test_user_subclass_gets_everything():
    q = Quadratic()
    x = torch.tensor([[1.0, 2.0]])
    assert torch.allclose(q(x), torch.tensor([5.0]))
    assert torch.allclose(q.score(x), -2.0 * x)
    assert torch.allclose(q.log_prob(x), -q(x))
    assert q.scale.grad is None


def test_bad_subclasses_and_inputs():
    class NoEnergy(EnergyModel):
        pass

    with pytest.raises(NotImplementedError, match="must implement energy"):
        NoEnergy(Continuous(2))(torch.zeros(1, 2))

    class WrongShape(EnergyModel):
        def energy(self, x):
            return x.sum(-1, keepdim=True)

    with pytest.raises(ValueError, match=r"returned \(3, 1\).*must return shape \(B,\)"):
        WrongShape(Continuous(2))(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="space must be an ebmflow.spaces.Space"):
        WrongShape(2)  # type: ignore[arg-type]
    mlp = MLPEnergy(Continuous(2), hidden=(4,)).to("meta")
    with pytest.raises(ValueError, match="is on device cpu but the model is on meta"):
        mlp(torch.zeros(1, 2))


def test_import_is_light():
    code = (
        "import sys, time; t = time.time(); import ebmflow; dt = time.time() - t; "
        "import ebmflow.energy, ebmflow.samplers, ebmflow.losses, ebmflow.spaces; "
        "bad = [m for m in ('matplotlib', 'sklearn', 'tensorboard') if m in sys.modules]; "
        "assert not bad, bad; assert dt < 0.5, dt"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_math_constant_sanity():
    # a single standard normal in D dims has energy D/2 log(2 pi) at the origin
    gmm = GaussianMixtureEnergy(torch.zeros(1, 4), 1.0)
    assert math.isclose(float(gmm(torch.zeros(1, 4))), 2 * math.log(2 * math.pi), rel_tol=1e-6)


# -- closed-form / hand-written gradients -------------------------------------------------------
def _autograd_eag(model: EnergyModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return EnergyModel.energy_and_grad(model, x)


@pytest.mark.parametrize("activation", ["silu", "relu", "elu", "gelu", "tanh", "softplus",
                                        "leaky_relu"])
@pytest.mark.parametrize("space", [Continuous(5), Continuous((2, 3)), Binary(6), Categorical(3, 4)])
def test_mlp_hand_written_backward_equals_autograd(activation, space, gen):
    model = MLPEnergy(space, hidden=(16, 8), activation=activation).double()
    if isinstance(space, Categorical):
        x = space.one_hot(space.noise(9, generator=gen)).double()
    else:
        x = torch.randn((9, *space.shape), generator=gen, dtype=torch.float64)
    e, g = model.energy_and_grad(x)
    e_ref, g_ref = _autograd_eag(model, x)
    assert g.shape == x.shape and not e.requires_grad and not g.requires_grad
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_mlp_hand_written_backward_falls_back_where_it_must(gen):
    x = torch.randn(4, 3, generator=gen)

    class Shifted(MLPEnergy):  # a subclass's own energy is differentiated by autograd
        def energy(self, x):
            return super().energy(x) + x.pow(3).sum(-1)

    sub = Shifted(Continuous(3), hidden=(8,))
    torch.testing.assert_close(sub.energy_and_grad(x)[1], _autograd_eag(sub, x)[1])
    mod = MLPEnergy(Continuous(3), hidden=(8,))
    mod.net.append(nn.Tanh())  # no longer a Linear/activation stack ending in Linear(., 1)
    torch.testing.assert_close(mod.energy_and_grad(x)[1], _autograd_eag(mod, x)[1])
    hooked = MLPEnergy(Continuous(3), hidden=(8,))
    hooked.net[0].register_forward_hook(lambda m, i, o: o * 2)
    torch.testing.assert_close(hooked.energy_and_grad(x)[1], _autograd_eag(hooked, x)[1])
    with pytest.raises(ValueError, match="expects"):
        MLPEnergy(Continuous(3)).energy_and_grad(torch.randn(4, 5))  # wrong width: named


def test_ising_closed_form_gradient_equals_autograd(gen):
    fixed = IsingEnergy.lattice(4, 0.3, bias=0.2)
    learnable = IsingEnergy(torch.randn(16, 16, generator=gen), torch.randn(16, generator=gen),
                            learnable=True)
    x = torch.randint(0, 2, (32, 16), generator=gen).float()
    for model in (fixed, learnable):
        e, g = model.energy_and_grad(x)
        e_ref, g_ref = _autograd_eag(model, x)
        torch.testing.assert_close(e, e_ref)
        torch.testing.assert_close(g, g_ref)
    assert learnable._coupling.grad is None
    # a fixed J is used as stored, so loading keeps it symmetric with a zero diagonal
    fixed.load_state_dict({"_coupling": torch.randn(16, 16, generator=gen), "bias": torch.zeros(16)})
    j = fixed.coupling
    assert torch.equal(j, j.T) and torch.equal(torch.diagonal(j), torch.zeros(16))


@pytest.mark.parametrize("space", [Binary(7), Categorical(4, 5)])
def test_conditional_energies_default_is_brute_force(space, gen):
    model = MLPEnergy(space, hidden=(16,))
    x = space.noise(6, generator=gen)
    index = torch.randint(0, space.num_dims if isinstance(space, Categorical) else space.dim,
                          (6,), generator=gen)
    k = space.num_classes
    with torch.no_grad():
        got = model.conditional_energies(x, index)
        cached = model.conditional_energies(x, index, model(x))
        want = torch.empty(6, k)
        for b in range(6):
            for v in range(k):
                y = x[b:b + 1].clone()
                y[0, index[b]] = v
                want[b, v] = model(y)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cached, want)


def test_ising_local_field_formula_equals_default(gen):
    model = IsingEnergy(torch.randn(12, 12, generator=gen), torch.randn(12, generator=gen))
    x = torch.randint(0, 2, (20, 12), generator=gen).float()
    index = torch.randint(0, 12, (20,), generator=gen)
    want = EnergyModel.conditional_energies(model, x, index)
    torch.testing.assert_close(model.conditional_energies(x, index), want)
    torch.testing.assert_close(model.conditional_energies(x, index, model(x)), want)
    with pytest.raises(ValueError, match="discrete states"):
        MLPEnergy(Continuous(3)).conditional_energies(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_sum_energy_combines_the_terms_fast_paths(gen):
    space = Binary(12)
    ising = IsingEnergy(torch.randn(12, 12, generator=gen), torch.randn(12, generator=gen))
    total = MLPEnergy(space, hidden=(8,)) + ising + BernoulliBaseEnergy(torch.randn(12, generator=gen))
    x = space.noise(10, generator=gen)
    index = torch.randint(0, 12, (10,), generator=gen)
    e, g = total.energy_and_grad(x)
    e_ref, g_ref = _autograd_eag(total, x)
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        want = EnergyModel.conditional_energies(total, x, index)
        torch.testing.assert_close(total.conditional_energies(x, index, total(x)), want)
    assert total.has_local_conditionals and ising.has_local_conditionals
    assert not (MLPEnergy(space) + BernoulliBaseEnergy(torch.zeros(12))).has_local_conditionals


def test_mixture_closed_form_gradient_equals_autograd(gen):
    mixtures = [
        GaussianMixtureEnergy.ring(),
        GaussianMixtureEnergy.two_modes(dim=16),
        GaussianMixtureEnergy(torch.randn(5, 3, generator=gen), torch.rand(5, 3, generator=gen) + 0.2,
                              torch.rand(5, generator=gen)),
    ]
    for model in mixtures:
        model = model.double()
        x = 4 * torch.randn(50, model.means.shape[1], generator=gen, dtype=torch.float64)
        e, g = model.energy_and_grad(x)
        e_ref, g_ref = _autograd_eag(model, x)
        torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_mlp_fast_path_on_large_float32_products_agrees_with_autograd(gen):
    """Medium and large float32 products of the fast path run on another GEMM (oneDNN on
    CPU): the numbers must still be autograd's, to float32 rounding."""
    from ebmflow.energy import _gemm

    model = MLPEnergy(Continuous(64), hidden=(256, 256))
    x = torch.randn(512, 64, generator=gen)
    e, g = model.energy_and_grad(x)
    e_ref, g_ref = _autograd_eag(model, x)
    torch.testing.assert_close(e, e_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    w, b = model.net[2].weight, model.net[2].bias
    h = torch.randn(512, 256, generator=gen)
    torch.testing.assert_close(_gemm.linear(h, w, b), torch.nn.functional.linear(h, w, b),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_gemm.linear(h, w.t()), h @ w, rtol=1e-4, atol=1e-4)
