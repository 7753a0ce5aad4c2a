"""Property-based tests (hypothesis): generated shapes and values for spaces, perturbations,
probability paths, metrics and encoders. Each property is an exact statement (no tolerance
beyond float rounding); derandomised, so the examples are the same on every run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebmflow.data import gray_decode, gray_encode
from ebmflow.discrete_flows import MixturePath, PolynomialSchedule
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    GaussianPerturbation,
    GridPerturbation,
)
from ebmflow.metrics import effective_sample_size, mmd, total_variation
from ebmflow.spaces import Binary, Categorical, Continuous

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
dims = st.integers(1, 6)
classes = st.integers(2, 5)
batch = st.integers(1, 16)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- spaces ------------------------------------------------------------------------------------
@SETTINGS
@given(d=dims, k=classes, n=batch, seed=seeds)
def test_space_noise_is_valid_and_one_hot_round_trips(d, k, n, seed):
    for space in (Continuous(d), Binary(d), Categorical(d, k)):
        x = space.noise(n, generator=_gen(seed))
        assert x.shape == (n, *space.shape)
        assert space.validate(x, "x") is not None
        assert torch.equal(x, space.noise(n, generator=_gen(seed)))  # deterministic
    cat = Categorical(d, k)
    x = cat.noise(n, generator=_gen(seed))
    oh = cat.one_hot(x)
    assert oh.shape == (n, d, k) and cat.is_one_hot(oh)
    assert torch.equal(cat.from_one_hot(oh), x)


@SETTINGS
@given(d=dims, k=classes, n=batch, seed=seeds, data=st.data())
def test_validate_rejects_any_single_corrupted_entry(d, k, n, seed, data):
    """One bad value anywhere (NaN/inf for continuous, outside the alphabet for discrete) is
    found and the message names the argument."""
    row = data.draw(st.integers(0, n - 1))
    col = data.draw(st.integers(0, d - 1))
    cont = Continuous(d).noise(n, generator=_gen(seed))
    cont[row, col] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    with pytest.raises(ValueError, match=r"^xs contains NaN or inf"):
        Continuous(d).validate(cont, "xs")
    binary = Binary(d).noise(n, generator=_gen(seed))
    binary[row, col] = data.draw(st.sampled_from([0.5, -1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^xs has a value .* outside \{0, 1\}"):
        Binary(d).validate(binary, "xs")
    cat = Categorical(d, k).noise(n, generator=_gen(seed))
    cat[row, col] = data.draw(st.sampled_from([-1, k, k + 3]))
    with pytest.raises(ValueError, match=rf"^xs has a value -?\d+ outside \[0, {k}\)"):
        Categorical(d, k).validate(cat, "xs")


# -- perturbations -----------------------------------------------------------------------------
@SETTINGS
@given(d=dims, k=classes, n=batch, seed=seeds, t=st.floats(0.01, 10.0), eps=st.floats(0.01, 0.99))
def test_perturbations_stay_in_the_space_and_are_deterministic(d, k, n, seed, t, eps):
    cont = Continuous(d).noise(n, generator=_gen(seed))
    y = GaussianPerturbation(t).perturb(cont, generator=_gen(seed))
    assert y.shape == cont.shape and y.dtype == cont.dtype and torch.isfinite(y).all()
    assert torch.equal(y, GaussianPerturbation(t).perturb(cont, generator=_gen(seed)))

    bits = Binary(d).noise(n, generator=_gen(seed))
    for pert in (BernoulliPerturbation(eps), GridPerturbation()):
        y = pert.perturb(bits, generator=_gen(seed + 1))
        assert y.dtype == bits.dtype and Binary(d).validate(y, "y") is not None
    grid = GridPerturbation().perturb(bits, generator=_gen(seed))
    assert torch.equal((grid != bits).sum(1), torch.ones(n, dtype=torch.long))  # one flip

    cats = Categorical(d, k).noise(n, generator=_gen(seed))
    for pert in (GridPerturbation(num_classes=k), CategoricalPerturbation(k, "cyclic", t)):
        y = pert.perturb(cats, generator=_gen(seed + 2))
        assert y.dtype == torch.long and Categorical(d, k).validate(y, "y") is not None
    grid = GridPerturbation(num_classes=k).perturb(cats, generator=_gen(seed))
    assert bool(((grid != cats).sum(1) <= 1).all())  # at most one coordinate resampled


# -- paths -------------------------------------------------------------------------------------
@SETTINGS
@given(d=dims, k=classes, n=batch, seed=seeds, t=st.floats(0.0, 0.999),
       source=st.sampled_from(["mask", "uniform"]), power=st.floats(1.0, 4.0))
def test_mixture_path_samples_and_velocities(d, k, n, seed, t, source, power):
    path = MixturePath(k, source=source, schedule=PolynomialSchedule(power))
    x1 = Categorical(d, k).noise(n, generator=_gen(seed))
    xt = path.sample(x1, t, generator=_gen(seed))
    assert xt.shape == x1.shape and xt.dtype == torch.long
    top = k if source == "mask" else k - 1  # MASK is the extra token k
    assert int(xt.min()) >= 0 and int(xt.max()) <= top
    if source == "mask":  # x_t is x1 or MASK coordinate-wise
        assert bool(((xt == x1) | (xt == k)).all())
    assert torch.equal(path.sample(x1, 1.0, generator=_gen(seed)), x1)  # kappa(1) = 1
    u = path.conditional_velocity(xt, x1, t)
    assert u.shape == (n, d, k) and torch.isfinite(u).all()
    off = path.off_diagonal(xt)
    assert bool((u[off] >= -1e-6).all()), "off-diagonal rates must be non-negative"
    if source == "uniform":  # rows of a rate matrix sum to 0
        torch.testing.assert_close(u.sum(-1), torch.zeros(n, d), atol=1e-5, rtol=0)


# -- metrics -----------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(2, 40), d=dims, seed=seeds, shift=st.floats(-5, 5))
def test_mmd_is_symmetric_and_translation_invariant(n, d, seed, shift):
    g = _gen(seed)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n + 1, d, generator=g, dtype=torch.float64)
    a, b = mmd(x, y, bandwidth=1.0), mmd(y, x, bandwidth=1.0)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(mmd(x + shift, y + shift, bandwidth=1.0), a, atol=1e-9, rtol=1e-6)


@SETTINGS
@given(n=st.integers(1, 50), shift=st.floats(-1e4, 1e4), seed=seeds,
       n_zero=st.integers(0, 10))
def test_ess_bounds_and_shift_invariance(n, shift, seed, n_zero):
    lw = torch.randn(n, generator=_gen(seed), dtype=torch.float64) * 3
    lw = torch.cat([lw, torch.full((n_zero,), -math.inf, dtype=torch.float64)])
    ess = float(effective_sample_size(lw))
    assert 1.0 - 1e-9 <= ess <= n + 1e-9  # zero weights do not count
    assert float(effective_sample_size(lw + shift)) == pytest.approx(ess, rel=1e-9)


@SETTINGS
@given(d=st.integers(1, 4), n=st.integers(1, 64), seed=seeds)
def test_total_variation_of_samples_is_in_unit_interval_and_exact_on_point_masses(d, n, seed):
    s = 2**d
    probs = torch.softmax(torch.randn(s, generator=_gen(seed), dtype=torch.float64), 0)
    x = Binary(d).noise(n, generator=_gen(seed))
    tv = float(total_variation(x, probs))
    assert 0.0 <= tv <= 1.0
    # all samples equal to state 0 (all zeros): TV = 1 - p_0 exactly
    assert float(total_variation(torch.zeros(n, d), probs)) == pytest.approx(
        1.0 - float(probs[0]), abs=1e-9)


# -- encoders ----------------------------------------------------------------------------------
@SETTINGS
@given(n=batch, d=st.integers(1, 3), bits=st.integers(2, 20), seed=seeds,
       bound=st.floats(0.5, 20.0))
def test_gray_code_round_trip_within_half_a_cell(n, d, bits, seed, bound):
    x = (torch.rand(n, d, generator=_gen(seed), dtype=torch.float64) * 2 - 1) * bound * 0.999
    code = gray_encode(x, bits=bits, bound=bound)
    assert code.shape == (n, d * bits) and Binary(d * bits).validate(code, "code") is not None
    back = gray_decode(code, bits=bits, bound=bound).double()
    cell = bound / 2 ** (bits - 1)
    assert float((back - x).abs().max()) <= cell / 2 + 1e-5 * bound
    assert torch.equal(gray_encode(back, bits=bits, bound=bound), code)  # centres re-encode
