"""Checkpoints: atomic writes, and resume giving exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from ebmflow.energy import MLPEnergy
from ebmflow.losses import EBMLoss, LossOutput
from ebmflow.samplers import Sampler
from ebmflow.spaces import Continuous
from ebmflow.training import (
    CheckpointError,
    Trainer,
    TrainingDiverged,
    atomic_save,
    load_checkpoint,
)
from ebmflow.training.checkpoint import load_module_state, module_state


class PersistentNoisySampler(Sampler):
    """Persistent chains in a buffer, a float step size adapted in update(), global RNG."""

    def __init__(self, capacity=64, dim=2):
        super().__init__()
        self.register_buffer("chains", torch.randn(capacity, dim))
        self.step_size = 0.1
        self.updates = 0

    def update(self, energy, data=None):
        self.updates += 1
        self.step_size *= 1.01
        return {}

    @torch.no_grad()
    def sample(self, energy, n=None, *, x0=None, generator=None):
        idx = torch.randint(0, self.chains.shape[0], (n,))
        x = self.chains[idx]
        _, g = energy.energy_and_grad(x)
        x = x - self.step_size * g + (2 * self.step_size) ** 0.5 * torch.randn_like(x)
        self.chains[idx] = x
        return x


class RandomCD(EBMLoss):
    """CD with a random data jitter (uses the global RNG, so RNG restore matters)."""

    requires_sampler = True

    def forward(self, energy, data, sampler=None):
        x_neg = self._check_sampler(sampler).sample(energy, data.shape[0])
        pos = energy(data + 0.01 * torch.randn_like(data)).mean()
        neg = energy(x_neg).mean()
        return LossOutput(pos - neg + 0.1 * (pos**2 + neg**2), {"energy_pos": pos.detach()})


def _make(tmp, **kw):
    torch.manual_seed(123)
    energy = MLPEnergy(Continuous(2), hidden=(16, 16))
    sampler = PersistentNoisySampler()
    opt = torch.optim.Adam(energy.parameters(), lr=1e-2)
    return Trainer(
        energy, RandomCD(), sampler=sampler, optimizer=opt, ema=0.9,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        progress=False, out_dir=tmp, log_every=4, **kw,
    )


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    full = _make(tmp_path / "full", seed=7)
    full.fit(data, steps=20, batch_size=32)

    half = _make(tmp_path / "half", seed=7)
    half.fit(data, steps=10, batch_size=32)
    resumed = _make(tmp_path / "half", seed=99)  # a different seed: the checkpoint wins
    resumed.fit(data, steps=20, batch_size=32, resume=True)

    assert resumed.step == 20
    for a, b in zip(full.energy.parameters(), resumed.energy.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.module.parameters(), resumed.ema.module.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.sampler.chains, resumed.sampler.chains)
    assert resumed.sampler.step_size == full.sampler.step_size
    assert resumed.sampler.updates == 20
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    # the resumed run appended to the same log
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 10, 12, 16, 20]


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": torch.zeros(3), "b": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_module_state_round_trips_buffers_and_plain_attributes():
    a, b = PersistentNoisySampler(), PersistentNoisySampler()
    a.step_size, a.updates = 0.37, 5
    a.stats = {"accept_rate": torch.tensor(0.5)}
    load_module_state(b, module_state(a), "sampler")
    assert torch.equal(a.chains, b.chains)
    assert (b.step_size, b.updates) == (0.37, 5)
    assert b.stats["accept_rate"].item() == 0.5


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    trainer = _make(tmp_path / "a", seed=0)
    trainer.save_checkpoint()
    other = Trainer(MLPEnergy(Continuous(2), hidden=(8,)), RandomCD(), sampler=PersistentNoisySampler(),
                    progress=False)
    with pytest.raises(CheckpointError, match="does not match"):
        other.load_checkpoint(tmp_path / "a" / "checkpoint.pt")


def test_no_checkpoint_of_nonfinite_parameters(tmp_path):
    trainer = _make(tmp_path, seed=0)
    trainer.save_checkpoint()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(trainer.energy.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="not writing a checkpoint"):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer = _make(tmp_path, seed=0, config={"data": "8gaussians", "hidden": [16, 16]})
    trainer.fit(torch.randn(128, 2), steps=3, batch_size=32)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["data"] == "8gaussians"
    assert set(ckpt) >= {"energy", "optimizer", "scheduler", "ema", "sampler", "rng"}


def test_two_fit_calls_continue_like_one(tmp_path):
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    one = _make(tmp_path / "one", seed=3)
    one.fit(data, steps=12, batch_size=32)
    two = _make(tmp_path / "two", seed=3)
    two.fit(data, steps=6, batch_size=32)
    two.fit(data, steps=12, batch_size=32)
    for a, b in zip(one.energy.parameters(), two.energy.parameters()):
        assert torch.equal(a, b)
