"""Exact checks of ebmflow.training written from its surviving mutants (tools/mutation.py).

Each test pins a behaviour a wrong implementation would change: messages, defaults, file
names, saved and restored state, the batches a stream yields, what the figures draw.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import warnings
from pathlib import Path

import pytest
import torch
import tqdm.std as tqdm_std
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ebmflow.energy import EnergyModel, MLPEnergy
from ebmflow.losses import EBMLoss, LossOutput
from ebmflow.samplers import Sampler
from ebmflow.spaces import Binary, Continuous
from ebmflow.training import (
    EMA,
    CheckpointError,
    EvalCallback,
    LambdaCallback,
    PlotCallback,
    StopOnNonFinite,
    Trainer,
    atomic_save,
    baselines,
    batches,
    checkpoint,
    load_checkpoint,
    loggers,
    monitor,
)
from ebmflow.training.batches import BatchStream

# Mutation testing forks one worker per mutant from a process that has run these tests. tqdm's
# default write lock includes a process-shared semaphore: a worker stopped (time limit) while
# holding it would leave every later worker blocked in tqdm.__new__. A thread-only lock (and no
# monitor thread, which takes the lock) keeps each forked worker independent.
tqdm_std.tqdm.set_lock(threading.RLock())
tqdm_std.tqdm.monitor_interval = 0


# -- helpers ---------------------------------------------------------------------------------
class Quadratic(EnergyModel):
    """E(x) = 0.5 * a * |x|^2 with one trainable scalar ``a`` (exact and cheap)."""

    def __init__(self, dim=2, a=1.0):
        super().__init__(Continuous(dim))
        self.a = nn.Parameter(torch.tensor(float(a)))

    def energy(self, x):
        return 0.5 * self.a * (x**2).sum(-1)


class BitsEnergy(EnergyModel):
    """A linear energy on bits."""

    def __init__(self, dim=4):
        super().__init__(Binary(dim))
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def energy(self, x):
        return x.float() @ self.w


class PosLoss(EBMLoss):
    """mean E(data): a loss needing no sampler; stats carry the positive energy."""

    def forward(self, energy, data, sampler=None):
        pos = energy(data).mean()
        return LossOutput(pos, {"energy_pos": pos.detach()})


class FixedSampler(Sampler):
    """Returns x0 (or zeros) and records what it was called with."""

    def __init__(self, dim=2):
        super().__init__()
        self.dim = dim
        self.calls = []

    def sample(self, energy, n=None, *, x0=None, generator=None):
        self.calls.append({"energy": energy, "n": n, "x0": x0})
        if x0 is not None:
            return x0.clone()
        return torch.zeros(n, self.dim)


class _FakeTrainer:
    """What callbacks read from a trainer."""

    def __init__(self, is_main=True, step=0, sampler=None, energy=None):
        self.is_main = is_main
        self.step = step
        self.sampler = sampler
        self.energy = energy if energy is not None else Quadratic()
        self.eval_energy = self.energy
        self.stops = []
        self.evals = []

    def request_stop(self, reason):
        self.stops.append(reason)

    def report_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))


# -- baselines -------------------------------------------------------------------------------
def test_baseline_warning_boundary_and_message():
    """baseline_warning: strict margin, needs both floats, names the baseline and advice."""
    ok = {"nll": 1.0, "nll_baseline": 1.2, "baseline": "B"}
    assert baselines.baseline_warning(ok, margin=0.1) is None
    # exactly at the margin: not below, so it warns
    edge = {"nll": 1.0, "nll_baseline": 1.5, "baseline": "the-base"}
    msg = baselines.baseline_warning(edge, margin=0.5)
    assert msg is not None
    assert "(the-base, NLL 1.500) by 0.5 nats" in msg
    assert msg.startswith("the model's NLL 1.000 does not beat the trivial baseline")
    assert msg.endswith("raise the learning rate or check the loss and sampler settings")
    # only one of the two is a float: no warning
    assert baselines.baseline_warning({"nll": 5.0, "nll_baseline": None}) is None
    assert baselines.baseline_warning({"nll": None, "nll_baseline": 5.0}) is None
    assert baselines.baseline_warning({"nll": float("nan"), "nll_baseline": 5.0}) is not None


def test_gaussian_fit_nll_uses_the_ml_covariance_plus_ridge():
    """gaussian_fit_nll: ML covariance (correction=0) plus a +1e-6 ridge, in float64."""
    train = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    test = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    mean = train.double().mean(0)
    cov = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64) + 1e-6 * torch.eye(2, dtype=torch.float64)
    law = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    expected = float(-law.log_prob(test.double()).mean())
    assert baselines.gaussian_fit_nll(train, test) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a degenerate direction: the ridge decides the value (a -1e-6 ridge would fail)
    flat = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    v = baselines.gaussian_fit_nll(flat, torch.tensor([[1.0, 1.0]]))
    assert math.isfinite(v)
    # a float64 ridge of exactly 1e-6 (a float32 one is 1e-6 * (1 - 2.5e-9))
    assert v == pytest.approx(0.5 * math.log(2 * math.pi * 1.000001) + 0.5 * math.log(2 * math.pi * 1e-6), rel=1e-13)


def test_trivial_baseline_keys():
    """trivial_baseline: gray -> uniform bits; otherwise the Gaussian fit; exact keys."""
    x = torch.zeros(3, 6)
    out = baselines.trivial_baseline("gray", x, x, torch.zeros(3, 2), torch.zeros(3, 2))
    assert out == {"nll_baseline": 6 * math.log(2.0), "baseline": "uniform law on 6 bits"}
    t2 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    out = baselines.trivial_baseline("none", t2, t2, t2, t2)
    assert set(out) == {"nll_baseline", "baseline"}
    assert out["baseline"] == "one Gaussian fitted to the training data"
    assert out["nll_baseline"] == baselines.gaussian_fit_nll(t2, t2)


# -- batches ---------------------------------------------------------------------------------
class _EpochSampler(torch.utils.data.Sampler):
    """A sampler with set_epoch (like DistributedSampler): order reversed on odd epochs."""

    def __init__(self, n):
        self.n = n
        self.epochs = []
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        self.epoch = epoch

    def __iter__(self):
        _count_pass(self)
        idx = list(range(self.n))
        return iter(idx[::-1] if self.epoch % 2 else idx)

    def __len__(self):
        return self.n


def _count_pass(sampler):
    """A stream that never yields would loop over its loader forever: fail fast instead."""
    sampler.passes = getattr(sampler, "passes", 0) + 1
    if sampler.passes > 100:
        raise RuntimeError("the stream went through 100 epochs without yielding what the test takes")


class _Sequential(torch.utils.data.Sampler):
    """Indices in order (no set_epoch), with the endless-loop guard."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        _count_pass(self)
        return iter(range(self.n))

    def __len__(self):
        return self.n


def _loader(n=6, bs=1, sampler=None):
    data = torch.arange(float(n)).reshape(n, 1)
    return DataLoader(TensorDataset(data), batch_size=bs, sampler=sampler or _Sequential(n), shuffle=False)


def _take(it, k):
    return [float(next(it)[0].reshape(-1)[0]) for _ in range(k)]


def test_loader_batches_in_order_across_epochs_and_resume_skip():
    """A plain DataLoader is replayed epoch after epoch; resume skips used batches."""
    loader = _loader(4)
    s = BatchStream(loader, None)
    assert s.batch_size == 1 and len(s) == 4
    assert _take(s.batches(0), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert _take(s.batches(2), 6) == [2, 3, 0, 1, 2, 3]
    assert _take(s.batches(5), 4) == [1, 2, 3, 0]
    assert _take(s.batches(4), 2) == [0, 1]


def test_loader_batches_call_set_epoch_with_the_epoch():
    """A loader whose sampler has set_epoch gets the epoch number before each pass."""
    sampler = _EpochSampler(3)
    s = BatchStream(_loader(3, sampler=sampler), None)
    got = _take(s.batches(4), 6)  # epoch 1 (reversed), from its second batch
    assert got == [1, 0, 0, 1, 2, 2]
    assert sampler.epochs[:3] == [1, 2, 3]
    one = _EpochSampler(1)
    s1 = BatchStream(_loader(1, sampler=one), None)
    assert _take(s1.batches(3), 2) == [0, 0] and one.epochs[:2] == [3, 4]


def test_loader_sharded_by_batch_under_data_parallelism():
    """Without a DistributedSampler rank r takes batches r, r+W, ...; equal counts."""
    loader = _loader(5)
    r0 = BatchStream(loader, None, rank=0, world_size=2)
    r1 = BatchStream(loader, None, rank=1, world_size=2)
    assert len(r0) == 2 and len(r1) == 2
    assert _take(r0.batches(0), 5) == [0, 2, 0, 2, 0]
    assert _take(r1.batches(0), 5) == [1, 3, 1, 3, 1]
    assert _take(r1.batches(3), 3) == [3, 1, 3]
    # a loader with set_epoch is used as is on every rank
    es = BatchStream(_loader(3, sampler=_EpochSampler(3)), None, rank=1, world_size=2)
    assert len(es) == 3
    assert len(BatchStream(_loader(2), None, rank=1, world_size=2)) == 1  # one batch per rank is enough
    empty = DataLoader(TensorDataset(torch.zeros(0, 1)), batch_size=1)
    assert len(BatchStream(empty, None)) == 0  # one process: never sharded, nothing to refuse
    with pytest.raises(ValueError, match=r"the DataLoader yields 1 batches per epoch, fewer than the 2 "
                                         r"processes; use a smaller batch_size or a DistributedSampler"):
        BatchStream(_loader(1), None, rank=0, world_size=2)


def test_tensor_and_dataset_streams():
    """Tensor/Dataset streams: seeded permutations, drop the remainder, shard by rank."""
    data = torch.arange(10.0).reshape(10, 1)
    s = BatchStream(data, 3, seed=5)
    assert len(s) == 3
    perm = batches._epoch_permutation(10, 5, 0)
    it = s.batches(0)
    for i in range(3):
        assert torch.equal(next(it), data[perm[3 * i: 3 * i + 3]])
    perm1 = batches._epoch_permutation(10, 5, 1)
    assert torch.equal(next(it), data[perm1[:3]])
    gen = torch.Generator().manual_seed((5 * 1_000_003 + 1) % (2**63 - 1))
    assert torch.equal(perm1, torch.randperm(10, generator=gen))
    big = 2**62 + 12345  # seeds this large wrap around modulo 2**63 - 1
    gen = torch.Generator().manual_seed((big * 1_000_003 + 3) % (2**63 - 1))
    assert torch.equal(batches._epoch_permutation(50, big, 3), torch.randperm(50, generator=gen))
    # rank 1 of 2: rows [2, 4) of each global batch of 4
    r1 = BatchStream(data, 2, seed=5, rank=1, world_size=2)
    assert len(r1) == 2
    assert torch.equal(next(r1.batches(1)), data[perm[6:8]])
    ds = BatchStream(TensorDataset(data), 3, seed=5)
    b = next(ds.batches(0))
    assert isinstance(b, list) and torch.equal(b[0], data[perm[:3]])
    with pytest.raises(ValueError, match=r"batch_size must be a positive int for tensor data, got 0"):
        BatchStream(data, 0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int for tensor data, got None"):
        BatchStream(data, None)
    with pytest.raises(ValueError, match=r"the data has 10 rows but one step needs batch_size x processes = "
                                         r"6 x 2 = 12; lower batch_size"):
        BatchStream(data, 6, world_size=2)
    with pytest.raises(ValueError, match=r"data must be a Tensor, a torch Dataset or a DataLoader, got list"):
        BatchStream([1, 2], 1)

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match=r"^an iterable Dataset has no length; wrap it in a DataLoader and pass "
                                         r"that$"):
        BatchStream(Endless(), 1)
    assert BatchStream(data, 3).seed == 0
    assert BatchStream(data, 10).batches_per_epoch == 1


def test_first_tensor():
    """first_tensor: tensor, first item of a tuple/list, 'x' of a dict, else a clear error."""
    a, b = torch.zeros(2), torch.ones(2)
    assert batches.first_tensor(a) is a
    assert batches.first_tensor((a, b)) is a
    assert batches.first_tensor([b, a]) is b
    assert batches.first_tensor({"y": b, "x": a}) is a
    assert batches.first_tensor({"y": b}) is b
    for bad, name in (([], "list"), ({}, "dict"), (("s", a), "tuple"), ({"x": "s"}, "dict"), (3, "int")):
        with pytest.raises(ValueError) as err:
            batches.first_tensor(bad)
        assert str(err.value) == (f"a batch must be a Tensor or a tuple/list whose first item is the state tensor, "
                                  f"got {name}; return x (or (x, y)) from your Dataset")


# -- callbacks -------------------------------------------------------------------------------
def test_lambda_callback_passes_its_arguments():
    """LambdaCallback: each hook calls its function with the hook's arguments."""
    seen = []
    cb = LambdaCallback(on_fit_start=lambda t: seen.append(("start", t)),
                        on_step=lambda t, s, st: seen.append(("step", t, s, st)),
                        on_eval=lambda t, s, m: seen.append(("eval", t, s, m)),
                        on_end=lambda t: seen.append(("end", t)))
    t, stats, metrics = object(), {"loss": 1}, {"mmd": 0.5}
    cb.on_fit_start(t)
    cb.on_step(t, 3, stats)
    cb.on_eval(t, 4, metrics)
    cb.on_end(t)
    assert seen == [("start", t), ("step", t, 3, stats), ("eval", t, 4, metrics), ("end", t)]
    empty = LambdaCallback()
    empty.on_fit_start(t)
    empty.on_step(t, 1, {})
    empty.on_eval(t, 1, {})
    empty.on_end(t)


def test_eval_callback_schedule_and_defaults():
    """EvalCallback: default every=1000, runs once per step, at the end on rank 0 only."""
    calls = []
    cb = EvalCallback(lambda tr: calls.append(tr.step) or {"m": torch.tensor(2.0)})
    assert cb.every == 1000 and cb.at_end is True and cb.last_step == -1 and cb.last == {}
    tr = _FakeTrainer(step=999)
    cb.on_step(tr, 999, {})
    assert calls == []
    tr.step = 1000
    cb.on_step(tr, 1000, {})
    assert calls == [1000] and cb.last == {"m": 2.0} and cb.last_step == 1000
    assert isinstance(cb.last["m"], float)
    cb.on_end(tr)  # same step: not again
    assert calls == [1000]
    assert tr.evals == [(1000, {"m": 2.0})]
    # at step 0 (last_step starts at -1) the end evaluation runs
    cb0 = EvalCallback(lambda tr: {"m": 1.0}, every=None)
    tr0 = _FakeTrainer(step=0)
    cb0.on_step(tr0, 0, {})
    assert tr0.evals == []
    cb0.on_end(tr0)
    assert tr0.evals == [(0, {"m": 1.0})]
    # not on other ranks, nor with at_end=False
    other = _FakeTrainer(is_main=False, step=5)
    EvalCallback(lambda tr: {"m": 1.0}).on_end(other)
    assert other.evals == []
    off = _FakeTrainer(step=5)
    EvalCallback(lambda tr: {"m": 1.0}, at_end=False).on_end(off)
    assert off.evals == []
    # last_step -1 vs +1 / -2: step 1 and step -2
    tr1 = _FakeTrainer(step=1)
    EvalCallback(lambda tr: {"m": 1.0}, every=None).on_end(tr1)
    assert tr1.evals == [(1, {"m": 1.0})]
    every1 = EvalCallback(lambda tr: {"m": 1.0}, every=1)
    assert every1.every == 1
    with pytest.raises(ValueError, match=r"every must be a positive int or None, got 0"):
        EvalCallback(lambda tr: {}, every=0)
    assert EvalCallback(lambda tr: {}, every=None).every is None


def test_eval_callback_last_step_after_run():
    """EvalCallback._run records the step so a second call at that step does nothing."""
    n = []
    cb = EvalCallback(lambda tr: n.append(1) or {"a": 1.0}, every=2)
    tr = _FakeTrainer(step=2)
    cb.on_step(tr, 2, {})
    cb.on_step(tr, 2, {})
    assert len(n) == 1 and cb.last_step == 2


def test_stop_on_non_finite():
    """StopOnNonFinite: every step by default, only the named keys, message with value and step."""
    cb = StopOnNonFinite()
    assert cb.keys is None and cb.every == 1
    tr = _FakeTrainer()
    cb.on_step(tr, 1, {"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))})
    assert tr.stops == ["b became inf at step 1"]
    tr = _FakeTrainer()
    StopOnNonFinite(keys=("a",)).on_step(tr, 3, {"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    assert tr.stops == []
    tr = _FakeTrainer()
    StopOnNonFinite(keys=("b",)).on_step(tr, 3, {"a": torch.tensor(float("nan")), "b": torch.tensor(float("nan"))})
    assert tr.stops == ["b became nan at step 3"]
    tr = _FakeTrainer()
    StopOnNonFinite().on_step(tr, 2, {"v": torch.tensor([float("nan"), 1.0])})  # not one element
    assert tr.stops == []
    every3 = StopOnNonFinite(every=3)
    assert every3.every == 3 and StopOnNonFinite(every=0).every == 1
    tr = _FakeTrainer()
    every3.on_step(tr, 4, {"a": torch.tensor(float("nan"))})
    assert tr.stops == []
    every3.on_step(tr, 6, {"a": torch.tensor(float("nan"))})
    assert tr.stops == ["a became nan at step 6"]


@pytest.fixture
def figs(monkeypatch):
    """The figures plots.py closes, kept open for inspection (closed after the test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, every = [], []
    real_close = plt.close

    def close(fig=None):
        kept.append(fig)
        every.append(fig)

    monkeypatch.setattr(plt, "close", close)
    yield kept
    for fig in every:
        if fig is not None:
            real_close(fig)


def test_plot_callback_settings_and_errors():
    """PlotCallback: defaults, 'every' checks and the space checks of on_fit_start."""
    cb = PlotCallback("out", every=2, data=torch.zeros(1, 2), gray_bits=3)
    assert cb.every == 2 and cb.data is not None and cb.gray_bits == 3 and cb.out_dir == Path("out")
    assert cb.name_format == "{kind}_{step}.png"
    assert PlotCallback("o", every=1).every == 1
    with pytest.raises(ValueError, match=r"every must be a positive int or None, got 0"):
        PlotCallback("o", every=0)
    with pytest.raises(ValueError, match=r"PlotCallback draws its samples with the Trainer's sampler, but the "
                                         r"Trainer has none \(the loss draws its own negatives\); pass "
                                         r"sample_fn=lambda trainer: MALA\(n_steps=300\)\.sample\("
                                         r"trainer\.eval_energy, 2000\), or a sampler to the Trainer$"):
        PlotCallback("o").on_fit_start(_FakeTrainer())
    fn = lambda tr: torch.zeros(2, 2)  # noqa: E731
    PlotCallback("o", sample_fn=fn).on_fit_start(_FakeTrainer())  # 2-D continuous: fine
    with pytest.raises(ValueError, match=r"gray_bits=2 means Gray-coded 2-D points, i\.e\. Binary\(4\), "
                                         r"but the energy's space is Binary\(6\)"):
        PlotCallback("o", sample_fn=fn, gray_bits=2).on_fit_start(_FakeTrainer(energy=BitsEnergy(6)))
    with pytest.raises(ValueError, match=r"gray_bits=1 means .*Binary\(2\), but the energy's space is Continuous\(2\)"):
        PlotCallback("o", sample_fn=fn, gray_bits=1).on_fit_start(_FakeTrainer())
    PlotCallback("o", sample_fn=fn, gray_bits=3).on_fit_start(_FakeTrainer(energy=BitsEnergy(6)))
    with pytest.raises(ValueError, match=r"PlotCallback plots 2-D models, but the energy's space is "
                                         r"Binary\(6\); for Gray-coded 2-D points pass gray_bits=3$"):
        PlotCallback("o", sample_fn=fn).on_fit_start(_FakeTrainer(energy=BitsEnergy(6)))
    with pytest.raises(ValueError, match=r"PlotCallback plots 2-D models, but the energy's space is Binary\(5\)$"):
        PlotCallback("o", sample_fn=fn).on_fit_start(_FakeTrainer(energy=BitsEnergy(5)))
    with pytest.raises(ValueError, match=r"PlotCallback plots 2-D models, but the energy's space is Continuous\(3\)$"):
        PlotCallback("o", sample_fn=fn).on_fit_start(_FakeTrainer(energy=Quadratic(3)))


def test_plot_callback_draws_samples_and_energy(tmp_path, figs):
    """PlotCallback._plot: sampler's 2000 states of eval_energy, file names, data panels."""
    sampler = FixedSampler()
    tr = _FakeTrainer(sampler=sampler, step=7)
    data = torch.tensor([[5.0, 5.0], [6.0, 6.0]])
    cb = PlotCallback(tmp_path / "a" / "b", every=3, data=data)
    cb.on_step(tr, 2, {})
    assert figs == []
    cb.on_step(_FakeTrainer(is_main=False, sampler=sampler), 3, {})
    assert figs == []
    cb.on_step(tr, 3, {})
    assert sampler.calls[-1]["n"] == 2000 and sampler.calls[-1]["energy"] is tr.eval_energy
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["energy_3.png", "samples_3.png"]
    samples_fig, energy_fig = figs[0], figs[1]
    titles = [ax.get_title() for ax in samples_fig.axes]
    assert titles == ["model samples", "data"]
    assert energy_fig.axes[0].get_xlim()[1] > 5.0  # the grid covers the data
    figs.clear()
    cb.on_end(tr)
    assert (tmp_path / "a" / "b" / "samples_7.png").is_file()
    assert (tmp_path / "a" / "b" / "energy_7.png").is_file()
    # without data the energy grid covers the samples
    figs.clear()
    fn_calls = []

    def fn(t):
        fn_calls.append(t)
        return torch.tensor([[-9.0, -9.0], [-8.0, -8.0]])

    PlotCallback(tmp_path / "c", sample_fn=fn, name_format="{step}-{kind}.png").on_end(tr)
    assert fn_calls == [tr]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["7-energy.png", "7-samples.png"]
    assert [ax.get_title() for ax in figs[0].axes] == ["model samples"]
    x0, x1 = figs[1].axes[0].get_xlim()
    assert x0 < -9.0 and x1 < -7.0
    # not on other ranks
    figs.clear()
    PlotCallback(tmp_path / "d", sample_fn=fn).on_end(_FakeTrainer(is_main=False))
    assert figs == [] and not (tmp_path / "d").exists()


def test_plot_callback_decodes_gray_bits(tmp_path, figs):
    """PlotCallback with gray_bits decodes samples to the plane and plots a decoded energy."""
    from ebmflow.data import gray_encode

    pts = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    bits = gray_encode(pts, 8)
    tr = _FakeTrainer(energy=BitsEnergy(16))
    PlotCallback(tmp_path, sample_fn=lambda t: bits, gray_bits=8).on_end(tr)
    offsets = figs[0].axes[0].collections[0].get_offsets()
    assert torch.allclose(torch.tensor(offsets, dtype=torch.float32), pts, atol=0.05)


# -- checkpoint ------------------------------------------------------------------------------
def test_atomic_save_names_and_cleanup(tmp_path, monkeypatch):
    """atomic_save: creates parents, temp file '.<name>.*.tmp' in the folder, cleans stale ones."""
    target = tmp_path / "x" / "y" / "ck.pt"
    made = []
    real = checkpoint.tempfile.mkstemp

    def spy(*a, **kw):
        fd, tmp = real(*a, **kw)
        made.append(tmp)
        return fd, tmp

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", spy)
    stale = tmp_path / "x" / "y"
    stale.mkdir(parents=True)
    (stale / ".ck.pt.abc.tmp").write_bytes(b"partial")
    (stale / ".other.pt.abc.tmp").write_bytes(b"keep")
    assert atomic_save({"a": 1}, target) == target
    name = Path(made[0]).name
    assert Path(made[0]).parent == target.parent
    assert name.startswith(".ck.pt.") and name.endswith(".tmp")
    assert sorted(p.name for p in stale.iterdir()) == [".other.pt.abc.tmp", "ck.pt"]
    assert torch.load(target, weights_only=True) == {"a": 1}
    deep = tmp_path / "p" / "q" / "r.pt"
    atomic_save([1], deep)
    assert deep.is_file()


def test_atomic_save_removes_its_temp_file_on_failure(tmp_path):
    """A failing save leaves no temporary file behind and re-raises."""

    class Bad:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save(Bad(), tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_ignores_a_stale_file_it_cannot_remove(tmp_path, monkeypatch):
    """An OSError while removing a stale temp file is suppressed."""
    (tmp_path / ".c.pt.zzz.tmp").write_bytes(b"x")
    real_unlink = Path.unlink

    def unlink(self, *a, **kw):
        if self.name == ".c.pt.zzz.tmp":
            raise OSError("busy")
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert atomic_save(1, tmp_path / "c.pt") == tmp_path / "c.pt"


def test_load_checkpoint_messages_and_weights_only(tmp_path):
    """load_checkpoint: messages name the path; weights_only refuses pickled objects."""
    missing = tmp_path / "none.pt"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(missing)
    assert str(err.value) == f"checkpoint {str(missing)!r} does not exist; check the path"
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(lst)
    assert str(err.value) == f"{str(lst)!r} is not an ebmflow checkpoint (got list)"
    obj = tmp_path / "obj.pt"
    torch.save({"f": Path("x")}, obj)  # a pickled object: refused with weights_only=True
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(obj)
    ok = tmp_path / "ok.pt"
    torch.save({"t": torch.ones(2)}, ok)
    seen = []
    got = load_checkpoint(ok, map_location=lambda s, loc: seen.append(loc) or s)
    assert seen == ["cpu"] and torch.equal(got["t"], torch.ones(2))


def test_load_checkpoint_asks_for_weights_only(tmp_path, monkeypatch):
    """load_checkpoint passes weights_only=True explicitly (torch < 2.6 defaults to False)."""
    ok = tmp_path / "ok.pt"
    torch.save({"t": 1}, ok)
    seen = []
    real = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    assert load_checkpoint(ok, map_location="cpu") == {"t": 1}
    assert seen == [{"map_location": "cpu", "weights_only": True}]


def test_rng_state_round_trip_and_cuda_keys(monkeypatch):
    """rng_state/set_rng_state: the next draws repeat; CUDA devices add a 'cuda' entry."""
    state = checkpoint.rng_state([torch.device("cpu")])
    assert set(state) == {"torch"}
    a = torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)
    assert set(checkpoint.rng_state()) == {"torch"}
    got = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: got.append(i) or torch.tensor([i]))
    st = checkpoint.rng_state([torch.device("cuda", 2), torch.device("cuda"), torch.device("cpu"),
                               torch.device("cuda", 2)])
    assert sorted(st["cuda"]) == ["0", "2"] and sorted(got) == [0, 2]
    assert torch.equal(st["cuda"]["2"], torch.tensor([2]))
    # set_rng_state restores the CUDA states of existing devices only
    put = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: put.append((s.tolist(), i)))
    checkpoint.set_rng_state({"torch": torch.get_rng_state(),
                              "cuda": {"0": torch.tensor([7]), "1": torch.tensor([8]), "2": torch.tensor([9])}})
    assert put == [([7], 0), ([8], 1)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    put.clear()
    checkpoint.set_rng_state({"torch": torch.get_rng_state(), "cuda": {"0": torch.tensor([7])}})
    assert put == []


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.step_size = 0.5
        self.name = "h"
        self.maybe = None
        self.flag = True
        self.t = torch.arange(3.0)
        self.tensors = {"a": torch.ones(2)}
        self.mixed = {"a": torch.ones(1), 1: torch.ones(1)}
        self.bad_dict = {"a": 1}
        self._private = 3
        self.obj = object()
        self.register_buffer("buf", torch.zeros(2))
        self.child = nn.Linear(1, 1)
        self.child.rate = 2


def test_plain_attributes_and_module_state():
    """_plain_attributes: public numbers/strings/None/tensors/str->tensor dicts, copies."""
    h = _Holder()
    attrs = checkpoint._plain_attributes(h)
    assert set(attrs) == {"step_size", "name", "maybe", "flag", "t", "tensors"}
    assert attrs["step_size"] == 0.5 and attrs["maybe"] is None and attrs["flag"] is True
    assert torch.equal(attrs["t"], torch.arange(3.0)) and attrs["t"] is not h.t
    assert torch.equal(attrs["tensors"]["a"], torch.ones(2)) and attrs["tensors"]["a"] is not h.tensors["a"]
    st = checkpoint.module_state(h)
    assert set(st) == {"state_dict", "attributes"}
    assert set(st["attributes"]) == {".", "child"}
    assert st["attributes"]["child"]["rate"] == 2
    assert "training" not in st["attributes"]["child"]


def test_load_module_state_restores_attributes_and_messages():
    """load_module_state: state_dict and attributes restored; unknown submodules skipped."""
    src = _Holder()
    src.step_size = 0.25
    src.t = torch.tensor([9.0, 8.0])
    src.tensors = {"a": torch.full((2,), 3.0), "new": torch.ones(1)}
    src.child.rate = 5
    with torch.no_grad():
        src.child.weight.fill_(4.0)
    st = checkpoint.module_state(src)
    st["attributes"] = {"ghost": {"x": 1}, **st["attributes"]}
    dst = _Holder()
    checkpoint.load_module_state(dst, st, "sampler")
    assert dst.step_size == 0.25 and dst.child.rate == 5
    assert torch.equal(dst.t, torch.tensor([9.0, 8.0]))
    assert torch.equal(dst.tensors["a"], torch.full((2,), 3.0)) and torch.equal(dst.tensors["new"], torch.ones(1))
    assert float(dst.child.weight.detach()) == 4.0
    # a state without attributes still loads the state_dict
    dst2 = _Holder()
    checkpoint.load_module_state(dst2, {"state_dict": st["state_dict"]}, "loss")
    assert float(dst2.child.weight.detach()) == 4.0 and dst2.step_size == 0.5
    # device: explicit device for tensors without a current tensor
    dst3 = _Holder()
    dst3.t = None
    checkpoint.load_module_state(dst3, st, "sampler", device=torch.device("meta"))
    assert dst3.t.device.type == "meta"
    assert dst3.tensors["new"].device.type == "meta" and dst3.tensors["a"].device.type == "cpu"
    dst5 = _Holder()
    dst5.tensors = None  # not a dict yet: the saved dict is taken as it is
    checkpoint.load_module_state(dst5, st, "sampler")
    assert sorted(dst5.tensors) == ["a", "new"] and torch.equal(dst5.tensors["a"], torch.full((2,), 3.0))
    dst4 = _Holder()
    dst4.t = torch.zeros(1, device="meta")
    dst4.tensors = {"a": torch.zeros(1, device="meta")}
    checkpoint.load_module_state(dst4, st, "sampler")
    assert dst4.t.device.type == "meta" and dst4.tensors["a"].device.type == "meta"
    assert dst4.tensors["new"].device.type == "cpu"
    # mismatching state_dict: message names what, the class and the first line of the error
    other = nn.Linear(3, 3)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_module_state(other, st, "sampler")
    msg = str(err.value)
    assert msg.startswith("the checkpoint's sampler does not match this sampler (Linear): Error(s) in loading "
                          "state_dict for Linear:")
    assert msg.endswith("; build it with the same settings as the saved run")


# -- EMA -------------------------------------------------------------------------------------
class _WithCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.lin(x) * 2


def test_ema_defaults_checks_and_messages():
    """EMA: default decay 0.999, decay in [0, 1), messages; integer buffers copied."""
    m = _WithCounter()
    ema = EMA(m)
    assert ema.decay == 0.999 and ema.warmup is False and ema.num_updates == 0
    assert EMA(m, decay=0.0).decay == 0.0
    assert EMA(m, warmup=True).warmup is True
    with pytest.raises(ValueError, match=r"^decay must be in \[0, 1\), got 1\.0; e\.g\. decay=0\.999$"):
        EMA(m, decay=1.0)
    with pytest.raises(ValueError, match=r"^EMA needs an nn\.Module, got int$"):
        EMA(3)
    m.count.fill_(7)
    ema.update(m)
    assert int(ema.module.count) == 7 and ema.num_updates == 1
    x = torch.ones(1, 2)
    assert torch.equal(ema(x), ema.module(x))

    class Scaled(nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    assert EMA(Scaled())(torch.ones(2), scale=3.0).tolist() == [3.0, 3.0]


def test_ema_mismatch_message():
    """EMA.update with another model: the message lists missing and extra names (3 at most)."""
    a = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)])
    b = nn.Sequential(nn.Linear(1, 1))
    b.extra1 = nn.Linear(1, 1)
    b.extra2 = nn.Linear(1, 1)
    ema = EMA(a)
    with pytest.raises(ValueError) as err:
        ema.update(b)
    assert str(err.value) == (
        "EMA.update got a model whose parameters differ from the averaged one "
        "(missing ['1.bias', '1.weight', '2.bias'], extra ['extra1.bias', 'extra1.weight', 'extra2.bias']); "
        "pass the model the EMA was built from")


def test_ema_extra_state_round_trip():
    """EMA state_dict keeps num_updates, decay and warmup."""
    m = nn.Linear(1, 1)
    a = EMA(m, decay=0.5, warmup=True)
    a.update(m)
    b = EMA(m, decay=0.9, warmup=False)
    b.load_state_dict(a.state_dict())
    assert (b.num_updates, b.decay, b.warmup) == (1, 0.5, True)
    c = EMA(m, decay=0.9, warmup=True)
    c.set_extra_state({"num_updates": 2, "decay": 0.3, "warmup": False})
    assert (c.num_updates, c.decay, c.warmup) == (2, 0.3, False)


# -- loggers ---------------------------------------------------------------------------------
def test_to_json_number_and_jsonl(tmp_path):
    """to_json_number: nan/inf/-inf strings; JSONLLogger writes them, appends, closes twice."""
    assert loggers.to_json_number(1.5) == 1.5
    assert loggers.to_json_number(0.0) == 0.0
    assert loggers.to_json_number(float("nan")) == "nan"
    assert loggers.to_json_number(float("inf")) == "inf"
    assert loggers.to_json_number(float("-inf")) == "-inf"
    path = tmp_path / "deep" / "er" / "log.jsonl"
    log = loggers.JSONLLogger(path)
    log.log({"step": 1, "loss": float("nan"), "note": "é", "x": 2.0})
    assert not log._file.closed
    log.close()
    assert log._file.closed
    log.close()
    log2 = loggers.JSONLLogger(path)
    log2.log({"step": 2, "loss": float("-inf")})
    log2.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(s) for s in lines] == [{"step": 1, "loss": "nan", "note": "é", "x": 2.0},
                                              {"step": 2, "loss": "-inf"}]


def test_progress_bar_postfix(monkeypatch):
    """ProgressBar.show: loss/acc/ess/it/s with 4 significant digits, sampler/ fallbacks."""
    bar = loggers.ProgressBar(total=10, disable=True)
    seen = []
    monkeypatch.setattr(bar._bar, "set_postfix", lambda shown, refresh=True: seen.append((shown, refresh)))
    bar.show({"loss": 1.234567, "sampler/accept_rate": 0.5, "accept_rate": "x", "ess": 3, "it_per_s": 100.0,
              "sampler/ess": 2.0})
    assert seen == [({"loss": "1.235", "acc": "0.5", "ess": "2", "it/s": "100"}, False)]
    bar.close()


def test_progress_bar_arguments(monkeypatch):
    """ProgressBar: tqdm over the steps with its total, start, 'train' label; advance/close."""
    made = []

    class Bar:
        def __init__(self, **kw):
            made.append(kw)
            self.n = 0
            self.closed = False

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(loggers, "tqdm", Bar)
    bar = loggers.ProgressBar(total=10, initial=2, disable=True)
    assert made == [{"total": 10, "initial": 2, "disable": True, "desc": "train", "dynamic_ncols": True,
                     "leave": True}]
    bar.advance(3)
    assert bar._bar.n == 3
    bar.close()
    assert bar._bar.closed
    loggers.ProgressBar(total=5)
    assert made[-1]["initial"] == 0 and made[-1]["disable"] is False


def test_tensorboard_logger_writes_scalars(tmp_path, monkeypatch):
    """TensorBoardLogger.log: numbers except 'step' and bools, at the record's step."""
    import sys
    import types

    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    tb = loggers.TensorBoardLogger(tmp_path / "tb")
    tb.log({"step": 4, "loss": 1.5, "n": 2, "flag": True, "s": "x"})
    tb.log({"loss": 2.0})
    tb.close()
    assert written == [("dir", str(tmp_path / "tb")), ("loss", 1.5, 4), ("n", 2, 4), ("loss", 2.0, 0), "closed"]


def test_tensorboard_available(monkeypatch):
    """TensorBoardLogger.available: False when tensorboard cannot be imported, True when it can."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert loggers.TensorBoardLogger.available() is False
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = object
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    assert loggers.TensorBoardLogger.available() is True


# -- monitor ---------------------------------------------------------------------------------
def test_step_stats_means_and_divergence():
    """StepStats: means over counted steps; the first non-finite monitored stat and its step."""
    s = monitor.StepStats(torch.device("cpu"))
    assert s.first_divergence() is None
    s.pack({"loss": torch.tensor(1.0), "other": torch.tensor(3.0)})
    s.count += 1
    s.pack({"loss": torch.tensor(3.0), "other": torch.tensor(5.0)})
    s.count += 1
    assert s.take_means().tolist() == [2.0, 4.0]
    assert s.count == 0 and s.sums.tolist() == [0.0, 0.0]
    s.pack({"loss": torch.tensor(4.0), "other": torch.tensor(1.0)})
    assert s.take_means().tolist() == [4.0, 1.0]  # count 0 -> divided by 1
    s.pack({"loss": torch.tensor(1.0), "other": torch.tensor(float("nan"))})
    assert s.first_divergence() is None  # "other" is not monitored
    s.pack({"loss": torch.tensor(float("inf")), "other": torch.tensor(1.0)})
    assert s.first_divergence() == ("loss", 5)
    assert monitor.is_monitored("energy_pos") and monitor.is_monitored("grad_norm")
    assert monitor.is_monitored("my_loss") and not monitor.is_monitored("sampler/accept_rate")


# -- plots -----------------------------------------------------------------------------------
def _png_size(path):
    head = Path(path).read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_samples_panels_limits_and_file(tmp_path, figs):
    """plot_samples: one panel per set, shared limits from the data, styling, 100 dpi file."""
    import matplotlib

    from ebmflow.training.plots import plot_samples

    x = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    data = torch.tensor([[0.0, 0.0], [1.0, 2.0], [float("nan"), 0.0]])
    with matplotlib.rc_context({"figure.dpi": 50, "savefig.dpi": "figure"}):
        out = plot_samples(x, tmp_path / "n" / "m" / "s.png", data=data)
    assert out == tmp_path / "n" / "m" / "s.png" and out.is_file()
    assert _png_size(out) == (800, 400)
    fig = figs[0]
    assert tuple(fig.get_size_inches()) == (8.0, 4.0)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["model samples", "data"]
    pad_x, pad_y = 0.1 + 1e-3, 0.2 + 1e-3
    for ax in axes:
        assert ax.get_xlim() == pytest.approx((-pad_x, 1 + pad_x))
        assert ax.get_ylim() == pytest.approx((-pad_y, 2 + pad_y))
        assert ax.get_aspect() == 1.0
        coll = ax.collections[0]
        assert list(coll.get_sizes()) == [2.0] and coll.get_alpha() == 0.5
    assert axes[0].collections[0].get_offsets().tolist() == [[0.0, 0.0], [10.0, 10.0]]
    assert axes[1].collections[0].get_offsets()[:2].tolist() == [[0.0, 0.0], [1.0, 2.0]]
    # without data: one panel, limits from the samples; a custom title
    figs.clear()
    plot_samples(torch.tensor([[1.0, -1.0], [3.0, 1.0]]), tmp_path / "t.png", title="T")
    (ax,) = figs[0].axes
    assert ax.get_title() == "T" and tuple(figs[0].get_size_inches()) == (4.0, 4.0)
    assert ax.get_xlim() == pytest.approx((1 - 0.201, 3 + 0.201))
    assert ax.get_ylim() == pytest.approx((-1 - 0.201, 1 + 0.201))
    # nothing finite: limits around the origin
    figs.clear()
    plot_samples(torch.full((2, 2), float("inf")), tmp_path / "u.png")
    assert figs[0].axes[0].get_xlim() == pytest.approx((-1e-3, 1e-3))
    assert figs[0].axes[0].get_ylim() == pytest.approx((-1e-3, 1e-3))


def test_plot_input_checks_and_missing_matplotlib(tmp_path, monkeypatch):
    """plots: shape errors name the argument; no matplotlib -> an install hint."""
    import sys

    from ebmflow.training.plots import plot_energy, plot_samples

    with pytest.raises(ValueError, match=r"^x must be 2-D points of shape \(N, 2\) to plot, got \(3, 3\)$"):
        plot_samples(torch.zeros(3, 3), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"^x must be 2-D points of shape \(N, 2\) to plot, got \(2,\)$"):
        plot_samples(torch.zeros(2), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"^data must be 2-D points of shape \(N, 2\) to plot, got \(1, 3\)$"):
        plot_samples(torch.zeros(3, 2), tmp_path / "a.png", data=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"^data must be 2-D points"):
        plot_energy(Quadratic(), tmp_path / "a.png", data=torch.zeros(4))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^plots need matplotlib; install it with `pip install ebmflow\[plot\]`$"):
        plot_samples(torch.zeros(3, 2), tmp_path / "a.png")


def test_plot_energy_grid_and_panels(tmp_path, figs):
    """plot_energy: default box [-4, 4]^2, data box, explicit limits; both panels titled."""
    from ebmflow.training.plots import plot_energy

    out = plot_energy(Quadratic(), tmp_path / "e" / "e.png", resolution=20)
    assert out.is_file()
    ax0, ax1 = figs[0].axes[:2]
    img = ax0.images[0]
    assert tuple(img.get_extent()) == (-4.0, 4.0, -4.0, 4.0)
    arr = img.get_array()
    assert arr.shape == (20, 20) and float(arr.max()) == pytest.approx(1.0)
    assert ax0.get_title() == "exp(-(E - min E))"
    assert ax1.get_title() == "energy E(x) (capped at min E + 20)"
    figs.clear()
    plot_energy(Quadratic(), tmp_path / "f.png", data=torch.tensor([[0.0, 0.0], [1.0, 2.0]]), resolution=10)
    assert figs[0].axes[0].images[0].get_extent() == pytest.approx((-0.101, 1.101, -0.201, 2.201))
    figs.clear()
    plot_energy(Quadratic(), tmp_path / "g.png", limits=(0.0, 1.0, 2.0, 3.0), resolution=10)
    assert tuple(figs[0].axes[0].images[0].get_extent()) == (0.0, 1.0, 2.0, 3.0)


# -- evaluation ------------------------------------------------------------------------------
class NoParams(EnergyModel):
    """A parameter-free 2-D energy (reference_tensor() is None)."""

    def __init__(self):
        super().__init__(Continuous(2))

    def energy(self, x):
        return 0.5 * (x**2).sum(-1)


class MetaEnergy(EnergyModel):
    """An energy whose parameters live on the meta device (to see where states are sent)."""

    def __init__(self):
        super().__init__(Continuous(2))
        self.p = nn.Parameter(torch.zeros(1, device="meta"))

    def energy(self, x):
        return x.sum(-1)


class RandSampler(Sampler):
    """Returns x0 plus global-RNG noise; records its calls."""

    def __init__(self, accepts_x0=True):
        super().__init__()
        self.calls = []
        self.accepts_x0 = accepts_x0

    def sample(self, energy, n=None, *, x0=None, generator=None):
        if x0 is not None and not self.accepts_x0:
            raise TypeError("no x0")
        self.calls.append({"energy": energy, "n": n, "x0": x0})
        base = x0 if x0 is not None else torch.zeros(n, 2)
        return base + torch.rand(base.shape)


def test_draw_samples_starts_from_the_data_gaussian_and_forks_the_rng():
    """draw_samples: x0 = eval_init with a seed-1 generator, RNG seeded and restored."""
    from ebmflow.training.evaluation import draw_samples
    from ebmflow.training.registry import RunConfig, eval_init

    cfg = RunConfig()
    train2d = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
    sampler = RandSampler()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    out = draw_samples(cfg, NoParams(), sampler, train2d, 5)
    assert torch.equal(torch.get_rng_state(), before)
    x0 = eval_init(cfg, train2d, 5, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    noise = torch.rand(5, 2)
    assert torch.allclose(out, x0 + noise)
    call = sampler.calls[0]
    assert call["n"] == 5 and isinstance(call["energy"], NoParams) and torch.equal(call["x0"], x0)
    out7 = draw_samples(cfg, NoParams(), RandSampler(), train2d, 5, seed=7)
    x07 = eval_init(cfg, train2d, 5, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    assert torch.allclose(out7, x07 + torch.rand(5, 2))
    # states go to the energy's device
    meta_sampler = FixedSampler()
    draw_samples(cfg, MetaEnergy(), meta_sampler, train2d, 3)
    assert meta_sampler.calls[0]["x0"].device.type == "meta"


def test_draw_samples_binary_uses_the_space_noise_and_falls_back_without_x0():
    """draw_samples for gray data: x0 from the space's noise (seeded); samplers without x0 work."""
    from ebmflow.training.evaluation import draw_samples
    from ebmflow.training.registry import RunConfig

    cfg = RunConfig(encoding="gray")
    energy = BitsEnergy(4)
    sampler = FixedSampler(dim=4)
    out = draw_samples(cfg, energy, sampler, torch.zeros(3, 2), 6, seed=3)
    expected = energy.space.noise(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, expected) and sampler.calls[0]["n"] == 6 and sampler.calls[0]["energy"] is energy
    no_x0 = RandSampler(accepts_x0=False)
    out = draw_samples(cfg, energy, no_x0, torch.zeros(3, 2), 4, seed=2)
    torch.manual_seed(2)
    assert torch.allclose(out, torch.rand(4, 2))
    assert no_x0.calls[0]["energy"] is energy and no_x0.calls[0]["n"] == 4 and no_x0.calls[0]["x0"] is None
    meta = FixedSampler(dim=2)

    class MetaBits(EnergyModel):
        def __init__(self):
            super().__init__(Binary(2))
            self.p = nn.Parameter(torch.zeros(1, device="meta"))

        def energy(self, x):
            return x.sum(-1)

    draw_samples(cfg, MetaBits(), meta, torch.zeros(3, 2), 2)
    assert meta.calls[0]["x0"].device.type == "meta"


def test_to_points_box_and_gray_energy():
    """to_points decodes gray bits with 16 bits; _box pads by 3; GrayDecodedEnergy is 2-D."""
    from ebmflow.data import gray_encode
    from ebmflow.training.evaluation import GrayDecodedEnergy, _box, to_points
    from ebmflow.training.registry import RunConfig

    pts = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    got = to_points(RunConfig(encoding="gray"), gray_encode(pts, 16))
    assert torch.allclose(got, pts, atol=1e-3)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    same = to_points(RunConfig(), x)
    assert not same.requires_grad and same.dtype == torch.float32
    assert _box(torch.tensor([[0.0, 1.0], [2.0, 5.0]])) == (-3.0, 5.0, -2.0, 8.0)
    assert _box(torch.tensor([[0.0, 1.0], [2.0, 5.0]]), margin=1.0) == (-1.0, 3.0, 0.0, 6.0)
    inner = BitsEnergy(32)
    g = GrayDecodedEnergy(inner)
    assert g.space == Continuous(2) and g.bits == 16
    assert torch.allclose(g(pts), inner(gray_encode(pts, 16)))
    g8 = GrayDecodedEnergy(BitsEnergy(16), bits=8)
    assert torch.allclose(g8(pts), g8.inner(gray_encode(pts, 8)))


def test_write_figures_names_and_limits(tmp_path, figs):
    """write_figures: samples.png beside as many test points, energy.png on the test box +- 1."""
    from ebmflow.training.evaluation import write_figures
    from ebmflow.training.registry import RunConfig

    test2d = torch.tensor([[0.0, 2.0], [1.0, 4.0], [2.0, 1.0], [9.0, 7.0]])
    samples = torch.tensor([[0.5, 0.5], [1.5, 1.5], [0.0, 1.0]])
    write_figures(RunConfig(), Quadratic(), samples, test2d, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["energy.png", "samples.png"]
    data_ax = figs[0].axes[1]
    assert data_ax.get_title() == "data"
    assert data_ax.collections[0].get_offsets().tolist() == test2d[:3].tolist()
    assert tuple(figs[1].axes[0].images[0].get_extent()) == (-1.0, 10.0, 0.0, 8.0)
    # gray: the energy is decoded to the plane
    figs.clear()
    from ebmflow.data import gray_encode

    write_figures(RunConfig(encoding="gray"), BitsEnergy(32), gray_encode(samples, 16), test2d, tmp_path / "g")
    assert (tmp_path / "g" / "energy.png").is_file()
    assert torch.allclose(torch.tensor(figs[0].axes[0].collections[0].get_offsets(), dtype=torch.float32),
                          samples, atol=1e-3)


# -- loading ---------------------------------------------------------------------------------
def test_energy_state_choices_and_messages():
    """energy_state: EMA average by default when saved, raw weights on request, clear errors."""
    from ebmflow.training.loading import energy_state

    raw = {"w": torch.zeros(1)}
    avg = {"module.w": torch.ones(1), "other": torch.full((1,), 5.0)}
    ckpt = {"energy": raw, "ema": avg}
    state, used = energy_state(ckpt)
    assert used is True and list(state) == ["w"] and torch.equal(state["w"], torch.ones(1))
    assert energy_state(ckpt, ema=False) == (raw, False)
    assert energy_state({"energy": raw, "ema": None}) == (raw, False)
    with pytest.raises(CheckpointError, match=r"^not an ebmflow Trainer checkpoint \(no 'energy' entry\)$"):
        energy_state({})
    with pytest.raises(CheckpointError, match=r"^the checkpoint has no EMA weights \(the run was trained without "
                                              r"ema=\.\.\.\); pass ema=False for the trained weights$"):
        energy_state({"energy": raw, "ema": None}, ema=True)


def _trained_checkpoint(tmp_path, config=None, ema=0.5):
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(8,))
    tr = Trainer(energy, PosLoss(), ema=ema, progress=False, out_dir=tmp_path, log_every=2,
                 tensorboard=False, threads=None, config=config)
    tr.fit(torch.randn(16, 2), steps=2, batch_size=8)
    return tr


def test_load_energy_builds_loads_and_reports(tmp_path):
    """load_energy: eval mode, no gradients, rebuilt from the config; messages name the path."""
    from ebmflow.training import load_energy
    from ebmflow.training.registry import RunConfig

    cfg = RunConfig(hidden=[8]).to_dict()
    tr = _trained_checkpoint(tmp_path, config=cfg)
    path = tmp_path / "checkpoint.pt"
    e = load_energy(path)
    assert not e.training and all(not p.requires_grad for p in e.parameters())
    for a, b in zip(e.parameters(), tr.ema.module.parameters()):
        assert torch.equal(a, b)
    raw = load_energy(path, ema=False, energy=MLPEnergy(Continuous(2), hidden=(8,)))
    for a, b in zip(raw.parameters(), tr.energy.parameters()):
        assert torch.equal(a, b.detach())
    seen = []
    load_energy(path, map_location=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^energy must be an ebmflow EnergyModel or None, got Linear$"):
        load_energy(path, energy=nn.Linear(1, 1))
    with pytest.raises(CheckpointError) as err:
        load_energy(path, energy=MLPEnergy(Continuous(2), hidden=(4,)))
    msg = str(err.value)
    assert msg.startswith(f"the weights in {str(path)!r} (MLPEnergy) do not fit MLPEnergy: Error(s) in loading "
                          "state_dict for MLPEnergy:")
    assert msg.endswith("; build the energy with the same class and sizes as the training run")
    assert seen == []


def test_load_energy_without_config_names_the_path(tmp_path):
    """load_energy: a checkpoint without settings asks for energy=..., naming path and class."""
    from ebmflow.training import load_energy

    _trained_checkpoint(tmp_path)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError) as err:
        load_energy(path)
    assert str(err.value) == (
        f"{str(path)!r} does not record how to build its energy (MLPEnergy); pass energy=... built as in the "
        "training script, e.g. load_energy(path, energy=MLPEnergy(Continuous(2), hidden=(128, 128, 128)))")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = {"hidden": [8], "bogus": 1}
    atomic_save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not record how to build its energy"):
        load_energy(tmp_path / "bad.pt")


def test_rebuild_reports_the_source_of_a_bad_config(tmp_path):
    """_rebuild passes the path to RunConfig.from_dict (named in its errors)."""
    from ebmflow.training import registry
    from ebmflow.training.loading import _rebuild

    seen = []
    real = registry.RunConfig.from_dict

    def spy(values, source="config"):
        seen.append(source)
        return real(values, source=source)

    orig = registry.RunConfig.from_dict
    registry.RunConfig.from_dict = staticmethod(spy)
    try:
        e = _rebuild({"config": {"hidden": [3]}}, "P.pt")
    finally:
        registry.RunConfig.from_dict = orig
    assert seen == ["P.pt"] and isinstance(e, MLPEnergy)


# -- registry --------------------------------------------------------------------------------
def _shapes(module):
    return [tuple(p.shape) for p in module.parameters()]


def test_run_config_from_dict_and_defaults():
    """RunConfig.from_dict: unknown keys listed with the source and every valid key."""
    from ebmflow.training.registry import ComponentError, RunConfig

    cfg = RunConfig.from_dict({"steps": 5, "lr": 0.5})
    assert cfg.steps == 5 and cfg.lr == 0.5 and cfg.batch == 128
    keys = ", ".join(sorted(RunConfig.keys()))
    with pytest.raises(ComponentError) as err:
        RunConfig.from_dict({"zzz": 1, "aaa": 2})
    assert str(err.value) == f"unknown setting(s) ['aaa', 'zzz'] in config; valid keys: {keys}"
    with pytest.raises(ComponentError, match=r"^unknown setting\(s\) \['q'\] in my\.toml; valid keys: alpha, amp, "):
        RunConfig.from_dict({"q": 1}, source="my.toml")


def test_check_config_messages():
    """check_config: each refusal's exact message; the default sampler filled in."""
    from ebmflow.data import TOY_DATASETS
    from ebmflow.training.registry import ComponentError, RunConfig, check_config

    def refuse(msg, **kw):
        with pytest.raises(ComponentError) as err:
            check_config(RunConfig(**kw))
        assert str(err.value) == msg

    refuse(f"unknown data set 'nope'; valid names: {', '.join(TOY_DATASETS)}", data="nope")
    refuse("unknown encoding 'x'; valid names: none, gray", encoding="x")
    refuse("unknown loss 'x'; valid names: ed, cd, pcd, dsm", loss="x")
    refuse("unknown sampler 'x'; valid names: langevin, mala, hmc, flowmc, gibbs, gwg, dula, dmala, discrete-flow",
           sampler="x")
    refuse("sampler 'mala' moves continuous states but --encoding gray makes the data binary; use one of "
           "gibbs, gwg, dula, dmala, discrete-flow", encoding="gray", sampler="mala")
    refuse("sampler 'gibbs' moves binary states but '8gaussians' is continuous 2-D data; use one of "
           "langevin, mala, hmc, flowmc (or --encoding gray for binary data)", sampler="gibbs")
    refuse("score matching needs gradients in x, so continuous data; drop --encoding gray or use --loss ed",
           encoding="gray", loss="dsm")
    refuse("steps must be a positive integer, got -1", steps=-1)
    refuse("batch must be a positive integer, got 0", batch=0)
    refuse("n_train must be a positive integer, got 2.0", n_train=2.0)
    refuse("log_every must be a positive integer, got True", log_every=True)
    refuse("eval_samples must be a positive integer, got 0", eval_samples=0)
    refuse("batch (11) is larger than n_train (10)", batch=11, n_train=10)
    assert check_config(RunConfig(steps=0, batch=1, n_train=1, n_test=1, eval_samples=1, log_every=1)).steps == 0
    assert check_config(RunConfig(batch=10, n_train=10)).sampler == "mala"
    assert check_config(RunConfig(encoding="gray")).sampler == "gibbs"
    if not torch.cuda.is_available():
        refuse("device 'cuda:1' requested but no CUDA GPU is available; use --device cpu", device="cuda:1")


def test_registry_import_errors(monkeypatch):
    """_import/_get: a missing module or name gives a ComponentError naming it."""
    import sys

    from ebmflow.training import registry

    monkeypatch.setitem(sys.modules, "ebmflow.nothing_here", None)
    with pytest.raises(registry.ComponentError, match=r"^widgets are not available in this installation \("):
        registry._import("ebmflow.nothing_here", "widgets")
    with pytest.raises(registry.ComponentError, match=r"^ebmflow\.nothing_here are not available in this installation"):
        registry._get("ebmflow.nothing_here", "x")
    with pytest.raises(registry.ComponentError,
                       match=r"^ebmflow\.data\.nothing is not available in this installation of ebmflow$"):
        registry._get("ebmflow.data", "nothing")
    monkeypatch.setitem(sys.modules, "ebmflow.data", None)
    with pytest.raises(registry.ComponentError, match=r"^data sets are not available in this installation"):
        registry.dataset_names()


def test_mcmc_builders():
    """_mcmc: each kernel with its default step size, steps, warm-up; unknown names refused."""
    from ebmflow.samplers import HMC, MALA, DiscreteLangevin, Gibbs, GibbsWithGradients, Langevin
    from ebmflow.training.registry import ComponentError, _mcmc

    lan = _mcmc("langevin", 7, None)
    assert type(lan) is Langevin and lan.step_size == 0.01 and lan.n_steps == 7
    assert _mcmc("langevin", 7, 0.3).step_size == 0.3
    mala = _mcmc("mala", 8, None)
    assert type(mala) is MALA and mala.step_size == 0.05 and mala.n_steps == 8 and mala.n_warmup == 0
    assert _mcmc("mala", 8, 0.2, warmup=4).n_warmup == 4 and _mcmc("mala", 8, 0.2).step_size == 0.2
    hmc = _mcmc("hmc", 9, None, warmup=2)
    assert type(hmc) is HMC and hmc.step_size == 0.1 and hmc.n_leapfrog == 5 and hmc.n_steps == 9
    assert hmc.n_warmup == 2 and _mcmc("hmc", 9, 0.4).step_size == 0.4
    g = _mcmc("gibbs", 3, None)
    assert type(g) is Gibbs and g.n_steps == 3
    gwg = _mcmc("gwg", 4, None)
    assert type(gwg) is GibbsWithGradients and gwg.n_steps == 4
    dula = _mcmc("dula", 5, None)
    assert type(dula) is DiscreteLangevin and dula.metropolis is False and dula.n_steps == 5
    assert dula.step_size == DiscreteLangevin().step_size
    dmala = _mcmc("dmala", 6, 0.7)
    assert dmala.metropolis is True and dmala.step_size == 0.7 and dmala.n_steps == 6
    with pytest.raises(ComponentError, match=r"^'flowmc' is not an MCMC sampler$"):
        _mcmc("flowmc", 1, None)


def test_learned_samplers_and_build_sampler():
    """_learned/build_sampler/build_eval_sampler: sizes and settings of each component."""
    from ebmflow.discrete_flows import MLPVelocity
    from ebmflow.flows import FlowMC, RealNVP
    from ebmflow.samplers import MALA, Langevin, PersistentSampler
    from ebmflow.training.registry import (
        RunConfig,
        _learned,
        build_eval_sampler,
        build_sampler,
    )

    cfg = RunConfig(sampler="flowmc", sampler_steps=7, step_size=0.3)
    fm = _learned(cfg, n_chains=11)
    assert type(fm) is FlowMC and fm.n_local == 7 and fm.n_global == 5 and fm.n_chains == 11
    assert type(fm.local) is MALA and fm.local.n_warmup == 100 and fm.local.step_size == 0.3
    assert fm.local.n_steps == 7
    assert _shapes(fm.flow) == _shapes(RealNVP(2, n_layers=6, hidden=(64, 64)))
    df = _learned(RunConfig(sampler="discrete-flow", encoding="gray", batch=17), n_chains=3)
    assert df.batch_size == 17 and df.fit_to == "energy"
    assert _shapes(df.model) == _shapes(MLPVelocity(32, 2, hidden=(256, 256)))
    assert build_sampler(RunConfig(loss="ed")) is None
    assert build_sampler(RunConfig(loss="dsm", sampler="mala")) is None
    cd = build_sampler(RunConfig(loss="cd", sampler="langevin", sampler_steps=4, step_size=0.2))
    assert type(cd) is Langevin and cd.n_steps == 4 and cd.step_size == 0.2
    pcd = build_sampler(RunConfig(loss="pcd", sampler="langevin", sampler_steps=4, buffer_size=33, step_size=0.2))
    assert type(pcd) is PersistentSampler and pcd.n_steps == 4 and pcd.buffer.capacity == 33
    assert pcd.mcmc.step_size == 0.2
    assert pcd.buffer.space == Continuous(2)
    learned = build_sampler(RunConfig(loss="pcd", sampler="flowmc", batch=9))
    assert type(learned) is FlowMC and learned.n_chains == 9
    fl = build_sampler(RunConfig(loss="ed", sampler="flowmc", batch=6))
    assert type(fl) is FlowMC and fl.n_chains == 6
    # evaluation sampler
    assert build_eval_sampler(RunConfig(sampler="flowmc"), fl) is fl
    ev = build_eval_sampler(RunConfig(sampler="mala", eval_steps=9, step_size=0.4), fl)
    assert type(ev) is MALA and ev.n_steps == 9 and ev.n_warmup == 4 and ev.step_size == 0.4
    assert build_eval_sampler(RunConfig(sampler="hmc", eval_steps=10), None).n_warmup == 5


def test_build_eval_sampler_without_trained_learned_sampler():
    """build_eval_sampler: a learned sampler name with nothing trained is an error (not an MCMC)."""
    from ebmflow.training.registry import ComponentError, RunConfig, build_eval_sampler

    with pytest.raises(ComponentError, match="'flowmc' is not an MCMC sampler"):
        build_eval_sampler(RunConfig(sampler="flowmc", eval_steps=8), None)


def test_build_loss_and_energy_and_data():
    """build_loss/build_energy/build_data: settings passed through, seeds and encodings."""
    from ebmflow.data import gray_encode, toy_2d
    from ebmflow.losses import ContrastiveDivergence, DenoisingScoreMatching, EnergyDiscrepancy
    from ebmflow.training.registry import RunConfig, build_data, build_energy, build_loss

    ed = build_loss(RunConfig(loss="ed", t=0.7, w=2.0))
    assert type(ed) is EnergyDiscrepancy and ed.m == 4 and ed.w == 2.0 and ed.perturbation.t == 0.7
    assert build_loss(RunConfig(loss="ed", m=9)).m == 9
    edg = build_loss(RunConfig(loss="ed", encoding="gray", eps=0.2, w=3.0))
    assert edg.m == 32 and edg.w == 3.0 and edg.perturbation.eps == 0.2
    assert build_loss(RunConfig(loss="ed", encoding="gray", m=5)).m == 5
    cd = build_loss(RunConfig(loss="cd", alpha=0.3))
    assert type(cd) is ContrastiveDivergence and cd.alpha == 0.3 and cd.init == "data"
    assert build_loss(RunConfig(loss="pcd")).init == "default"
    dsm = build_loss(RunConfig(loss="dsm", dsm_sigma=0.25))
    assert type(dsm) is DenoisingScoreMatching and dsm.sigma == 0.25
    e = build_energy(RunConfig(hidden=[5, 3]))
    assert _shapes(e) == _shapes(MLPEnergy(Continuous(2), hidden=(5, 3)))
    assert build_energy(RunConfig(encoding="gray", hidden=[4])).space == Binary(32)
    tr, te, tr2, te2 = build_data(RunConfig(n_train=20, n_test=10, seed=3))
    assert torch.equal(tr, toy_2d("8gaussians", 20, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(te, toy_2d("8gaussians", 10, generator=torch.Generator().manual_seed(10_010)))
    assert tr is tr2 and te is te2
    g_tr, g_te, g_tr2, g_te2 = build_data(RunConfig(n_train=20, n_test=10, seed=3, encoding="gray"))
    assert torch.equal(g_tr, gray_encode(tr, 16)) and torch.equal(g_te, gray_encode(te, 16))
    assert torch.equal(g_tr2, tr) and torch.equal(g_te2, te)


def test_eval_init():
    """eval_init: a Gaussian with the data's mean and std (continuous), None for bits."""
    from ebmflow.training.registry import RunConfig, eval_init

    train = torch.tensor([[0.0, 10.0], [2.0, 14.0], [4.0, 12.0]])
    got = eval_init(RunConfig(), train, 4, torch.Generator().manual_seed(5))
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, torch.tensor([2.0, 12.0]) + torch.tensor([2.0, 2.0]) * z)
    assert eval_init(RunConfig(encoding="gray"), train, 4, torch.Generator()) is None


# -- resume ----------------------------------------------------------------------------------
def _extra_frames(module, fn):
    """mutmut calls every function through a trampoline: two more frames below the caller."""
    return 2 if hasattr(module, f"x_{fn}__mutmut_orig") else 0


class _Settings(nn.Module):
    def __init__(self, n_steps=10, step_size=0.1):
        super().__init__()
        self.n_steps = n_steps
        self.step_size = step_size
        self.kind = "a"
        self._hidden = 1
        self.obj = [1]
        self.inner = nn.Module()
        self.inner.rate = 0.5
        self.empty = nn.Module()


def test_scalar_attributes():
    """scalar_attributes: public numbers/strings/None per submodule ('.' for the module)."""
    from ebmflow.training.resume import scalar_attributes

    assert scalar_attributes(None) == {}
    m = _Settings()
    m.none = None
    assert scalar_attributes(m) == {".": {"n_steps": 10, "step_size": 0.1, "kind": "a", "none": None},
                                    "inner": {"rate": 0.5}}


def test_apply_changed_arguments_new_arguments_win():
    """With the saved run's arguments: changed ones take the new value, with one warning."""
    from ebmflow.training import resume

    m = _Settings(n_steps=99, step_size=0.7)  # restored values
    m.inner.rate = 0.9
    built = {".": {"n_steps": 20, "step_size": 0.1, "kind": "a"}, "inner": {"rate": 0.25},
             "ghost": {"x": 1}}
    saved = {".": {"n_steps": 10, "step_size": 0.1}, "inner": {"rate": 0.5}, "ghost": {"x": 2}}

    def level2():
        return resume.apply_changed_arguments(m, "sampler", built, saved, {}), inspect.currentframe().f_lineno

    def level3():
        return level2()

    def level4():
        return level3(), inspect.currentframe().f_lineno

    with pytest.warns(UserWarning) as rec:
        ((lines, line2), line4) = level4()
    assert lines == ["sampler.n_steps: checkpoint 10 -> using the new argument 20",
                     "sampler.inner.rate: checkpoint 0.5 -> using the new argument 0.25"]
    assert m.n_steps == 20 and m.step_size == 0.7 and m.inner.rate == 0.25
    assert len(rec) == 1 and rec[0].category is UserWarning
    assert str(rec[0].message) == (
        "resuming: sampler settings differ from the checkpoint (arguments changed since the saved run win "
        "over the checkpoint): " + "; ".join(lines))
    # stacklevel=4: the caller of the caller of restore_trainer's caller (level4 here)
    assert rec[0].filename == __file__
    assert rec[0].lineno == (line2 if _extra_frames(resume, "apply_changed_arguments") else line4)
    # a submodule the saved run did not record: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume.apply_changed_arguments(m, "loss", {"inner": {"rate": 3.0}}, {}, {}) == []
    assert m.inner.rate == 0.25


def test_apply_changed_arguments_old_checkpoint_values_win():
    """Without the saved run's arguments: the checkpoint wins; differences are named."""
    from ebmflow.training import resume

    m = _Settings(n_steps=99)  # restored
    m.inner.rate = 0.9
    before = {".": {"n_steps": 5, "step_size": 0.1, "gone": 3}, "inner": {"rate": 0.5}, "ghost": {"y": 1}}
    with pytest.warns(UserWarning) as rec:
        lines = resume.apply_changed_arguments(m, "ema", {".": {"n_steps": 1}}, None, before)
    assert lines == ["ema.n_steps: this run's 5 -> using the checkpoint's 99",
                     "ema.inner.rate: this run's 0.5 -> using the checkpoint's 0.9"]
    assert m.n_steps == 99
    assert str(rec[0].message) == (
        "resuming: ema settings differ from the checkpoint (this checkpoint does not record the saved run's "
        "arguments, so its values win; set the attribute after load_checkpoint() to change it): "
        + "; ".join(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume.apply_changed_arguments(m, "ema", {}, None, {".": {"n_steps": 99}}) == []


# -- state (Trainer checkpoints) -------------------------------------------------------------
class Chains(Sampler):
    """A sampler with a buffer, a float attribute and a counter."""

    def __init__(self, step_size=0.1):
        super().__init__()
        self.register_buffer("chains", torch.zeros(4, 2))
        self.step_size = step_size
        self.updates = 0

    def update(self, energy, data=None):
        self.updates += 1
        self.chains.add_(1.0)
        return {}

    def sample(self, energy, n=None, *, x0=None, generator=None):
        return self.chains[:n].clone()


class AttrLoss(PosLoss):
    """PosLoss with a plain attribute (restored from checkpoints)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale


def _trainer(tmp_path=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("tensorboard", False)
    kw.setdefault("threads", None)
    energy = kw.pop("energy", None) or Quadratic()
    loss = kw.pop("loss", None) or AttrLoss()
    return Trainer(energy, loss, out_dir=tmp_path, **kw)


def test_trainer_state_dict_contents(monkeypatch):
    """trainer_state_dict: every entry, with the values of the trainer."""
    from ebmflow._version import __version__
    from ebmflow.training.distributed import DistInfo
    from ebmflow.training.state import CHECKPOINT_FORMAT, trainer_state_dict

    tr = _trainer(sampler=Chains(), ema=0.5, config={"a": 1})
    tr.step, tr.data_seed = 3, 11
    st = trainer_state_dict(tr)
    assert set(st) == {"format", "ebmflow_version", "step", "data_seed", "world_size", "energy", "energy_class",
                       "optimizer", "scheduler", "ema", "sampler", "loss", "rng", "config", "constructed"}
    assert st["format"] == CHECKPOINT_FORMAT == 1 and st["ebmflow_version"] == __version__
    assert st["step"] == 3 and st["data_seed"] == 11 and st["world_size"] == 1
    assert st["energy_class"] == "Quadratic" and st["config"] == {"a": 1}
    assert st["loss"]["attributes"]["."]["scale"] == 1.0
    assert st["sampler"]["attributes"]["."]["step_size"] == 0.1
    assert st["scheduler"] is None and st["ema"] is not None
    assert set(st["rng"]) == {"torch"}
    assert st["constructed"] == tr._built
    plain = trainer_state_dict(_trainer())
    assert plain["sampler"] is None and plain["ema"] is None
    # data parallel: every rank's RNG state, gathered
    import torch.distributed as tdist

    def gather(out, obj):
        assert out == [None, None]
        out[0], out[1] = obj, {"torch": torch.zeros(1)}

    monkeypatch.setattr(tdist, "all_gather_object", gather)
    tr.dist = DistInfo(rank=0, world_size=2)
    st = trainer_state_dict(tr)
    assert list(st["rng"]) == ["ranks"] and len(st["rng"]["ranks"]) == 2
    assert torch.equal(st["rng"]["ranks"][0]["torch"], torch.get_rng_state())
    assert st["world_size"] == 2


def test_save_trainer_paths_and_messages(tmp_path):
    """save_checkpoint: an explicit path, the default path, or a clear error without either."""
    tr = _trainer()
    with pytest.raises(ValueError, match=r"^no checkpoint path: pass path=\.\.\. or build the Trainer with out_dir$"):
        tr.save_checkpoint()
    assert tr.save_checkpoint(tmp_path / "x.pt") == tmp_path / "x.pt"
    assert (tmp_path / "x.pt").is_file() and tr.last_checkpoint == tmp_path / "x.pt"
    tr2 = _trainer(tmp_path / "run")
    assert tr2.save_checkpoint() == tmp_path / "run" / "checkpoint.pt"
    assert tr2.save_checkpoint(str(tmp_path / "y.pt")) == tmp_path / "y.pt"
    with torch.no_grad():
        tr2.energy.a.fill_(float("nan"))
    with pytest.raises(Exception, match=r"the energy's parameters are NaN/inf at step 0; not writing a checkpoint "
                                        r"\(the last good one is .*y\.pt\)"):
        tr2.save_checkpoint()


def test_restore_trainer_round_trip(tmp_path):
    """restore: energy, optimiser, EMA, sampler and loss state, step, seed and RNG come back."""
    src = _trainer(sampler=Chains(step_size=0.3), ema=0.5, loss=AttrLoss(scale=2.0))
    src.fit(torch.randn(8, 2), steps=3, batch_size=4)
    src.sampler.step_size = 0.35
    src.loss.scale = 2.5
    path = src.save_checkpoint(tmp_path / "c.pt")
    a = torch.rand(3)
    dst = _trainer(sampler=Chains(step_size=0.3), ema=0.5, loss=AttrLoss(scale=2.0))
    torch.manual_seed(123)
    dst.load_checkpoint(path)
    assert torch.equal(torch.rand(3), a)
    assert dst.step == 3 and dst.step_stats.step_t.item() == 3 and dst.data_seed == src.data_seed
    assert dst.last_checkpoint == Path(path) and isinstance(dst.last_checkpoint, Path)
    assert dst.energy.a.item() == src.energy.a.item()
    assert dst.ema.module.a.item() == src.ema.module.a.item() and dst.ema.num_updates == 3
    assert torch.equal(dst.sampler.chains, src.sampler.chains) and dst.sampler.updates == 3
    assert dst.sampler.step_size == 0.35 and dst.loss.scale == 2.5
    assert dst.optimizer.state_dict()["state"][0]["step"] == src.optimizer.state_dict()["state"][0]["step"]


def test_restore_trainer_into_a_trainer_with_fewer_parts(tmp_path):
    """A checkpoint with a scheduler, EMA and sampler loads into a Trainer without them."""
    src = _trainer(sampler=Chains(), ema=0.5, scheduler="cosine")
    src.fit(torch.randn(8, 2), steps=2, batch_size=4)
    path = src.save_checkpoint(tmp_path / "c.pt")
    dst = _trainer()
    dst.load_checkpoint(path)
    assert dst.step == 2 and dst.scheduler is None and dst.ema is None and dst.sampler is None
    # an EMA set after construction: nothing recorded at construction, nothing to compare
    late = _trainer()
    late.ema = EMA(late.energy, decay=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        late.load_checkpoint(path)
    assert late.ema.num_updates == 2


def test_restore_trainer_messages(tmp_path):
    """restore: not a Trainer checkpoint, another energy, another sampler/loss: clear errors."""
    src = _trainer(sampler=Chains())
    path = src.save_checkpoint(tmp_path / "c.pt")
    for bad in ({"format": 1}, {"format": 2, "energy": {}}):
        atomic_save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError) as err:
            _trainer().load_checkpoint(tmp_path / "bad.pt")
        assert str(err.value) == f"{tmp_path / 'bad.pt'} is not an ebmflow Trainer checkpoint"
    with pytest.raises(CheckpointError) as err:
        _trainer(energy=MLPEnergy(Continuous(2), hidden=(3,))).load_checkpoint(path)
    assert str(err.value).startswith("the checkpoint's energy (Quadratic) does not match MLPEnergy: Error(s) in "
                                     "loading state_dict for MLPEnergy:")

    class OtherChains(Chains):
        def __init__(self):
            super().__init__()
            self.register_buffer("extra", torch.zeros(1))

    with pytest.raises(CheckpointError, match=r"^the checkpoint's sampler does not match this sampler \(OtherChains\)"):
        _trainer(sampler=OtherChains()).load_checkpoint(path)

    class BufLoss(AttrLoss):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(1))

    with pytest.raises(CheckpointError, match=r"^the checkpoint's loss does not match this loss \(BufLoss\)"):
        _trainer(loss=BufLoss()).load_checkpoint(path)


def test_restore_trainer_rng_of_this_rank(tmp_path):
    """A data-parallel checkpoint gives each rank its own RNG state (rank 0's if missing)."""
    from ebmflow.training.distributed import DistInfo

    src = _trainer()
    path = src.save_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state()})
    ckpt["rng"] = {"ranks": states}
    atomic_save(ckpt, tmp_path / "ranks.pt")

    def next_draw(rank):
        tr = _trainer()
        tr.dist = DistInfo(rank=rank, world_size=1)
        tr.load_checkpoint(tmp_path / "ranks.pt")
        return torch.rand(2)

    def first_draw(seed):
        torch.manual_seed(seed)
        return torch.rand(2)

    assert torch.equal(next_draw(1), first_draw(2))
    assert torch.equal(next_draw(0), first_draw(1))
    assert torch.equal(next_draw(2), first_draw(3))
    assert torch.equal(next_draw(3), first_draw(1))
    assert torch.equal(next_draw(7), first_draw(1))


def test_restore_with_an_empty_constructed_record(tmp_path):
    """A checkpoint whose 'constructed' record lacks the loss: no argument counts as changed."""
    src = _trainer(loss=AttrLoss(scale=1.0))
    path = src.save_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["constructed"] = {}
    atomic_save(ckpt, tmp_path / "e.pt")
    dst = _trainer(loss=AttrLoss(scale=5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst.load_checkpoint(tmp_path / "e.pt")
    assert dst.loss.scale == 1.0
    # no record at all (older checkpoints): the checkpoint wins and the difference is named
    ckpt["constructed"] = None
    atomic_save(ckpt, tmp_path / "old.pt")
    dst = _trainer(loss=AttrLoss(scale=5.0))
    with pytest.warns(UserWarning, match=r"loss\.scale: this run's 5\.0 -> using the checkpoint's 1\.0"):
        dst.load_checkpoint(tmp_path / "old.pt")
    assert dst.loss.scale == 1.0


# -- threads ---------------------------------------------------------------------------------
def test_cores_and_free_cores(monkeypatch):
    """_cores: the affinity set, else cpu_count (1 when unknown); free_cores from the load."""
    from ebmflow.training import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert threads._cores() == 3

    def no_affinity(pid):
        raise OSError

    monkeypatch.setattr(threads.os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: None)
    assert threads._cores() == 1
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 6)
    assert threads._cores() == 6
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert threads.free_cores() == (4, 2.4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    assert threads.free_cores() == (4, 2.5)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.free_cores() == (3, 2.6)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.free_cores() == (1, 9.0)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.free_cores() == (6, 0.0)

    def no_load():
        raise OSError

    monkeypatch.setattr(threads.os, "getloadavg", no_load)
    assert threads.free_cores() == (6, None)


def test_user_set_threads(monkeypatch):
    """user_set_threads: the environment variable, a set_num_threads call, or None."""
    from ebmflow.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_THREADS_AT_IMPORT", torch.get_num_threads())
    assert threads.user_set_threads() is None
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert threads.user_set_threads() == "MKL_NUM_THREADS=3 is set"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.user_set_threads() == "OMP_NUM_THREADS=2 is set"
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.delenv("MKL_NUM_THREADS")
    assert threads.user_set_threads() is None
    monkeypatch.setattr(threads, "_THREADS_AT_IMPORT", torch.get_num_threads() + 1)
    assert threads.user_set_threads() == "torch.set_num_threads was called"


def test_choose_threads_every_branch(monkeypatch):
    """choose_threads: None, ints, 'auto' on GPU, a user setting, and the load-based choice."""
    from ebmflow.training import threads

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert threads.choose_threads(None, cpu, 10) == threads.ThreadChoice(
        None, False, "threads=None: keeping torch's setting (8)")
    assert threads.choose_threads(3, cpu, 10) == threads.ThreadChoice(3, True, "threads=3 (as given)")
    assert threads.choose_threads(8, cpu, 10) == threads.ThreadChoice(8, False, "threads=8 (as given)")
    assert threads.choose_threads(1, cpu, 10).threads == 1
    for bad in (True, "x", 1.5):
        with pytest.raises(ValueError) as err:
            threads.choose_threads(bad, cpu, 10)
        assert str(err.value) == (f"threads must be 'auto', a positive int or None, got {bad!r}; e.g. threads=1 "
                                  "for small models on a shared machine")
    with pytest.raises(ValueError, match=r"^threads must be a positive int, got 0; e\.g\. threads=1$"):
        threads.choose_threads(0, cpu, 10)
    assert threads.choose_threads("auto", torch.device("cuda"), 10) == threads.ThreadChoice(
        None, False, "threads='auto': cuda run, keeping torch's setting (8)")
    monkeypatch.setattr(threads, "user_set_threads", lambda: "OMP_NUM_THREADS=2 is set")
    assert threads.choose_threads("auto", cpu, 10) == threads.ThreadChoice(
        None, False, "threads='auto': keeping 8 (OMP_NUM_THREADS=2 is set)")
    monkeypatch.setattr(threads, "user_set_threads", lambda: None)
    monkeypatch.setattr(threads, "_cores", lambda: 16)
    monkeypatch.setattr(threads, "free_cores", lambda: (6, 10.0))
    assert threads.choose_threads("auto", cpu, 999_999) == threads.ThreadChoice(
        4, True, "threads='auto' chose 4 (16 cores, 1-min load 10.0, small energy (999,999 parameters); "
                 "torch default 8)")
    assert threads.choose_threads("auto", cpu, 1_000_000) == threads.ThreadChoice(
        6, True, "threads='auto' chose 6 (16 cores, 1-min load 10.0; torch default 8)")
    monkeypatch.setattr(threads, "free_cores", lambda: (12, None))
    assert threads.choose_threads("auto", cpu, 2_000_000) == threads.ThreadChoice(
        8, False, "threads='auto' chose 8 (16 cores; torch default 8)")
    monkeypatch.setattr(threads, "free_cores", lambda: (0, 1.0))
    assert threads.choose_threads("auto", cpu, 2_000_000).threads == 1


def test_warn_if_oversubscribed(monkeypatch):
    """warn_if_oversubscribed: once, only for small CPU models with more threads than free cores."""
    from ebmflow.training import threads

    monkeypatch.setattr(threads, "_warned", False)
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "free_cores", lambda: (1, 1.96))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = torch.device("cpu")
    assert threads.warn_if_oversubscribed(10, torch.device("meta")) is False
    assert threads.warn_if_oversubscribed(1_000_000, cpu) is False
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert threads.warn_if_oversubscribed(10, cpu) is False
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads, "free_cores", lambda: (2, 0.1))
    assert threads.warn_if_oversubscribed(10, cpu) is False
    monkeypatch.setattr(threads, "free_cores", lambda: (1, None))
    assert threads.warn_if_oversubscribed(10, cpu) is False
    monkeypatch.setattr(threads, "free_cores", lambda: (1, 1.96))

    def caller():
        return threads.warn_if_oversubscribed(12_345, cpu), inspect.currentframe().f_lineno

    def outer():
        return caller(), inspect.currentframe().f_lineno

    with pytest.warns(RuntimeWarning) as rec:
        ((warned, line_caller), line_outer) = outer()
    assert warned is True and threads._warned is True
    assert str(rec[0].message) == (
        "a small energy (12,345 parameters) trains with 2 CPU threads while the 1-minute load average is 2.0 on "
        "2 cores: small ops run far slower multi-threaded on busy cores (up to 10x); use Trainer(threads='auto') "
        "or 1, or torch.set_num_threads(1)")
    assert rec[0].category is RuntimeWarning
    if _extra_frames(threads, "warn_if_oversubscribed"):  # stacklevel=3 lands in mutmut's trampoline
        assert rec[0].filename.endswith("trampoline.py") and line_caller > 0
    else:
        assert rec[0].filename == __file__ and rec[0].lineno == line_outer
    assert threads.warn_if_oversubscribed(12_345, cpu) is False  # once per process
    monkeypatch.setattr(threads, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"^a small energy \(999,999 parameters\)"):
        assert threads.warn_if_oversubscribed(999_999, cpu) is True


# -- setup -----------------------------------------------------------------------------------
def test_resolve_device(monkeypatch):
    """resolve_device: the energy's device by default, an explicit device, CUDA checks."""
    from ebmflow.training.distributed import DistInfo
    from ebmflow.training.setup import resolve_device

    one = DistInfo()
    assert resolve_device(Quadratic(), None, one) == torch.device("cpu")
    assert resolve_device(NoParams(), None, one) == torch.device("cpu")
    assert resolve_device(MetaEnergy(), None, one) == torch.device("meta")
    assert resolve_device(Quadratic(), "meta", one) == torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='cuda' but no CUDA GPU is available; use device='cpu'$"):
        resolve_device(Quadratic(), "cuda", one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(d))
    assert resolve_device(Quadratic(), "cuda", one) == torch.device("cuda", 3)
    assert resolve_device(Quadratic(), "cuda:1", one) == torch.device("cuda", 1)
    assert resolve_device(Quadratic(), "cuda:1", DistInfo(rank=1, world_size=2, local_rank=2)) == torch.device("cuda", 2)
    assert resolve_device(Quadratic(), "cuda", DistInfo(rank=0, world_size=1, local_rank=5)) == torch.device("cuda", 3)
    assert current == [torch.device("cuda", 3), torch.device("cuda", 1), torch.device("cuda", 2),
                       torch.device("cuda", 3)]


def test_build_optimizer_and_scheduler():
    """build_optimizer/build_scheduler: what each spec gives, and the messages."""
    from ebmflow.training.setup import build_optimizer, build_scheduler

    e = Quadratic()
    params = list(e.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    assert build_optimizer(opt, params, 1e-3, False, torch.device("cpu")) is opt
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"^optimizer does not update any parameter of the energy; build it from "
                                         r"energy\.parameters\(\)$"):
        build_optimizer(other, params, 1e-3, False, torch.device("cpu"))
    made = build_optimizer(lambda p: torch.optim.SGD(p, lr=0.5), params, 1e-3, False, torch.device("cpu"))
    assert isinstance(made, torch.optim.SGD) and made.param_groups[0]["params"] == params
    with pytest.raises(ValueError, match=r"^optimizer must be a torch Optimizer, a function params -> Optimizer, or "
                                         r"None; got str$"):
        build_optimizer("adam", params, 1e-3, False, torch.device("cpu"))
    adam = build_optimizer(None, params, 0.02, False, torch.device("cpu"))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.02
    fast = build_optimizer(None, params, 0.03, True, torch.device("cpu"))
    lr = fast.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(0.03)
    assert fast.param_groups[0]["capturable"] is True
    assert build_scheduler(None, adam, 10) is None
    assert build_scheduler("constant", adam, 10) is None
    cos = build_scheduler("cosine", adam, 10)
    assert isinstance(cos, torch.optim.lr_scheduler.CosineAnnealingLR) and cos.T_max == 10
    assert build_scheduler("cosine", torch.optim.SGD(params, lr=1.0), 0).T_max == 1
    with pytest.raises(ValueError, match=r"^unknown scheduler 'linear'; use 'cosine', 'constant', an LRScheduler "
                                         r"or a function$"):
        build_scheduler("linear", adam, 10)
    step = torch.optim.lr_scheduler.StepLR(adam, 3)
    assert build_scheduler(step, adam, 10) is step
    assert isinstance(build_scheduler(lambda o: torch.optim.lr_scheduler.StepLR(o, 2), adam, 10),
                      torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ValueError, match=r"^scheduler must be None, a name, an LRScheduler or a function, got 3$"):
        build_scheduler(3, adam, 10)


# -- run_folder ------------------------------------------------------------------------------
def test_run_folder_checks(tmp_path):
    """check_run_folder: refuses an earlier run, clears it with overwrite, skips when resuming."""
    from ebmflow.training import RunExistsError
    from ebmflow.training.run_folder import check_run_folder, earlier_run_files

    ck = tmp_path / "ck.pt"
    assert earlier_run_files(None, None) == []
    assert earlier_run_files(tmp_path, ck) == []
    ck.write_bytes(b"x")
    (tmp_path / "log.jsonl").write_text("{}\n")
    assert earlier_run_files(tmp_path, ck) == [ck, tmp_path / "log.jsonl"]
    assert earlier_run_files(None, ck) == [ck]
    assert earlier_run_files(tmp_path, None) == [tmp_path / "log.jsonl"]
    assert check_run_folder(tmp_path, ck, resuming=True, overwrite=False) == []
    with pytest.raises(RunExistsError) as err:
        check_run_folder(tmp_path, ck, resuming=False, overwrite=False)
    assert str(err.value) == (
        f"{ck}, {tmp_path / 'log.jsonl'} already exist(s) from an earlier run; pass resume=True to fit() to "
        "continue that run, overwrite=True to the Trainer to replace it, or choose another out_dir")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "ev").write_text("x")
    (tmp_path / "keep.txt").write_text("x")
    removed = check_run_folder(tmp_path, ck, resuming=False, overwrite=True)
    assert removed == [ck, tmp_path / "log.jsonl", tmp_path / "tensorboard"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert check_run_folder(tmp_path, ck, resuming=False, overwrite=True) == []
    ck.write_bytes(b"x")
    assert check_run_folder(None, ck, resuming=False, overwrite=True) == [ck]
    ck.write_bytes(b"x")
    assert check_run_folder(tmp_path, ck, resuming=False, overwrite=True) == [ck]


# -- distributed (with a fake process group) ---------------------------------------------------
def test_distributed_reductions_with_a_fake_group(monkeypatch):
    """_all_reduce_mean_/all_reduce_mean/all_reduce_gradients/average_module: sums / world."""
    from ebmflow.training import distributed as d

    calls = []

    def all_reduce(t, op=None):
        calls.append((t.dtype, t.numel(), op))
        t.add_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape))  # the other rank

    monkeypatch.setattr(d.dist, "all_reduce", all_reduce)
    a, b, c = torch.zeros(2), torch.full((2, 2), 4.0), torch.zeros(3, dtype=torch.float64)
    e = torch.zeros(1)
    d._all_reduce_mean_([a, b, c, e], 2)
    assert a.tolist() == [0.0, 0.5] and b.tolist() == [[3.0, 3.5], [4.0, 4.5]]
    assert c.tolist() == [0.0, 0.5, 1.0] and e.tolist() == [3.0]
    assert calls == [(torch.float32, 7, d.dist.ReduceOp.SUM), (torch.float64, 3, d.dist.ReduceOp.SUM)]
    calls.clear()
    groups = d._grouped([a, b, c])
    assert list(groups) == [(torch.float32, torch.device("cpu")), (torch.float64, torch.device("cpu"))]
    assert groups[(torch.float32, torch.device("cpu"))][1] is b
    v = torch.tensor([2.0, 4.0])
    assert d.all_reduce_mean(v, 1) is v
    out = d.all_reduce_mean(v, 2)
    assert out.tolist() == [1.0, 2.5] and v.tolist() == [2.0, 4.0]
    assert calls == [(torch.float32, 2, d.dist.ReduceOp.SUM)]
    # gradients: a missing one becomes zeros first; world 1 is a no-op
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    p.grad = torch.full((2,), 2.0)
    d.all_reduce_gradients([p, q], 1)
    assert q.grad is None
    d.all_reduce_gradients([p, q], 2)
    assert p.grad.tolist() == [1.0, 1.5] and q.grad.tolist() == [1.0]
    d.all_reduce_gradients([], 2)
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(4.0)
    d.average_module(lin, 1)
    assert lin.weight.item() == 2.0
    d.average_module(lin, 2)
    assert lin.weight.item() == 1.0 and lin.bias.item() == 2.5
    d.average_module(nn.Module(), 2)


def test_broadcast_module_and_setup_distributed(monkeypatch):
    """broadcast_module sends parameters (and buffers unless told) from src; setup reads the env."""
    from ebmflow.training import distributed as d

    bn = nn.BatchNorm1d(2)
    d.broadcast_module(bn)  # no process group: nothing happens
    sent = []
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "broadcast", lambda t, src: sent.append((tuple(t.shape), src)))
    d.broadcast_module(bn, src=1)
    assert sent == [((2,), 1), ((2,), 1), ((2,), 1), ((2,), 1), ((), 1)]
    sent.clear()
    d.broadcast_module(bn, buffers=False)
    assert sent == [((2,), 0), ((2,), 0)]
    # an initialised group is reused
    monkeypatch.setattr(d.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(d.dist, "get_world_size", lambda: 3)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert d.setup_distributed() == d.DistInfo(1, 3, 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert d.setup_distributed() == d.DistInfo(1, 3, 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert d.setup_distributed(False) == d.DistInfo()
    assert d.setup_distributed("off") == d.DistInfo() and d.setup_distributed("none") == d.DistInfo()
    monkeypatch.setattr(d.dist, "is_initialized", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert d.setup_distributed() == d.DistInfo()
    for mode in (True, "on"):
        with pytest.raises(RuntimeError, match=r"^distributed=True but WORLD_SIZE is not set; launch with "
                                               r"`torchrun --nproc_per_node=N your_script\.py`$"):
            d.setup_distributed(mode)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert d.setup_distributed() == d.DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    inits = []
    monkeypatch.setattr(d.dist, "init_process_group", lambda backend: inits.append(backend))
    monkeypatch.setattr(d.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(d.dist, "get_world_size", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert d.setup_distributed() == d.DistInfo(0, 2, 0)
    assert d.setup_distributed(True, torch.device("cuda")) == d.DistInfo(0, 2, 0)
    assert d.setup_distributed("on", torch.device("cpu")) == d.DistInfo(0, 2, 0)
    assert inits == ["gloo", "nccl", "gloo"]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert d.setup_distributed() == d.DistInfo(0, 2, 3)
    monkeypatch.setattr(d.dist, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"^torch\.distributed is not available in this torch build$"):
        d.setup_distributed()
    info = d.DistInfo(rank=1, world_size=2)
    assert info.enabled and not info.is_main and d.DistInfo().is_main and not d.DistInfo().enabled


# -- graph (CUDA graphs, with fakes standing in for the CUDA calls) ---------------------------
def test_captured_step_and_capture_with_fakes(monkeypatch):
    """CapturedStep copies the batch in and replays; capture_step records step_fn once."""
    from ebmflow.training import graph

    class FakeGraph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    g = FakeGraph()
    static, outputs = torch.zeros(2, 2), torch.ones(3)
    step = graph.CapturedStep(g, static, outputs)
    assert step.graph is g and step.static_batch is static and step.outputs is outputs
    got = step(torch.full((2, 2), 5.0))
    assert got is outputs and g.replays == 1 and static.tolist() == [[5.0, 5.0], [5.0, 5.0]]
    class Static:
        shape = torch.Size([1])

        def copy_(self, batch, **kw):
            copies.append(kw)

    copies = []
    graph.CapturedStep(FakeGraph(), Static(), outputs)(torch.zeros(1))
    assert copies == [{"non_blocking": True}]
    with pytest.raises(ValueError, match=r"^the captured step expects batches of shape \(2, 2\), got \(3, 2\); use "
                                         r"a fixed batch size \(drop the last partial batch\)$"):
        step(torch.zeros(3, 2))
    events = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))

    class Ctx:
        def __init__(self, graph):
            events.append(("graph", type(graph).__name__))

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *a):
            events.append("exit")

    monkeypatch.setattr(torch.cuda, "graph", Ctx)
    batch = torch.full((2, 1), 3.0)

    def step_fn(b):
        events.append(("step", b.tolist(), b is batch))
        return b * 2

    cap = graph.capture_step(step_fn, batch, lambda: events.append("zero"))
    assert events == ["sync", "zero", ("graph", "FakeGraph"), "enter", ("step", [[3.0], [3.0]], False), "exit"]
    assert isinstance(cap, graph.CapturedStep) and isinstance(cap.graph, FakeGraph)
    assert torch.equal(cap.static_batch, batch) and cap.static_batch is not batch
    assert cap.outputs.tolist() == [[6.0], [6.0]]


def test_keep_tensor_lr():
    """keep_tensor_lr writes a scheduler's float lr into the group's tensor and puts it back."""
    from ebmflow.training.trainer import keep_tensor_lr

    p = nn.Parameter(torch.zeros(1))
    t = torch.tensor(0.5)
    opt = torch.optim.SGD([{"params": [p], "lr": t}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    opt.param_groups[0]["lr"] = 0.25
    opt.param_groups[1]["lr"] = 0.05
    keep_tensor_lr(opt, [t, None])
    assert opt.param_groups[0]["lr"] is t and float(t) == 0.25
    assert opt.param_groups[1]["lr"] == 0.05
    keep_tensor_lr(opt, [t, None])  # already the tensor: unchanged
    assert opt.param_groups[0]["lr"] is t and float(t) == 0.25
    u = torch.tensor(1.0)
    opt2 = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1},
                            {"params": [nn.Parameter(torch.zeros(1))], "lr": u}])
    opt2.param_groups[1]["lr"] = 0.5
    keep_tensor_lr(opt2, [None, u])
    assert opt2.param_groups[1]["lr"] is u and float(u) == 0.5


# -- trainer ---------------------------------------------------------------------------------
class NeedsSampler(PosLoss):
    requires_sampler = True


class BinaryOnly(Chains):
    def supports(self, energy):
        return isinstance(energy.space, Binary)


def test_trainer_argument_checks():
    """Trainer: every refused argument gets its exact message."""
    e = Quadratic()

    def refuse(msg, *args, **kw):
        with pytest.raises(ValueError) as err:
            Trainer(*args, **kw)
        assert str(err.value) == msg

    refuse("energy must be an ebmflow EnergyModel, got Linear", nn.Linear(1, 1), PosLoss())
    refuse("loss must be an ebmflow EBMLoss (e.g. EnergyDiscrepancy, ContrastiveDivergence), got Linear",
           e, nn.Linear(1, 1))
    refuse("sampler must be an ebmflow Sampler or None, got Linear", e, PosLoss(), nn.Linear(1, 1))
    refuse("NeedsSampler draws its negatives from a sampler; pass sampler=... (e.g. Langevin() for continuous "
           "data, GibbsWithGradients() for binary data)", e, NeedsSampler())
    refuse("BinaryOnly cannot draw states of Continuous(2) (the energy's space); pick a sampler for this space",
           e, PosLoss(), BinaryOnly())
    refuse("on_nonfinite must be 'raise' or 'stop', got 'ignore'", e, PosLoss(), on_nonfinite="ignore")
    refuse("log_every must be a positive int, got 0", e, PosLoss(), log_every=0)
    refuse("checkpoint_every must be a positive int or None, got 0", e, PosLoss(), checkpoint_every=0)
    refuse("checkpoint_every needs out_dir or checkpoint_path", e, PosLoss(), checkpoint_every=5)
    refuse("NoParams has no trainable parameters", NoParams(), PosLoss())
    frozen = Quadratic()
    frozen.a.requires_grad_(False)
    refuse("Quadratic has no trainable parameters", frozen, PosLoss())
    Trainer(Quadratic(), NeedsSampler(), Chains(), threads=None)
    Trainer(Quadratic(), PosLoss(), log_every=1, checkpoint_every=1, checkpoint_path="unused.pt", threads=None)


def test_trainer_defaults_and_settings(tmp_path):
    """Trainer: the defaults of every setting and how each argument is stored."""
    tr = Trainer(Quadratic(), PosLoss())
    assert tr.lr == 1e-3 and tr.optimizer.param_groups[0]["lr"] == 1e-3
    assert tr.ema is None and tr.grad_clip is None and tr.amp is False and tr.compile is False
    assert tr.fast is False and tr.warmup_steps == 3 and tr.callbacks == [] and tr.out_dir is None
    assert tr.log_every == 100 and tr.checkpoint_every is None and tr.checkpoint_path is None
    assert tr.progress is True and tr.quiet is False and tr.seed is None and tr.tensorboard == "auto"
    assert tr.on_nonfinite == "raise" and tr.check_every == 1 and tr.config == {} and tr.overwrite is False
    assert tr.threads == "auto" and tr.step == 0 and tr.history == [] and tr.data_seed is None
    assert tr.last_checkpoint is None and tr.device == torch.device("cpu") and tr.dist.world_size == 1
    assert tr.scheduler is None and tr.sampler is None and tr._lr_tensors == [None]
    assert tr.params == [tr.energy.a] and tr.is_main is True and tr.eval_energy is tr.energy
    assert tr._built == {"loss": {".": {"check_data_mode": "auto"}}}
    cb = StopOnNonFinite()
    cfg = {"x": 1}
    tr = Trainer(Quadratic(), AttrLoss(), Chains(), lr=0.2, ema=0.5, grad_clip=2, amp=True, fast=True,
                 warmup_steps=0, callbacks=(cb,), out_dir=str(tmp_path), log_every=7, checkpoint_every=3,
                 quiet=True, seed=4, tensorboard=False, on_nonfinite="stop", check_every=5, config=cfg,
                 threads=2, overwrite=True, scheduler="cosine")
    assert tr.lr == 0.2 and tr.optimizer.param_groups[0]["lr"] == 0.2 and isinstance(tr.ema, EMA)
    assert tr.ema.decay == 0.5 and tr.eval_energy is tr.ema.module
    assert tr.grad_clip == 2.0 and isinstance(tr.grad_clip, float) and tr.amp is True
    assert tr.fast is False  # CPU: eager steps
    assert tr.warmup_steps == 1 and tr.callbacks == [cb] and tr.out_dir == tmp_path
    assert tr.log_every == 7 and tr.checkpoint_every == 3 and tr.checkpoint_path == tmp_path / "checkpoint.pt"
    assert tr.quiet is True and tr.progress is False and tr.seed == 4 and tr.tensorboard is False
    assert tr.on_nonfinite == "stop" and tr.check_every == 5 and tr.config == cfg and tr.config is not cfg
    assert tr.overwrite is True and tr.threads == 2 and tr.thread_choice.threads == 2
    assert tr._scheduler_spec == "cosine" and tr.scheduler is None
    assert tr._built == {"sampler": {".": {"grad_sync": None, "step_size": 0.1, "updates": 0}},
                         "loss": {".": {"check_data_mode": "auto", "scale": 1.0}},
                         "ema": {".": {"decay": 0.5, "warmup": False, "num_updates": 0}}}
    assert tr._resumable() == {"sampler": tr.sampler, "loss": tr.loss, "ema": tr.ema}
    own = EMA(Quadratic(), decay=0.7)
    assert Trainer(Quadratic(), PosLoss(), ema=own).ema is own
    t2 = Trainer(Quadratic(), PosLoss(), out_dir=tmp_path, checkpoint_path=tmp_path / "o.pt", progress=False,
                 check_every=0)
    assert t2.checkpoint_path == tmp_path / "o.pt" and t2.progress is False and t2.check_every == 1
    assert Trainer(Quadratic(), PosLoss(), device="cpu").device == torch.device("cpu")
    assert Trainer(Quadratic(), PosLoss(), check_every=3).check_every == 3


def test_trainer_fits_an_exact_quadratic(tmp_path):
    """fit: Adam steps on mean E(data); the log records, its keys and the returned record."""
    data = torch.full((8, 2), 1.0)
    tr = _trainer(tmp_path, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), log_every=2, seed=0)
    rec = tr.fit(data, steps=3, batch_size=4)
    # dE/da = 0.5 * |x|^2 = 1 for every row: a = 1 - 3 * 0.1
    assert tr.energy.a.item() == pytest.approx(0.7)
    assert tr.step == 3 and rec["step"] == 3
    assert [h["step"] for h in tr.history] == [2, 3]
    first = tr.history[0]
    assert set(first) == {"step", "loss", "energy_pos", "lr", "it_per_s", "threads", "threads_reason"}
    assert first["loss"] == pytest.approx((0.9 + 1.0) / 2) and first["lr"] == 0.1
    assert first["threads"] == torch.get_num_threads()
    assert first["threads_reason"] == tr.thread_choice.reason
    assert "threads_reason" not in tr.history[1]
    assert tr.history[1]["loss"] == pytest.approx(0.8)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3] and lines[1]["loss"] == pytest.approx(0.8)
    assert (tmp_path / "checkpoint.pt").is_file() and tr.last_checkpoint == tmp_path / "checkpoint.pt"
    assert not (tmp_path / "tensorboard").exists()


def test_fit_argument_checks_and_resume(tmp_path):
    """fit: steps checked; an earlier run refused, resumed or continued by the same Trainer."""
    from ebmflow.training import RunExistsError

    data = torch.randn(8, 2)
    tr = _trainer(tmp_path, log_every=1)
    for bad in (-1, 2.0, "3"):
        with pytest.raises(ValueError, match=rf"^steps must be a non-negative int, got {bad!r}$"):
            tr.fit(data, steps=bad)
    tr.fit(data, steps=2, batch_size=4)
    tr.fit(data, steps=3, batch_size=4)  # its own run: continues
    assert tr.step == 3
    with pytest.raises(RunExistsError):
        _trainer(tmp_path).fit(data, steps=4, batch_size=4)
    again = _trainer(tmp_path, log_every=1)
    again.fit(data, steps=4, batch_size=4, resume=True)
    assert again.step == 4
    fresh = _trainer(tmp_path, overwrite=True, log_every=1)
    fresh.fit(data, steps=1, batch_size=4)
    assert fresh.step == 1 and len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    other = _trainer(tmp_path / "none", log_every=1)
    other.fit(data, steps=1, batch_size=4, resume=True)  # nothing to resume: starts
    assert other.step == 1
    elsewhere = _trainer(tmp_path / "b", log_every=1)
    elsewhere.fit(data, steps=5, batch_size=4, resume=tmp_path / "checkpoint.pt")
    assert elsewhere.step == 5
    zero = _trainer(tmp_path / "z")
    assert zero.fit(data, steps=0, batch_size=4) == {}


def test_fit_data_checks_and_seeds(tmp_path):
    """_prepare_data: data type checked; the data seed from seed, else drawn once."""
    tr = _trainer()
    with pytest.raises(ValueError, match=r"^data must be a Tensor, a torch Dataset or a DataLoader, got list$"):
        tr.fit([[0.0, 0.0]], steps=1)
    with pytest.raises(ValueError, match=r"^data has shape \(4, 3\) but Continuous\(2\) expects \(B, 2\)"):
        tr.fit(torch.zeros(4, 3), steps=1, batch_size=2)  # not states of Continuous(2)
    seeded = _trainer(seed=5)
    seeded.fit(torch.randn(8, 2), steps=1, batch_size=4)
    assert seeded.data_seed == 5
    torch.manual_seed(0)
    expected = int(torch.randint(0, 2**31 - 1, (1,)))
    torch.manual_seed(0)
    free = _trainer()
    free.fit(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), steps=1, batch_size=4)
    assert free.data_seed == expected
    free.fit(torch.randn(8, 2), steps=2, batch_size=4)
    assert free.data_seed == expected
    ds = _trainer()
    ds.fit(TensorDataset(torch.ones(8, 2), torch.zeros(8)), steps=2, batch_size=4)
    assert ds.step == 2
    dl = _trainer()
    dl.fit(DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2), steps=5, batch_size=None)
    assert dl.step == 5


def test_fit_seed_gives_repeatable_runs():
    """fit with a seed: torch is seeded with seed + rank, so two runs agree exactly."""

    def run():
        tr = _trainer(seed=3, sampler=Chains(), loss=NoisyLoss())
        tr.fit(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)), steps=3, batch_size=4)
        return tr.energy.a.item(), torch.rand(1).item()

    a = run()
    torch.manual_seed(99)
    b = run()
    assert a == b
    torch.manual_seed(3)
    r = torch.rand(1).item()
    tr = _trainer(seed=3)
    tr._seeded = True
    data = torch.randn(8, 2)
    torch.manual_seed(3)
    tr.fit(data, steps=0, batch_size=4)
    assert torch.rand(1).item() == r


class NoisyLoss(PosLoss):
    """Uses the global RNG (so seeding matters)."""

    def forward(self, energy, data, sampler=None):
        pos = energy(data + torch.randn_like(data)).mean()
        return LossOutput(pos, {"energy_pos": pos.detach(), "vec": torch.ones(2), "num": 3.0})


def test_step_stats_and_callbacks_see_each_step():
    """_step_math: loss, 0-d loss stats, grad_norm with clipping, sampler stats and updates."""
    seen = []

    class StatsSampler(Chains):
        def update(self, energy, data=None):
            super().update(energy, data)
            return {"fit_loss": torch.tensor(0.5), "note": 1.0}

        def sample(self, energy, n=None, *, x0=None, generator=None):
            self.stats = {"accept_rate": torch.tensor(0.25), "per_chain": torch.ones(3),
                          "energy_pos": torch.tensor(9.0)}
            return super().sample(energy, n)

    class UsesSampler(NoisyLoss):
        requires_sampler = True

        def forward(self, energy, data, sampler=None):
            sampler.sample(energy, 2)
            out = super().forward(energy, data, sampler)
            return LossOutput(out.loss, {**out.stats, "two": torch.ones(1, 1) * 2})

    tr = _trainer(sampler=StatsSampler(), loss=UsesSampler(), grad_clip=0.001, seed=0,
                  callbacks=[LambdaCallback(on_step=lambda t, s, st: seen.append((s, {k: float(v) for k, v in st.items()})))])
    tr.fit(torch.ones(8, 2), steps=2, batch_size=4)
    step, stats = seen[0]
    assert step == 1
    # the loss's energy_pos is kept; the sampler's one of the same name is not added
    assert list(stats) == ["sampler/fit_loss", "grad_norm", "loss", "energy_pos", "two", "sampler/accept_rate"]
    assert stats["sampler/fit_loss"] == 0.5 and stats["two"] == 2.0 and stats["sampler/accept_rate"] == 0.25
    assert stats["grad_norm"] > 0.001 and stats["loss"] == pytest.approx(stats["energy_pos"])
    assert tr.sampler.updates == 2 and seen[1][0] == 2
    assert abs(tr.energy.a.item() - 1.0) < 0.01  # clipped steps stay small


def test_amp_runs_the_loss_under_autocast():
    """amp=True runs the loss under bfloat16 autocast; False does not."""
    seen = []

    class Probe(PosLoss):
        def forward(self, energy, data, sampler=None):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(energy, data, sampler)

    _trainer(loss=Probe(), amp=True).fit(torch.ones(4, 2), steps=1, batch_size=4)
    _trainer(loss=Probe()).fit(torch.ones(4, 2), steps=1, batch_size=4)
    assert seen == [True, False]
    tr = _trainer(amp=True)
    with tr._autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_loss_must_return_a_loss_output():
    """A loss returning something else: a TypeError naming the loss."""

    class Bad(EBMLoss):
        def forward(self, energy, data, sampler=None):
            return energy(data).mean()

    with pytest.raises(TypeError, match=r"^Bad must return a LossOutput, got Tensor$"):
        _trainer(loss=Bad()).fit(torch.ones(4, 2), steps=1, batch_size=4)


def test_divergence_raises_or_stops(tmp_path):
    """A NaN loss raises TrainingDiverged naming step and key, or stops with a warning."""
    from ebmflow.training import TrainingDiverged

    class NaNAt(PosLoss):
        def __init__(self, at):
            super().__init__()
            self.at, self.n = at, 0

        def forward(self, energy, data, sampler=None):
            self.n += 1
            out = super().forward(energy, data, sampler)
            if self.n >= self.at:
                return LossOutput(out.loss * float("nan"), out.stats)
            return out

    tr = _trainer(tmp_path, loss=NaNAt(3), checkpoint_every=1, log_every=1)
    with pytest.raises(TrainingDiverged) as err:
        tr.fit(torch.ones(4, 2), steps=5, batch_size=4)
    assert str(err.value) == (
        f"training diverged: loss became NaN/inf at step 3; the last good checkpoint is "
        f"{tmp_path / 'checkpoint.pt'}. Lower the learning rate, clip gradients (grad_clip=...), or regularise "
        "the energy")
    assert tr.step == 3
    tr2 = _trainer(loss=NaNAt(2), on_nonfinite="stop")
    with pytest.warns(RuntimeWarning, match=r"^training diverged: loss became NaN/inf at step 2; no checkpoint "
                                            r"was written\. Lower"):
        tr2.fit(torch.ones(4, 2), steps=5, batch_size=4)
    assert tr2.step == 2 and tr2._stop_reason.startswith("training diverged")


def test_stop_request_and_message(capsys):
    """A callback's stop request ends fit after that step and is printed unless quiet."""
    cb = LambdaCallback(on_step=lambda t, s, st: t.request_stop("enough") if s == 2 else None)
    tr = _trainer(callbacks=[cb], progress=True)
    tr.fit(torch.ones(4, 2), steps=10, batch_size=4)
    assert tr.step == 2
    out = capsys.readouterr().out
    assert "training stopped at step 2: enough" in out
    assert f"ebmflow: CPU {tr.thread_choice.reason}" in out
    quiet = _trainer(callbacks=[cb], quiet=True)
    quiet.fit(torch.ones(4, 2), steps=10, batch_size=4)
    assert capsys.readouterr().out == ""


def test_callback_hooks_order_and_eval_report(tmp_path):
    """fit calls on_fit_start, on_step each step, on_end once; report_eval logs eval/ keys."""
    events = []
    cb = LambdaCallback(on_fit_start=lambda t: events.append("start"),
                        on_step=lambda t, s, st: events.append(("step", s)),
                        on_eval=lambda t, s, m: events.append(("eval", s, dict(m))),
                        on_end=lambda t: events.append("end"))
    ev = EvalCallback(lambda t: {"m": 1.5}, every=2)
    tr = _trainer(tmp_path, callbacks=[ev, cb], log_every=10)
    tr.fit(torch.ones(4, 2), steps=3, batch_size=4)
    assert events == ["start", ("step", 1), ("eval", 2, {"m": 1.5}), ("step", 2), ("step", 3),
                      ("eval", 3, {"m": 1.5}), "end"]
    evals = [h for h in tr.history if "eval/m" in h]
    assert evals == [{"step": 2, "eval/m": 1.5}, {"step": 3, "eval/m": 1.5}]
    logged = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "eval/m": 1.5} in logged


def test_report_eval_on_other_ranks():
    """report_eval: only rank 0 records; every callback hears of it with the trainer."""
    from ebmflow.training.distributed import DistInfo

    heard = []
    tr = _trainer(callbacks=[LambdaCallback(on_eval=lambda t, s, m: heard.append((t, s, m)))])
    tr.report_eval(4, {"a": 1})
    assert tr.history == [{"step": 4, "eval/a": 1.0}] and heard == [(tr, 4, {"a": 1})]
    tr.dist = DistInfo(rank=1, world_size=1)
    tr.report_eval(5, {"a": 2})
    assert len(tr.history) == 1 and heard[-1] == (tr, 5, {"a": 2})


def test_ema_and_scheduler_follow_the_steps():
    """train_step: the scheduler steps and the EMA updates once per step."""
    tr = _trainer(ema=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                  scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    tr.fit(torch.full((4, 2), 1.0), steps=2, batch_size=4)
    # a: 1 -> 0 (lr 1) -> -0.5 (lr 0.5); EMA: 0.5*1 + 0.5*0 = 0.5, then 0.5*0.5 + 0.5*(-0.5) = 0
    assert tr.energy.a.item() == pytest.approx(-0.5)
    assert tr.ema.module.a.item() == pytest.approx(0.0) and tr.ema.num_updates == 2
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    assert tr.history[-1]["lr"] == pytest.approx(0.25)


def test_logging_means_and_it_per_s(monkeypatch):
    """_log: means since the last record; it/s from the elapsed time; nan when none elapsed."""
    tr = _trainer(log_every=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    tr.fit(torch.full((4, 2), 2.0), steps=4, batch_size=4)
    assert [h["loss"] for h in tr.history] == [pytest.approx(4.0), pytest.approx(4.0)]
    tr.step_stats.pack({"loss": torch.tensor(1.0), "energy_pos": torch.tensor(1.0)})
    tr.step_stats.count = 1
    rec = tr._log(0.0, 3)
    assert math.isnan(rec["it_per_s"]) and rec["loss"] == 1.0
    tr.step_stats.pack({"loss": torch.tensor(1.0), "energy_pos": torch.tensor(1.0)})
    tr.step_stats.count = 1
    assert tr._log(0.5, 3)["it_per_s"] == 6.0


def test_threads_applied_during_fit_and_restored(monkeypatch):
    """fit sets the chosen thread count while it runs and restores the previous one."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = []
    cb = LambdaCallback(on_step=lambda t, s, st: seen.append(torch.get_num_threads()))
    tr = _trainer(threads=want, callbacks=[cb])
    tr.fit(torch.ones(4, 2), steps=1, batch_size=4)
    assert seen == [want] and torch.get_num_threads() == before
    assert tr.history[-1]["threads"] == want


def test_open_loggers(tmp_path, monkeypatch):
    """_open_loggers: JSONL with out_dir on rank 0; TensorBoard when asked or available."""
    from ebmflow.training import trainer as trainer_mod
    from ebmflow.training.distributed import DistInfo

    made = []

    class FakeTB:
        def __init__(self, log_dir):
            made.append(log_dir)

        def log(self, record):
            pass

        def close(self):
            made.append("closed")

        @staticmethod
        def available():
            return True

    monkeypatch.setattr(trainer_mod, "TensorBoardLogger", FakeTB)
    tr = _trainer(tmp_path, tensorboard=True)
    tr._open_loggers()
    assert [type(lg).__name__ for lg in tr._loggers] == ["JSONLLogger", "FakeTB"]
    assert made == [tmp_path / "tensorboard"]
    tr._close_loggers()
    assert tr._loggers == [] and made[-1] == "closed"
    auto = _trainer(tmp_path / "a", tensorboard="auto")
    auto._open_loggers()
    assert len(auto._loggers) == 2
    auto._close_loggers()
    FakeTB.available = staticmethod(lambda: False)
    auto._open_loggers()
    assert len(auto._loggers) == 1
    auto._close_loggers()
    off = _trainer(tmp_path / "o", tensorboard=False)
    off._open_loggers()
    assert [type(lg).__name__ for lg in off._loggers] == ["JSONLLogger"]
    off._close_loggers()
    none = _trainer(None, tensorboard=True)
    none._open_loggers()
    assert none._loggers == []
    rank1 = _trainer(tmp_path / "r", tensorboard=True)
    rank1.dist = DistInfo(rank=1, world_size=1)
    rank1._open_loggers()
    assert rank1._loggers == [] and not (tmp_path / "r").exists()


def test_check_every_and_checkpoint_every(tmp_path, monkeypatch):
    """check_every: divergence checked on those steps; checkpoint_every: saves on its steps."""
    from ebmflow.training import trainer as trainer_mod

    saves = []
    real = trainer_mod.save_trainer
    monkeypatch.setattr(trainer_mod, "save_trainer", lambda t, p=None: saves.append(t.step) or real(t, p))
    tr = _trainer(tmp_path, checkpoint_every=2, log_every=100)
    tr.fit(torch.ones(4, 2), steps=5, batch_size=4)
    assert saves == [2, 4, 5]
    checks = []
    tr2 = _trainer(check_every=2)
    real_check = tr2._check_finite
    tr2._check_finite = lambda: checks.append(tr2.step) or real_check()
    tr2.fit(torch.ones(4, 2), steps=5, batch_size=4)
    assert checks[:2] == [2, 4]


def test_last_stats_view_uses_the_captured_outputs():
    """_last_stats_view: the captured step's outputs when a graph is used, else the last vector."""
    tr = _trainer()
    tr._last_vec = torch.tensor([1.0, 2.0])
    assert [float(v) for v in tr._last_stats_view()] == [1.0, 2.0]

    class Cap:
        outputs = torch.tensor([3.0])

    tr._captured = Cap()
    assert [float(v) for v in tr._last_stats_view()] == [3.0]


def test_scalar_and_state_dict():
    """_scalar: detached 0-d tensors; Trainer.state_dict is trainer_state_dict."""
    from ebmflow.training.trainer import _scalar

    v = torch.ones(1, 1, requires_grad=True) * 2
    s = _scalar(v)
    assert s.dim() == 0 and float(s) == 2.0 and not s.requires_grad
    z = torch.tensor(3.0)
    assert _scalar(z).dim() == 0 and float(_scalar(z)) == 3.0
    one = _scalar(torch.ones(1))
    assert one.dim() == 0 and one.shape == torch.Size([])
    tr = _trainer(config={"k": 2})
    st = tr.state_dict()
    assert st["config"] == {"k": 2} and st["step"] == 0 and st["format"] == 1


def _fake_cuda(monkeypatch, events):
    """Stand-ins for the CUDA stream calls of fast mode (so its control flow runs on CPU)."""

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    main = Stream("main")

    class StreamCtx:
        def __init__(self, stream):
            events.append(("use", stream.name))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            events.append("leave")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: events.append(("stream", str(device))) or Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: events.append(("current", str(device))) or main)
    monkeypatch.setattr(torch.cuda, "stream", StreamCtx)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))


def test_fast_mode_warm_up_capture_and_replay(monkeypatch):
    """Fast mode: warm-up steps on a side stream, one capture, then replays (fakes for CUDA)."""
    from ebmflow.training import graph

    events = []
    _fake_cuda(monkeypatch, events)

    class Captured:
        def __init__(self, step_fn, batch):
            self.step_fn, self.outputs, self.calls = step_fn, None, 0

        def __call__(self, batch):
            self.calls += 1
            events.append("replay")
            self.outputs = self.step_fn(batch)
            return self.outputs

    def capture(step_fn, batch, zero_grad):
        p = tr.energy.a
        p.grad = torch.ones(())
        zero_grad()
        events.append(("capture", p.grad is None, tuple(batch.shape)))
        return Captured(step_fn, batch)

    monkeypatch.setattr(graph, "capture_step", capture)
    seen = []
    lr = torch.tensor(0.1)
    tr = _trainer(optimizer=lambda p: torch.optim.SGD(p, lr=lr), warmup_steps=2,
                  scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=1.0),
                  callbacks=[LambdaCallback(on_step=lambda t, s, st: seen.append({k: float(v) for k, v in st.items()}))])
    tr.fast = True
    tr.fit(torch.ones(4, 2), steps=4, batch_size=4)
    warm = [("stream", "cpu"), ("current", "cpu"), ("wait", "side", "main"), ("use", "side"), "leave",
            ("current", "cpu"), ("wait", "main", "side")]
    assert events == warm + warm + [("capture", True, (4, 2)), "replay", "replay"]
    assert tr.energy.a.item() == pytest.approx(0.6) and tr._captured.calls == 2
    assert tr.step_stats.clean is False  # captured steps do the branch-free bookkeeping
    assert [s["loss"] for s in seen] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert tr.optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1)
    assert len(tr._lr_tensors) == 1 and tr._lr_tensors[0] is lr


def test_fast_mode_falls_back_to_eager_steps(monkeypatch):
    """Fast mode: a failed capture warns (type and first line of the error) and steps eagerly."""
    from ebmflow.training import graph
    from ebmflow.training import trainer as trainer_mod

    events = []
    _fake_cuda(monkeypatch, events)
    errors = [RuntimeError("boom\nsecond line"), ValueError()]

    def capture(step_fn, batch, zero_grad):
        raise errors.pop(0)

    monkeypatch.setattr(graph, "capture_step", capture)
    for expected in ("(RuntimeError: boom)", "(ValueError: )"):
        events.clear()
        tr = _trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), warmup_steps=1)
        tr.fast = True
        data = torch.ones(4, 2)
        tr.train_step(data)
        with pytest.warns(RuntimeWarning) as rec:
            tr.train_step(data)
        assert str(rec[0].message) == (f"fast mode: the training step could not be captured as a CUDA graph "
                                       f"{expected}; continuing with eager steps")
        if hasattr(trainer_mod.Trainer, "xǁTrainerǁ_fast_step__mutmut_orig"):  # mutmut's trampoline
            assert rec[0].filename.endswith("trampoline.py")
        else:
            assert rec[0].filename == __file__
        assert tr._capture_failed is True and tr._captured is None and ("sync", "cpu") in events
        n = len(events)
        tr.train_step(data)
        assert len(events) == n and tr.step == 3
        assert tr.energy.a.item() == pytest.approx(0.7)
    # the statistics changed while capturing: also a fallback
    tr = _trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), warmup_steps=1)
    tr.fast = True

    def relayout(step_fn, batch, zero_grad):
        tr.step_stats.layout = ["other"]
        return None

    monkeypatch.setattr(graph, "capture_step", relayout)
    tr.train_step(torch.ones(4, 2))
    with pytest.warns(RuntimeWarning, match=r"\(RuntimeError: the step's statistics changed between steps\)"):
        tr.train_step(torch.ones(4, 2))


def test_trainer_under_fake_data_parallelism(monkeypatch, tmp_path):
    """Data parallel paths with a faked process group: broadcasts, all-reduces, seeds, saving."""
    import torch.distributed as tdist

    from ebmflow.training import distributed as d
    from ebmflow.training import trainer as tm

    calls, grads, avg, means, ops = [], [], [], [], []
    rank = {"r": 0}
    monkeypatch.setattr(tm, "setup_distributed",
                        lambda mode, hint: calls.append(("setup", mode, hint)) or d.DistInfo(rank["r"], 2))
    monkeypatch.setattr(tm, "broadcast_module",
                        lambda m, buffers=True: calls.append(("bcast", type(m).__name__, buffers)))
    monkeypatch.setattr(tm, "all_reduce_gradients", lambda params, world: grads.append((len(params), world)))
    monkeypatch.setattr(tm, "average_module", lambda m, world: avg.append((type(m).__name__, world)))
    monkeypatch.setattr(tm, "all_reduce_mean", lambda v, world: means.append(world) or v * 2)
    monkeypatch.setattr(tdist, "broadcast", lambda t, src: calls.append(("seed", src)) or t.fill_(77))
    monkeypatch.setattr(tdist, "all_reduce", lambda t, op=None: ops.append((op, t.numel())))
    monkeypatch.setattr(tdist, "barrier", lambda: calls.append("barrier"))

    def gather(out, obj):
        for i in range(len(out)):
            out[i] = obj

    monkeypatch.setattr(tdist, "all_gather_object", gather)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        Trainer(NoParams(), PosLoss(), threads=None, distributed=True)
    assert calls == [("setup", True, None), ("bcast", "NoParams", True)]
    calls.clear()
    Trainer(Quadratic(), PosLoss(), device="meta", threads=None)
    assert calls[0] == ("setup", "auto", torch.device("meta"))
    calls.clear()
    tr = _trainer(tmp_path, sampler=Chains(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), log_every=2)
    assert calls == [("setup", "auto", torch.device("cpu")), ("bcast", "Quadratic", True), ("bcast", "Chains", False)]
    assert tr.dist.enabled and tr.check_every == 1
    tr.sampler.grad_sync([tr.energy.a])
    assert grads == [(1, 2)]
    grads.clear()
    calls.clear()
    torch.manual_seed(5)
    tr.fit(torch.ones(8, 2), steps=2, batch_size=2)
    assert tr.data_seed == 77 and ("seed", 0) in calls
    assert grads == [(1, 2), (1, 2)] and avg == [("Chains", 2), ("Chains", 2)]
    assert means == [2] and tr.history[0]["loss"] == pytest.approx(2 * (1.0 + 0.9) / 2)
    assert (tdist.ReduceOp.MIN, 2) in ops  # the first-bad steps of "loss" and "energy_pos"
    assert calls[-1] == "barrier" and (tmp_path / "checkpoint.pt").is_file()
    assert list(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["rng"]) == ["ranks"]
    # another rank: seeded with initial_seed() + rank, writes nothing, logs nothing
    rank["r"] = 1
    other = _trainer(tmp_path / "r1", seed=None)
    torch.manual_seed(5)
    expected_seed = torch.initial_seed() + 1
    other.fit(torch.ones(8, 2), steps=1, batch_size=2)
    assert torch.initial_seed() == expected_seed
    assert other.history == [] and not (tmp_path / "r1" / "checkpoint.pt").exists()
    seeded = _trainer(None, seed=4)
    seeded.fit(torch.ones(8, 2), steps=1, batch_size=2)
    assert torch.initial_seed() == 5 and seeded.data_seed == 4


def test_compile_option_uses_static_shapes(monkeypatch):
    """compile=True wraps the loss step with torch.compile(dynamic=False)."""
    seen = []

    def fake_compile(fn, **kw):
        seen.append((fn, kw))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    tr = _trainer(compile=True)
    assert tr.compile is True and len(seen) == 1
    fn, kw = seen[0]
    assert kw == {"dynamic": False} and fn == tr._compute_loss and tr._loss_fn == tr._compute_loss
    plain = _trainer()
    assert plain._loss_fn == plain._compute_loss and len(seen) == 1


def test_apply_threads_logs_prints_and_warns(monkeypatch, caplog, capsys):
    """_apply_threads: logs the reason, prints it once at step 0, warns when threads=None."""
    import logging

    from ebmflow.training import trainer as tm

    warned = []
    monkeypatch.setattr(tm, "warn_if_oversubscribed", lambda n, dev: warned.append((n, dev)))
    tr = _trainer(threads=None, progress=True)
    with caplog.at_level(logging.INFO, logger="ebmflow.training"):
        tr.fit(torch.ones(4, 2), steps=1, batch_size=4)
    assert caplog.records[0].getMessage() == tr.thread_choice.reason
    assert capsys.readouterr().out == f"ebmflow: CPU {tr.thread_choice.reason}\n"
    assert warned == [(1, torch.device("cpu"))]
    tr.fit(torch.ones(4, 2), steps=2, batch_size=4)
    assert capsys.readouterr().out == ""
    two = _trainer(threads=1, progress=True)
    two.fit(torch.ones(4, 2), steps=1, batch_size=4)
    assert len(warned) == 2  # threads=None warns at each fit; threads=1 never
    assert capsys.readouterr().out == f"ebmflow: CPU {two.thread_choice.reason}\n"
    quiet = _trainer(threads=1)
    quiet.fit(torch.ones(4, 2), steps=1, batch_size=4)
    assert capsys.readouterr().out == ""


def test_step_stats_bookkeeping_in_detail():
    """StepStats.pack: layout changes, exact vs cheap bookkeeping, first bad step per stat."""
    s = monitor.StepStats(torch.device("cpu"))
    assert s.layout is None and s.sums is None and s.count == 0 and s.first_bad is None
    assert s.monitored is None and s.clean is True and s.step_t.dtype == torch.long and int(s.step_t) == 0
    changes = []
    vec = s.pack({"a": torch.tensor(1.0), "loss": torch.tensor(2)}, exact=False,
                 on_new_layout=lambda: changes.append("x"))
    assert changes == [] and vec.dtype == torch.float32 and vec.tolist() == [1.0, 2.0]
    assert s.layout == ["a", "loss"] and s.monitored.tolist() == [False, True]
    assert s.first_bad.tolist() == [-1, -1] and s.first_bad.dtype == torch.long
    assert s.clean is True and int(s.step_t) == 1
    s.pack({"a": torch.tensor(1.0), "loss": torch.tensor(2.0)}, exact=True)
    assert s.clean is False and s.sums.tolist() == [2.0, 4.0]
    s.count = 2
    s.pack({"b_loss": torch.tensor(float("nan")), "energy_neg": torch.tensor(1.0)}, on_new_layout=lambda: changes.append("y"))
    assert changes == ["y"] and s.count == 0
    assert math.isnan(s.sums[0]) and float(s.sums[1]) == 1.0
    assert s.layout == ["b_loss", "energy_neg"] and s.monitored.tolist() == [True, True]
    assert s.first_bad.tolist() == [3, -1] and s.clean is False
    s.pack({"b_loss": torch.tensor(float("inf")), "energy_neg": torch.tensor(float("inf"))})
    assert s.first_bad.tolist() == [3, 4]
    assert s.first_divergence() == ("b_loss", 3)
    # data parallel: the minimum over ranks; never-set entries stay unset
    seen = []

    def reduce_min(t):
        seen.append(t.clone())
        return torch.minimum(t, torch.tensor([5, 2]))

    assert s.first_divergence(reduce_min) == ("energy_neg", 2)
    never = torch.iinfo(torch.long).max
    assert seen[0].tolist() == [3, 4]
    fresh = monitor.StepStats(torch.device("cpu"))
    fresh.pack({"loss": torch.tensor(1.0), "x": torch.tensor(1.0)})
    assert fresh.first_divergence(lambda t: (seen.append(t.clone()), t)[1]) is None
    assert seen[-1].tolist() == [never, never]
    assert fresh.first_divergence(lambda t: torch.tensor([never, 7])) == ("x", 7)
    assert monitor.StepStats(torch.device("cpu")).first_divergence(lambda t: t) is None  # no step yet
    clean = monitor.StepStats(torch.device("cpu"))
    clean.pack({"loss": torch.tensor(1.0)}, exact=False)
    assert clean.first_divergence() is None
    assert clean.first_divergence(lambda t: torch.tensor([4])) == ("loss", 4)


def test_default_pack_is_exact():
    """StepStats.pack is exact (branch-free bookkeeping) unless told otherwise."""
    s = monitor.StepStats(torch.device("cpu"))
    s.pack({"loss": torch.tensor(1.0)})
    assert s.clean is False


def test_a_layout_change_checks_the_old_stats_first():
    """When the step's stats change names, a NaN recorded under the old ones still raises."""
    from ebmflow.training import TrainingDiverged

    class Shifting(PosLoss):
        def __init__(self):
            super().__init__()
            self.n = 0

        def forward(self, energy, data, sampler=None):
            self.n += 1
            pos = energy(data).mean()
            if self.n == 1:
                return LossOutput(pos, {"energy_pos": torch.tensor(float("nan"))})
            return LossOutput(pos, {"energy_pos": pos.detach(), "extra": torch.tensor(1.0)})

    tr = _trainer(loss=Shifting(), check_every=100, log_every=100)
    with pytest.raises(TrainingDiverged, match=r"^training diverged: energy_pos became NaN/inf at step 1;"):
        tr.fit(torch.ones(4, 2), steps=3, batch_size=4)
    assert tr.step == 1  # raised while packing the second step's stats


def test_cpu_steps_skip_bookkeeping_while_finite():
    """On CPU the Trainer packs with exact=False: finite steps leave the stats 'clean'."""
    tr = _trainer()
    tr.fit(torch.ones(4, 2), steps=2, batch_size=4)
    assert tr.step_stats.clean is True and int(tr.step_stats.step_t) == 2


def test_auto_threads_count_the_trainable_parameters(monkeypatch):
    """threads='auto' measures the energy by its trainable parameters (in the reason)."""
    from ebmflow.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_THREADS_AT_IMPORT", torch.get_num_threads())
    energy = MLPEnergy(Continuous(2), hidden=(8,))
    frozen = next(energy.parameters())
    frozen.requires_grad_(False)
    n = sum(p.numel() for p in energy.parameters() if p.requires_grad)
    tr = Trainer(energy, PosLoss(), threads="auto", progress=False)
    assert f"small energy ({n:,} parameters)" in tr.thread_choice.reason
    assert tr.thread_choice.reason.startswith("threads='auto' chose ")


def test_step_stats_tensors_live_on_its_device():
    """StepStats keeps its sums, masks and counters on its own device."""
    s = monitor.StepStats(torch.device("meta"))
    assert s.step_t.device.type == "meta"
    s._new_layout(["loss", "x"])
    assert s.sums.device.type == "meta" and s.monitored.device.type == "meta"
    assert s.first_bad.device.type == "meta" and s.first_bad.dtype == torch.long
    assert s.sums.shape == (2,) and s.count == 0 and s.clean is True


def test_one_process_never_averages_the_sampler(monkeypatch):
    """Without data parallelism the sampler's parameters are not averaged (no call at all)."""
    from ebmflow.training import trainer as tm

    calls = []
    monkeypatch.setattr(tm, "average_module", lambda m, world: calls.append(world))
    monkeypatch.setattr(tm, "all_reduce_gradients", lambda p, world: calls.append(world))
    tr = _trainer(sampler=Chains())
    tr.fit(torch.ones(4, 2), steps=2, batch_size=4)
    assert calls == [] and tr.sampler.updates == 2


class TwoParams(Quadratic):
    """Quadratic plus a parameter ``b`` that only some steps use."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.0))


class FirstStepUsesB(PosLoss):
    def __init__(self):
        super().__init__()
        self.n = 0

    def forward(self, energy, data, sampler=None):
        self.n += 1
        pos = energy(data).mean()
        loss = pos + energy.b if self.n == 1 else pos
        return LossOutput(loss, {"energy_pos": pos.detach()})


def test_gradients_are_reset_to_none_each_step():
    """zero_grad(set_to_none=True): a parameter without a gradient this step is left alone by Adam."""
    tr = _trainer(energy=TwoParams(), loss=FirstStepUsesB(),
                  optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    tr.fit(torch.ones(4, 2), steps=1, batch_size=4)
    b1 = tr.energy.b.item()
    assert b1 == pytest.approx(-0.1)
    tr.fit(torch.ones(4, 2), steps=3, batch_size=4)
    assert tr.energy.b.item() == b1 and tr.energy.b.grad is None


def test_fit_progress_bar_and_rates_with_a_fake_clock(monkeypatch):
    """_fit: the bar's total/start, one advance per step, shown records; it/s from a fake clock."""
    import types

    from ebmflow.training import trainer as tm

    bars = []

    class Bar:
        def __init__(self, total, initial=0, disable=False):
            self.args = (total, initial, disable)
            self.advanced, self.shown, self.closed = 0, [], False
            bars.append(self)

        def advance(self, n):
            self.advanced += n

        def show(self, record):
            self.shown.append(record["step"])

        def close(self):
            self.closed = True

    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(tm, "ProgressBar", Bar)
    monkeypatch.setattr(tm, "time", types.SimpleNamespace(perf_counter=perf_counter))
    tr = _trainer(log_every=2, progress=True)
    tr.energy.eval()
    tr.fit(torch.ones(4, 2), steps=5, batch_size=4)
    assert tr.energy.training is True
    bar = bars[0]
    assert bar.args == (5, 0, False) and bar.advanced == 5 and bar.shown == [2, 4, 5] and bar.closed
    assert [h["it_per_s"] for h in tr.history] == [2.0, 2.0, 1.0]
    tr.fit(torch.ones(4, 2), steps=6, batch_size=4)
    assert bars[1].args == (6, 5, False) and bars[1].advanced == 1
    # a stop between log steps: one more record for the steps since the last one
    cb = LambdaCallback(on_step=lambda t, s, st: t.request_stop("x") if s == 3 else None)
    stop = _trainer(log_every=2, callbacks=[cb], quiet=True)
    stop.fit(torch.ones(4, 2), steps=9, batch_size=4)
    assert [h["step"] for h in stop.history] == [2, 3]
    assert stop.history[-1]["it_per_s"] == 1.0 and bars[-1].args[2] is True and bars[-1].shown == [2]
    from ebmflow.training.distributed import DistInfo

    other = _trainer(progress=True)
    other.dist = DistInfo(rank=1, world_size=1)  # not the main process (rows 4:8 of each batch)
    other.fit(torch.ones(8, 2), steps=1, batch_size=4)
    assert bars[-1].args == (1, 0, True)


def test_every_part_moves_to_the_trainer_device():
    """device=...: energy, loss and sampler buffers, EMA and step statistics all go there."""

    class BufLoss(AttrLoss):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(1))

    tr = Trainer(Quadratic(), BufLoss(), Chains(), device="meta", ema=0.5, threads=None, progress=False)
    assert tr.device == torch.device("meta") and tr.energy.a.device.type == "meta"
    assert tr.loss.w.device.type == "meta" and tr.sampler.chains.device.type == "meta"
    assert tr.ema.module.a.device.type == "meta" and tr.step_stats.step_t.device.type == "meta"
    own = EMA(Quadratic(), decay=0.5)
    tr2 = Trainer(Quadratic(), BufLoss(), device="meta", ema=own, threads=None, progress=False)
    assert tr2.ema is own and own.module.a.device.type == "meta"


def test_fit_defaults_and_second_fit():
    """fit: batch_size 128 by default; a second fit neither reseeds nor rebuilds the schedule."""
    sizes = []

    class Sizes(PosLoss):
        def forward(self, energy, data, sampler=None):
            sizes.append(data.shape[0])
            return super().forward(energy, data, sampler)

    tr = _trainer(loss=Sizes(), seed=3, scheduler="cosine")
    tr.fit(torch.ones(300, 2), steps=1)
    assert sizes == [128] and tr.scheduler.T_max == 1
    sched = tr.scheduler
    torch.manual_seed(99)
    tr.fit(torch.ones(300, 2), steps=2)
    assert torch.initial_seed() == 99 and tr.scheduler is sched


def test_earlier_runs_seen_through_the_log_or_the_checkpoint(tmp_path):
    """An earlier run is found by its log alone or its checkpoint alone; a Trainer that ran
    (even without writing a checkpoint) may fit again."""
    from ebmflow.training import RunExistsError

    class NaNLoss(PosLoss):
        def forward(self, energy, data, sampler=None):
            out = super().forward(energy, data, sampler)
            return LossOutput(out.loss * float("nan"), out.stats)

    tr = _trainer(tmp_path / "a", loss=NaNLoss(), on_nonfinite="stop")
    with pytest.warns(RuntimeWarning):
        tr.fit(torch.ones(4, 2), steps=3, batch_size=4)
    assert tr.step == 1 and tr.last_checkpoint is None
    assert (tmp_path / "a" / "log.jsonl").is_file() and not (tmp_path / "a" / "checkpoint.pt").exists()
    with pytest.warns(RuntimeWarning):
        tr.fit(torch.ones(4, 2), steps=3, batch_size=4)  # its own run: no RunExistsError
    with pytest.raises(RunExistsError, match="log.jsonl already exist"):
        _trainer(tmp_path / "a").fit(torch.ones(4, 2), steps=1, batch_size=4)
    ck = tmp_path / "elsewhere" / "ck.pt"
    _trainer(checkpoint_path=ck).fit(torch.ones(4, 2), steps=1, batch_size=4)
    with pytest.raises(RunExistsError, match="ck.pt already exist"):
        _trainer(tmp_path / "b", checkpoint_path=ck).fit(torch.ones(4, 2), steps=1, batch_size=4)


def test_divergence_warning_points_at_fit():
    """on_nonfinite='stop': the warning is attributed to fit() (stacklevel=2 from _fit)."""
    import linecache

    from ebmflow.training import trainer as tm

    class NaNLoss(PosLoss):
        def forward(self, energy, data, sampler=None):
            out = super().forward(energy, data, sampler)
            return LossOutput(out.loss * float("nan"), out.stats)

    with pytest.warns(RuntimeWarning) as rec:
        _trainer(loss=NaNLoss(), on_nonfinite="stop").fit(torch.ones(4, 2), steps=2, batch_size=4)
    line = linecache.getline(rec[0].filename, rec[0].lineno)
    if hasattr(tm.Trainer, "xǁTrainerǁ_fit__mutmut_orig"):  # mutmut's trampoline between fit and _fit
        assert rec[0].filename.endswith("trampoline.py") and "func(*call_args, **kwargs)" in line
    else:
        assert rec[0].filename == tm.__file__ and "self._fit(stream, steps)" in line


def test_data_and_batches_go_to_the_trainer_device():
    """A tensor goes to the Trainer's device once; Dataset batches are moved there per step."""
    seen = []

    class Probe(PosLoss):
        def forward(self, energy, data, sampler=None):
            seen.append(data.device.type)
            raise RuntimeError("probe: stop after the first batch")

    tr = Trainer(Quadratic(), Probe(), device="meta", threads=None, progress=False)
    stream = tr._prepare_data(torch.ones(4, 2), 2)
    assert stream.data.device.type == "meta"
    with pytest.raises(RuntimeError, match="^probe: stop after the first batch$"):
        tr.fit(TensorDataset(torch.ones(4, 2)), steps=1, batch_size=2)
    assert seen == ["meta"]


def test_prepare_data_passes_seed_rank_and_world():
    """_prepare_data: the stream gets the data seed, this rank and the world size."""
    from ebmflow.training.distributed import DistInfo

    tr = _trainer(seed=5)
    tr.dist = DistInfo(rank=1, world_size=2)
    stream = tr._prepare_data(torch.ones(8, 2), 2)
    assert (stream.seed, stream.rank, stream.world_size) == (5, 1, 2)
