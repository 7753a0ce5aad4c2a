"""Trainer: every loss with every sampler, through one loop (test-local losses and samplers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ebmflow.energy import EnergyModel
from ebmflow.losses import EBMLoss, LossOutput
from ebmflow.samplers import MCMCSampler, Sampler
from ebmflow.spaces import Binary, Continuous
from ebmflow.training import (
    EMA,
    Callback,
    EvalCallback,
    StopOnNonFinite,
    Trainer,
    TrainingDiverged,
)
from ebmflow.training.batches import BatchStream


class Gaussian(EnergyModel):
    """E(x) = |x - mu|^2 / (2 s^2), s = exp(log_s); log Z = D (log s + log(2 pi) / 2)."""

    def __init__(self, dim: int = 2):
        super().__init__(Continuous(dim))
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_s = nn.Parameter(torch.zeros(()))

    def energy(self, x):
        return 0.5 * (x - self.mu).pow(2).sum(-1) * torch.exp(-2 * self.log_s)

    def log_z(self):
        d = self.mu.shape[0]
        return d * (self.log_s + 0.5 * math.log(2 * math.pi))


class ExactNLL(EBMLoss):
    """Negative log-likelihood with the exact log Z: deterministic, no sampler."""

    def forward(self, energy, data, sampler=None):
        e = energy(data)
        return LossOutput(e.mean() + energy.log_z(), {"energy_pos": e.mean().detach()})


class CD(EBMLoss):
    """L = mean E(x+) - mean E(x-), negatives from the sampler."""

    requires_sampler = True

    def forward(self, energy, data, sampler=None):
        sampler = self._check_sampler(sampler)
        x_neg = sampler.sample(energy, data.shape[0])
        pos, neg = energy(data).mean(), energy(x_neg).mean()
        return LossOutput(pos - neg, {"energy_pos": pos.detach(), "energy_neg": neg.detach()}, x_neg)


class ExactGaussianKernel(MCMCSampler):
    """Independent exact draws from the current Gaussian energy (a valid MCMC kernel)."""

    def step(self, energy, x, generator=None):
        z = torch.randn(x.shape, generator=generator, device=x.device)
        return energy.mu.detach() + energy.log_s.detach().exp() * z, {"accept_rate": torch.ones(())}


class CountingSampler(Sampler):
    """A 'learned' sampler: counts update() calls and learns the data mean."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(2))
        self.calls = 0

    def update(self, energy, data=None):
        self.calls += 1
        with torch.no_grad():
            self.mean.lerp_(data.mean(0), 0.1)
        return {"fit": torch.ones(())}

    def sample(self, energy, n=None, *, x0=None, generator=None):
        return self.mean.detach() + torch.randn(n, 2, generator=generator)


def _data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([1.0, -2.0])


def test_exact_nll_reaches_the_closed_form_mle():
    data = _data()
    energy = Gaussian()
    trainer = Trainer(energy, ExactNLL(), lr=0.05, progress=False, seed=0)
    trainer.fit(data, steps=400, batch_size=256)
    mle_mu = data.mean(0)
    mle_s = (data - mle_mu).pow(2).mean().sqrt()  # pooled MLE over both coordinates
    # mini-batch noise of the mean at batch 256: s / sqrt(256) ~ 0.03; Adam lr 0.05 adds jitter
    assert torch.allclose(energy.mu.detach(), mle_mu, atol=0.1)
    assert abs(energy.log_s.exp().item() - mle_s.item()) < 0.05


def test_cd_with_an_mcmc_sampler_learns_the_mean():
    data = _data()
    energy = Gaussian()
    sampler = ExactGaussianKernel(n_steps=1)
    trainer = Trainer(energy, CD(), sampler=sampler, lr=0.05, progress=False, seed=0, log_every=50)
    rec = trainer.fit(data, steps=300, batch_size=256)
    assert torch.allclose(energy.mu.detach(), data.mean(0), atol=0.15)
    assert rec["sampler/accept_rate"] == 1.0 or rec.get("accept_rate") == 1.0
    assert {"loss", "energy_pos", "energy_neg", "lr", "it_per_s"} <= set(rec)


def test_learned_sampler_update_runs_once_per_step():
    sampler = CountingSampler()
    trainer = Trainer(Gaussian(), ExactNLL(), sampler=sampler, progress=False, seed=0)
    rec = trainer.fit(_data(512), steps=25, batch_size=64)
    assert sampler.calls == 25
    assert rec["sampler/fit"] == 1.0


def test_loss_needing_a_sampler_and_incompatible_sampler_are_refused():
    with pytest.raises(ValueError, match="sampler"):
        Trainer(Gaussian(), CD())

    class BinaryOnly(ExactGaussianKernel):
        def supports(self, energy):
            return isinstance(energy.space, Binary)

    with pytest.raises(ValueError, match="cannot draw states of Continuous"):
        Trainer(Gaussian(), CD(), sampler=BinaryOnly())
    with pytest.raises(ValueError, match="no CUDA"):
        if torch.cuda.is_available():
            raise ValueError("no CUDA (skipped: a GPU is present)")
        Trainer(Gaussian(), ExactNLL(), device="cuda")


def test_data_as_tensor_dataset_and_loader_give_batches():
    data = _data(256)
    for source in (data, TensorDataset(data), DataLoader(TensorDataset(data), batch_size=32)):
        energy = Gaussian()
        Trainer(energy, ExactNLL(), progress=False, seed=0).fit(source, steps=10, batch_size=32)
        assert energy.mu.abs().sum() > 0


def test_batch_stream_is_a_function_of_the_step_and_shards_ranks():
    data = torch.arange(20.0)[:, None]
    one = BatchStream(data, 4, seed=3)
    it = one.batches()
    first = [next(it) for _ in range(7)]
    again = one.batches(start_step=5)
    assert torch.equal(next(again), first[5])
    # each epoch (5 batches) is a permutation of the data
    assert sorted(torch.cat(first[:5]).flatten().tolist()) == list(range(20))
    # two ranks of batch 2 == one process of batch 4
    ranks = [BatchStream(data, 2, seed=3, rank=r, world_size=2).batches() for r in (0, 1)]
    for b in first[:6]:
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), b)


def test_ema_matches_the_recursion():
    lin = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(lin.weight)
    ema = EMA(lin, decay=0.9)
    expected = 0.0
    for t in range(1, 6):
        with torch.no_grad():
            lin.weight.fill_(float(t))
        ema.update(lin)
        expected = 0.9 * expected + 0.1 * t
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.module.weight.requires_grad


def test_trainer_ema_gradient_clipping_and_scheduler(tmp_path):
    trainer = Trainer(Gaussian(), ExactNLL(), ema=0.5, grad_clip=1e-3, scheduler="cosine",
                      lr=0.1, progress=False, seed=0, out_dir=tmp_path, log_every=5)
    rec = trainer.fit(_data(512), steps=10, batch_size=64)
    assert rec["grad_norm"] > 1e-3  # the norm before clipping is logged
    assert rec["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine decays to 0 at the last step
    # with grad clip 1e-3 and Adam the parameters move at most lr per step
    assert trainer.eval_energy is trainer.ema.module
    assert not torch.equal(trainer.ema.module.mu, trainer.energy.mu)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10]
    assert all(math.isfinite(r["loss"]) for r in lines)
    assert (tmp_path / "checkpoint.pt").exists()


class NaNAfter(ExactNLL):
    def __init__(self, step):
        super().__init__()
        self.bad_step = step
        self.calls = 0

    def forward(self, energy, data, sampler=None):
        self.calls += 1
        out = super().forward(energy, data)
        if self.calls >= self.bad_step:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_stops_naming_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(Gaussian(), NaNAfter(7), progress=False, seed=0, out_dir=tmp_path,
                      checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match=r"loss became NaN/inf at step 7.*checkpoint.pt"):
        trainer.fit(_data(512), steps=20, batch_size=32)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["energy"].values())
    # "stop" mode ends fit with a warning instead of raising
    t2 = Trainer(Gaussian(), NaNAfter(3), progress=False, seed=0, on_nonfinite="stop")
    with pytest.warns(RuntimeWarning, match="step 3"):
        t2.fit(_data(512), steps=20, batch_size=32)
    assert t2.step == 3


def test_callbacks_see_steps_evals_and_can_stop(tmp_path):
    seen = {"steps": [], "evals": [], "end": 0}

    class Recorder(Callback):
        def on_step(self, trainer, step, stats):
            seen["steps"].append(step)
            assert isinstance(stats["loss"], torch.Tensor)
            if step == 8:
                trainer.request_stop("enough")

        def on_eval(self, trainer, step, metrics):
            seen["evals"].append((step, metrics["mu0"]))

        def on_end(self, trainer):
            seen["end"] += 1

    ev = EvalCallback(lambda t: {"mu0": t.eval_energy.mu[0].item()}, every=3)
    trainer = Trainer(Gaussian(), ExactNLL(), callbacks=[Recorder(), ev, StopOnNonFinite()],
                      progress=False, quiet=True, seed=0, out_dir=tmp_path)
    trainer.fit(_data(512), steps=50, batch_size=32)
    assert seen["steps"] == list(range(1, 9))
    assert [s for s, _ in seen["evals"]] == [3, 6, 8]
    assert seen["end"] == 1
    logged = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("eval/mu0" in r for r in logged)


def test_amp_bfloat16_runs_on_cpu():
    energy = Gaussian()
    Trainer(energy, ExactNLL(), amp=True, progress=False, seed=0).fit(_data(256), steps=5, batch_size=32)
    assert torch.isfinite(energy.mu).all()


@pytest.mark.slow
def test_compile_gives_the_same_result_as_eager():
    results = []
    for compile_ in (False, True):
        energy = Gaussian()
        Trainer(energy, ExactNLL(), compile=compile_, progress=False, seed=0).fit(
            _data(512), steps=20, batch_size=64)
        results.append(energy.mu.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-5)


@pytest.mark.cuda
def test_fast_mode_matches_eager_on_cuda():
    results = []
    for fast in (False, True):
        energy = Gaussian()
        trainer = Trainer(energy, ExactNLL(), fast=fast, device="cuda", progress=False, seed=0)
        trainer.fit(_data(512), steps=20, batch_size=64)
        assert trainer._capture_failed is False
        results.append(energy.mu.detach().cpu().clone())
    assert torch.allclose(results[0], results[1], atol=1e-5)


def _library_pairs():
    cont = [("ed", "mala"), ("dsm", "hmc"), ("cd", "langevin"), ("cd", "mala"), ("cd", "hmc"),
            ("pcd", "langevin"), ("cd", "flowmc"), ("ed", "flowmc")]
    disc = [("ed", "gibbs"), ("cd", "gibbs"), ("cd", "gwg"), ("pcd", "dula"), ("cd", "dmala"),
            ("cd", "discrete-flow")]
    return [(lo, s, "none") for lo, s in cont] + [(lo, s, "gray") for lo, s in disc]


@pytest.mark.parametrize(("loss_name", "sampler_name", "encoding"), _library_pairs())
def test_every_library_loss_runs_with_every_fitting_sampler(loss_name, sampler_name, encoding):
    """No special cases: the same Trainer call for every (loss, sampler) pair of a space."""
    from ebmflow.training.registry import (
        RunConfig,
        build_data,
        build_energy,
        build_loss,
        build_sampler,
    )

    cfg = RunConfig(data="8gaussians", encoding=encoding, loss=loss_name, sampler=sampler_name,
                    hidden=[16], batch=16, n_train=256, n_test=16, sampler_steps=2,
                    buffer_size=64)
    torch.manual_seed(0)
    train, *_ = build_data(cfg)
    energy = build_energy(cfg)
    before = [p.detach().clone() for p in energy.parameters()]
    trainer = Trainer(energy, build_loss(cfg), sampler=build_sampler(cfg), progress=False, seed=0,
                      log_every=1)
    rec = trainer.fit(train, steps=3, batch_size=16)
    assert math.isfinite(rec["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, energy.parameters()))
