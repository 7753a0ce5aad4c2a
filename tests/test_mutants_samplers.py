"""Tests that kill mutants of ebmflow.samplers which the other sampler tests let survive.

Each test checks exact answers: one transition of MALA / HMC / ULA against a reference
written out from the formulas with the same random draws, the Robbins-Monro step of the
warm-up adaptation, the argument checks with their exact messages, and the documented
defaults. Found with ``python tools/mutation.py --package samplers`` (docs/reliability.md).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from ebmflow.energy import EnergyModel
from ebmflow.energy.ising import IsingEnergy
from ebmflow.samplers import (
    HMC,
    MALA,
    ChainState,
    CompileFallbackWarning,
    DiscreteLangevin,
    Gibbs,
    GibbsWithGradients,
    Langevin,
    MCMCSampler,
    PersistentSampler,
    ReplayBuffer,
    _adapt,
    _compiled,
    _discrete,
    _fast,
    _lattice,
    base,
    chain,
    rng,
)
from ebmflow.samplers.adaptive import chain_mask, event_sum
from ebmflow.spaces import Binary, Categorical, Continuous


class Quad(EnergyModel):
    """E(x) = 0.5 * sum(a * x^2) (a per coordinate), grad = a * x."""

    def __init__(self, shape=2, a=None):
        super().__init__(Continuous(shape))
        self.a = a

    def energy(self, x):
        a = 1.0 if self.a is None else self.a.to(x.dtype)
        return 0.5 * (a * x.square()).flatten(1).sum(-1)


def _quad_eg(x, a):
    return 0.5 * (a * x.square()).flatten(1).sum(-1), a * x


def _x0(b=6, d=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64) * 1.5


# ---- _adapt helpers -------------------------------------------------------------------

def test_check_positive_values_and_messages():
    assert _adapt.check_positive("s", 2) == 2.0 and isinstance(_adapt.check_positive("s", 2), float)
    assert _adapt.check_positive("s", 0, allow_zero=True) == 0.0
    with pytest.raises(ValueError) as e:
        _adapt.check_positive("s", "abc")
    assert str(e.value) == "s must be a number, got 'abc'"
    with pytest.raises(ValueError) as e:
        _adapt.check_positive("s", None)
    assert str(e.value) == "s must be a number, got None"
    with pytest.raises(ValueError) as e:
        _adapt.check_positive("s", 0)
    assert str(e.value) == "s must be finite and > 0, got 0"
    with pytest.raises(ValueError) as e:
        _adapt.check_positive("s", -1, allow_zero=True)
    assert str(e.value) == "s must be finite and >= 0, got -1"
    for bad in (math.inf, math.nan, -1e-9):
        with pytest.raises(ValueError, match="must be finite"):
            _adapt.check_positive("s", bad)
    assert _adapt.check_positive("s", 1e-300) == 1e-300


def test_check_probability_and_count_messages():
    assert _adapt.check_probability("p", 0.5) == 0.5
    with pytest.raises(ValueError) as e:
        _adapt.check_probability("p", 1)
    assert str(e.value) == "p must lie in (0, 1), got 1"
    with pytest.raises(ValueError) as e:
        _adapt.check_probability("p", 0)
    assert str(e.value) == "p must be finite and > 0, got 0"
    assert _adapt.check_probability("p", 0.999999) == 0.999999
    assert _adapt.check_count("c", 0) == 0
    assert _adapt.check_count("c", 3, minimum=3) == 3
    with pytest.raises(ValueError) as e:
        _adapt.check_count("c", 2, minimum=3)
    assert str(e.value) == "c must be an int >= 3, got 2"
    with pytest.raises(ValueError) as e:
        _adapt.check_count("c", True)
    assert str(e.value) == "c must be an int >= 0, got True"
    with pytest.raises(ValueError) as e:
        _adapt.check_count("c", 1.0)
    assert str(e.value) == "c must be an int >= 0, got 1.0"
    with pytest.raises(ValueError) as e:
        _adapt.check_count("c", -1)
    assert str(e.value) == "c must be an int >= 0, got -1"


def test_accept_prob_exact():
    la = torch.tensor([-math.log(4.0), 0.0, 2.0, math.nan, -math.inf])
    assert torch.equal(_adapt.accept_prob(la), torch.tensor([0.25, 1.0, 1.0, 0.0, 0.0]))


def test_rm_update_exact():
    assert _adapt.RM_EXPONENT == 0.6
    extra = {"log_step_size": torch.tensor(0.5, dtype=torch.float64)}
    assert _adapt.rm_update(extra, torch.tensor([1.0]), 0.5, 10, 1.0) is extra
    for t, n_warmup in ((0.0, 10), (3.0, 10), (9.0, 10), (10.0, 10), (12.0, 10)):
        extra = {"log_step_size": torch.tensor(0.5, dtype=torch.float64),
                 "adapt_t": torch.tensor(t, dtype=torch.float64)}
        prob = torch.tensor([1.0, 0.0, 0.5, 0.7], dtype=torch.float64)  # mean 0.55
        out = _adapt.rm_update(extra, prob, 0.25, n_warmup, 2.0)
        active = t < n_warmup
        want = 0.5 + (2.0 * (t + 1) ** -0.6 * (0.55 - 0.25) if active else 0.0)
        assert out["log_step_size"].item() == pytest.approx(want, abs=1e-14)
        assert out["adapt_t"].item() == t + (1 if active else 0)
        assert extra["adapt_t"].item() == t  # the input is not modified


def test_initial_extra_and_finish_adaptation():
    x = torch.zeros(3, 2, dtype=torch.float64)
    extra = _adapt.initial_extra(0.25, 2, 5, x)
    assert set(extra) == {"log_step_size", "adapt_t"}
    assert extra["log_step_size"].dtype == torch.float64 and extra["log_step_size"].dim() == 0
    assert extra["log_step_size"].item() == pytest.approx(math.log(0.25), abs=1e-15)
    assert extra["adapt_t"].item() == 2.0 and extra["adapt_t"].dtype == torch.float64
    assert set(_adapt.initial_extra(0.25, 5, 5, x)) == {"log_step_size"}
    assert set(_adapt.initial_extra(0.25, 4, 5, x)) == {"log_step_size", "adapt_t"}
    xi = torch.zeros(3, 2, dtype=torch.long)
    assert _adapt.initial_extra(0.25, 0, 5, xi)["log_step_size"].dtype == torch.float32
    assert _adapt.initial_extra(0.25, 0, 5, xi)["adapt_t"].dtype == torch.float32
    assert _adapt.finish_adaptation({"log_step_size": torch.tensor(0.0)}) is None
    done = _adapt.finish_adaptation({"log_step_size": torch.tensor(math.log(0.5), dtype=torch.float64),
                                     "adapt_t": torch.tensor(7.0)})
    assert done[0] == pytest.approx(0.5, abs=1e-15) and done[1] == 7
    assert isinstance(done[0], float) and isinstance(done[1], int)


def test_event_sum_and_chain_mask():
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(event_sum(t), torch.tensor([66.0, 210.0]))
    assert torch.equal(event_sum(t[:, :, 0]), torch.tensor([12.0, 48.0]))
    acc = torch.tensor([True, False])
    assert chain_mask(acc, t).shape == (2, 1, 1)
    assert chain_mask(acc, t[:, 0]).shape == (2, 1)


# ---- AdaptiveStepSize bookkeeping -------------------------------------------------------

def test_adaptive_defaults_and_state():
    m = MALA()
    assert (m.step_size, m.n_steps, m.target_accept, m.n_warmup, m.adapt_rate) == (0.01, 10, 0.574, 0, 1.0)
    assert not m.adapting
    h = HMC()
    assert (h.step_size, h.n_leapfrog, h.n_steps, h.target_accept, h.n_warmup, h.adapt_rate) == (
        0.1, 10, 10, 0.65, 0, 1.0)
    lv = Langevin()
    assert (lv.step_size, lv.n_steps, lv.temperature, lv.noise_scale, lv.grad_clip) == (
        0.01, 10, 1.0, None, None)
    m = MALA(0.2, n_warmup=3)
    assert m.adapting
    assert m.get_extra_state() == {"step_size": 0.2, "adapted": 0}
    m.set_extra_state({"step_size": 0.3, "adapted": 3.0})
    assert m.step_size == 0.3 and m._adapted == 3 and isinstance(m._adapted, int)
    assert not m.adapting
    m.reset_adaptation()
    assert m._adapted == 0 and m.step_size == 0.3 and m.adapting
    m.reset_adaptation(0.05)
    assert m.step_size == 0.05
    with pytest.raises(ValueError, match="^step_size must be finite and > 0, got -1$"):
        m.step_size = -1
    assert repr(MALA(0.123456, 7, target_accept=0.5, n_warmup=4)) == (
        "MALA(step_size=0.1235, n_steps=7, target_accept=0.5, n_warmup=4)")
    assert repr(HMC(0.5, 3, 2)) == (
        "HMC(step_size=0.5, n_steps=2, target_accept=0.65, n_warmup=0, n_leapfrog=3)")
    assert HMC(n_leapfrog=1)._compile_block_steps() == 8
    assert HMC(n_leapfrog=3)._compile_block_steps() == 2
    assert HMC(n_leapfrog=9)._compile_block_steps() == 1
    with pytest.raises(ValueError, match=r"^n_leapfrog must be an int >= 1, got 0$"):
        HMC(n_leapfrog=0)
    with pytest.raises(ValueError, match=r"^target_accept must lie in \(0, 1\), got 1$"):
        MALA(target_accept=1)
    with pytest.raises(ValueError, match=r"^n_warmup must be an int >= 0, got -1$"):
        MALA(n_warmup=-1)
    with pytest.raises(ValueError, match=r"^adapt_rate must be finite and > 0, got 0$"):
        MALA(adapt_rate=0)


# ---- exact transitions ---------------------------------------------------------------

def _mala_ref(x, a, eta, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(x.numel() + 2 * len(x), generator=g, dtype=x.dtype)
    noise = z[:x.numel()].reshape(x.shape)
    log_u = -0.5 * (z[x.numel():].reshape(2, len(x)) ** 2).sum(0)  # chi^2_2 / 2 ~ Exp(1)
    e, gr = _quad_eg(x, a)
    prop = x - eta * gr + math.sqrt(2 * eta) * noise
    ep, gp = _quad_eg(prop, a)
    log_q_fwd = -(noise.square()).sum(1) / 2
    log_q_back = -((x - prop + eta * gp).square()).sum(1) / (4 * eta)
    la = e - ep + log_q_back - log_q_fwd
    acc = log_u < la
    return torch.where(acc[:, None], prop, x), torch.where(acc, ep, e), acc, la


@pytest.mark.parametrize("n_warmup", [0, 5])
def test_mala_transition_exact(n_warmup):
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    energy = Quad(2, a)
    x = _x0()
    eta = 0.3
    s = MALA(eta, n_warmup=n_warmup, target_accept=0.4, adapt_rate=0.5)
    st = s.init_state(energy, x)
    new, info = s.transition(energy, st, torch.Generator().manual_seed(11))
    xr, er, acc, la = _mala_ref(x, a, eta, 11)
    assert 0 < int(acc.sum()) < len(acc)  # both branches taken
    torch.testing.assert_close(new.x, xr, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.energy, er, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.grad, a * xr, rtol=0, atol=1e-12)
    assert torch.equal(info["accept_rate"], acc.to(x.dtype))
    assert torch.equal(info["nonfinite_rate"], torch.zeros_like(la, dtype=torch.bool))
    if n_warmup:
        prob = la.clamp(max=0).exp().mean().item()
        assert new.extra["log_step_size"].item() == pytest.approx(
            math.log(eta) + 0.5 * (prob - 0.4), abs=1e-12)
        assert new.extra["adapt_t"].item() == 1.0
    else:
        assert new.extra is st.extra


def _hmc_ref(x, a, eps, L, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(x.numel() + 2 * len(x), generator=g, dtype=x.dtype)
    p = z[:x.numel()].reshape(x.shape)
    log_u = -0.5 * (z[x.numel():].reshape(2, len(x)) ** 2).sum(0)
    e, gr = _quad_eg(x, a)
    h0 = e + 0.5 * p.square().sum(1)
    xn, pn = x.clone(), p - 0.5 * eps * gr
    for i in range(L):
        xn = xn + eps * pn
        en, gn = _quad_eg(xn, a)
        pn = pn - (0.5 if i == L - 1 else 1.0) * eps * gn
    la = h0 - (en + 0.5 * pn.square().sum(1))
    acc = log_u < la
    return torch.where(acc[:, None], xn, x), torch.where(acc, en, e), acc, la


@pytest.mark.parametrize("n_warmup", [0, 5])
@pytest.mark.parametrize("L", [1, 3])
def test_hmc_transition_exact(n_warmup, L):
    a = torch.tensor([1.0, 9.0], dtype=torch.float64)
    energy = Quad(2, a)
    x = _x0(b=8)
    eps = 0.6
    s = HMC(eps, L, n_warmup=n_warmup, target_accept=0.3, adapt_rate=0.7)
    st = s.init_state(energy, x)
    new, info = s.transition(energy, st, torch.Generator().manual_seed(5))
    xr, er, acc, la = _hmc_ref(x, a, eps, L, 5)
    assert 0 < int(acc.sum()) < len(acc)
    torch.testing.assert_close(new.x, xr, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.energy, er, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.grad, a * xr, rtol=0, atol=1e-12)
    assert torch.equal(info["accept_rate"], acc.to(x.dtype))
    assert not info["nonfinite_rate"].any()
    if n_warmup:
        prob = la.clamp(max=0).exp().mean().item()
        assert new.extra["log_step_size"].item() == pytest.approx(
            math.log(eps) + 0.7 * (prob - 0.3), abs=1e-12)
        assert new.extra["adapt_t"].item() == 1.0


def test_langevin_step_exact():
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    energy = Quad(2, a)
    x = _x0()
    for kw, sigma in (({}, math.sqrt(2 * 0.2 * 1.5)), ({"noise_scale": 0.1}, 0.1),
                      ({"noise_scale": 0.0}, 0.0)):
        s = Langevin(0.2, temperature=1.5, **kw)
        assert s.sigma == pytest.approx(sigma, abs=1e-15)
        out = s.step(energy, x, torch.Generator().manual_seed(2))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        torch.testing.assert_close(out, x - 0.2 * a * x + sigma * noise, rtol=0, atol=1e-12)
    s = Langevin(0.2, grad_clip=0.5, noise_scale=0.0)
    out = s.step(energy, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x - 0.2 * (a * x).clamp(-0.5, 0.5), rtol=0, atol=1e-12)


# ---- discrete samplers: exact proposals and transitions -------------------------------

class BinQuad(EnergyModel):
    """E(x) = 0.5 x^T J x + b . x on bits (float64 parameters)."""

    def __init__(self, d=4, seed=0):
        super().__init__(Binary(d))
        g = torch.Generator().manual_seed(seed)
        j = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("J", (j + j.T) * 0.8)
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))

    def energy(self, x):
        x = x.to(self.J.dtype)
        return 0.5 * ((x @ self.J) * x).sum(-1) + x @ self.b


def _binquad_eg(m, x):
    x = x.to(m.J.dtype)
    return 0.5 * ((x @ m.J) * x).sum(-1) + x @ m.b, x @ m.J + m.b


class CatQuad(EnergyModel):
    """E = 0.5 h^T J h + w . h on the flattened one-hot h of (D, K) states."""

    def __init__(self, d=3, k=3, seed=1):
        super().__init__(Categorical(d, k))
        g = torch.Generator().manual_seed(seed)
        j = torch.randn(d * k, d * k, generator=g, dtype=torch.float64)
        self.register_buffer("J", (j + j.T) * 0.6)
        self.register_buffer("w", torch.randn(d * k, generator=g, dtype=torch.float64))

    def energy(self, x):
        h = self.space.one_hot(x, dtype=torch.float64).flatten(1)
        return 0.5 * ((h @ self.J) * h).sum(-1) + h @ self.w


def _catquad_eg(m, x):
    h = m.space.one_hot(x, dtype=torch.float64)
    hf = h.flatten(1)
    return 0.5 * ((hf @ m.J) * hf).sum(-1) + hf @ m.w, (hf @ m.J + m.w).reshape(h.shape)


def _bits(b=16, d=4, seed=7):
    return torch.randint(0, 2, (b, d), generator=torch.Generator().manual_seed(seed)).double()


def _cats(b=16, d=3, k=3, seed=7):
    return torch.randint(0, k, (b, d), generator=torch.Generator().manual_seed(seed))


def test_flip_gain_and_half_flip_gain_exact():
    x = torch.tensor([[0.0, 1.0, 1.0]])
    g = torch.tensor([[2.0, 3.0, -1.0]])
    assert torch.equal(_discrete.flip_gain(Binary(3), x, g), torch.tensor([[-2.0, 3.0, -1.0]]))
    assert torch.equal(_discrete.half_flip_gain(x, g.clone()), torch.tensor([[-1.0, 1.5, -0.5]]))
    sp = Categorical(2, 3)
    xr = sp.one_hot(torch.tensor([[1, 2]]))
    ge = torch.tensor([[[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]]])
    # d_{i,k} = -g_{i,k} + g_{i, x_i}
    assert torch.equal(_discrete.flip_gain(sp, xr, ge),
                       torch.tensor([[[1.0, 0.0, -2.0], [3.0, 4.0, 0.0]]]))


def test_mh_select_exact():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    xn = x + 10
    e = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    en = torch.tensor([1.0, -1.0, math.nan, 0.5], dtype=torch.float64)
    q_f = torch.tensor([0.0, 0.2, 0.0, 0.1], dtype=torch.float64)
    q_r = torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64)
    g, gn = torch.zeros(4, 1, 2), torch.ones(4, 1, 2)
    out = _discrete.mh_select(x, e.clone(), g, xn, en, gn, q_f, q_r,
                              torch.Generator().manual_seed(4))
    u = torch.rand((4,), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    la = e - en + q_r - q_f
    acc = u.log() < la
    assert torch.equal(out[3], acc.double())
    assert torch.equal(out[4], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(out[0], torch.where(acc[:, None], xn, x))
    assert torch.equal(out[1], torch.where(acc, en, e))
    assert torch.equal(out[2], torch.where(acc[:, None, None], gn, g))
    assert out[2].shape == (4, 1, 2)
    lu = _discrete.log_uniform(3, torch.zeros(1, dtype=torch.float64), torch.Generator().manual_seed(1))
    assert torch.equal(lu, torch.rand(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).log())


def test_gwg_log_proposal_exact():
    s = GibbsWithGradients()
    m = BinQuad()
    x = _bits(4)
    _, gr = _binquad_eg(m, x)
    logq = torch.log_softmax((x - 0.5) * gr, 1)
    y = x.clone()
    y[:, 2] = 1 - y[:, 2]
    torch.testing.assert_close(s.log_proposal(m, x, y), logq[:, 2], rtol=0, atol=1e-12)
    y[:, 0] = 1 - y[:, 0]
    assert torch.equal(s.log_proposal(m, x, y), torch.full((4,), -math.inf, dtype=torch.float64))
    mc = CatQuad()
    xc = _cats(4)
    _, gc = _catquad_eg(mc, xc)
    h = mc.space.one_hot(xc, dtype=torch.float64)
    d = -gc + (h * gc).sum(-1, keepdim=True)
    lq = torch.log_softmax((d / 2).masked_fill(h > 0.5, -math.inf).flatten(1), 1)
    yc = xc.clone()
    yc[:, 1] = (yc[:, 1] + 1) % 3
    torch.testing.assert_close(s.log_proposal(mc, xc, yc), lq.gather(1, (3 + yc[:, 1])[:, None])[:, 0],
                               rtol=0, atol=1e-12)


def test_discrete_langevin_log_proposal_exact():
    s = DiscreteLangevin(0.7)
    m = BinQuad()
    x = _bits(4)
    y = _bits(4, seed=9)
    _, gr = _binquad_eg(m, x)
    logits = (x - 0.5) * gr - 0.5 / 0.7
    p = torch.sigmoid(logits)
    want = torch.where(x != y, p, 1 - p).log().sum(1)
    torch.testing.assert_close(s.log_proposal(m, x, y), want, rtol=0, atol=1e-12)
    mc = CatQuad()
    xc, yc = _cats(4), _cats(4, seed=9)
    _, gc = _catquad_eg(mc, xc)
    h = mc.space.one_hot(xc, dtype=torch.float64)
    d = -gc + (h * gc).sum(-1, keepdim=True)
    lq = torch.log_softmax(d / 2 - (1 - h) / 0.7, -1)
    torch.testing.assert_close(s.log_proposal(mc, xc, yc), lq.gather(2, yc[..., None])[..., 0].sum(1),
                               rtol=0, atol=1e-12)
    assert repr(DiscreteLangevin(0.5, metropolis=True)) == "DiscreteLangevin(step_size=0.5, metropolis=True)"
    d0 = DiscreteLangevin()
    assert (d0.step_size, d0.metropolis, d0.n_steps, d0.check_gradient) == (0.1, False, 10, True)
    for bad in (0, -1.0, math.inf, "1", None):
        with pytest.raises(ValueError) as e:
            DiscreteLangevin(bad)
        assert str(e.value) == f"step_size must be a positive finite float, got {bad!r}"


def _gumbel_ref(logits, g):
    u = torch.rand(logits.shape, generator=g, dtype=logits.dtype)
    return (logits - u.clamp_min(torch.finfo(logits.dtype).tiny).log().neg().log()).argmax(-1)


def test_gwg_binary_transition_exact():
    m, x = BinQuad(), _bits()
    s = GibbsWithGradients()
    st = s.init_state(m, x)
    new, info = s.transition(m, st, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    e, gr = _binquad_eg(m, x)
    lf = torch.log_softmax((x - 0.5) * gr, 1)
    move = _gumbel_ref(lf, g)
    y = x.clone()
    y[torch.arange(len(x)), move] = 1 - y[torch.arange(len(x)), move]
    ey, gy = _binquad_eg(m, y)
    lr = torch.log_softmax((y - 0.5) * gy, 1)
    rows = torch.arange(len(x))
    la = e - ey + lr[rows, move] - lf[rows, move]
    acc = torch.rand(len(x), generator=g, dtype=torch.float64).log() < la
    assert 0 < int(acc.sum()) < len(acc)
    assert torch.equal(new.x, torch.where(acc[:, None], y, x))
    torch.testing.assert_close(new.energy, torch.where(acc, ey, e), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.grad, torch.where(acc[:, None], gy, gr), rtol=0, atol=1e-12)
    assert torch.equal(info["accept_rate"], acc.double()) and torch.equal(info["flips"], acc.double())
    assert not info["nonfinite_rate"].any()


def test_gwg_categorical_transition_exact():
    m, x = CatQuad(), _cats()
    s = GibbsWithGradients()
    new, info = s.transition(m, s.init_state(m, x), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    rows = torch.arange(len(x))

    def logq(z):
        e, gz = _catquad_eg(m, z)
        h = m.space.one_hot(z, dtype=torch.float64)
        d = -gz + (h * gz).sum(-1, keepdim=True)
        return e, gz, torch.log_softmax((d / 2).masked_fill(h > 0.5, -math.inf).flatten(1), 1)

    e, gx, lf = logq(x)
    move = _gumbel_ref(lf, g)
    y = x.clone()
    y[rows, move // 3] = move % 3
    ey, gy, lr = logq(y)
    back = (move // 3) * 3 + x[rows, move // 3]
    la = e - ey + lr[rows, back] - lf[rows, move]
    acc = torch.rand(len(x), generator=g, dtype=torch.float64).log() < la
    assert 0 < int(acc.sum()) < len(acc)
    assert torch.equal(new.x, torch.where(acc[:, None], y, x))
    torch.testing.assert_close(new.energy, torch.where(acc, ey, e), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.grad, torch.where(acc[:, None, None], gy, gx), rtol=0, atol=1e-12)
    assert torch.equal(info["accept_rate"], acc.double())


@pytest.mark.parametrize("metropolis", [False, True])
def test_discrete_langevin_binary_transition_exact(metropolis):
    m, x = BinQuad(), _bits()
    s = DiscreteLangevin(0.8, metropolis=metropolis)
    new, info = s.transition(m, s.init_state(m, x), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    e, gr = _binquad_eg(m, x)
    lf = (x - 0.5) * gr - 0.5 / 0.8
    flip = torch.rand(x.shape, generator=g, dtype=torch.float64).log() < torch.nn.functional.logsigmoid(lf)
    y = torch.where(flip, 1 - x, x)
    ey, gy = _binquad_eg(m, y)
    if not metropolis:
        assert torch.equal(new.x, y)
        assert torch.equal(info["accept_rate"], torch.ones(len(x), dtype=torch.float64))
        assert torch.equal(info["flips"], flip.sum(1).double())
        torch.testing.assert_close(new.energy, ey, rtol=0, atol=1e-12)
        torch.testing.assert_close(new.grad, gy, rtol=0, atol=1e-12)
        return
    lr = (y - 0.5) * gy - 0.5 / 0.8

    def lq(lg):
        p = torch.sigmoid(lg)
        return torch.where(flip, p, 1 - p).log().sum(1)

    la = e - ey + lq(lr) - lq(lf)
    acc = torch.rand(len(x), generator=g, dtype=torch.float64).log() < la
    assert 0 < int(acc.sum()) < len(acc)
    assert torch.equal(new.x, torch.where(acc[:, None], y, x))
    torch.testing.assert_close(new.energy, torch.where(acc, ey, e), rtol=0, atol=1e-12)
    assert torch.equal(info["flips"], flip.sum(1).double() * acc)
    assert torch.equal(info["accept_rate"], acc.double())
    torch.testing.assert_close(new.grad, torch.where(acc[:, None], gy, gr), rtol=0, atol=1e-12)
    assert set(info) == {"accept_rate", "flips", "nonfinite_rate"}
    assert torch.equal(info["nonfinite_rate"], torch.zeros(len(x), dtype=torch.float64))


@pytest.mark.parametrize("metropolis", [False, True])
def test_discrete_langevin_categorical_transition_exact(metropolis):
    m, x = CatQuad(), _cats()
    s = DiscreteLangevin(0.8, metropolis=metropolis)
    new, info = s.transition(m, s.init_state(m, x), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)

    def logits(z):
        e, gz = _catquad_eg(m, z)
        h = m.space.one_hot(z, dtype=torch.float64)
        d = -gz + (h * gz).sum(-1, keepdim=True)
        return e, gz, d / 2 - (1 - h) / 0.8

    e, gx, lf = logits(x)
    y = _gumbel_ref(lf, g)
    ey, gy, lr = logits(y)
    flips = (x != y).sum(1).double()
    if not metropolis:
        assert torch.equal(new.x, y) and torch.equal(info["flips"], flips)
        torch.testing.assert_close(new.energy, ey, rtol=0, atol=1e-12)
        torch.testing.assert_close(new.grad, gy, rtol=0, atol=1e-12)
        assert torch.equal(info["accept_rate"], torch.ones(len(x), dtype=torch.float64))
        return
    lq_f = torch.log_softmax(lf, -1).gather(2, y[..., None])[..., 0].sum(1)
    lq_r = torch.log_softmax(lr, -1).gather(2, x[..., None])[..., 0].sum(1)
    la = e - ey + lq_r - lq_f
    acc = torch.rand(len(x), generator=g, dtype=torch.float64).log() < la
    assert 0 < int(acc.sum()) < len(acc)
    assert torch.equal(new.x, torch.where(acc[:, None], y, x))
    assert torch.equal(info["flips"], flips * acc)
    torch.testing.assert_close(new.grad, torch.where(acc[:, None, None], gy, gx), rtol=0, atol=1e-12)
    assert set(info) == {"accept_rate", "flips", "nonfinite_rate"}


# ---- Gibbs -----------------------------------------------------------------------------

def _with(x, i, v):
    y = x.clone()
    y[torch.arange(len(x)), i] = v.to(x.dtype)
    return y


def _gibbs_binary_ref(m, x, idx, g):
    e = m.energy(x)
    y = _with(x, idx, 1 - x[torch.arange(len(x)), idx])
    ey = m.energy(y)
    keep = torch.rand(len(x), generator=g, dtype=torch.float64).log() >= torch.nn.functional.logsigmoid(e - ey)
    return torch.where(keep[:, None], x, y), (~keep).double()


def _gibbs_cat_ref(m, x, idx, g):
    rows = torch.arange(len(x))
    cur = x[rows, idx]
    logits = torch.stack([-m.energy(_with(x, idx, (cur + j) % 3)) for j in range(3)], 1)
    j = _gumbel_ref(logits, g)
    return _with(x, idx, (cur + j) % 3), (j != 0).double()


@pytest.mark.parametrize("sweep", [False, True])
def test_gibbs_binary_transition_exact(sweep):
    m, x = BinQuad(), _bits()
    s = Gibbs(sweep=sweep)
    new, info = s.transition(m, s.init_state(m, x), torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    if sweep:
        y, flips = x, torch.zeros(len(x), dtype=torch.float64)
        for i in range(x.shape[1]):
            y, f = _gibbs_binary_ref(m, y, torch.full((len(x),), i), g)
            flips = flips + f
    else:
        idx = torch.randint(0, x.shape[1], (len(x), 1), generator=g)[:, 0]
        y, flips = _gibbs_binary_ref(m, x, idx, g)
    assert flips.unique().numel() > 1 and (flips < x.shape[1]).any()
    assert torch.equal(new.x, y)
    torch.testing.assert_close(new.energy, m.energy(y), rtol=0, atol=1e-12)
    assert torch.equal(info["flips"], flips)


@pytest.mark.parametrize("sweep", [False, True])
def test_gibbs_categorical_transition_exact(sweep):
    m, x = CatQuad(), _cats()
    s = Gibbs(sweep=sweep)
    new, info = s.transition(m, s.init_state(m, x), torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    if sweep:
        y, flips = x, torch.zeros(len(x), dtype=torch.float64)
        for i in range(x.shape[1]):
            y, f = _gibbs_cat_ref(m, y, torch.full((len(x),), i), g)
            flips = flips + f
    else:
        idx = torch.randint(0, x.shape[1], (len(x),), generator=g)
        y, flips = _gibbs_cat_ref(m, x, idx, g)
    assert flips.unique().numel() > 1 and (flips < x.shape[1]).any()
    assert torch.equal(new.x, y)
    torch.testing.assert_close(new.energy, m.energy(y), rtol=0, atol=1e-12)
    assert torch.equal(info["flips"], flips)


def test_gibbs_conditional_log_probs_and_bookkeeping():
    m, x = CatQuad(), _cats(5)
    s = Gibbs()
    for index in (0, 2, torch.tensor([0, 1, 2, 1, 0])):
        idx = torch.as_tensor(index).expand(5)
        want = torch.log_softmax(torch.stack(
            [-m.energy(_with(x, idx, torch.full((5,), v))) for v in range(3)], 1), 1)
        torch.testing.assert_close(s.conditional_log_probs(m, x, index), want, rtol=0, atol=1e-12)
    assert repr(Gibbs()) == "Gibbs(sweep=False)" and repr(Gibbs(True)) == "Gibbs(sweep=True)"
    assert Gibbs().n_steps == 10 and Gibbs().sweep is False
    assert Gibbs(sweep=True)._compile_block_steps() == 1 and Gibbs()._compile_block_steps() == 8
    s = Gibbs(n_steps=2)
    s.sample(m, x0=x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.chain_stats["accept_rate"], torch.ones(5))
    assert s.stats["accept_rate"].item() == 1.0


# ---- chain bookkeeping -----------------------------------------------------------------

def test_fold_bad_exact():
    rows = torch.tensor([[1.0, 2.0, 3.0], [1.0, math.nan, 3.0], [math.inf, 0.0, 3.0]])
    assert chain._fold_bad(None, torch.ones(3, 3), 0) is None
    fb = chain._fold_bad(None, rows, 5)
    assert torch.equal(fb, torch.tensor([7, 6, chain._NEVER]))
    assert chain._NEVER == 2**62
    fb2 = chain._fold_bad(fb, torch.tensor([[math.nan, math.nan, math.nan]]), 8)
    assert torch.equal(fb2, torch.tensor([7, 6, 8]))
    fb3 = chain._fold_bad(torch.full((3,), chain._NEVER), torch.tensor([[0.0, math.nan, 1.0]]), 0)
    assert torch.equal(fb3, torch.tensor([chain._NEVER, 0, chain._NEVER]))
    assert fb3.dtype == torch.long


def test_row_sums_and_energy_grad_rows_exact():
    x = torch.arange(12.0).reshape(2, 3, 2)
    st = chain.ChainState(x)
    assert torch.equal(chain._row_sums(st), torch.tensor([15.0, 51.0]))
    st = chain.ChainState(x, energy=torch.tensor([1.0, -1.0]), grad=torch.ones(2, 3, 2))
    assert torch.equal(chain._row_sums(st), torch.tensor([22.0, 56.0]))
    xi = torch.zeros(2, 3, dtype=torch.long)
    assert torch.equal(chain._row_sums(chain.ChainState(xi)), torch.zeros(2))
    assert torch.equal(chain._row_sums(chain.ChainState(xi, energy=torch.tensor([2.0, 3.0]))),
                       torch.tensor([2.0, 3.0]))
    assert torch.equal(chain._row_sums(chain.ChainState(xi, grad=torch.ones(2, 3))), torch.tensor([3.0, 3.0]))
    e = torch.tensor([1.0, 2.0])
    assert chain._energy_grad_rows(chain.ChainState(xi, energy=e)) is e
    assert torch.equal(chain._energy_grad_rows(chain.ChainState(xi, energy=e, grad=torch.ones(2, 3, 4))),
                       torch.tensor([13.0, 14.0]))
    assert torch.equal(chain._flat_sum(torch.ones(2, 5)), torch.tensor([5.0, 5.0]))


def test_where_state_exact():
    bad = torch.tensor([True, False])
    old = chain.ChainState(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3),
                           {"s": torch.zeros(2), "g": torch.tensor(0.0), "o": torch.zeros(5)})
    new = chain.ChainState(torch.ones(2, 3), torch.ones(2), torch.ones(2, 3),
                           {"s": torch.ones(2), "g": torch.tensor(1.0), "o": torch.ones(5),
                            "n": torch.ones(2)})
    out = chain._where_state(bad, old, new)
    assert torch.equal(out.x, torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.equal(out.energy, torch.tensor([0.0, 1.0]))
    assert torch.equal(out.grad, torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.equal(out.extra["s"], torch.tensor([0.0, 1.0]))
    assert out.extra["g"] is new.extra["g"] and out.extra["o"] is new.extra["o"]
    assert out.extra["n"] is new.extra["n"]
    out = chain._where_state(bad, chain.ChainState(torch.zeros(2, 3)), new)
    assert out.energy is new.energy and out.grad is new.grad
    out = chain._where_state(bad, chain.ChainState(torch.zeros(2, 1, 3)), chain.ChainState(torch.ones(2, 3)))
    assert torch.equal(out.x, torch.ones(2, 3))
    out = chain._where_state(bad, chain.ChainState(torch.zeros(2, 2, 2)), chain.ChainState(torch.ones(2, 2, 2)))
    assert torch.equal(out.x[0], torch.zeros(2, 2)) and torch.equal(out.x[1], torch.ones(2, 2))


def test_accumulate_and_reduce_info_exact():
    acc = {}
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    chain._accumulate(acc, {"a": a, "z": torch.tensor(1.0)})
    assert acc["a"].dtype == torch.float32 and acc["a"] is not a
    chain._accumulate(acc, {"a": a, "z": torch.tensor([1.0, 2.0])})
    assert torch.equal(acc["a"], torch.tensor([2.0, 4.0])) and torch.equal(a, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(acc["z"], torch.tensor([2.0, 3.0]))
    chain._accumulate(acc, {"a": torch.tensor(1.0)})
    assert torch.equal(acc["a"], torch.tensor([3.0, 5.0]))
    acc = {}
    chain._reduce_info(acc, {"a": torch.tensor([1, 2])})
    chain._reduce_info(acc, {"a": torch.tensor([1, 2])})
    assert torch.equal(acc["a"], torch.tensor([2.0, 4.0]))


def test_nonfinite_messages_exact():
    chain._check_finite_start(torch.ones(3, 2), None)
    x0 = torch.zeros(10, 2)
    x0[[1, 2, 3, 4, 5, 6, 7, 8, 9], 0] = math.nan
    with pytest.raises(ValueError) as e:
        chain._check_finite_start(x0, None)
    assert str(e.value) == (
        "x0 holds NaN/inf values in 9 chain(s) ([1, 2, 3, 4, 5, 6, 7, 8]...): initial states "
        "must be finite; check how x0 was made (e.g. data with missing values), or start from "
        "the space's noise (sampler.sample(energy, n))")
    with pytest.raises(ValueError, match=r"in 2 chain\(s\) \(\[3, 1\]\): initial"):
        chain._check_finite_start(x0, torch.tensor([3, 0, 1]))
    chain._raise_if_bad(torch.full((3,), chain._NEVER), "S")
    fb = torch.full((10,), chain._NEVER)
    fb[[0, 2, 3, 4, 5, 6, 7, 8, 9]] = torch.tensor([5, 4, 9, 9, 9, 9, 9, 9, 9])
    with pytest.raises(chain.NonFiniteError) as e:
        chain._raise_if_bad(fb, "MALA")
    assert str(e.value) == (
        "MALA: 9 chain(s) became NaN/inf, first at step 4 (chains [0, 2, 3, 4, 5, 6, 7, 8]...). "
        "Lower the step size, check the energy for NaN/inf, or pass on_nonfinite='reset' to "
        "undo such moves")
    fb = torch.full((3,), chain._NEVER)
    fb[1] = 0
    with pytest.raises(chain.NonFiniteError, match=r"^S: 1 chain\(s\) became NaN/inf, first at step 0 \(chains \[1\]\)\. "):
        chain._raise_if_bad(fb, "S", torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"^x0 holds NaN/inf values in 1 chain\(s\) \(\[1\]\)"):
        chain._raise_if_bad(fb, "S", x0[:3])
    with pytest.raises(chain.NonFiniteError):
        chain._raise_if_bad(fb, "S", torch.zeros(3, 2, dtype=torch.long))
    st = chain.ChainState(torch.zeros(1))
    assert st.replace(energy=torch.ones(1)).energy is not None and st.energy is None


# ---- run: the eager "raise" loop and the generic "reset" loop --------------------------

class Counter(MCMCSampler):
    """x -> x + 1; chain 1 turns NaN once its value reaches ``bad_at``; reports per-chain
    ``a`` = the new value and a 0-d ``z`` = 2."""

    def __init__(self, bad_at=math.inf, **kw):
        super().__init__(compile=False, **kw)
        self.bad_at = bad_at

    def step(self, energy, x, generator=None):
        y = x + 1
        hit = (y >= self.bad_at) & (torch.arange(len(x)) == 1)[:, None]
        y = torch.where(hit, torch.full_like(y, math.nan), y)
        return y, {"a": y[:, 0].nan_to_num(0.0), "z": torch.tensor(2.0)}


@pytest.mark.parametrize("bad_at", [1, 2, 32, 33, 35, 40])
def test_run_eager_names_the_first_nonfinite_step(bad_at):
    s = Counter(bad_at)
    with pytest.raises(chain.NonFiniteError) as e:
        s.run(Quad(1), torch.zeros(3, 1), 40)
    assert str(e.value).startswith(
        f"Counter: 1 chain(s) became NaN/inf, first at step {bad_at - 1} (chains [1]). ")
    s.run(Quad(1), torch.zeros(3, 1), bad_at - 1)  # one step short: no error


def test_run_stats_and_reset_mode_exact():
    s = Counter()
    out = s.run(Quad(1), torch.zeros(3, 1), 4)
    assert torch.equal(out, torch.full((3, 1), 4.0))
    assert torch.equal(s.chain_stats["a"], torch.full((3,), 2.5))  # mean of 1..4
    assert set(s.chain_stats) == {"a"}
    assert s.stats["a"].item() == 2.5 and s.stats["z"].item() == 2.0
    assert s.stats["nonfinite"].item() == 0.0
    assert torch.equal(s.last_state.x, out)
    s.run(Quad(1), torch.zeros(3, 1), 0)
    assert s.stats["nonfinite"].item() == 0.0
    r = Counter(3, on_nonfinite="reset")
    out = r.run(Quad(1), torch.zeros(3, 1), 6)
    assert torch.equal(out[:, 0], torch.tensor([6.0, 2.0, 6.0]))
    assert r.stats["nonfinite"].item() == 4.0
    assert torch.equal(r.chain_stats["a"], torch.tensor([3.5, 0.5, 3.5]))  # (1+2)/6 for chain 1
    assert r.stats["z"].item() == 2.0


def test_mcmc_sampler_argument_messages():
    for kw, msg in (
        ({"n_steps": -1}, "n_steps must be a non-negative int, got -1"),
        ({"n_steps": True}, "n_steps must be a non-negative int, got True"),
        ({"on_nonfinite": "skip"}, "on_nonfinite must be 'raise' or 'reset', got 'skip'"),
        ({"graph_steps": 0}, "graph_steps must be a positive int or None, got 0"),
        ({"graph_steps": True}, "graph_steps must be a positive int or None, got True"),
        ({"graph_steps": 2.0}, "graph_steps must be a positive int or None, got 2.0"),
        ({"compile": "yes"}, "compile must be True, False or 'auto', got 'yes'"),
    ):
        with pytest.raises(ValueError) as e:
            MCMCSampler(**kw)
        assert str(e.value) == msg
    m = MCMCSampler()
    assert (m.n_steps, m.on_nonfinite, m.progress, m.cuda_graph, m.graph_steps, m.compile) == (
        10, "raise", False, False, None, "auto")
    assert m.compile_after == 2000 and m.compile_backend == "inductor"
    assert m.compile_seconds is None and m._compile_block_steps() == 8
    assert MCMCSampler(graph_steps=1).graph_steps == 1
    with pytest.raises(ValueError, match=r"^n_steps must be a non-negative int, got 1\.5$"):
        Counter().run(Quad(1), torch.zeros(2, 1), 1.5)
    with pytest.raises(NotImplementedError, match=r"^MCMCSampler must implement step\(\) \(or init_state/transition\)$"):
        MCMCSampler().step(Quad(1), torch.zeros(2, 1))


# ---- replay buffer and persistent chains ------------------------------------------------

def test_replay_buffer_draw_exact():
    sp = Continuous(2)
    buf = ReplayBuffer(sp, capacity=6, reinit_prob=0.5)
    assert not buf.initialised
    x, slots = buf.draw(4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    states = sp.noise(6, generator=g)
    ref_slots = torch.randperm(6, generator=g)[:4]
    fresh = sp.noise(4, generator=g)
    renew = torch.rand(4, generator=g) < 0.5
    assert 0 < int(renew.sum()) < 4
    assert buf.initialised and torch.equal(buf.states, states)
    assert torch.equal(slots, ref_slots)
    assert torch.equal(x, torch.where(renew[:, None], fresh, states[ref_slots]))
    assert buf.stats["reinit_rate"].item() == renew.float().mean().item()
    buf.push(x + 100, slots)
    assert torch.equal(buf.states[slots], x + 100)
    rest = torch.ones(6, dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(buf.states[rest], states[rest])
    b0 = ReplayBuffer(sp, capacity=3, reinit_prob=0)
    x, slots = b0.draw(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, b0.states[slots]) and b0.stats["reinit_rate"].item() == 0.0
    b1 = ReplayBuffer(sp, capacity=3, reinit_prob=1)
    b1.draw(2)
    assert b1.stats["reinit_rate"].item() == 1.0


def test_replay_buffer_defaults_and_messages():
    sp = Continuous(2)
    b = ReplayBuffer(sp)
    assert (b.capacity, b.reinit_prob, b.noise) == (10000, 0.05, None)
    assert b.states.shape == (0, 2)
    assert repr(ReplayBuffer(sp, 5, 0.25)) == f"ReplayBuffer({sp!r}, capacity=5, reinit_prob=0.25)"
    for args, msg in (
        (("abc",), "space must be an ebmflow.spaces.Space, got str"),
        ((sp, 0), "capacity must be an int >= 1, got 0"),
        ((sp, 5, 1.5), "reinit_prob must lie in [0, 1], got 1.5"),
        ((sp, 5, -0.1), "reinit_prob must be finite and >= 0, got -0.1"),
    ):
        with pytest.raises(ValueError) as e:
            ReplayBuffer(*args)
        assert str(e.value) == msg
    assert ReplayBuffer(sp, 1, 1.0).capacity == 1
    b = ReplayBuffer(sp, 3)
    with pytest.raises(ValueError) as e:
        b.push(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    assert str(e.value) == "push() before any draw(): the buffer is empty; call draw() first"
    with pytest.raises(ValueError) as e:
        b.draw(4)
    assert str(e.value) == ("cannot draw n=4 distinct states from a buffer of capacity 3; "
                            "use ReplayBuffer(capacity >= 4)")
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        b.draw(0)
    b.draw(3)
    with pytest.raises(ValueError) as e:
        b.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert str(e.value) == (f"x has shape (2, 3) but the buffer stores states of {sp!r}, shape (n, 2)")
    with pytest.raises(ValueError) as e:
        b.push(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    assert str(e.value) == "slots must have shape (2,), got (3,)"
    with pytest.raises(ValueError) as e:
        b.draw(1, device="meta")
    assert str(e.value) == ("the replay buffer is on cpu but states are asked for on meta; "
                            "move the buffer (or the sampler holding it) with .to('meta')")
    with pytest.raises(ValueError) as e:
        ReplayBuffer(sp, 3, noise=lambda n, g, d: torch.zeros(n, 5)).draw(1)
    assert str(e.value).startswith("noise() has shape (3, 5) but the buffer stores states")
    b2 = ReplayBuffer(sp, 3, reinit_prob=0, noise=lambda n, g, d: torch.full((n, 2), 7.0))
    assert torch.equal(b2.draw(2)[0], torch.full((2, 2), 7.0))
    b3 = ReplayBuffer(sp, 3)
    b3.load_state_dict(b.state_dict())
    assert torch.equal(b3.states, b.states)
    b4 = ReplayBuffer(sp, 3)
    b4.load_state_dict(ReplayBuffer(sp, 4).state_dict())  # empty: fine
    assert b4.states.shape == (0, 2)
    with pytest.raises(ValueError) as e:
        ReplayBuffer(sp, 4).load_state_dict(b.state_dict())
    assert str(e.value) == "saved replay buffer has shape (3, 2), expected (4, 2)"
    with pytest.raises(ValueError, match=r"^saved replay buffer has shape \(3, 2\), expected \(3, 3\)$"):
        ReplayBuffer(Continuous(3), 3).load_state_dict(b.state_dict())


def test_persistent_sampler_exact_and_messages():
    sp = Continuous(1)
    buf = ReplayBuffer(sp, capacity=5, reinit_prob=0)
    ps = PersistentSampler(Counter(), buf, n_steps=3)
    assert ps.n_steps == 3 and PersistentSampler(Counter(), buf).n_steps is None
    x = ps.sample(Quad(1), 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    states = sp.noise(5, generator=g)
    slots = torch.randperm(5, generator=g)[:2]
    assert torch.equal(x, states[slots] + 3)
    assert torch.equal(buf.states[slots], x)
    assert ps.stats["buffer_capacity"].item() == 5.0 and ps.stats["reinit_rate"].item() == 0.0
    assert ps.stats["z"].item() == 2.0
    x = ps.sample(Quad(1), 2, n_steps=1)
    assert ps.stats["a"].shape == ()
    before = buf.states.clone()
    out = ps.sample(Quad(1), x0=torch.zeros(2, 1))
    assert torch.equal(out, torch.full((2, 1), 3.0)) and torch.equal(buf.states, before)
    assert set(ps.stats) == {"a", "z", "nonfinite"}
    out = ps.sample(Quad(1), x0=torch.zeros(2, 1), n_steps=5)
    assert torch.equal(out, torch.full((2, 1), 5.0))
    with pytest.raises(ValueError) as e:
        ps.sample(Quad(2), 2)
    assert str(e.value) == (f"the energy's space {Continuous(2)!r} does not match the replay "
                            f"buffer's {sp!r}; build ReplayBuffer(energy.space, ...)")
    with pytest.raises(ValueError, match=r"^pass n \(number of states\) or x0 \(initial states\)$"):
        ps.sample(Quad(1))
    with pytest.raises(ValueError, match="^mcmc must be an MCMCSampler, got ReplayBuffer$"):
        PersistentSampler(buf, buf)
    with pytest.raises(ValueError, match="^buffer must be a ReplayBuffer, got Counter$"):
        PersistentSampler(Counter(), Counter())
    with pytest.raises(ValueError, match="^n_steps must be an int >= 0, got -1$"):
        PersistentSampler(Counter(), buf, -1)
    assert ps.supports(Quad(1)) and not ps.supports(Quad(2))
    assert not PersistentSampler(MALA(), ReplayBuffer(Binary(1), 2)).supports(BinQuad(1))
    assert ps.update(Quad(1)) == {}


# ---- messages of the sampler bases, the compile fallback and the graph key ---------------

def test_space_and_input_messages_exact():
    with pytest.raises(ValueError) as e:
        Gibbs().sample(Quad(2), 2)
    assert str(e.value) == (
        f"Gibbs cannot sample {Continuous(2)!r}; samplers for this space: Langevin, MALA, HMC, "
        "FlowMC (ebmflow.flows)")
    for m in (BinQuad(2), CatQuad(2, 2)):
        with pytest.raises(ValueError) as e:
            MALA().sample(m, 2)
        assert str(e.value) == (
            f"MALA cannot sample {m.space!r}; samplers for this space: Gibbs, GibbsWithGradients, "
            "DiscreteLangevin, DiscreteFlowSampler (ebmflow.discrete_flows)")
    assert base._samplers_for(object()) == ["none built in: subclass ebmflow.samplers.MCMCSampler"]
    with pytest.raises(ValueError) as e:
        MALA().sample(torch.nn.Linear(1, 1), 2)
    assert str(e.value) == ("energy must be an ebmflow EnergyModel, got Linear; subclass "
                            "ebmflow.energy.EnergyModel and implement energy()")
    with pytest.raises(ValueError) as e:
        Counter().sample(Quad(1), 3, x0=torch.zeros(2, 1))
    assert str(e.value) == "n=3 but x0 has 2 states; pass one of them"
    with pytest.raises(ValueError) as e:
        Counter().sample(Quad(1))
    assert str(e.value) == "pass n (number of states) or x0 (initial states)"
    with pytest.raises(ValueError) as e:
        Counter().run(Quad(2), torch.zeros(3, 1))
    assert str(e.value) == (f"Counter: x0 has shape (3, 1) but the energy's space {Continuous(2)!r} "
                            "expects (B, 2) with B >= 1; batch dimension first")
    with pytest.raises(ValueError, match=r"^x0 must be a torch\.Tensor, got list$"):
        Counter().run(Quad(1), [[0.0]])
    with pytest.raises(ValueError, match=r"^Counter: x0 has shape \(0, 1\)"):
        Counter().run(Quad(1), torch.zeros(0, 1))
    out = Counter().sample(Quad(1), 2, n_steps=3, generator=torch.Generator().manual_seed(0))
    x0 = Continuous(1).noise(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0 + 3)
    assert torch.equal(Counter(n_steps=2).sample(Quad(1), x0=torch.zeros(2, 1)), torch.full((2, 1), 2.0))


def test_warn_fallback_message_exact():
    with pytest.warns(CompileFallbackWarning) as rec:
        _compiled.warn_fallback("MALA", "no compiler")
    assert str(rec[0].message) == ("MALA: compiled chains are not available (no compiler); running "
                                   "eagerly. Pass compile=False to silence this warning.")


def test_graph_key_exact():
    m = BinQuad(2)
    s = MALA(0.2)
    g = torch.Generator()
    key = _fast.graph_key(s, m, ("spec",), 4, g)
    addresses = ((m.J.data_ptr(), torch.float64, (2, 2)), (m.b.data_ptr(), torch.float64, (2,)))
    assert key == (id(m), True, addresses, ("spec",), 4, _fast._hyperparameters(s),
                   _fast.energy_attributes(m), id(g))
    assert _fast.graph_key(s, m, ("spec",), 4, None)[-1] is None
    assert ("_step_size", 0.2) in _fast._hyperparameters(s)
    assert ("_step_size", 0.2) not in _fast._hyperparameters(s, baked=False)
    assert ("n_steps", 10) in _fast._hyperparameters(s, baked=False)


class Rounded(EnergyModel):
    """Not differentiable in its input (detached)."""

    def __init__(self, space):
        super().__init__(space)

    def energy(self, x):
        return self.space.one_hot(x).flatten(1).detach().sum(-1) if isinstance(
            self.space, Categorical) else x.detach().sum(-1)


@pytest.mark.parametrize("cls", [GibbsWithGradients, DiscreteLangevin])
def test_log_proposal_names_the_sampler_for_a_gradient_free_energy(cls):
    for space in (Binary(3), Categorical(2, 3)):
        m = Rounded(space)
        x = space.noise(2)
        with pytest.raises(ValueError, match=rf"^{cls.__name__} needs the gradient of the energy with "
                           r"respect to the state, but Rounded\.energy is not differentiable"):
            cls().log_proposal(m, x, x)


# ---- boundaries and guards of the transitions --------------------------------------------

class Flat(EnergyModel):
    def __init__(self, space):
        super().__init__(space)

    def energy(self, x):
        return torch.zeros(x.shape[0], dtype=torch.float64)


def test_gibbs_binary_keeps_the_bit_when_u_equals_the_flip_probability():
    # E(x') = E(x): p(flip) = sigmoid(0) = 1/2; u = 1/2 is not < 1/2, so the bit is kept
    m, x = Flat(Binary(3)), torch.zeros(2, 3, dtype=torch.float64)
    tape = rng.NoiseTape([torch.tensor([[1], [2]]), torch.tensor([0.5, 0.25], dtype=torch.float64)])
    new, info = Gibbs().transition(m, ChainState(x, energy=m.energy(x)), tape)
    assert torch.equal(new.x, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(info["flips"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert info["flips"].dtype == torch.float64


@pytest.mark.parametrize("cls", [MALA, HMC])
def test_continuous_transitions_need_the_cached_state(cls):
    m, x = Quad(2), torch.zeros(2, 2)
    e, g = m.energy(x), torch.zeros(2, 2)
    for st in (ChainState(x), ChainState(x, energy=e), ChainState(x, grad=g)):
        with pytest.raises(AssertionError) as err:
            cls().transition(m, st)
        assert str(err.value) == f"{cls.__name__} needs the state from init_state"


def test_discrete_langevin_propose_binary_exact():
    s, x = DiscreteLangevin(), _bits(4)
    logits = torch.linspace(-2, 2, 16, dtype=torch.float64).reshape(4, 4)
    y = s._propose(BinQuad(), x, logits, torch.Generator().manual_seed(5))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    flip = u.log() < torch.nn.functional.logsigmoid(logits)
    assert 0 < int(flip.sum()) < 16
    assert torch.equal(y, torch.where(flip, 1 - x, x))


# ---- exact lattice sampling (transfer matrices) -------------------------------------------

def test_lattice_row_terms_limits_and_messages():
    for d, rows, msg in (
        (36, 2, "rows must be >= 3 and divide D = 36, got rows=2"),
        (36, 5, "rows must be >= 3 and divide D = 36, got rows=5"),
        (39, 3, "rows of 13 spins need 2^13 row states; max is 12 bits"),
    ):
        with pytest.raises(ValueError) as e:
            _lattice._row_terms(IsingEnergy(torch.zeros(d, d)), rows)
        assert str(e.value) == msg
    assert _lattice.MAX_ROW_BITS == 12
    # 12 spins per row is allowed (on the meta device: shapes only, no memory)
    spins, log_t, _ = _lattice._row_terms(IsingEnergy(torch.zeros(36, 36)).to("meta"), 3)
    assert spins.shape == (4096, 12) and log_t.shape == (3, 4096, 4096) and log_t.device.type == "meta"
    prods, scales = _lattice._suffix_products(log_t)
    assert prods[0].device.type == "meta" and scales[-1].device.type == "meta"
    assert scales[-1].dtype == torch.float64 and prods[-1].dtype == torch.float64
    j = torch.zeros(8, 8)
    j[0, 4] = j[4, 0] = 1.0  # row 0 (sites 0, 1) to row 2 (sites 4, 5) of 4 rows
    with pytest.raises(ValueError) as e:
        _lattice._row_terms(IsingEnergy(j), 4)
    assert str(e.value) == ("coupling links row 0 to row 2; transfer matrices need couplings only "
                            "within a row and between neighbouring rows")
    j = torch.zeros(8, 8)
    j[0, 6] = j[6, 0] = 1.0  # row 0 to row 3: neighbours on the periodic ring
    _lattice._row_terms(IsingEnergy(j), 4)


def test_lattice_log_partition_exact():
    g = torch.Generator().manual_seed(0)
    j = torch.randn(9, 9, generator=g, dtype=torch.float64) * 0.5
    m = IsingEnergy(j, torch.randn(9, generator=g, dtype=torch.float64) * 0.3)
    states = torch.tensor([[(i >> k) & 1 for k in range(9)] for i in range(512)], dtype=m.bias.dtype)
    want = torch.logsumexp(-m.energy(states).double(), 0)
    got = _lattice.lattice_transfer_log_partition(m, 3)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


# ---- non-finite proposals, exact dtypes, constructor pass-through --------------------------

class Cliff(EnergyModel):
    """0.5 |x|^2, but -inf where x_0 > 0.5 (a proposal there has log alpha = +inf)."""

    def __init__(self):
        super().__init__(Continuous(2))

    def energy(self, x):
        e = 0.5 * x.square().sum(-1)
        return torch.where(x[:, 0] > 0.5, torch.full_like(e, -math.inf), e)


def _normals_with_log_u(noise, u):
    r"""The one draw of MALA and HMC (``rng.randn_and_log_uniform``) that gives ``noise`` and
    $\log u$ for every chain: the two extra normals of a chain are $(\sqrt{-2 \log u}, 0)$."""
    b = len(noise)
    first = torch.full((b,), math.sqrt(-2 * math.log(u)) if u > 0 else math.inf,
                       dtype=noise.dtype)
    return torch.cat([noise.flatten(), first, torch.zeros(b, dtype=noise.dtype)])


@pytest.mark.parametrize("cls", [MALA, HMC])
@pytest.mark.parametrize("n_warmup", [0, 3])
def test_nonfinite_proposals_are_rejected_even_when_u_is_zero(cls, n_warmup):
    # chain 0 proposes x_0 = 1 (E = -inf, log alpha = +inf -> NaN/inf): rejected;
    # chain 1 proposes x_0 = -1 (finite, log alpha = 0.5 - 0.5 = 0 ... or less): u = 0 accepts
    m, x = Cliff(), torch.zeros(2, 2, dtype=torch.float64)
    s = cls(0.5, n_warmup=n_warmup) if cls is MALA else cls(1.0, n_leapfrog=1, n_warmup=n_warmup)
    noise = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    for u in (0.0, 0.5):
        tape = rng.NoiseTape([_normals_with_log_u(noise, u)])
        new, info = s.transition(m, s.init_state(m, x), tape)
        assert torch.equal(new.x[0], x[0]) and new.energy[0].item() == 0.0
        assert torch.equal(info["nonfinite_rate"], torch.tensor([True, False]))
        assert info["accept_rate"].dtype == torch.float64
        assert info["accept_rate"][0].item() == 0.0
    tape = rng.NoiseTape([_normals_with_log_u(noise, 0.0)])
    new, info = s.transition(m, s.init_state(m, x), tape)
    assert torch.equal(info["accept_rate"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert new.x[1, 0].item() == -1.0
    if n_warmup and cls is MALA:  # the rejected NaN/inf proposal counts as probability 0
        prob = 0.5 * math.exp(_mala_log_alpha_chain1())
        assert new.extra["log_step_size"].item() == pytest.approx(
            math.log(0.5) + (prob - 0.574), abs=1e-12)


def _mala_log_alpha_chain1():
    # MALA, eta = 0.5, x = 0, grad 0, xi = (-1, 0): x' = (-1, 0), E(x') = 0.5, grad E(x') = x';
    # log alpha = E(x) - E(x') + |xi|^2 / 2 - |x - x' + eta grad E(x')|^2 / (4 eta)
    return 0.0 - 0.5 + 0.5 - (1.0 - 0.5) ** 2 / 2.0


_CTORS = {
    "Langevin": (Langevin, {}),
    "MALA": (MALA, {}),
    "HMC": (HMC, {}),
    "Gibbs": (Gibbs, {}),
    "GibbsWithGradients": (GibbsWithGradients, {}),
    "DiscreteLangevin": (DiscreteLangevin, {}),
}


@pytest.mark.parametrize("name", sorted(_CTORS))
def test_constructors_pass_every_option_through(name):
    cls, _ = _CTORS[name]
    s = cls()
    # compile defaults to "auto" in every constructor (the MCMCSampler default)
    assert (s.n_steps, s.on_nonfinite, s.progress, s.cuda_graph, s.graph_steps, s.compile) == (
        10, "raise", False, False, None, "auto")
    s = cls(n_steps=3, on_nonfinite="reset", progress=True, cuda_graph=True, graph_steps=5,
            compile=False)
    assert (s.n_steps, s.on_nonfinite, s.progress, s.cuda_graph, s.graph_steps, s.compile) == (
        3, "reset", True, True, 5, False)
    assert cls(compile=True).compile is True


def test_initial_states_on_the_energys_device_and_generator_message():
    m = BinQuad(3).to("meta")
    assert Gibbs()._initial_states(m, 4, None, None).device.type == "meta"
    with pytest.raises(ValueError) as e:
        Gibbs()._initial_states(m, 4, None, torch.Generator())
    assert str(e.value) == ("generator is on cpu but the energy is on meta; create it with "
                            "torch.Generator(device='meta')")
    x = Gibbs()._initial_states(BinQuad(3), None, torch.ones(2, 3), None)
    assert torch.equal(x, torch.ones(2, 3))


def test_initial_states_validate_x0_by_name_and_device():
    with pytest.raises(ValueError) as e:
        Gibbs()._initial_states(BinQuad(3), None, torch.full((2, 3), 2.0), None)
    assert str(e.value) == ("x0 has a value 2.0 outside {0, 1} for Binary(3); binarise it first, "
                            "e.g. (x0 > 0.5).float()")
    with pytest.raises(ValueError) as e:
        Gibbs()._initial_states(BinQuad(3).to("meta"), None, torch.ones(2, 3), None)
    assert str(e.value) == ("x0 is on device cpu but the model is on meta; move it first, "
                            "e.g. x0 = x0.to('meta')")
    with pytest.raises(ValueError, match=r"^n=2 but x0 has 3 states; pass one of them$"):
        Gibbs()._initial_states(BinQuad(2), 2, torch.ones(3, 2), None)


def test_langevin_image_states_nan_energy_marks_only_its_chain():
    class Img(EnergyModel):
        def __init__(self):
            super().__init__(Continuous((3, 4)))

        def energy(self, x):
            e = 0.5 * x.square().flatten(1).sum(-1)
            return torch.where(torch.arange(x.shape[0]) == 0, torch.full_like(e, math.nan), e)

    x = torch.ones(2, 3, 4, dtype=torch.float64)
    out = Langevin(0.1, noise_scale=0.0).step(Img(), x, torch.Generator().manual_seed(0))
    assert torch.isnan(out[0]).all()
    torch.testing.assert_close(out[1], torch.full((3, 4), 0.9, dtype=torch.float64), rtol=0, atol=1e-15)


def test_float_dtype_of_the_energy():
    assert _discrete.float_dtype(Flat(Binary(2))) == torch.get_default_dtype()
    assert _discrete.float_dtype(BinQuad(2)) == torch.float64

    class IntBuf(Flat):
        def __init__(self):
            super().__init__(Binary(2))
            self.register_buffer("k", torch.zeros(2, dtype=torch.long))

    assert _discrete.float_dtype(IntBuf()) == torch.get_default_dtype()


def test_gibbs_update_costs_one_energy_call_on_the_alternatives():
    class Counting(CatQuad):
        def __init__(self):
            super().__init__()
            self.rows = []

        def energy(self, x):
            self.rows.append(x.shape[0])
            return super().energy(x)

    for sweep, want in ((False, [5 * 2]), (True, [5 * 2] * 3)):
        m, x = Counting(), _cats(5)
        s = Gibbs(sweep=sweep)
        st = s.init_state(m, x)
        m.rows.clear()
        s.transition(m, st, torch.Generator().manual_seed(0))
        assert m.rows == want


def test_langevin_argument_messages():
    for kw, msg in (
        ({"step_size": 0}, "step_size must be finite and > 0, got 0"),
        ({"temperature": -1}, "temperature must be finite and > 0, got -1"),
        ({"noise_scale": -1}, "noise_scale must be finite and >= 0, got -1"),
        ({"grad_clip": 0}, "grad_clip must be finite and > 0, got 0"),
    ):
        with pytest.raises(ValueError) as e:
            Langevin(**kw)
        assert str(e.value) == msg


class GradOnce(EnergyModel):
    """Differentiable at its first call only (then detached): the proposal's gradient fails."""

    def __init__(self, space):
        super().__init__(space)
        self.calls = 0

    def energy(self, x):
        self.calls += 1
        h = self.space.one_hot(x, dtype=torch.float32) if isinstance(self.space, Categorical) else x
        h = h.flatten(1)
        return h.sum(-1) if self.calls == 1 else h.detach().sum(-1)


@pytest.mark.parametrize("cls", [GibbsWithGradients, DiscreteLangevin])
@pytest.mark.parametrize("space", [Binary(3), Categorical(2, 3)], ids=["binary", "categorical"])
def test_proposal_gradient_error_names_the_sampler(cls, space):
    m = GradOnce(space)
    s = cls(metropolis=True) if cls is DiscreteLangevin else cls()
    st = s.init_state(m, space.noise(2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=rf"^{cls.__name__} needs the gradient of the energy"):
        s.transition(m, st, torch.Generator().manual_seed(0))


def test_gradient_check_flag_defaults():
    assert GibbsWithGradients().check_gradient is True
    assert GibbsWithGradients(check_gradient=False).check_gradient is False
    assert DiscreteLangevin(check_gradient=0).check_gradient is False


def test_gibbs_end_run_stats_on_the_states_device():
    s = Gibbs()
    s.end_run(Flat(Binary(3)), ChainState(torch.zeros(4, 3, device="meta")))
    assert s.chain_stats["accept_rate"].device.type == "meta"
    assert s.chain_stats["accept_rate"].shape == (4,)
    assert s.stats["accept_rate"].device.type == "meta"


@pytest.mark.parametrize("sweep", [False, True])
def test_gibbs_transition_without_cached_energy_and_flip_dtype_device(sweep):
    for m, x in ((BinQuad(), _bits()), (CatQuad(), _cats())):
        s = Gibbs(sweep=sweep)
        a, ia = s.transition(m, ChainState(x), torch.Generator().manual_seed(8))
        b, ib = s.transition(m, ChainState(x, energy=m.energy(x)), torch.Generator().manual_seed(8))
        assert torch.equal(a.x, b.x) and torch.equal(a.energy, b.energy)
        assert torch.equal(ia["flips"], ib["flips"]) and ia["flips"].dtype == torch.float64
        xm = x.to("meta")
        _, info = s.transition(m.to("meta"), ChainState(xm, energy=torch.zeros(len(x), dtype=torch.float64,
                                                                             device="meta")))
        assert info["flips"].device.type == "meta" and info["flips"].dtype == torch.float64


@pytest.mark.parametrize("cls", [Gibbs, GibbsWithGradients, DiscreteLangevin])
def test_discrete_init_state_names_the_sampler_for_a_continuous_space(cls):
    with pytest.raises(ValueError) as e:
        cls().init_state(Quad(2), torch.zeros(2, 2))
    assert str(e.value) == (f"{cls.__name__} samples Binary or Categorical spaces, got "
                            f"{Continuous(2)!r}; use Langevin, MALA or HMC for continuous states")


def test_init_states_cache_the_energy():
    m, x = CatQuad(), _cats(4)
    torch.testing.assert_close(Gibbs().init_state(m, x).energy, m.energy(x), rtol=0, atol=0)
    e, g = _catquad_eg(m, x)
    for cls in (GibbsWithGradients, DiscreteLangevin):
        st = cls().init_state(m, x)
        torch.testing.assert_close(st.energy, e, rtol=0, atol=1e-12)
        torch.testing.assert_close(st.grad, g, rtol=0, atol=1e-12)


def test_mh_select_rejects_infinite_energy_even_at_u_zero_and_float_flags():
    x, xn = torch.zeros(2, 1), torch.ones(2, 1)
    e = torch.zeros(2, dtype=torch.float64)
    en = torch.tensor([math.inf, 0.0], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    tape = rng.NoiseTape([torch.zeros(2, dtype=torch.float64)])
    out = _discrete.mh_select(x, e, torch.zeros(2, 1), xn, en, torch.ones(2, 1), z, z, tape)
    assert torch.equal(out[0], torch.tensor([[0.0], [1.0]]))
    assert torch.equal(out[3], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert out[3].dtype == torch.float64 and out[4].dtype == torch.float64
    assert torch.equal(out[4], torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_eight_bad_chains_are_listed_without_an_ellipsis():
    x0 = torch.zeros(9, 1)
    x0[:8] = math.nan
    with pytest.raises(ValueError, match=r"in 8 chain\(s\) \(\[0, 1, 2, 3, 4, 5, 6, 7\]\): initial"):
        chain._check_finite_start(x0, None)


def test_replay_buffer_state_before_the_first_draw_and_meta_device():
    b = ReplayBuffer(Categorical(2, 3), 4)
    assert b.stats == {} and b.states.dtype == torch.long and b.states.shape == (0, 2)
    assert ReplayBuffer(Binary(2), 4).states.dtype == Binary(2).dtype
    x, slots = ReplayBuffer(Continuous(2), 4).draw(2, device="meta")
    assert x.device.type == "meta" and slots.device.type == "meta"
    seen = []
    b = ReplayBuffer(Continuous(2), 3, noise=lambda n, g, d: seen.append((g, d)) or torch.zeros(n, 2))
    g = torch.Generator()
    b.draw(2, generator=g, device="cpu")
    assert seen[0] == (g, "cpu") and seen[1][0] is g and seen[1][1] == torch.device("cpu")


def test_persistent_sampler_passes_the_generator_and_n_to_its_kernel():
    m, sp = Quad(2), Continuous(2)
    ps = PersistentSampler(Langevin(0.1, 2), ReplayBuffer(sp, 5, reinit_prob=0.5))
    out = ps.sample(m, 3, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x, _ = ReplayBuffer(sp, 5, reinit_prob=0.5).draw(3, generator=g)
    torch.testing.assert_close(out, Langevin(0.1, 2).run(m, x, generator=g), rtol=0, atol=0)
    x0 = torch.ones(3, 2)
    out = ps.sample(m, 3, x0=x0, generator=torch.Generator().manual_seed(4))
    want = Langevin(0.1, 2).sample(m, x0=x0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^n=2 but x0 has 3 states; pass one of them$"):
        ps.sample(m, 2, x0=x0)


@pytest.mark.parametrize("d", [5, 64, 65, 200, 1024])
def test_discrete_langevin_log_q_equals_the_sum_of_log_sigmoids(d):
    """The product form of sum_i log q_i (chunks of 64 coordinates) against log-sigmoids, in
    float64 and float32; all-zero logits make every factor 2, so a float32 product over more
    than 127 coordinates would overflow without the chunks."""
    g = torch.Generator().manual_seed(d)
    logits = 4 * torch.randn(3, d, generator=g, dtype=torch.float64)
    logits[0] = 0.0
    flipped = torch.rand(3, d, generator=g) < 0.3
    ls = torch.nn.functional.logsigmoid
    want = torch.where(flipped, ls(logits), ls(-logits)).sum(1)
    got = DiscreteLangevin._log_q_binary(logits, flipped)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    got32 = DiscreteLangevin._log_q_binary(logits.float(), flipped)
    assert bool(torch.isfinite(got32).all())
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-3)
    # the e^{-|l|} handed in by the proposal gives the same
    e = logits.abs().neg().exp()
    torch.testing.assert_close(DiscreteLangevin._log_q_binary(logits, flipped, e), got,
                               rtol=0, atol=0)


def test_discrete_langevin_flip_boundary_u_equal_to_p_keeps_the_bit():
    # logit 0: p(flip) = 1/2; u = 1/2 is not < 1/2, so the bit stays; u = 0.25 flips
    x = torch.zeros(1, 2, dtype=torch.float64)
    tape = rng.NoiseTape([torch.tensor([[0.5, 0.25]], dtype=torch.float64)])
    y, flip, e = DiscreteLangevin._propose_binary(x, torch.zeros(1, 2, dtype=torch.float64), tape)
    assert torch.equal(flip, torch.tensor([[False, True]]))
    assert torch.equal(y, torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(e, torch.ones(1, 2, dtype=torch.float64))  # e^{-|l|} at l = 0
    # p = e / (1 + e) for a negative logit, 1 / (1 + e) for a positive one; u just below
    # p flips, u just above keeps
    logits = torch.tensor([[-1.0, -1.0, 2.0, 2.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    u = p * torch.tensor([[1 - 1e-9, 1 + 1e-9, 1 - 1e-9, 1 + 1e-9]], dtype=torch.float64)
    _, flip, _ = DiscreteLangevin._propose_binary(torch.zeros(1, 4, dtype=torch.float64), logits,
                                                  rng.NoiseTape([u.clone()]))
    assert flip.tolist() == [[True, False, True, False]]


def test_replay_buffer_shape_message_of_an_image_space():
    sp = Continuous((2, 3))
    b = ReplayBuffer(sp, 2)
    b.draw(1)
    with pytest.raises(ValueError) as e:
        b.push(torch.zeros(1, 3, 2), torch.zeros(1, dtype=torch.long))
    assert str(e.value) == f"x has shape (1, 3, 2) but the buffer stores states of {sp!r}, shape (n, 2, 3)"


# ---- rng.categorical_sample: probabilities and cumulative sums -------------------------

def test_categorical_sample_from_probs_and_cdf_is_the_inverse_cdf():
    """``probs`` (unnormalised) and ``cdf``: index = #{k : F_k <= u F_K} for the uniform u of
    the row, drawn with the row's dtype from the generator (here handed in by a tape)."""
    probs = torch.tensor([[1.0, 2.0, 1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    u = torch.tensor([[0.3], [0.8]], dtype=torch.float64)
    # row 0: F = (1, 3, 4), u F_K = 1.2 -> 1; row 1: F = (0, 3, 4), u F_K = 3.2 -> 2
    assert torch.equal(rng.categorical_sample(probs=probs, generator=rng.NoiseTape([u])),
                       torch.tensor([1, 2]))
    cdf = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
    # row 0: F = (.25, .75, 1), u = .3 -> 1; row 1: F = (0, .75, 1), u = .8 -> 2
    assert torch.equal(rng.categorical_sample(cdf=cdf, generator=rng.NoiseTape([u])),
                       torch.tensor([1, 2]))
    tape = rng.RecordingTape(torch.Generator().manual_seed(0))
    rng.categorical_sample(probs=probs, generator=tape)
    assert [(tuple(d.shape), d.dtype) for d in tape.spec] == [((2, 1), torch.float64)]


def test_categorical_sample_from_probs_draws_the_distribution_from_the_generator():
    probs = torch.tensor([0.5, 3.0, 1.5]).expand(40000, 3)
    a = rng.categorical_sample(probs=probs, generator=torch.Generator().manual_seed(3))
    b = rng.categorical_sample(probs=probs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).double() / a.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)
    cdf = torch.tensor([0.1, 0.7, 1.0]).expand(40000, 3)
    c = rng.categorical_sample(cdf=cdf, generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(c, minlength=3).double() / c.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("kwargs", [{}, {"probs": torch.ones(2), "cdf": torch.ones(2)},
                                    {"logits": torch.zeros(2), "probs": torch.ones(2)}])
def test_categorical_sample_needs_exactly_one_input(kwargs):
    with pytest.raises(ValueError, match=r"^pass exactly one of logits, probs, cdf$"):
        rng.categorical_sample(**kwargs)


def test_gumbel_argmax_is_categorical_sample_from_logits():
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    a = _discrete.gumbel_argmax(logits, torch.Generator().manual_seed(8))
    b = rng.categorical_sample(logits, torch.Generator().manual_seed(8))
    c = rng.categorical_sample(logits, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- MCMCSampler.step, Sampler hooks, pickling --------------------------------------------

def test_step_is_one_transition_from_the_initial_state():
    """``step(energy, x, generator)`` = ``transition(energy, init_state(energy, x), generator)``
    for samplers written with init_state / transition."""
    m, x = Quad(), _x0()
    for sampler in (MALA(0.3), HMC(0.2, n_leapfrog=3)):
        x1, info = sampler.step(m, x, torch.Generator().manual_seed(2))
        ref, ref_info = sampler.transition(m, sampler.init_state(m, x),
                                           torch.Generator().manual_seed(2))
        assert torch.equal(x1, ref.x) and set(info) == set(ref_info)
        torch.manual_seed(99)
        other, _ = sampler.step(m, x, torch.Generator().manual_seed(3))
        assert not torch.equal(other, x1)


def test_sampler_base_sample_and_propose_and_accept_messages():
    class Bare(base.Sampler):
        pass

    with pytest.raises(NotImplementedError, match=r"^Bare must implement sample\(\)$"):
        Bare().sample(Quad(), 2)

    class Half(_discrete.GradientDiscreteSampler):
        pass

    m, x = BinQuad(), _bits(4)
    with pytest.raises(NotImplementedError, match=r"^Half must implement _propose_and_accept$"):
        Half().transition(m, ChainState(x), None)


def test_sync_gradients_calls_the_hook_with_the_list_of_parameters():
    sampler = Langevin(0.1)
    params = [torch.zeros(2), torch.ones(3)]
    sampler.sync_gradients(iter(params))  # no hook: nothing happens
    seen = []
    sampler.grad_sync = seen.append
    sampler.sync_gradients(iter(params))
    assert len(seen) == 1 and isinstance(seen[0], list)
    assert [p is q for p, q in zip(seen[0], params)] == [True, True]


def test_pickled_state_and_clear_graphs_drop_the_recorded_work():
    sampler = MALA(0.2)
    sampler._graph, sampler._compiled, sampler._draw_specs = "graph", {"k": 1}, {"k": 2}
    state = sampler.__getstate__()
    assert state["_graph"] is None and state["_compiled"] == {} and state["_draw_specs"] == {}
    assert sampler._graph == "graph" and sampler._compiled == {"k": 1}  # the sampler keeps them
    assert state["n_steps"] == sampler.n_steps and state["_modules"] is sampler._modules
    sampler.clear_graphs()
    assert sampler._graph is None and sampler._compiled == {} and sampler._draw_specs == {}
    assert isinstance(sampler._compiled, dict) and isinstance(sampler._draw_specs, dict)


# ---- gradient-based discrete samplers -----------------------------------------------------

def test_gradient_discrete_transition_computes_missing_energy_and_gradient():
    """A state without cached E and grad gets them computed: the same move as from a state
    built by init_state."""
    m, x = BinQuad(), _bits(8)
    for sampler in (GibbsWithGradients(), DiscreteLangevin(0.3, metropolis=True)):
        bare, info = sampler.transition(m, ChainState(x), torch.Generator().manual_seed(4))
        full, ref = sampler.transition(m, sampler.init_state(m, x),
                                       torch.Generator().manual_seed(4))
        assert torch.equal(bare.x, full.x) and torch.equal(bare.energy, full.energy)
        assert torch.equal(bare.grad, full.grad)
        e, g = _binquad_eg(m, x)
        half = ChainState(x, energy=e, grad=None)
        moved, _ = sampler.transition(m, half, torch.Generator().manual_seed(4))
        assert torch.equal(moved.x, full.x)


class Steps(EnergyModel):
    """A piecewise-constant energy: the values differ, the gradient is zero everywhere."""

    def __init__(self):
        super().__init__(Binary(3))

    def energy(self, x):
        return x.sum(-1) * 0.0 + x.detach().sum(-1)


def test_flat_gradient_check_runs_only_when_asked_and_for_two_or_more_states():
    m = Steps()
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    e, g = _discrete.relaxed_energy_and_grad("GWG", m, x)  # check=False by default
    assert torch.equal(e, torch.tensor([0.0, 1.0])) and torch.equal(g, torch.zeros(2, 3))
    msg = (r"^GWG: the gradient of Steps\.energy is zero at every state of the batch although "
           r"the energies differ, so it carries no information about which coordinates to "
           r"change \(a piecewise-constant energy\?\); use ebmflow\.samplers\.Gibbs, which "
           r"needs no gradient$")
    with pytest.raises(ValueError, match=msg):
        _discrete.relaxed_energy_and_grad("GWG", m, x, check=True)
    _discrete.relaxed_energy_and_grad("GWG", m, x[:1], check=True)  # one state: no verdict
    same = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # equal energies: no verdict
    _discrete.relaxed_energy_and_grad("GWG", m, same, check=True)
    with pytest.raises(ValueError, match=msg.replace("GWG", "GibbsWithGradients")):
        GibbsWithGradients(check_gradient=True).run(m, x, 1)
    GibbsWithGradients(check_gradient=False).run(m, x, 1)


# ---- replay buffer and persistent sampler --------------------------------------------------

def test_replay_buffer_load_into_an_empty_buffer_keeps_dtype_and_names_the_shape():
    space = Categorical(2, 3)
    filled, empty = ReplayBuffer(space, capacity=6), ReplayBuffer(space, capacity=6)
    filled.draw(2, generator=torch.Generator().manual_seed(0))
    assert empty.states.shape[0] == 0
    empty.load_state_dict(filled.state_dict())
    assert empty.states.shape == (6, 2) and empty.states.dtype == torch.long
    assert torch.equal(empty.states, filled.states)
    wide = ReplayBuffer(Continuous((2, 3)), capacity=5)
    bad = {k: v for k, v in ReplayBuffer(Continuous((3, 2)), capacity=5).state_dict().items()}
    with pytest.raises(Exception, match=r"\(5, 2, 3\)"):
        wide.load_state_dict(bad)


def test_persistent_sampler_update_delegates_to_its_kernel():
    seen = []

    class Learned(Langevin):
        def update(self, energy, data=None):
            seen.append((energy, data))
            return {"fitted": torch.ones(())}

    m, data = Quad(), torch.zeros(3, 2)
    ps = PersistentSampler(Learned(0.1), ReplayBuffer(Continuous(2), 8))
    assert ps.update(m, data) == {"fitted": torch.ones(())}
    assert seen == [(m, data)]


def test_persistent_sampler_stats_hold_the_capacity():
    ps = PersistentSampler(Langevin(0.01, n_steps=2), ReplayBuffer(Continuous(2), 8))
    ps.sample(Quad(), 4, generator=torch.Generator().manual_seed(0))
    cap = ps.stats["buffer_capacity"]
    assert cap.dim() == 0 and float(cap) == 8.0 and cap.device.type == "cpu"


# ---- adaptation extras ----------------------------------------------------------------------

def test_initial_extra_lives_on_the_states_device_and_step_size_is_reported():
    x = torch.empty(3, 2, device="meta", dtype=torch.float64)
    extra = _adapt.initial_extra(0.5, 0, 10, x)
    assert {k: (v.device.type, v.dtype) for k, v in extra.items()} == {
        "log_step_size": ("meta", torch.float64), "adapt_t": ("meta", torch.float64)}
    sampler = MALA(0.25, n_steps=3)
    sampler.run(Quad(), _x0().float(), 3, generator=torch.Generator().manual_seed(0))
    assert set(sampler.stats) >= {"step_size"}
    assert float(sampler.stats["step_size"]) == pytest.approx(sampler.step_size, rel=1e-6)


@pytest.mark.parametrize("cls", [MALA, HMC])
def test_mala_and_hmc_draw_once_per_step_in_the_states_dtype(cls):
    m = Quad()
    for dtype in (torch.float64, torch.float32):
        x = _x0().to(dtype)
        tape = rng.RecordingTape(torch.Generator().manual_seed(0))
        sampler = cls(0.3)
        sampler.transition(m, sampler.init_state(m, x), tape)
        assert [(d.kind, d.shape, d.dtype) for d in tape.spec] == [
            ("randn", (x.numel() + 2 * len(x),), dtype)]


def test_randn_and_log_uniform_splits_one_draw():
    """The first B n normals are the noise (shape and order of the draw), the last 2 B give
    log u = -(z1^2 + z2^2) / 2 per row; ``log u`` has the law of the log of a uniform."""
    z = torch.randn(3 * 4 + 2 * 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise, log_u = rng.randn_and_log_uniform((3, 2, 2), rng.NoiseTape([z]), torch.device("cpu"),
                                             torch.float64)
    assert noise.shape == (3, 2, 2) and torch.equal(noise.flatten(), z[:12])
    torch.testing.assert_close(log_u, -0.5 * (z[12:15] ** 2 + z[15:] ** 2), rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    _, log_u = rng.randn_and_log_uniform((20000, 1), g, torch.device("cpu"), torch.float64)
    u = log_u.exp().numpy()
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    # a seeded call equals one torch.randn of B (n + 2) numbers
    want = torch.randn(3 * 4 + 2 * 3, generator=torch.Generator().manual_seed(4))
    noise, _ = rng.randn_and_log_uniform((3, 4), torch.Generator().manual_seed(4),
                                         torch.device("cpu"))
    assert torch.equal(noise.flatten(), want[:12])


def test_lattice_helpers_build_on_the_couplings_device():
    t = torch.empty(3, 4, 4, device="meta")
    prods, scales = _lattice._suffix_products(t)
    assert all(p.device.type == "meta" for p in prods + scales)


def test_categorical_sample_boundaries_batch_axes_and_rounding():
    """u exactly on F_k picks the next value (#{F <= u}); batch axes before the last are
    kept; a cumulative sum that ends below u (rounding) still gives the last value."""
    cdf = torch.tensor([[0.25, 0.75, 1.0]], dtype=torch.float64)
    on_edge = torch.tensor([[0.25]], dtype=torch.float64)
    assert rng.categorical_sample(cdf=cdf, generator=rng.NoiseTape([on_edge])).tolist() == [1]
    short = torch.tensor([[0.5, 0.9]], dtype=torch.float64)
    high = torch.tensor([[0.95]], dtype=torch.float64)
    assert rng.categorical_sample(cdf=short, generator=rng.NoiseTape([high])).tolist() == [1]
    probs = torch.tensor([[[1.0, 1.0, 2.0], [4.0, 0.0, 0.0]],
                          [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]], dtype=torch.float64)
    u = torch.tensor([[[0.3], [0.5]], [[0.1], [0.9]]], dtype=torch.float64)
    out = rng.categorical_sample(probs=probs, generator=rng.NoiseTape([u]))
    assert out.tolist() == [[1, 0], [2, 2]]
    cdf3 = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
    assert rng.categorical_sample(cdf=cdf3, generator=rng.NoiseTape([u])).tolist() == [[1, 0],
                                                                                    [2, 2]]
    tape = rng.RecordingTape(torch.Generator().manual_seed(0))
    rng.categorical_sample(cdf=cdf3, generator=tape)
    assert [(tuple(d.shape), d.dtype) for d in tape.spec] == [((2, 2, 1), torch.float64)]


@pytest.mark.parametrize("space,x", [
    (Binary(3), torch.zeros(4, 5)),  # wrong width
    (Binary(3), torch.zeros(4, 3, 1)),  # an extra axis
    (Binary(3), torch.zeros(0, 3)),  # no chains
    (Categorical(3, 4), torch.zeros(0, 3, dtype=torch.long)),
    (Categorical(3, 4), torch.zeros(4, 5, dtype=torch.long)),
])
def test_discrete_state_checks_reject_wrong_shapes_of_valid_values(space, x):
    with pytest.raises(ValueError, match="x0"):
        _discrete.check_discrete_states("Gibbs", Flat(space), x)


def test_row_sums_of_integer_states_without_cache_live_on_the_states_device():
    x = torch.empty(3, 2, dtype=torch.long, device="meta")
    rows = chain._row_sums(ChainState(x))
    assert rows.shape == (3,) and rows.device.type == "meta"
    assert torch.equal(chain._row_sums(ChainState(torch.ones(3, 2, dtype=torch.long))),
                       torch.zeros(3))


# ---- the energy-and-gradient helper of the chains ---------------------------------------------

class _OwnEAG(Quad):
    calls = 0

    def energy_and_grad(self, x):
        type(self).calls += 1
        return _quad_eg(x, 1.0)


class _OwnForward(Quad):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


class _Column(Quad):
    """Returns E as a (B, 1) column: the checked path names the problem."""

    def energy(self, x):
        return super().energy(x)[:, None]


def test_fast_energy_and_grad_dispatch_and_errors():
    x = _x0().float()
    e, g = _fast.energy_and_grad(Quad(), x)
    re, rg = _quad_eg(x, 1.0)
    assert torch.allclose(e, re) and torch.allclose(g, rg) and not e.requires_grad
    _OwnEAG.calls = 0
    _fast.energy_and_grad(_OwnEAG(), x)
    assert _OwnEAG.calls == 1  # an override of energy_and_grad is used
    _OwnForward.calls = 0
    e2, g2 = _fast.energy_and_grad(_OwnForward(), x)
    assert _OwnForward.calls >= 1 and torch.allclose(g2, rg)  # forward overridden: the checked path
    with pytest.raises(ValueError, match=r"^_Column\.energy returned \(6, 1\) for a batch of 6 "
                       r"states; it must return shape \(B,\) = \(6,\)"):
        _fast.energy_and_grad(_Column(), x)


def test_discrete_dtype_errors_name_x0_and_the_fix():
    with pytest.raises(ValueError, match=r"^x0 has dtype torch\.int64 but Binary\(3\) expects "
                                         r"float states in \{0, 1\}; use x0\.float\(\)$"):
        _discrete.check_discrete_states("Gibbs", Flat(Binary(3)), torch.zeros(2, 3, dtype=torch.long),
                                        values=False)
    with pytest.raises(ValueError, match=r"^x0 "):
        _discrete.check_discrete_states("Gibbs", Flat(Binary(3)), torch.full((2, 3), 0.5))


def test_nonfinite_message_lists_eight_chains_without_an_ellipsis():
    first_bad = torch.full((10,), chain._NEVER, dtype=torch.long)
    first_bad[:8] = 3
    with pytest.raises(base.NonFiniteError, match=r"chains \[0, 1, 2, 3, 4, 5, 6, 7\]\)\. Lower"):
        chain._raise_if_bad(first_bad, "MALA")
    first_bad[8] = 3
    with pytest.raises(base.NonFiniteError, match=r"chains \[0, 1, 2, 3, 4, 5, 6, 7\]\.\.\.\)"):
        chain._raise_if_bad(first_bad, "MALA")


def test_run_eager_keeps_the_first_nonfinite_step_across_many_check_blocks():
    """A chain that turns NaN at step 0 and stays NaN for three check blocks: still step 0."""
    with pytest.raises(chain.NonFiniteError, match=r"first at step 0 \(chains \[1\]\)"):
        Counter(1).run(Quad(1), torch.zeros(3, 1), 70)


class _NaNAtOnes(EnergyModel):
    """Binary energy that is NaN at the all-ones state."""

    def __init__(self):
        super().__init__(Binary(3))

    def energy(self, x):
        e = x.sum(-1) * 0.5
        return torch.where(x.sum(-1) == 3, torch.full_like(e, math.nan), e)


def test_a_sampler_that_keeps_chains_finite_names_a_nonfinite_start_as_step_zero():
    x0 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(chain.NonFiniteError, match=r"first at step 0 \(chains \[1\]\)"):
        GibbsWithGradients().run(_NaNAtOnes(), x0, 3)


@pytest.mark.parametrize("space,x,ok", [
    (Categorical(3, 4), torch.zeros(2, 3, 4), True),  # one-hot states
    (Categorical(3, 4), torch.zeros(1, 3, 4), True),
    (Categorical(3, 4), torch.zeros(0, 3, 4), False),
    (Categorical(3, 4), torch.zeros(2, 5, dtype=torch.long), False),
    (Categorical(3, 4), torch.zeros(2, 3, dtype=torch.long), True),
])
def test_check_shape_of_categorical_and_one_hot_states(space, x, ok):
    if ok:
        base._check_shape(Flat(space), x, "Gibbs")
    else:
        with pytest.raises(ValueError, match=r"^Gibbs: x0 has shape "):
            base._check_shape(Flat(space), x, "Gibbs")


def test_check_shape_message_lists_every_event_axis():
    with pytest.raises(ValueError, match=r"^Langevin: x0 has shape \(4, 5\) but the energy's space "
                       r"Continuous\(\(2, 3\)\) expects \(B, 2, 3\) with B >= 1; batch dimension "
                       r"first$"):
        base._check_shape(Quad((2, 3)), torch.zeros(4, 5), "Langevin")


def test_mcmc_sampler_defaults_before_any_run():
    s = MALA(0.1, n_steps=0)
    assert s.n_steps == 0 and s.last_state is None and s._auto_steps == 0
    x = _x0().float()
    assert torch.equal(s.run(Quad(), x, 0), x)


def test_discrete_checks_name_a_non_energy_and_float_categorical_states():
    with pytest.raises(ValueError, match=r"^energy must be an ebmflow EnergyModel, got str; subclass "
                       r"ebmflow\.energy\.EnergyModel and implement energy\(\)$"):
        _discrete.check_discrete_states("Gibbs", "energy", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^x0 has dtype torch\.float32"):
        _discrete.check_discrete_states("Gibbs", Flat(Categorical(3, 4)), torch.zeros(2, 3),
                                        values=False)


def test_transition_without_cache_names_the_sampler_for_a_gradient_free_energy():
    m = Rounded(Binary(3))
    with pytest.raises(ValueError, match=r"^GibbsWithGradients needs the gradient"):
        GibbsWithGradients().transition(m, ChainState(torch.zeros(2, 3)), None)


class _Linear2(EnergyModel):
    def __init__(self):
        super().__init__(Continuous(2))
        self.lin = torch.nn.Linear(2, 1)

    def energy(self, x):
        return self.lin(x).squeeze(-1)


def test_fast_energy_and_grad_sends_a_failing_energy_to_the_checked_path():
    with pytest.raises(ValueError, match=r"^x has dtype torch\.float64"):
        _fast.energy_and_grad(_Linear2(), torch.zeros(3, 2, dtype=torch.float64))


def test_randint_draws_keep_their_low_bound_and_categorical_draw_shape_with_batch_axes():
    v = rng.randint(5, 7, (4000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(v.unique().tolist()) == {5, 6}
    tape = rng.RecordingTape(torch.Generator().manual_seed(0))
    rng.categorical_sample(probs=torch.ones(2, 2, 3), generator=tape)
    assert [tuple(d.shape) for d in tape.spec] == [(2, 2, 1)]


class _NaNFar(EnergyModel):
    """0.5 |x|^2, NaN where x_0 > 5."""

    def __init__(self):
        super().__init__(Continuous(2))

    def energy(self, x):
        e = 0.5 * x.square().sum(-1)
        return torch.where(x[:, 0] > 5, torch.full_like(e, math.nan), e)


@pytest.mark.parametrize("make", [lambda: MALA(0.1), lambda: HMC(0.1, n_leapfrog=2)])
def test_mala_and_hmc_name_a_start_with_a_nan_energy_as_step_zero(make):
    """MALA and HMC keep finite chains finite, so only the start is checked: step 0."""
    x0 = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    with pytest.raises(chain.NonFiniteError, match=r"first at step 0 \(chains \[1\]\)"):
        make().run(_NaNFar(), x0, 3)


@pytest.mark.parametrize("space,x", [
    (Binary(3), torch.zeros(2, 3, dtype=torch.long)),  # bits as integers
    (Categorical(3, 4), torch.zeros(2, 3)),  # categories as floats
])
def test_value_checks_reject_valid_values_of_the_wrong_dtype(space, x):
    with pytest.raises(ValueError, match=r"^x0 has dtype"):
        _discrete.check_discrete_states("Gibbs", Flat(space), x)


def test_generator_state_round_trips_for_a_given_and_the_default_generator():
    """``rng.generator_state`` / ``restore_generator_state``: a given generator's state, or
    the CPU default generator's for CPU states; drawing in between is undone."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    state = rng.generator_state(gen, cpu)
    a = torch.rand(3, generator=gen)
    rng.restore_generator_state(gen, cpu, state)
    assert torch.equal(torch.rand(3, generator=gen), a)
    torch.manual_seed(2)
    state = rng.generator_state(None, cpu)
    assert torch.equal(state, torch.get_rng_state())
    b = torch.rand(3)
    rng.restore_generator_state(None, cpu, state)
    assert torch.equal(torch.rand(3), b)
