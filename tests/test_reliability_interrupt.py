"""Interrupted runs: a crash during a checkpoint write loses nothing, and resuming gives the same
result as an uninterrupted run (bit-for-bit on CPU).

* ``test_crash_inside_checkpoint_write_then_resume_equals_uninterrupted`` (fast, in-process):
  ``torch.save`` is made to write half a file and then raise ``KeyboardInterrupt`` on a
  seeded-random checkpoint; the previous checkpoint must survive intact, no temporary file may
  be left, and ``fit(..., resume=True)`` must end with parameters, EMA, optimiser and replay
  buffer equal (``torch.equal``) to an uninterrupted run.
* ``test_sigkill_during_checkpoint_write_of_ebmflow_train`` (subprocess): ``ebmflow train``
  with a checkpoint every step is killed with SIGKILL while a checkpoint's temporary file
  exists (the k-th write, k seeded), then ``ebmflow train --resume`` finishes the run; its
  final checkpoint equals the one of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ebmflow.cli import main
from ebmflow.energy import MLPEnergy
from ebmflow.losses import ContrastiveDivergence
from ebmflow.samplers import Langevin, PersistentSampler, ReplayBuffer
from ebmflow.spaces import Continuous
from ebmflow.training import Trainer
from ebmflow.training import checkpoint as ckpt_mod
from ebmflow.training.checkpoint import load_checkpoint


def _assert_same_tree(a, b, where: str = "checkpoint") -> None:
    """Recursive torch.equal over nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same_tree(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _state(ckpt: dict) -> dict:
    """The parts of a checkpoint that define the training result (not the RNG bookkeeping of
    the writer, which is compared separately)."""
    keys = ("step", "energy", "optimizer", "ema", "sampler", "loss", "scheduler", "rng")
    return {k: ckpt.get(k) for k in keys}


# -- fast, in-process ----------------------------------------------------------------------------
def _trainer(out: Path) -> Trainer:
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(16, 16))
    sampler = PersistentSampler(Langevin(0.05), ReplayBuffer(Continuous(2), capacity=128),
                                n_steps=3)
    return Trainer(energy, ContrastiveDivergence(), sampler=sampler, lr=1e-2, ema=0.9,
                   out_dir=out, checkpoint_every=2, log_every=4, progress=False, quiet=True,
                   seed=3, tensorboard=False)


class _Crash(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("seed", [0, 1])
def test_crash_inside_checkpoint_write_then_resume_equals_uninterrupted(tmp_path, monkeypatch,
                                                                       seed):
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    steps = 16
    full = _trainer(tmp_path / "full")
    full.fit(data, steps=steps, batch_size=32)

    crash_at = random.Random(seed).randrange(2, steps // 2)  # index of the failing write
    real_save = torch.save
    calls = {"n": 0}

    def half_written_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            f.write(b"PK\x03\x04 half a checkpoint")  # torn write, then the "signal"
            raise _Crash
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", half_written_save)
    crashed = _trainer(tmp_path / "run")
    with pytest.raises(_Crash):
        crashed.fit(data, steps=steps, batch_size=32)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], f"temporary files left: {files}"
    survived = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # loads: not corrupt
    assert survived["step"] == 2 * (crash_at - 1)  # the last completed write

    resumed = _trainer(tmp_path / "run")
    resumed.fit(data, steps=steps, batch_size=32, resume=True)
    assert resumed.step == steps
    _assert_same_tree(_state(load_checkpoint(tmp_path / "full" / "checkpoint.pt")),
                      _state(load_checkpoint(tmp_path / "run" / "checkpoint.pt")))


# -- subprocess + SIGKILL ------------------------------------------------------------------------
CONFIG = """
steps = {steps}
batch = 32
hidden = [16, 16]
n_train = 512
n_test = 256
loss = "pcd"
sampler = "langevin"
sampler_steps = 3
buffer_size = 256
eval_samples = 64
eval_steps = 2
log_every = 5
checkpoint_every = 1
ema = 0.9
"""


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _kill_during_write(cfg: Path, out: Path, nth: int, timeout: float = 60.0) -> tuple[bool, int]:
    """Start ``ebmflow train``; SIGKILL it once the ``nth`` distinct checkpoint temporary file
    is seen. Returns (killed during a write, number of writes seen)."""
    cmd = [sys.executable, "-c", "import sys; from ebmflow.cli import main; sys.exit(main())",
           "train", "--config", str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen: set[str] = set()
    during = False
    t_end = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < t_end:
            if out.is_dir():
                tmps = {p.name for p in out.iterdir() if p.name.startswith(".checkpoint.pt.")}
                seen |= tmps
                if len(seen) >= nth and tmps:
                    proc.send_signal(signal.SIGKILL)
                    during = True
                    break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and not during:
            proc.kill()
        proc.wait()
    return during, len(seen)


def test_sigkill_during_checkpoint_write_of_ebmflow_train(tmp_path):
    steps = 40
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(steps=steps))
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(full), "--quiet"]) == 0

    rng = random.Random(2026)
    for _attempt in range(3):  # a loaded machine may let the run finish first: try again
        nth = rng.randrange(2, steps // 2)
        during, n_seen = _kill_during_write(cfg, run, nth)
        if during:
            break
        main(["train", "--config", str(cfg), "--out", str(run), "--quiet", "--overwrite"])
    assert during, f"could not kill during a checkpoint write (saw {n_seen} writes)"

    # what the crash left: the last completed checkpoint, readable, plus maybe a torn temp file
    assert (run / "checkpoint.pt").is_file()
    before = load_checkpoint(run / "checkpoint.pt")
    assert 1 <= before["step"] < steps
    assert not (run / "metrics.json").exists()
    torn = [p for p in run.iterdir() if p.name.endswith(".tmp")]  # usually the killed write
    assert all(p.name.startswith(".checkpoint.pt.") for p in torn)

    assert main(["train", "--config", str(cfg), "--out", str(run), "--quiet", "--resume"]) == 0
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    assert b["step"] == steps
    _assert_same_tree(_state(a), _state(b))
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"torn temporary files were not cleaned up: {leftovers}"

    m_full = json.loads((full / "metrics.json").read_text())
    m_run = json.loads((run / "metrics.json").read_text())
    assert m_full["mmd"] == m_run["mmd"]  # evaluation after resume sees the same model and RNG


def test_resume_from_a_torn_checkpoint_is_a_clear_error(tmp_path, capsys):
    """A checkpoint truncated by something other than ebmflow (a copy, a full disk) is refused
    with one line naming the file; nothing is overwritten."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(steps=4))
    run = tmp_path / "run"
    run.mkdir()
    torn = b"PK\x03\x04 half a checkpoint"
    (run / "checkpoint.pt").write_bytes(torn)
    code = main(["train", "--config", str(cfg), "--out", str(run), "--quiet", "--resume"])
    assert code != 0
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "checkpoint.pt" in err
    assert (run / "checkpoint.pt").read_bytes() == torn
