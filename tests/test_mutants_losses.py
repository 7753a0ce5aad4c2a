"""Tests that kill mutants of ebmflow.losses which the other loss tests let survive.

Each test names the behaviour it pins down (documented defaults, error messages, the
value-check policy, generator and dtype plumbing, the custom ``negatives`` path of energy
discrepancy). Found with ``python tools/mutation.py --package losses`` (docs/reliability.md).
"""

from __future__ import annotations

import functools
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ebmflow.energy import EnergyModel
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
    Perturbation,
)
from ebmflow.losses import base as loss_base
from ebmflow.losses.perturbations import graph_laplacian
from ebmflow.samplers.base import Sampler
from ebmflow.spaces import Binary, Categorical, Continuous


class Quad(EnergyModel):
    """0.5 |x|^2 in the input's dtype; +inf beyond |x| > 10 (for the alpha=0 test)."""

    def __init__(self, shape=2):
        super().__init__(Continuous(shape))
        self.calls = 0

    def energy(self, x):
        self.calls += 1
        e = 0.5 * x.flatten(1).pow(2).sum(-1)
        return torch.where(x.flatten(1).abs().amax(-1) > 10, torch.full_like(e, math.inf), e)


class Cat(EnergyModel):
    def __init__(self):
        super().__init__(Categorical(3, 4))

    def energy(self, x):
        return self.space.one_hot(x).flatten(1).sum(-1)


class Recorder(Sampler):
    """Returns x0 (or ``value``) unchanged, cast to ``dtype``; records its arguments."""

    def __init__(self, value=None, dtype=None):
        super().__init__()
        self.value, self.dtype, self.seen = value, dtype, {}

    def sample(self, energy, n=None, *, x0=None, generator=None):
        self.seen = {"n": n, "x0": x0, "generator": generator}
        out = self.value if self.value is not None else x0
        if out is None:
            out = energy.space.noise(n)
        return out if self.dtype is None else out.to(self.dtype)


class NoSteps(Sampler):
    def sample(self, energy, n=None, *, x0=None, generator=None):
        return energy.space.noise(n)


# ---- documented defaults -------------------------------------------------------------

def test_documented_defaults():
    assert GaussianPerturbation().t == 1.0
    assert CategoricalPerturbation(4).t == 1.0
    assert EnergyDiscrepancy(GaussianPerturbation()).m == 4
    assert DenoisingScoreMatching().sigma == 0.1
    assert "kind='cyclic'" in repr(CategoricalPerturbation(4, "cyclic"))
    assert GridPerturbation(num_classes=2).num_classes == 2  # K = 2 is allowed


def test_categorical_cdf_ends_at_one():
    assert torch.equal(CategoricalPerturbation(5, "ordinal", 0.3).cdf[:, -1], torch.ones(5))


# ---- error messages (they name the argument and the fix) -------------------------------

@pytest.mark.parametrize("make, pattern", [
    (lambda: DenoisingScoreMatching(check_data="sometimes"),
     "; 'auto' checks values on CPU every call and on an accelerator once$"),
    (lambda: ContrastiveDivergence(n_steps=-1), "n_steps must be a non-negative int or None"),
    (lambda: ContrastiveDivergence(n_steps=2.5), "n_steps must be a non-negative int or None"),
    (lambda: EnergyDiscrepancy(3), "got int"),
    (lambda: EnergyDiscrepancy(GaussianPerturbation(), w=True), "w \\(stabiliser\\)"),
    (lambda: BernoulliPerturbation("0.5"), "eps"),
    (lambda: CategoricalPerturbation("3"), "num_classes must be an int >= 2"),
    (lambda: GridPerturbation(num_classes="3"), "num_classes must be None"),
    (lambda: GaussianPerturbation(-1.0),
     "t must be a positive finite float, got -1.0; t is the noise variance, e.g. t=1.0"),
    (lambda: CategoricalPerturbation(3, t=-1.0),
     "t must be a positive finite float, got -1.0; t is the diffusion time of the heat "
     "kernel, e.g. t=1.0"),
    (lambda: graph_laplacian(3, "star"), "kind must be 'uniform', 'cyclic' or 'ordinal'"),
])
def test_constructor_errors_name_the_argument(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_sampler_errors_name_the_loss_and_the_fix():
    cd = ContrastiveDivergence()
    with pytest.raises(ValueError, match=re.escape(
            "ContrastiveDivergence needs a sampler for its negative samples; pass "
            "sampler=... (e.g. Langevin() or PersistentSampler(...))")):
        cd(Quad(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="sampler must be an ebmflow Sampler, got int"):
        cd(Quad(), torch.zeros(2, 2), 3)


def test_n_steps_error_names_the_sampler_and_the_fix():
    with pytest.raises(ValueError, match=re.escape(
            "NoSteps.sample does not accept n_steps (")) as info:
        ContrastiveDivergence(n_steps=3)(Quad(), torch.zeros(2, 2), NoSteps())
    assert "pass n_steps=None to ContrastiveDivergence and set the steps on the sampler" in str(
        info.value)


def test_check_data_messages():
    loss = DenoisingScoreMatching()
    with pytest.raises(ValueError, match=re.escape(
            "energy must be an ebmflow EnergyModel, got int; subclass "
            "ebmflow.energy.EnergyModel and implement energy()")):
        loss.check_data(3, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="got list; convert it first"):
        loss.check_data(Quad(), [[0.0, 0.0]])
    with pytest.raises(ValueError, match=re.escape("expects (B, 2, 3); batch dimension first")):
        loss.check_data(Quad((2, 3)), torch.zeros(4, 3, 2))
    # checked before (and without) the space's value check
    never = DenoisingScoreMatching(check_data="never")
    # right number of dimensions, wrong event shape
    with pytest.raises(ValueError, match="data has shape"):
        never.check_data(Quad(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="empty batch"):
        never.check_data(Quad(2), torch.zeros(0, 2))


def test_dtype_is_checked_even_when_values_are_not():
    never = EnergyDiscrepancy(GridPerturbation(num_classes=4), check_data="never")
    with pytest.raises(ValueError):
        never.check_data(Cat(), torch.zeros(2, 3))  # float data, categorical space
    with pytest.raises(ValueError):
        DenoisingScoreMatching(check_data="never").check_data(
            Quad(), torch.zeros(2, 2, dtype=torch.int32))


def test_check_space_message_names_the_kinds():
    with pytest.raises(ValueError, match="GaussianPerturbation acts on Continuous states"):
        GaussianPerturbation().check_space(Binary(3))
    with pytest.raises(ValueError, match="GridPerturbation acts on Binary or Categorical states"):
        GridPerturbation().check_space(Continuous(3))


# ---- when values are read ---------------------------------------------------------------

def test_value_check_policy():
    off_cpu = SimpleNamespace(is_cpu=False, is_cuda=False)
    on_cpu = SimpleNamespace(is_cpu=True, is_cuda=False)
    auto = DenoisingScoreMatching()
    assert auto._wants_value_check(off_cpu)  # first accelerator call is checked
    auto._values_checked_on_device = True
    assert not auto._wants_value_check(off_cpu)  # later ones are not
    assert auto._wants_value_check(on_cpu)  # CPU: every call
    always = DenoisingScoreMatching(check_data="always")
    always._values_checked_on_device = True
    assert always._wants_value_check(off_cpu)
    assert not DenoisingScoreMatching(check_data="never")._wants_value_check(on_cpu)


def test_accelerator_data_is_value_checked_once(monkeypatch):
    calls = []
    monkeypatch.setattr(Continuous, "validate", lambda self, x, name: calls.append(name))
    loss = DenoisingScoreMatching()
    loss.check_data(Quad(), torch.zeros(2, 2))
    assert loss._values_checked_on_device is False  # CPU calls do not set it
    meta = torch.zeros(2, 2, device="meta")
    loss.check_data(Quad(), meta)
    loss.check_data(Quad(), meta)
    assert loss._values_checked_on_device is True
    assert calls == ["data", "data"]  # the CPU call and the first device call


def test_values_are_not_read_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bad = torch.tensor([[math.nan, 0.0]])
    DenoisingScoreMatching(check_data="always").check_data(Quad(), bad)  # no error


def test_values_are_not_read_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert loss_base._capturing_or_compiling(SimpleNamespace(is_cuda=True))


# ---- contrastive divergence --------------------------------------------------------------

def test_cd_passes_the_generator_to_init_and_sampler():
    seen = []
    gen = torch.Generator().manual_seed(0)

    def init(data, generator):
        seen.append(generator)
        return data.clone()

    sampler = Recorder()
    ContrastiveDivergence(init=init)(Quad(), torch.zeros(3, 2), sampler, generator=gen)
    assert seen == [gen] and sampler.seen["generator"] is gen


def test_cd_noise_start_uses_the_generator():
    out = ContrastiveDivergence(init="noise")(
        Quad(), torch.zeros(5, 2), Recorder(), generator=torch.Generator().manual_seed(3))
    want = Continuous(2).noise(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.x_neg, want)


def test_cd_energy_calls_and_stats():
    energy = Quad()
    data = torch.ones(4, 2)
    x_neg = torch.full((4, 2), 2.0)
    out = ContrastiveDivergence()(energy, data, Recorder(value=x_neg))
    assert energy.calls == 1  # one pass over data and negatives
    assert out.stats["energy_gap"].item() == pytest.approx(1.0 - 4.0)


def test_cd_with_negatives_of_another_dtype():
    energy = Quad()
    data = torch.ones(4, 2, dtype=torch.float64)
    out = ContrastiveDivergence()(energy, data, Recorder(value=torch.full((4, 2), 2.0),
                                                         dtype=torch.float32))
    assert energy.calls == 2
    assert out.loss.item() == pytest.approx(1.0 - 4.0)


def test_cd_alpha_zero_adds_nothing_even_for_infinite_energies():
    out = ContrastiveDivergence(alpha=0.0)(Quad(), torch.zeros(2, 2),
                                           Recorder(value=torch.full((2, 2), 100.0)))
    assert out.loss.item() == -math.inf


# ---- energy discrepancy --------------------------------------------------------------------

class Shift(Perturbation):
    """Deterministic kernel with its own negatives(): row j of y_i is y_i + j + 1."""

    space_kind = Continuous

    def perturb(self, x, generator=None):
        return x + 0.5

    def negatives(self, y, m, generator=None):
        self.generator = generator
        steps = torch.arange(1, m + 1, dtype=y.dtype).view(1, m, 1)
        return y.unsqueeze(1) + steps


def test_ed_uses_an_overridden_negatives():
    data = torch.zeros(2, 2)
    pert, gen = Shift(), torch.Generator()
    out = EnergyDiscrepancy(pert, m=3)(Quad(), data, generator=gen)
    assert pert.generator is gen
    rows = torch.tensor([1.5, 2.5, 3.5]).repeat(2)
    assert torch.equal(out.x_neg, rows[:, None].expand(6, 2))


def test_ed_stabiliser_in_float64():
    data = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    out = EnergyDiscrepancy(Shift(), m=2, w=3.0)(Quad(), data)
    e = lambda x: 0.5 * (x**2).sum(-1)  # noqa: E731
    diff = torch.stack([e(data) - e(data + 0.5 + j) for j in (1, 2)], 1)
    diff = torch.cat([torch.full((2, 1), math.log(3.0), dtype=torch.float64), diff], 1)
    want = torch.logsumexp(diff, 1).mean() - math.log(2)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - want.item()) < 1e-14


# ---- denoising score matching ----------------------------------------------------------------

def test_dsm_noise_is_drawn_in_the_data_dtype():
    data = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    out = DenoisingScoreMatching(sigma=0.5)(Quad(), data,
                                            generator=torch.Generator().manual_seed(1))
    xi = torch.randn(data.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = data + 0.5 * xi  # grad of 0.5 |x|^2 at the noisy point
    want = 0.5 * (grad - xi / 0.5).pow(2).sum(-1).mean()
    assert abs(out.loss.item() - want.item()) < 1e-14
    assert np.isfinite(out.loss.item())


# ---- device plumbing, checked on the meta device (no accelerator needed) ----------------------

def test_losses_keep_their_tensors_on_the_data_device():
    data = torch.zeros(3, 2, device="meta")
    cd = ContrastiveDivergence(init="noise", check_data="never")(Quad(), data, Recorder())
    assert cd.x_neg.device.type == "meta" and cd.loss.device.type == "meta"
    ed = EnergyDiscrepancy(GaussianPerturbation(), m=2, check_data="never")(Quad(), data)
    assert ed.loss.device.type == "meta"
    dsm = DenoisingScoreMatching(check_data="never")(Quad(), data)
    assert dsm.loss.device.type == "meta"


# ---- reprs and the abstract methods -----------------------------------------------------------

def test_reprs():
    def start(data, generator):
        return data

    assert repr(ContrastiveDivergence(alpha=0.5, init="data", n_steps=3)) == (
        "ContrastiveDivergence(alpha=0.5, init='data', n_steps=3)")
    assert repr(ContrastiveDivergence(init=start)) == (
        "ContrastiveDivergence(alpha=0.0, init='start', n_steps=None)")
    assert "init='fn'" in repr(ContrastiveDivergence(init=functools.partial(start)))
    assert repr(GridPerturbation()) == "GridPerturbation()"
    assert repr(GridPerturbation(num_classes=3)) == "GridPerturbation(num_classes=3)"


def test_abstract_methods_name_the_class():
    with pytest.raises(NotImplementedError, match=r"^Perturbation must implement perturb\(x, generator\)$"):
        Perturbation().perturb(torch.zeros(1, 2))
    with pytest.raises(NotImplementedError, match=r"^EBMLoss must implement forward\(\)$"):
        loss_base.EBMLoss().forward(Quad(), torch.zeros(1, 2))
