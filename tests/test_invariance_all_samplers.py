"""Invariance of every MCMC sampler class, discovered automatically.

Every concrete subclass of ``ebmflow.samplers.MCMCSampler`` defined in the library is found by
walking ``MCMCSampler.__subclasses__()`` after importing the packages; each must have a row in
``ROWS`` (a new sampler fails ``test_every_sampler_class_has_a_row`` until it gets one).

Checks, all from chains started at exact draws of a target p (so one step must keep them exact):

* Continuous exact kernels (MALA, HMC): after one step the first and second moments match the
  target within ``Z`` Monte Carlo standard errors, and the pair (x, x') is exchangeable
  (detailed balance: E[a(x) b(x')] = E[b(x) a(x')] for asymmetric test functions a, b).
* ULA (``Langevin``) is biased by design: on N(0, s^2) one step maps the variance to exactly
  s^2 + eta^2 / s^2 (x' = (1 - eta/s^2) x + sqrt(2 eta) xi), so the test checks that documented
  inflation, not invariance.
* Discrete kernels: the law after one step is compared with p by total variation on an
  enumerable space (Ising on {0,1}^4 and a Potts-type energy on {0,1,2}^3), with the exact
  expected TV of an empirical law plus a McDiarmid deviation (failure probability 1e-4).
  Where the sampler exposes exact proposal probabilities (``log_proposal``) the one-step
  transition matrix P is also built exactly and pi P = pi (and detailed balance) is checked to
  1e-10. DULA (``DiscreteLangevin(metropolis=False)``) is approximate: its sampled one-step law
  must match pi P (not pi), and the bias TV(pi P, pi) must grow with the step size.

Tolerance derivation (continuous): a statistic's mean over n chains has standard error
sd / sqrt(n) with sd estimated from the same chains; Z = 5 gives a false-alarm probability
below 1e-6 per statistic.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import binom
from torch import Tensor

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy, IsingEnergy, enumerate_binary
from ebmflow.samplers import (
    HMC,
    MALA,
    DiscreteLangevin,
    Gibbs,
    GibbsWithGradients,
    Langevin,
    MCMCSampler,
)
from ebmflow.spaces import Binary, Categorical

Z = 5.0
DELTA = 1e-4
# packages that may define samplers; imported so that their subclasses are registered
_PACKAGES = ("ebmflow.samplers", "ebmflow.flows", "ebmflow.discrete_flows", "ebmflow.losses",
             "ebmflow.training")
# intermediate bases that hold no kernel of their own
ABSTRACT = {"ebmflow.samplers.adaptive.AdaptiveStepSize", "ebmflow.samplers._discrete.GradientDiscreteSampler"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def discover_samplers() -> list[type]:
    """Concrete library subclasses of MCMCSampler (recursively), sorted by name."""
    for pkg in _PACKAGES:
        importlib.import_module(pkg)
    found: dict[str, type] = {}
    todo = list(MCMCSampler.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        name = _qualname(cls)
        if cls.__module__.startswith("ebmflow.") and name not in ABSTRACT:
            found[name] = cls
    return [found[k] for k in sorted(found)]


# -- targets -----------------------------------------------------------------------------------
class PottsEnergy(EnergyModel):
    """E(x) = -sum_d h[d, x_d] - 1/2 sum_{d,e} W[d, e, x_d, x_e] on Categorical(D, K).

    Accepts long ``(B, D)`` states or their one-hot relaxation ``(B, D, K)`` (differentiable).
    """

    def __init__(self, h: Tensor, w: Tensor):
        d, k = h.shape
        super().__init__(Categorical(d, k))
        w = (w + w.permute(1, 0, 3, 2)) / 2
        mask = 1.0 - torch.eye(d)[:, :, None, None]
        self.h = torch.nn.Parameter(h)
        self.w = torch.nn.Parameter(w * mask)

    def energy(self, x: Tensor) -> Tensor:
        oh = x if x.is_floating_point() else self.space.one_hot(x).to(self.h.dtype)
        pair = torch.einsum("bdk,dekl,bel->b", oh, self.w, oh)
        return -(oh * self.h).sum((1, 2)) - 0.5 * pair


def _ising(seed: int = 0) -> IsingEnergy:
    g = torch.Generator().manual_seed(seed)
    return IsingEnergy(torch.randn(4, 4, generator=g) * 0.5, torch.randn(4, generator=g) * 0.5)


def _potts(seed: int = 1) -> PottsEnergy:
    g = torch.Generator().manual_seed(seed)
    return PottsEnergy(torch.randn(3, 3, generator=g) * 0.8, torch.randn(3, 3, 3, 3, generator=g))


def _gauss() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.6]]))


def _mixture() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(torch.tensor([[-1.5, 0.0], [1.5, 0.5]]),
                                 torch.tensor([0.6, 0.8]), torch.tensor([0.7, 0.3]))


def all_states(space: Binary | Categorical) -> Tensor:
    if isinstance(space, Binary):
        return enumerate_binary(space.dim)
    k, d = space.num_classes, space.dim
    radix = k ** torch.arange(d - 1, -1, -1)
    return (torch.arange(k**d)[:, None] // radix) % k


def state_index(space: Binary | Categorical, x: Tensor) -> Tensor:
    k = 2 if isinstance(space, Binary) else space.num_classes
    radix = k ** torch.arange(space.dim - 1, -1, -1)
    return (x.long() * radix).sum(1)


@torch.no_grad()
def exact_law(energy: EnergyModel) -> tuple[Tensor, Tensor]:
    states = all_states(energy.space)
    ref = energy._reference_tensor()
    if states.is_floating_point() and ref is not None:
        states = states.to(ref.dtype)  # binary states in the model's dtype (float64 models)
    return states, torch.softmax(-energy(states).double(), 0)


def tv_tolerance(p: Tensor, n: int) -> float:
    """Exact E[TV(p_hat, p)] for n draws (de Moivre) plus a McDiarmid deviation (1e-4)."""
    pn = p.double().clamp(0, 1).numpy()
    m = (n * pn).astype("int64")
    mad = 2.0 * (m + 1) * (1.0 - pn) * binom.pmf(m + 1, n, pn)
    return float(mad.sum() / (2 * n)) + math.sqrt(math.log(1 / DELTA) / (2 * n))


def empirical(space: Binary | Categorical, x: Tensor, n_states: int) -> Tensor:
    return torch.bincount(state_index(space, x), minlength=n_states).double() / x.shape[0]


# -- the table: one row per sampler class ----------------------------------------------------
@dataclass
class Row:
    """How a sampler class is tested. ``cases``: (id, sampler factory, target factory).

    ``exact``: the kernel keeps p invariant (False: approximate by design, tested against its
    documented bias). ``mh``: for discrete samplers with ``log_proposal``, whether the move is
    accepted with the Metropolis-Hastings rule (False: every proposal is accepted).
    """

    cases: list[tuple[str, Callable[[], MCMCSampler], Callable[[], EnergyModel]]]
    exact: bool = True
    mh: bool = True


ROWS: dict[str, Row] = {
    _qualname(MALA): Row([("mala-gauss", lambda: MALA(0.6), _gauss),
                          ("mala-mixture", lambda: MALA(0.4), _mixture)]),
    _qualname(HMC): Row([("hmc-gauss", lambda: HMC(0.5, n_leapfrog=4), _gauss),
                         ("hmc-mixture", lambda: HMC(0.7, n_leapfrog=4), _mixture)]),
    _qualname(Langevin): Row([("ula-gauss", lambda: Langevin(0.3), _gauss)], exact=False),
    _qualname(Gibbs): Row([("gibbs-ising", Gibbs, _ising), ("gibbs-potts", Gibbs, _potts),
                           ("gibbs-sweep-potts", lambda: Gibbs(sweep=True), _potts)]),
    _qualname(GibbsWithGradients): Row([("gwg-ising", GibbsWithGradients, _ising),
                                        ("gwg-potts", GibbsWithGradients, _potts)]),
    _qualname(DiscreteLangevin): Row(
        [("dmala-ising", lambda: DiscreteLangevin(1.0, metropolis=True), _ising),
         ("dmala-potts", lambda: DiscreteLangevin(1.0, metropolis=True), _potts)]),
}
# DULA is the same class with metropolis=False: approximate, tested separately below
APPROX_DISCRETE = [("dula-ising", lambda: DiscreteLangevin(0.5), _ising),
                   ("dula-potts", lambda: DiscreteLangevin(0.5), _potts)]


def _cases(kind: str) -> list:
    out = []
    for row in ROWS.values():
        for cid, make_s, make_t in row.cases:
            space = make_t().space
            is_cont = not isinstance(space, (Binary, Categorical))
            if (kind == "continuous") == is_cont and (kind != "continuous" or row.exact):
                out.append(pytest.param(make_s, make_t, row, id=cid))
    return out


def test_every_sampler_class_has_a_row() -> None:
    found = {_qualname(c) for c in discover_samplers()}
    assert found, "discovery found no MCMCSampler subclasses"
    missing = sorted(found - set(ROWS))
    assert not missing, (f"MCMC sampler class(es) {missing} have no invariance row; add one to "
                         f"ROWS in {__file__}")
    stale = sorted(set(ROWS) - found)
    assert not stale, f"ROWS names classes that no longer exist: {stale}"


def test_discovery_sees_a_new_subclass() -> None:
    """A sampler class added to the library is discovered (and would then need a row)."""
    new = type("NewKernel", (MCMCSampler,), {"__module__": "ebmflow.samplers.new_kernel"})
    try:
        assert "ebmflow.samplers.new_kernel.NewKernel" in {_qualname(c) for c in
                                                           discover_samplers()}
    finally:
        del new
        import gc

        gc.collect()


# -- continuous --------------------------------------------------------------------------------
def _moments(x: Tensor) -> Tensor:
    return torch.cat([x, x.square(), x[:, :1] * x[:, 1:2]], dim=1)


def _check_means(stat: Tensor, expected: Tensor, what: str) -> None:
    se = stat.std(0) / math.sqrt(stat.shape[0])
    z = ((stat.mean(0) - expected) / se).abs()
    assert float(z.max()) < Z, f"{what}: z-scores {z.tolist()} (means {stat.mean(0).tolist()})"


def _exchangeability(x: Tensor, y: Tensor) -> Tensor:
    """Per-chain a(x) b(y) - b(x) a(y) for asymmetric pairs (a, b): mean 0 iff reversible."""
    pairs = [(x[:, 0], y[:, 0].square()), (x[:, 1], y[:, 1].square()),
             (x[:, 0], y[:, 1]), (x[:, 0].square(), y[:, 1])]
    pairs_rev = [(y[:, 0], x[:, 0].square()), (y[:, 1], x[:, 1].square()),
                 (y[:, 0], x[:, 1]), (y[:, 0].square(), x[:, 1])]
    return torch.stack([a * b - c * d for (a, b), (c, d) in zip(pairs, pairs_rev)], 1)


@pytest.mark.parametrize(("make_sampler", "make_target", "row"), _cases("continuous"))
def test_continuous_one_step_invariance_and_detailed_balance(make_sampler, make_target, row):
    gen = torch.Generator().manual_seed(11)
    target, sampler = make_target(), make_sampler()
    n = 20_000
    x = target.sample(n, generator=gen).double()
    target = target.double()
    y = sampler.run(target, x, 1, generator=gen)
    acc = float(sampler.stats["accept_rate"])
    assert 0.2 < acc < 0.98, f"acceptance {acc:.2f}: the step is too small or too large to test"
    exact = _moments(target.sample(200_000, generator=gen).double()).mean(0)
    _check_means(_moments(y), exact, "one-step moments")
    _check_means(_exchangeability(x, y), torch.zeros(4, dtype=torch.float64), "detailed balance")


def test_ula_one_step_inflates_the_variance_as_documented():
    """x' = (1 - eta / s^2) x + sqrt(2 eta) xi on N(m, s^2): Var x' = s^2 + eta^2 / s^2."""
    gen = torch.Generator().manual_seed(12)
    target = _gauss().double()
    eta = 0.3
    sampler = Langevin(eta)
    n = 40_000
    x = target.sample(n, generator=gen)
    y = sampler.run(target, x, 1, generator=gen)
    s2 = torch.tensor([1.0, 0.6], dtype=torch.float64) ** 2
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    var = s2 + eta**2 / s2
    centred = (y - mean).square()
    _check_means(centred, var, "ULA variance")
    # and the inflation is detectable: the exact variance is rejected
    se = centred.std(0) / math.sqrt(n)
    assert float(((centred.mean(0) - s2) / se).max()) > Z


def test_harness_detects_a_kernel_without_hastings_correction():
    """Power check: ULA's proposal accepted with the MH rule minus the q-ratio is not invariant;
    the continuous checks above must flag it."""

    class NoHastings(MALA):
        def transition(self, energy, state, generator=None):
            x, e, g = state.x, state.energy, state.grad
            eta = state.extra["log_step_size"].exp()
            prop = x - eta * g + (2 * eta).sqrt() * torch.randn(
                x.shape, generator=generator, dtype=x.dtype)
            e_prop, g_prop = energy.energy_and_grad(prop)
            u = torch.rand(e.shape, generator=generator, dtype=x.dtype)
            acc = u.log() < (e - e_prop)
            return state.replace(x=torch.where(acc[:, None], prop, x),
                                 energy=torch.where(acc, e_prop, e),
                                 grad=torch.where(acc[:, None], g_prop, g)), {}

    gen = torch.Generator().manual_seed(13)
    target = _gauss().double()
    x = target.sample(20_000, generator=gen)
    y = NoHastings(0.6).run(target, x, 1, generator=gen)
    exact = _moments(target.sample(200_000, generator=gen)).mean(0)
    with pytest.raises(AssertionError):
        _check_means(_moments(y), exact, "one-step moments")


# -- discrete ----------------------------------------------------------------------------------
def exact_matrix(sampler: MCMCSampler, energy: EnergyModel, mh: bool) -> tuple[Tensor, Tensor]:
    """One-step transition matrix from ``log_proposal``: P = q * min(1, ratio) (MH) or q."""
    states, pi = exact_law(energy)
    s = states.shape[0]
    x, y = states.repeat_interleave(s, 0), states.repeat(s, 1)
    log_fwd = sampler.log_proposal(energy, x, y).double()
    if not mh:
        return log_fwd.exp().reshape(s, s), pi
    log_rev = sampler.log_proposal(energy, y, x).double()
    with torch.no_grad():
        f_x, f_y = -energy(x).double(), -energy(y).double()
    log_acc = torch.clamp(f_y - f_x + log_rev - log_fwd, max=0.0)
    off = torch.exp(log_fwd + log_acc).nan_to_num(0.0).reshape(s, s)
    off.fill_diagonal_(0.0)
    return off + torch.diag(1.0 - off.sum(1)), pi


def _one_step_law(sampler: MCMCSampler, energy: EnergyModel, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    states, pi = exact_law(energy)
    idx = torch.multinomial(pi.float(), n, replacement=True, generator=gen)
    x0 = states[idx]
    if isinstance(energy.space, Binary):
        x0 = x0.float()
    y = sampler.run(energy, x0, 1, generator=gen)
    return empirical(energy.space, y, states.shape[0])


@pytest.mark.parametrize(("make_sampler", "make_target", "row"), _cases("discrete"))
def test_discrete_one_step_preserves_the_exact_law(make_sampler, make_target, row):
    energy, sampler = make_target(), make_sampler()
    n = 20_000
    _, pi = exact_law(energy)
    law = _one_step_law(sampler, energy, n, seed=21)
    moved = float(sampler.stats["flips"]) if "flips" in sampler.stats else 1.0
    assert moved > 0.1, f"the chains barely moved ({moved:.3f} flips per step)"
    tv = 0.5 * float((law - pi).abs().sum())
    assert tv < tv_tolerance(pi, n), f"TV {tv:.4f} after one step from exact samples"
    if hasattr(sampler, "log_proposal"):
        mat, pi = exact_matrix(sampler, copy.deepcopy(energy).double(), row.mh)
        torch.testing.assert_close(mat.sum(1), torch.ones_like(pi), atol=1e-10, rtol=0)
        torch.testing.assert_close(pi @ mat, pi, atol=1e-10, rtol=0)
        flow = pi[:, None] * mat
        torch.testing.assert_close(flow, flow.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("make_sampler", "make_target"),
                         [pytest.param(s, t, id=i) for i, s, t in APPROX_DISCRETE])
def test_dula_is_approximate_with_the_predicted_one_step_bias(make_sampler, make_target):
    energy, sampler = make_target(), make_sampler()
    mat, pi = exact_matrix(sampler, copy.deepcopy(energy).double(), mh=False)
    predicted = pi @ mat
    bias = 0.5 * float((predicted - pi).abs().sum())
    assert bias > 1e-3, "DULA should not be exactly invariant here"
    n = 20_000
    law = _one_step_law(sampler, energy, n, seed=22)
    tv = 0.5 * float((law - predicted).abs().sum())
    assert tv < tv_tolerance(predicted, n), f"sampled law is {tv:.4f} from pi P"
    biases = []
    for alpha in (0.05, 0.2, 0.8):
        m, _ = exact_matrix(DiscreteLangevin(alpha), copy.deepcopy(energy).double(), mh=False)
        biases.append(0.5 * float((pi @ m - pi).abs().sum()))
    assert biases[0] < biases[1] < biases[2], f"bias does not grow with the step: {biases}"


# -- samplers that are not MCMCSampler subclasses but hold a Markov kernel --------------------------
def test_flowmc_global_move_keeps_the_target_invariant_and_reversible():
    """FlowMC's independence-MH move with a fixed (untrained) flow q: accept with
    min(1, p(x') q(x) / (p(x) q(x'))) keeps p invariant and is reversible whatever q is."""
    from ebmflow.flows import FlowMC, RealNVP

    torch.manual_seed(0)
    flow = RealNVP(2, n_layers=2, hidden=(8,))
    sampler = FlowMC(flow, n_local=0, n_global=1)
    target = _gauss()
    gen = torch.Generator().manual_seed(14)
    n = 20_000
    x = target.sample(n, generator=gen)
    y = sampler.sample(target, x0=x, generator=gen)
    acc = float(sampler.stats["global_accept"])
    assert 0.05 < acc < 0.98, f"global acceptance {acc:.2f} too extreme to test"
    exact = _moments(target.sample(200_000, generator=gen)).mean(0)
    _check_means(_moments(y).double(), exact.double(), "FlowMC one-round moments")
    _check_means(_exchangeability(x.double(), y.double()), torch.zeros(4, dtype=torch.float64),
                 "FlowMC detailed balance")
