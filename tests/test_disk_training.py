"""Training with tables on disk (train.table_store="mmap"): same updates, crash-safe checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engram.checkpoint import CheckpointError, read_checkpoint
from engram.generate import generate
from engram.presets import tiny_engram
from engram.run import train
from engram.store import MemoryRowStore, MmapRowStore
from engram.store.trainable import DiskTrainedStore
from engram.train import load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(store: str = "mmap"):
    cfg = tiny_engram()
    return replace(
        cfg,
        train=replace(
            cfg.train, steps=8, ckpt_every=4, keep_checkpoints=0, grad_accum=2, table_store=store
        ),
    )


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def _table(run_or_ckpt: Path) -> torch.Tensor:
    parts, _ = load_trained(run_or_ckpt)
    store = parts.model.engram_layers()[1].store
    return store.gather(torch.arange(store.num_rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disk-runs")
    out = {}
    for store in ("ram", "mmap"):
        out[store] = root / store
        train(_cfg(store), out[store], progress=False)
    return out


def test_disk_store_matches_sparse_adam(tmp_path: Path) -> None:
    N, D = 500, 8
    ram = MemoryRowStore(N, D, seed=3)
    disk = DiskTrainedStore.create(tmp_path, 1, N, D, fingerprint="ab" * 8, seed=3)
    all_rows = torch.arange(N)
    assert torch.equal(disk.gather(all_rows), ram.weight.detach())  # same init, bit for bit
    opt = torch.optim.SparseAdam([ram.weight], lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        rows = torch.randint(0, N, (4, 30), generator=gen)  # duplicates included
        target = torch.randn(4, 30, D, generator=gen)
        (ram.gather(rows) * target).sum().backward()
        (disk.gather(rows) * target).sum().backward()
        assert disk.anchor.grad is None  # no dense gradient anywhere
        opt.step()
        opt.zero_grad()
        touched = disk.adam_step(0.01, (0.9, 0.95), 1e-8)
        assert touched == len(torch.unique(rows))
    assert torch.equal(disk.gather(all_rows), ram.weight.detach())
    for part in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(disk.parts[part].gather(all_rows), opt.state[ram.weight][part])
    disk.close()


def test_mmap_training_equals_ram_training(runs) -> None:
    assert _losses(runs["mmap"]) == pytest.approx(_losses(runs["ram"]), rel=1e-6)
    ckpt = read_checkpoint(runs["mmap"])
    assert set(ckpt.state["tables"]) == {"1"}
    torch.testing.assert_close(_table(runs["mmap"]), _table(runs["ram"]), rtol=0, atol=1e-4)
    # The disk run's tables are not in its safetensors file, only in its table files.
    parts, _ = load_trained(runs["mmap"])
    assert isinstance(parts.model.engram_layers()[1].store, MmapRowStore)
    assert parts.model.table_parameters() == []
    assert parts.indexer is not None
    res = generate(parts.model, [[464, 3797]], indexer=parts.indexer, max_new_tokens=3)
    assert len(res.tokens[0]) == 3


def test_mmap_resume_equals_uninterrupted(runs, tmp_path: Path) -> None:
    cfg = _cfg()
    train(cfg, tmp_path / "split", progress=False, stop_after=3)  # checkpoint at 3, then resume
    train(cfg, tmp_path / "split", progress=False)
    assert _losses(tmp_path / "split") == _losses(runs["mmap"])
    assert torch.equal(_table(tmp_path / "split"), _table(runs["mmap"]))


def test_damaged_checkpoint_table_is_refused(runs, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["mmap"], run)
    ckpt = read_checkpoint(run)
    f = ckpt.path / "tables" / "L1.exp_avg.engt"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"L1\.exp_avg\.engt"):
        read_checkpoint(run)


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from dataclasses import replace
    import engram.store.mmap as mm
    import engram.store.trainable as tr
    from engram.presets import tiny_engram
    from engram.run import train

    import torch

    mode, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(sys.argv[4]))  # the parent's: float sums depend on the split
    calls = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "checkpoint":  # killed while a checkpoint's table file is half written
        write = tr.write_table

        def killing_write(path, source, **kw):
            calls[0] += 1
            if calls[0] != kill_at:
                return write(path, source, **kw)

            def half(start, stop):
                if start > 0:
                    die()
                return source(start, stop)

            return write(path, half, **{**kw, "chunk_rows": 64})

        tr.write_table = killing_write
    else:  # killed between writing a step's rows and its Adam moments back
        rows = mm.MmapRowStore.write_rows

        def killing_rows(self, *a, **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                die()
            return rows(self, *a, **kw)

        mm.MmapRowStore.write_rows = killing_rows
    cfg = tiny_engram()
    cfg = replace(cfg, train=replace(cfg.train, steps=8, ckpt_every=4, keep_checkpoints=0,
                                     grad_accum=2, table_store="mmap"))
    train(cfg, out, progress=False)
    """
)


@pytest.mark.parametrize(
    "mode,kill_at",
    [
        ("checkpoint", 8),  # 3 files at creation, 3 at step 4; dies inside step 8's 2nd file
        ("rows", 3 * 5 + 2),  # dies in step 6, after its rows were written, before its moments
    ],
)
def test_killed_run_keeps_last_checkpoint_and_resumes(
    runs, tmp_path: Path, mode: str, kill_at: int
) -> None:
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, mode, str(kill_at), str(out), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "step-000004"
    if mode == "checkpoint":
        assert list(root.glob(".step-000008*")), "the half-written checkpoint should be left"
    ckpt = read_checkpoint(out)  # verifies every file, table files included
    assert ckpt.step == 4
    # The surviving checkpoint is exactly the uninterrupted run's step 4.
    assert torch.equal(_table(ckpt.path), _table(runs["mmap"] / "checkpoints" / "step-000004"))
    # Resuming finishes the run exactly as if it had never been killed.
    train(_cfg(), out, progress=False)
    assert not list(root.glob(".step-*")), "stale temporaries are cleaned up"
    assert _losses(out) == _losses(runs["mmap"])
    assert torch.equal(_table(out), _table(runs["mmap"]))


def test_export_of_a_disk_trained_checkpoint_is_exact(runs, tmp_path: Path) -> None:
    from engram.export import export_tables, read_tables

    files = export_tables(runs["mmap"], tmp_path / "tables")
    assert torch.equal(read_tables(files)[1], _table(runs["mmap"]))
