"""Every loss checks its ``data`` argument: a ValueError naming ``data``, what was expected and
the fix, instead of a NaN loss, a silently wrong loss or a raw torch error."""

from __future__ import annotations

import pytest
import torch

from ebmflow.energy import EnergyModel, MLPEnergy
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EBMLoss,
    EnergyDiscrepancy,
    GaussianPerturbation,
    GridPerturbation,
    LossOutput,
)
from ebmflow.samplers import Gibbs, Langevin
from ebmflow.spaces import Binary, Categorical, Continuous

NAN = float("nan")


class Mean(EBMLoss):
    """A user's loss written against the base class: mean data energy."""

    def forward(self, energy, data, sampler=None):
        self.check_data(energy, data)
        return LossOutput(energy(data).mean())


def _cont():
    torch.manual_seed(0)
    return MLPEnergy(Continuous(2), hidden=(8,))


def _bin():
    torch.manual_seed(0)
    return MLPEnergy(Binary(4), hidden=(8,))


def _cat():
    torch.manual_seed(0)
    return MLPEnergy(Categorical(3, num_classes=4), hidden=(8,))


def _losses(kind: str):
    """(name, loss, energy factory, sampler) for every loss that accepts this space."""
    if kind == "continuous":
        return [
            ("ed", EnergyDiscrepancy(GaussianPerturbation(t=0.5)), _cont, None),
            ("cd", ContrastiveDivergence(n_steps=2), _cont, Langevin(step_size=0.01)),
            ("dsm", DenoisingScoreMatching(), _cont, None),
            ("base", Mean(), _cont, None),
        ]
    if kind == "binary":
        return [
            ("ed-bernoulli", EnergyDiscrepancy(BernoulliPerturbation()), _bin, None),
            ("ed-grid", EnergyDiscrepancy(GridPerturbation()), _bin, None),
            ("cd", ContrastiveDivergence(n_steps=1), _bin, Gibbs()),
            ("base", Mean(), _bin, None),
        ]
    return [
        ("ed-heat", EnergyDiscrepancy(CategoricalPerturbation(4)), _cat, None),
        ("ed-grid", EnergyDiscrepancy(GridPerturbation(num_classes=4)), _cat, None),
        ("cd", ContrastiveDivergence(n_steps=1), _cat, Gibbs()),
        ("base", Mean(), _cat, None),
    ]


BAD = {
    "continuous": [
        ("nan", torch.tensor([[0.0, NAN], [1.0, 2.0]]), r"data contains NaN or inf.*clean"),
        ("inf", torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]), r"data contains NaN or inf"),
        ("long", torch.ones(3, 2, dtype=torch.long), r"data has dtype torch.int64.*data\.float\(\)"),
        ("bool", torch.ones(3, 2, dtype=torch.bool), r"data has dtype torch.bool.*data\.float\(\)"),
        ("shape", torch.zeros(3, 5), r"data has shape \(3, 5\).*\(B, 2\)"),
        ("empty", torch.zeros(0, 2), r"data is an empty batch"),
        ("list", [[0.0, 1.0]], r"data must be a torch.Tensor.*torch.as_tensor"),
    ],
    "binary": [
        ("half", torch.full((3, 4), 0.5), r"data has a value 0.5 outside \{0, 1\}.*binarise"),
        ("two", torch.tensor([[0.0, 1.0, 2.0, 0.0]]), r"data has a value 2.0 outside"),
        ("nan", torch.tensor([[0.0, 1.0, NAN, 0.0]]), r"data has a value nan outside"),
        ("long", torch.ones(3, 4, dtype=torch.long), r"data has dtype torch.int64.*data\.float\(\)"),
        ("bool", torch.ones(3, 4, dtype=torch.bool), r"data has dtype torch.bool.*data\.float\(\)"),
    ],
    "categorical": [
        ("too-big", torch.tensor([[0, 4, 1]]), r"data has a value 4 outside \[0, 4\)"),
        ("negative", torch.tensor([[0, -1, 1]]), r"data has a value -1 outside"),
        ("float", torch.zeros(2, 3), r"data has dtype torch.float32.*data\.long\(\)"),
        ("bool", torch.zeros(2, 3, dtype=torch.bool), r"data has dtype torch.bool.*data\.long\(\)"),
    ],
}

CASES = [
    pytest.param(kind, i, bad, pattern, id=f"{kind}-{name}-{bad_name}")
    for kind in BAD
    for i, (name, *_rest) in enumerate(_losses(kind))
    for bad_name, bad, pattern in BAD[kind]
]


@pytest.mark.parametrize(("kind", "index", "bad", "pattern"), CASES)
def test_bad_data_is_a_value_error_naming_data_and_the_fix(kind, index, bad, pattern):
    _name, loss, make_energy, sampler = _losses(kind)[index]
    with pytest.raises(ValueError, match=pattern):
        loss(make_energy(), bad, sampler)


@pytest.mark.parametrize("kind", list(BAD))
def test_good_data_passes_every_loss(kind, gen):
    good = {
        "continuous": torch.randn(6, 2, generator=gen),
        "binary": (torch.rand(6, 4, generator=gen) < 0.5).float(),
        "categorical": torch.randint(0, 4, (6, 3), generator=gen),
    }[kind]
    for _name, loss, make_energy, sampler in _losses(kind):
        out = loss(make_energy(), good, sampler)
        assert torch.isfinite(out.loss)


def test_dsm_on_a_discrete_space_names_the_space():
    with pytest.raises(ValueError, match="Continuous space.*EnergyDiscrepancy"):
        DenoisingScoreMatching()(_bin(), torch.zeros(2, 4))


def test_energy_must_be_an_energy_model():
    with pytest.raises(ValueError, match="energy must be an ebmflow EnergyModel"):
        EnergyDiscrepancy(GaussianPerturbation())(torch.nn.Linear(2, 1), torch.zeros(2, 2))


def test_check_data_mode_is_validated():
    with pytest.raises(ValueError, match="check_data must be one of.*'auto'"):
        EnergyDiscrepancy(GaussianPerturbation(), check_data="sometimes")
    with pytest.raises(ValueError, match="check_data"):
        ContrastiveDivergence(check_data=True)  # type: ignore[arg-type]


def test_never_skips_the_value_check_but_not_the_dtype_check():
    loss = EnergyDiscrepancy(GaussianPerturbation(), check_data="never")
    out = loss(_cont(), torch.tensor([[0.0, NAN]]))
    assert torch.isnan(out.loss)  # the user asked for no value check
    with pytest.raises(ValueError, match="data has dtype torch.int64"):
        loss(_cont(), torch.ones(2, 2, dtype=torch.long))


class CountingSpace(Continuous):
    """Continuous space that counts how often values are read."""

    reads = 0

    def _check_values(self, x, name):
        type(self).reads += 1
        super()._check_values(x, name)


class Plain(EnergyModel):
    def __init__(self):
        super().__init__(CountingSpace(2))
        self.w = torch.nn.Parameter(torch.ones(()))

    def energy(self, x):
        return self.w * x.pow(2).sum(-1)


def test_auto_reads_values_every_call_on_cpu():
    CountingSpace.reads = 0
    energy, loss = Plain(), EnergyDiscrepancy(GaussianPerturbation())
    for _ in range(3):
        loss(energy, torch.zeros(4, 2))
    assert CountingSpace.reads == 3


@pytest.mark.cuda
@pytest.mark.parametrize("mode, reads", [("auto", 1), ("always", 3), ("never", 0)])
def test_on_cuda_auto_reads_values_once(mode, reads):
    """No host synchronisation per step on an accelerator: values are read on the first call
    only (``"auto"``), every call (``"always"``) or never."""
    CountingSpace.reads = 0
    energy = Plain().cuda()
    loss = EnergyDiscrepancy(GaussianPerturbation(), check_data=mode)
    for _ in range(3):
        loss(energy, torch.zeros(4, 2, device="cuda"))
    assert CountingSpace.reads == reads
    if mode == "auto":  # the first call still catches bad data
        fresh = EnergyDiscrepancy(GaussianPerturbation())
        with pytest.raises(ValueError, match="data contains NaN"):
            fresh(energy, torch.full((4, 2), NAN, device="cuda"))


@pytest.mark.cuda
def test_on_cuda_a_step_has_no_host_sync_after_the_first():
    energy = Plain().cuda()
    loss = EnergyDiscrepancy(GaussianPerturbation())
    data = torch.zeros(4, 2, device="cuda")
    loss(energy, data)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(energy, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
