"""A new user's path through the Python API: threads, output folders, loading, resuming,
callbacks, seeding and the baselines of ``ebmflow train``."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import ebmflow
from ebmflow.cli import main
from ebmflow.energy import MLPEnergy
from ebmflow.losses import ContrastiveDivergence, EnergyDiscrepancy, GaussianPerturbation
from ebmflow.samplers import Langevin
from ebmflow.spaces import Binary, Continuous
from ebmflow.training import PlotCallback, RunExistsError, Trainer, load_energy, threads
from ebmflow.training.baselines import baseline_warning, gaussian_fit_nll, trivial_baseline
from ebmflow.training.checkpoint import CheckpointError


def _data(n=512):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([1.0, -1.0])


def _ed_trainer(out=None, **kw):
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(16, 16))
    return Trainer(energy, EnergyDiscrepancy(GaussianPerturbation(1.0)), progress=False,
                   out_dir=out, log_every=5, **kw)


def _cd_trainer(out, n_steps=3, step_size=0.01):
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(16, 16))
    return Trainer(energy, ContrastiveDivergence(alpha=0.1, init="data"),
                   sampler=Langevin(step_size=step_size, n_steps=n_steps), progress=False,
                   out_dir=out, log_every=5)


# -- threads ----------------------------------------------------------------------------------
@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(before)


def test_auto_threads_use_the_free_cores_and_at_most_four_for_small_energies(restore_threads, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(threads, "_THREADS_AT_IMPORT", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(threads, "free_cores", lambda: (1, 15.2))
    busy = threads.choose_threads("auto", cpu, n_params=50_000)
    assert busy.threads == 1 and busy.changed and "1-min load 15.2" in busy.reason
    monkeypatch.setattr(threads, "free_cores", lambda: (16, 0.0))
    idle_small = threads.choose_threads("auto", cpu, n_params=50_000)
    assert idle_small.threads == threads.SMALL_MODEL_MAX_THREADS and "small energy" in idle_small.reason
    idle_big = threads.choose_threads("auto", cpu, n_params=5_000_000)
    assert idle_big.threads == 16 and not idle_big.changed
    # GPU runs and explicit settings are left alone
    assert threads.choose_threads("auto", torch.device("cuda"), 10).threads is None
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    kept = threads.choose_threads("auto", cpu, n_params=50_000)
    assert kept.threads is None and "OMP_NUM_THREADS=8" in kept.reason
    assert threads.choose_threads(3, cpu, 10).threads == 3
    assert threads.choose_threads(None, cpu, 10).threads is None


def test_a_thread_count_set_by_the_user_is_kept(restore_threads):
    torch.set_num_threads(1 if threads._THREADS_AT_IMPORT != 1 else 2)
    choice = threads.choose_threads("auto", torch.device("cpu"), n_params=10)
    assert choice.threads is None and "torch.set_num_threads" in choice.reason


@pytest.mark.parametrize("bad", [0, -2, "fast", 1.5, True])
def test_bad_threads_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        _ed_trainer(threads=bad)


def test_trainer_applies_threads_during_fit_logs_why_and_restores(restore_threads, tmp_path):
    torch.set_num_threads(2)
    seen = []
    trainer = _ed_trainer(tmp_path, threads=1)
    trainer.callbacks.append(ebmflow.training.LambdaCallback(
        on_step=lambda t, s, st: seen.append(torch.get_num_threads())))
    trainer.fit(_data(), steps=10, batch_size=64)
    assert set(seen) == {1}
    assert torch.get_num_threads() == 2
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["threads"] == 1 and "threads=1" in records[0]["threads_reason"]
    assert all(r["threads"] == 1 for r in records)


def test_one_warning_when_a_small_model_runs_multithreaded_on_busy_cores(restore_threads, monkeypatch):
    monkeypatch.setattr(threads, "_warned", False)
    monkeypatch.setattr(threads, "free_cores", lambda: (1, 3.0))
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="busy cores"):
        assert threads.warn_if_oversubscribed(1000, cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not threads.warn_if_oversubscribed(1000, cpu)  # once per process
    monkeypatch.setattr(threads, "_warned", False)
    monkeypatch.setattr(threads, "free_cores", lambda: (2, 0.1))
    assert not threads.warn_if_oversubscribed(1000, cpu)  # idle cores: no warning
    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "free_cores", lambda: (1, 3.0))
    assert not threads.warn_if_oversubscribed(1000, cpu)  # single-threaded: no warning


# -- an earlier run in out_dir ----------------------------------------------------------------
def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(tmp_path):
    first = _ed_trainer(tmp_path)
    first.fit(_data(), steps=20, batch_size=64)
    log_before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(RunExistsError, match="resume=True.*overwrite=True"):
        _ed_trainer(tmp_path).fit(_data(), steps=10, batch_size=64)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 20
    assert (tmp_path / "log.jsonl").read_text() == log_before
    # resume continues, overwrite starts over with a fresh log
    resumed = _ed_trainer(tmp_path)
    resumed.fit(_data(), steps=30, batch_size=64, resume=True)
    assert resumed.step == 30
    fresh = _ed_trainer(tmp_path, overwrite=True)
    fresh.fit(_data(), steps=10, batch_size=64)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10


def test_a_log_without_checkpoint_is_also_protected(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 100}\n')
    with pytest.raises(RunExistsError, match="log.jsonl"):
        _ed_trainer(tmp_path).fit(_data(), steps=5, batch_size=64)


# -- loading a trained energy -----------------------------------------------------------------
def test_load_energy_gives_the_ema_or_the_raw_weights(tmp_path):
    trainer = _ed_trainer(tmp_path, ema=0.9)
    trainer.fit(_data(), steps=20, batch_size=64)
    x = _data(50)
    with torch.no_grad():
        want_ema, want_raw = trainer.ema.module(x), trainer.energy(x)
    assert not torch.allclose(want_ema, want_raw)
    fresh = MLPEnergy(Continuous(2), hidden=(16, 16))
    got = load_energy(tmp_path / "checkpoint.pt", energy=fresh)
    assert got is fresh and not got.training
    torch.testing.assert_close(got(x), want_ema)
    raw = load_energy(tmp_path / "checkpoint.pt", ema=False, energy=MLPEnergy(Continuous(2), hidden=(16, 16)))
    torch.testing.assert_close(raw(x), want_raw)
    # a Python run does not record how to build its energy: a clear error
    with pytest.raises(CheckpointError, match="pass energy="):
        load_energy(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_energy(tmp_path / "checkpoint.pt", energy=MLPEnergy(Continuous(2), hidden=(8,)))


def test_load_energy_without_ema_in_the_checkpoint(tmp_path):
    trainer = _ed_trainer(tmp_path)
    trainer.fit(_data(), steps=5, batch_size=64)
    e = load_energy(tmp_path / "checkpoint.pt", energy=MLPEnergy(Continuous(2), hidden=(16, 16)))
    torch.testing.assert_close(e(_data(10)), trainer.energy(_data(10)).detach())
    with pytest.raises(CheckpointError, match="no EMA"):
        load_energy(tmp_path / "checkpoint.pt", ema=True, energy=MLPEnergy(Continuous(2), hidden=(16, 16)))


def test_load_energy_rebuilds_the_energy_of_a_cli_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "10", "--eval-samples", "100",
                 "--eval-steps", "5", "--quiet", "--hidden", "32,32"]) == 0
    energy = load_energy(out / "checkpoint.pt")
    assert isinstance(energy, MLPEnergy)
    x = Langevin(step_size=0.01, n_steps=5).sample(energy, 20)
    assert x.shape == (20, 2) and torch.isfinite(x).all()


# -- resume and changed arguments -------------------------------------------------------------
def test_resume_warns_and_uses_changed_constructor_arguments(tmp_path):
    _cd_trainer(tmp_path, n_steps=3, step_size=0.01).fit(_data(), steps=10, batch_size=64)
    trainer = _cd_trainer(tmp_path, n_steps=7, step_size=0.01)
    with pytest.warns(UserWarning, match=r"sampler\.n_steps: checkpoint 3 -> using the new argument 7"):
        trainer.fit(_data(), steps=12, batch_size=64, resume=True)
    assert trainer.sampler.n_steps == 7 and trainer.sampler.step_size == 0.01


def test_resume_with_the_same_arguments_is_silent_and_restores_state(tmp_path):
    first = _cd_trainer(tmp_path)
    first.fit(_data(), steps=10, batch_size=64)
    first.sampler.secret = 5  # a plain attribute changed during the run, saved in the checkpoint
    first.save_checkpoint()
    trainer = _cd_trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.fit(_data(), steps=12, batch_size=64, resume=True)
    assert trainer.sampler.secret == 5


def test_old_checkpoints_keep_their_values_and_name_the_differences(tmp_path):
    _cd_trainer(tmp_path, n_steps=3).fit(_data(), steps=10, batch_size=64)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["constructed"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    trainer = _cd_trainer(tmp_path, n_steps=7)
    with pytest.warns(UserWarning, match=r"sampler\.n_steps: this run's 7 -> using the checkpoint's 3"):
        trainer.load_checkpoint(tmp_path / "checkpoint.pt")
    assert trainer.sampler.n_steps == 3


# -- callbacks, seeding -----------------------------------------------------------------------
def test_plot_callback_without_a_sampler_fails_before_the_first_step(tmp_path):
    trainer = _ed_trainer(callbacks=[PlotCallback(tmp_path, every=500)])
    with pytest.raises(ValueError, match="sample_fn"):
        trainer.fit(_data(), steps=600, batch_size=64)
    assert trainer.step == 0


def test_plot_callback_checks_the_space_and_decodes_gray_codes(tmp_path):
    pytest.importorskip("matplotlib")
    from ebmflow.data import gray_encode

    torch.manual_seed(0)
    energy = MLPEnergy(Binary(8), hidden=(8,))
    loss = EnergyDiscrepancy(ebmflow.losses.BernoulliPerturbation(eps=0.1), m=4)
    bits = gray_encode(_data(256), 4)
    with pytest.raises(ValueError, match="gray_bits=4"):
        Trainer(energy, loss, progress=False,
                callbacks=[PlotCallback(tmp_path, sample_fn=lambda t: bits)]).fit(bits, steps=2)
    cb = PlotCallback(tmp_path, gray_bits=4, sample_fn=lambda t: bits[:100])
    Trainer(energy, loss, progress=False, callbacks=[cb]).fit(bits, steps=2, batch_size=32)
    assert (tmp_path / "energy_2.png").stat().st_size > 0


def test_energy_plot_has_colour_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from ebmflow.training.plots import plot_energy

    calls = []
    original = matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    plot_energy(MLPEnergy(Continuous(2), hidden=(8,)), tmp_path / "e.png", resolution=20)
    assert len(calls) == 2


def test_seed_everything_covers_the_energy_initialisation():
    def build():
        ebmflow.seed_everything(7)
        energy = MLPEnergy(Continuous(2), hidden=(8,))
        return torch.cat([p.flatten() for p in energy.parameters()])

    torch.testing.assert_close(build(), build())
    with pytest.raises(ValueError, match="seed"):
        ebmflow.seed_everything(-1)


# -- baselines and the CLI ---------------------------------------------------------------------
def test_gaussian_fit_nll_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20_000, 2, generator=g) * torch.tensor([2.0, 0.5])
    want = math.log(2 * math.pi) + math.log(2.0 * 0.5) + 1.0  # D/2 log 2 pi e + log det^(1/2)
    assert gaussian_fit_nll(x, x) == pytest.approx(want, abs=0.02)
    bits = torch.zeros(4, 32)
    assert trivial_baseline("gray", bits, bits, x, x)["nll_baseline"] == pytest.approx(32 * math.log(2))


def test_baseline_warning_only_when_the_model_does_not_beat_it():
    base = {"nll_baseline": 4.0, "baseline": "one Gaussian"}
    assert baseline_warning({"nll": 3.0, **base}) is None
    assert "does not beat the trivial baseline" in baseline_warning({"nll": 3.95, **base})
    assert baseline_warning({"nll": float("nan"), **base}) is not None


def test_cli_reports_the_baseline_and_warns_when_the_model_ends_there(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "1", "--eval-samples", "100",
                 "--eval-steps", "5", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["baseline"] == "one Gaussian fitted to the training data"
    assert math.isfinite(m["nll_baseline"]) and m["nll"] > m["nll_baseline"] - 0.1
    assert "does not beat the trivial baseline" in capsys.readouterr().err


def test_cli_evaluate_prints_rounded_numbers(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "5", "--eval-samples", "100",
                 "--eval-steps", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--n", "100"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "nll_baseline" in printed
    for v in printed.values():
        if isinstance(v, float):
            assert len(f"{v!r}".lstrip("-").replace(".", "").lstrip("0").split("e")[0]) <= 4, v


def test_unknown_train_flag_shows_the_train_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ebmflow train") and "--no-such-flag" in err
