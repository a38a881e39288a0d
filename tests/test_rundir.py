"""Run directories under faults: one writer, interrupts that save, full disks, refused starts
that leave nothing behind, and a lost LATEST pointer."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import engram.checkpoint as checkpoint_mod
from engram.checkpoint import CheckpointError, read_checkpoint
from engram.presets import tiny_moe
from engram.run import train
from engram.run_config import ConfigError, apply_overrides
from engram.rundir import LOCK_FILE, RunDirLocked, RunLock
from engram.train import TrainingInterrupted, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "train-cache"))


def _cfg(*overrides: str):
    return apply_overrides(tiny_moe(), ["train.eval_every=0", *overrides])


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def _child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_HOLDER = """
    import sys, time
    from engram.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_writer_is_refused_at_once_and_lock_released_on_exit(tmp_path, caplog):
    run = tmp_path / "run"
    train(_cfg("train.steps=1"), run, progress=False)
    holder = _child(_HOLDER, str(run))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        t0 = time.monotonic()
        with pytest.raises(RunDirLocked) as info:
            train(_cfg("train.steps=2"), run, progress=False)
        assert time.monotonic() - t0 < 5  # refused, not queued
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "since" in msg
        assert "\n" not in msg
        assert _snapshot(run) == before  # the refused start wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock; its text is left: taken over with a warning.
    with caplog.at_level(logging.WARNING):
        train(_cfg("train.steps=2"), run, progress=False)
    assert any(f"pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert not (run / LOCK_FILE).exists()  # released (and removed) on exit


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    pid = int(dead.stdout)
    tmp_path.joinpath(LOCK_FILE).write_text(f"pid={pid} host={socket.gethostname()} since=x\n")
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        (warning,) = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
        assert f"pid {pid}" in warning and "dead" in warning
        assert f"pid={os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second holder, even in the same process
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


_TRAINER = """
    import sys
    from engram.presets import tiny_moe
    from engram.run_config import apply_overrides
    from engram.train import TrainingInterrupted
    from engram.run import train
    import torch
    torch.set_num_threads(1)
    cfg = apply_overrides(tiny_moe(), ["train.eval_every=0", "train.steps=5000"])
    try:
        train(cfg, sys.argv[1], progress=False)
    except TrainingInterrupted as e:
        sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_current_step_and_it_resumes(tmp_path, sig):
    run = tmp_path / "run"
    proc = _child(_TRAINER, str(run))
    try:
        deadline = time.monotonic() + 60
        while len(read_metrics(run / "metrics.jsonl")) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    (line,) = [x for x in err.splitlines() if x.startswith("engram: interrupted at step")]
    step = int(line.split("step ")[1].split(";")[0])
    saved = Path(line.split("saved ")[1])
    assert saved == run / "checkpoints" / f"step-{step:06d}"
    ckpt = read_checkpoint(run)  # LATEST names it and every file verifies
    assert ckpt.path == saved and ckpt.step == step >= 2
    assert not (run / LOCK_FILE).exists()
    result = train(_cfg(f"train.steps={step + 1}"), run, progress=False)
    assert result.step == step + 1 and [h["step"] for h in result.history] == [step + 1]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, step + 2))


def test_interrupt_in_process_raises_training_interrupted(tmp_path, monkeypatch, capsys):
    """The exception contract the CLI maps: a KeyboardInterrupt carrying the line it printed."""
    trainer_mod = sys.modules["engram.train"]  # (`engram.train` the attribute is the function)
    real_step = trainer_mod.Trainer.step
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / `&`

    def step_then_signal(self, step, stop=False):
        out = real_step(self, step, stop)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        train(_cfg("train.steps=50"), tmp_path / "run", progress=False)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.step == 2  # the signal came at the end of step 2: step 2 is saved
    assert str(info.value) == f"engram: interrupted at step 2; saved {info.value.checkpoint}"
    assert str(info.value) in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "run").step == 2
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_full_disk_names_the_checkpoint_and_keeps_the_previous(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = checkpoint_mod.save_model
    calls = []

    def full_disk(model, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, filename, *a, **kw)

    monkeypatch.setattr(checkpoint_mod, "save_model", full_disk)
    with pytest.raises(CheckpointError) as info:
        train(_cfg("train.steps=4", "train.ckpt_every=2"), run, progress=False)
    msg = str(info.value)
    assert msg == (
        f"cannot write checkpoint {run / 'checkpoints' / 'step-000004'}: "
        "[Errno 28] No space left on device"
    )
    assert read_checkpoint(run).step == 2  # the previous one: LATEST and every file intact
    assert not list((run / "checkpoints").glob(".step-*"))  # no half-written directory
    assert not (run / LOCK_FILE).exists()


def test_refused_resume_leaves_the_run_untouched_and_names_the_keys(tmp_path):
    run = tmp_path / "run"
    train(_cfg("train.steps=2"), run, progress=False)
    before = _snapshot(run)
    other = _cfg("train.steps=3", "optim.lr=0.01", "model.n_heads=4")
    with pytest.raises(ConfigError, match="different config") as info:
        train(other, run, progress=False)
    msg = str(info.value)
    assert "optim.lr: 0.003 -> 0.01" in msg and "model.n_heads: 2 -> 4" in msg, msg
    assert "train.steps:" not in msg
    assert _snapshot(run) == before


def test_refused_fresh_start_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "run"
    bad = _cfg("train.steps=2", f"data.source={json.dumps(str(tmp_path / 'missing.txt'))}")
    with pytest.raises(ValueError):
        train(bad, out, progress=False)
    assert list(tmp_path.iterdir()) == []  # not even the parent it had to create
    mmap_on_gpu = apply_overrides(_cfg(), ["train.table_store=mmap", "train.device=cuda"])
    with pytest.raises(ValueError):
        train(mmap_on_gpu, out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pointer", ["missing", "corrupt"])
def test_lost_latest_falls_back_to_newest_intact_checkpoint(tmp_path, caplog, pointer):
    run = tmp_path / "run"
    train(_cfg("train.steps=4", "train.ckpt_every=2"), run, progress=False)
    root = run / "checkpoints"
    if pointer == "missing":
        (root / "LATEST").unlink()
    else:
        (root / "LATEST").write_text("step-000099\n")
    # The newest checkpoint is damaged as well: the fallback verifies, and takes step 2.
    model = root / "step-000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        result = train(_cfg("train.steps=5", "train.ckpt_every=2"), run, progress=False)
    (warning,) = [r.getMessage() for r in caplog.records if "intact" in r.getMessage()]
    assert str(root / "step-000002") in warning and "LATEST" in warning
    assert [h["step"] for h in result.history] == [3, 4, 5]
    assert read_checkpoint(run).step == 5
