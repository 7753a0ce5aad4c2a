"""The Trainer's fast mode (the whole step captured as one CUDA graph), run on CPU through the
stand-in of graph capture in ``tests/_cpu_cuda_graph.py``.

A step can be captured only if nothing in it reads a tensor value on the host (``.item()``,
``bool(t)``, a NaN check): the stand-in raises on such a read during capture, as CUDA does.
So these tests show, without a GPU, that each loss and sampler combination below records as
one graph (no fallback warning) and that the replayed steps give the same parameters and
the same logged statistics as eager steps with the same seed.

The Trainer enables fast mode only for CUDA devices; the tests switch it on after building
the Trainer on CPU, with SGD (capturable Adam runs only on accelerators).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _cpu_cuda_graph import patch_cuda_graphs

from ebmflow.energy import MLPEnergy
from ebmflow.losses import (
    BernoulliPerturbation,
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
)
from ebmflow.samplers import (
    MALA,
    DiscreteLangevin,
    GibbsWithGradients,
    Langevin,
    PersistentSampler,
    ReplayBuffer,
)
from ebmflow.spaces import Binary, Continuous
from ebmflow.training import Callback, Trainer


def _continuous():
    return MLPEnergy(Continuous(2), hidden=(16, 16)), torch.randn(256, 2)


def _binary():
    g = torch.Generator().manual_seed(5)
    return MLPEnergy(Binary(8), hidden=(16,)), (torch.rand(256, 8, generator=g) < 0.3).float()


CASES = {
    "cd-mala": (_continuous, lambda: ContrastiveDivergence(), lambda: MALA(0.05, n_steps=3)),
    "cd-langevin": (_continuous, lambda: ContrastiveDivergence(alpha=0.1),
                    lambda: Langevin(0.01, n_steps=4)),
    "pcd-langevin": (_continuous, lambda: ContrastiveDivergence(),
                     lambda: PersistentSampler(Langevin(0.01, n_steps=3), ReplayBuffer(Continuous(2), 128))),
    "ed-gaussian": (_continuous, lambda: EnergyDiscrepancy(GaussianPerturbation(0.25), m=4),
                    lambda: None),
    "dsm": (_continuous, lambda: DenoisingScoreMatching(0.1), lambda: None),
    "ed-bernoulli": (_binary, lambda: EnergyDiscrepancy(BernoulliPerturbation(0.1), m=4),
                     lambda: None),
    "cd-gwg": (_binary, lambda: ContrastiveDivergence(), lambda: GibbsWithGradients(n_steps=2)),
    "cd-dmala": (_binary, lambda: ContrastiveDivergence(),
                 lambda: DiscreteLangevin(0.2, metropolis=True, n_steps=2)),
}


def _train(case: str | tuple, fast: bool, steps: int = 10):
    make_energy, make_loss, make_sampler = CASES[case] if isinstance(case, str) else case
    torch.manual_seed(0)
    energy, data = make_energy()
    logged: list[dict] = []
    trainer = Trainer(
        energy, make_loss(), make_sampler(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
        callbacks=[_Recorder(logged)], progress=False, quiet=True, seed=0, threads=None,
    )
    trainer.fast = fast
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(data, steps=steps, batch_size=32)
    return trainer, logged, [str(w.message) for w in caught if "fast mode" in str(w.message)]


class _Recorder(Callback):
    """Keeps every step's statistics as floats (in fast mode they are the graph's outputs,
    overwritten by the next replay)."""

    def __init__(self, out: list) -> None:
        self.out = out

    def on_step(self, trainer, step, stats):
        self.out.append({k: float(v) for k, v in stats.items()})


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_mode_captures_the_step_and_matches_eager_steps(monkeypatch, case):
    """One graph recorded after the 3 warm-up steps and replayed for the 7 others; the same
    parameters and the same logged loss as 10 eager steps."""
    eager, eager_log, _ = _train(case, fast=False)
    graphs = patch_cuda_graphs(monkeypatch)
    fast, fast_log, fell_back = _train(case, fast=True)
    assert fell_back == []
    assert len(graphs) == 1 and graphs[0].replays == 7
    for p, q in zip(eager.energy.parameters(), fast.energy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(fast.energy.parameters()),
                           next(_train(case, fast=False, steps=1)[0].energy.parameters()))
    assert len(fast_log) == len(eager_log) > 0
    for a, b in zip(eager_log, fast_log):
        assert set(a) == set(b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_a_host_read_in_the_step_falls_back_to_eager_steps_with_a_warning(monkeypatch):
    """A loss that reads a value on the host cannot be captured: the Trainer warns once,
    naming the error, and the run finishes with eager steps equal to a plain eager run."""

    class ReadingCD(ContrastiveDivergence):
        def forward(self, energy, data, sampler=None):
            out = super().forward(energy, data, sampler)
            if float(out.loss) > 1e9:  # a host read
                raise AssertionError
            return out

    case = (_continuous, lambda: ReadingCD(), lambda: MALA(0.05, n_steps=3))
    eager, _, _ = _train(case, fast=False)
    graphs = patch_cuda_graphs(monkeypatch)
    fast, _, fell_back = _train(case, fast=True)
    assert len(fell_back) == 1
    assert "could not be captured as a CUDA graph" in fell_back[0]
    assert "operation not permitted when stream is capturing" in fell_back[0]
    assert [g.replays for g in graphs] == [0]
    for p, q in zip(eager.energy.parameters(), fast.energy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
