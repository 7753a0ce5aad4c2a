"""Tests that kill mutants of ebmflow.samplers which the other sampler tests let survive.

Each test checks exact answers: one transition of MALA / HMC / ULA against a reference
written out from the formulas with the same random draws, the Robbins-Monro step of the
warm-up adaptation, the argument checks with their exact messages, and the documented
defaults. Found with ``python tools/mutation.py --package samplers`` (docs/reliability.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from ebmflow.energy import EnergyModel
from ebmflow.samplers import HMC, MALA, Langevin, _adapt
from ebmflow.samplers.adaptive import chain_mask, event_sum
from ebmflow.spaces import Continuous


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
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    u = torch.rand(x.shape[:1], generator=g, dtype=x.dtype)
    e, gr = _quad_eg(x, a)
    prop = x - eta * gr + math.sqrt(2 * eta) * noise
    ep, gp = _quad_eg(prop, a)
    log_q_fwd = -(noise.square()).sum(1) / 2
    log_q_back = -((x - prop + eta * gp).square()).sum(1) / (4 * eta)
    la = e - ep + log_q_back - log_q_fwd
    acc = u.log() < la
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
    p = torch.randn(x.shape, generator=g, dtype=x.dtype)
    u = torch.rand(x.shape[:1], generator=g, dtype=x.dtype)
    e, gr = _quad_eg(x, a)
    h0 = e + 0.5 * p.square().sum(1)
    xn, pn = x.clone(), p - 0.5 * eps * gr
    for i in range(L):
        xn = xn + eps * pn
        en, gn = _quad_eg(xn, a)
        pn = pn - (0.5 if i == L - 1 else 1.0) * eps * gn
    la = h0 - (en + 0.5 * pn.square().sum(1))
    acc = u.log() < la
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
