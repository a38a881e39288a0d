"""Training with tables on disk (train.table_store="mmap"): same updates, crash-safe checkpoints
that write only the rows changed since the previous one (a base plus row deltas)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engram.checkpoint import CHECKPOINT_LOG, CheckpointError, read_checkpoint, table_file
from engram.generate import generate
from engram.presets import tiny_engram
from engram.run import train
from engram.store import MemoryRowStore, MmapRowStore
from engram.store.tablechain import PARTS, DeltaReader, TableChainError, delta_nbytes
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


def _delta_cfg(steps: int = 10):
    """Checkpoints every step of a table ~3x tiny's: each step touches ~15% of its rows, so
    checkpoints are deltas until the chain passes half the table, then a new base."""
    cfg = tiny_engram()
    return replace(
        cfg,
        name="tiny-engram-deltas",
        engram=replace(cfg.engram, engram_vocab_size=(1500, 1500)),
        train=replace(
            cfg.train, steps=steps, ckpt_every=1, keep_checkpoints=0, grad_accum=2,
            table_store="mmap",
        ),
    )  # fmt: skip


def _log(run: Path) -> list[dict]:
    lines = (run / "checkpoints" / CHECKPOINT_LOG).read_text().splitlines()
    return [json.loads(x) for x in lines]


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
    out["deltas"] = root / "deltas"
    train(_delta_cfg(), out["deltas"], progress=False)
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
    import json, os, signal, sys
    import engram.store.mmap as mm
    import engram.store.trainable as tr
    from engram.run import train
    from engram.run_config import RunConfig

    import torch

    mode, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(sys.argv[4]))  # the parent's: float sums depend on the split
    cfg = RunConfig.from_dict(json.loads(sys.argv[5]))
    calls = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "checkpoint":  # killed while a checkpoint's full table file is half written
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
    elif mode == "delta":  # killed while a checkpoint's delta file is half written
        write_delta = tr.write_delta

        def killing_delta(path, rows, read, **kw):
            calls[0] += 1
            if calls[0] != kill_at:
                return write_delta(path, rows, read, **kw)
            chunks = [0]

            def half(part, idx):
                chunks[0] += 1
                if chunks[0] > 1:
                    die()
                return read(part, idx)

            return write_delta(path, rows, half, **{**kw, "chunk_rows": 64})

        tr.write_delta = killing_delta
    else:  # killed between writing a step's rows and its Adam moments back
        rows = mm.MmapRowStore.write_rows

        def killing_rows(self, *a, **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                die()
            return rows(self, *a, **kw)

        mm.MmapRowStore.write_rows = killing_rows
    train(cfg, out, progress=False)
    """
)


@pytest.mark.parametrize(
    "run,mode,kill_at,survivor",
    [
        ("mmap", "checkpoint", 8, 4),  # 3 files at creation, 3 at step 4; dies in step 8's 2nd
        ("mmap", "rows", 3 * 5 + 2, 4),  # dies in step 6, after its rows, before its moments
        # Steps 1, 5 and 8 write a base, the others a delta: the 5th delta is step 7's.
        ("deltas", "delta", 5, 6),  # dies in step 7's delta; step 6 is base 5 + one delta
        ("deltas", "rows", 3 * 6 + 2, 6),  # dies in step 7, after its rows, before its moments
    ],
)
def test_killed_run_keeps_last_checkpoint_and_resumes(
    runs, tmp_path: Path, run: str, mode: str, kill_at: int, survivor: int
) -> None:
    cfg = _cfg() if run == "mmap" else _delta_cfg()
    out = tmp_path / "killed"
    proc = subprocess.run(
        [
            sys.executable, "-c", _KILLER, mode, str(kill_at), str(out),
            str(torch.get_num_threads()), json.dumps(cfg.to_dict()),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = out / "checkpoints"
    name = f"step-{survivor:06d}"
    assert (root / "LATEST").read_text().strip() == name
    if mode in ("checkpoint", "delta"):
        assert list(root.glob(f".step-{survivor + (4 if run == 'mmap' else 1):06d}*")), (
            "the half-written checkpoint should be left"
        )
    ckpt = read_checkpoint(out)  # verifies every file, table files included
    assert ckpt.step == survivor
    if run == "deltas":
        assert ckpt.state["tables"]["1"]["checkpoint"]["kind"] == "delta"
    # The surviving checkpoint is exactly the uninterrupted run's.
    assert torch.equal(_table(ckpt.path), _table(runs[run] / "checkpoints" / name))
    # Resuming finishes the run exactly as if it had never been killed.
    train(cfg, out, progress=False)
    assert not list(root.glob(".step-*")), "stale temporaries are cleaned up"
    assert _losses(out) == _losses(runs[run])
    assert torch.equal(_table(out), _table(runs[run]))


def test_export_of_a_disk_trained_checkpoint_is_exact(runs, tmp_path: Path) -> None:
    from engram.export import export_tables, read_tables

    files = export_tables(runs["mmap"], tmp_path / "tables")
    assert torch.equal(read_tables(files)[1], _table(runs["mmap"]))


# ------------------------------------------------------------------- incremental checkpoints
def test_checkpoints_write_only_the_rows_changed(runs) -> None:
    """Each delta holds exactly the rows written since the previous checkpoint (a superset of
    the rows that changed), its bytes are ids + 3 parts of those rows + a header, and the
    run's checkpoint log reports them; the chain compacts into a new base past half the table."""
    run = runs["deltas"]
    log = _log(run)
    assert [e["step"] for e in log] == list(range(1, 11))
    kinds = [e["tables"]["1"]["kind"] for e in log]
    assert kinds[0] == "base" and "delta" in kinds
    assert "base" in kinds[kinds.index("delta") :], "the chain never compacted into a new base"
    previous = None
    for e in log:
        t = e["tables"]["1"]
        ckpt = read_checkpoint(run / "checkpoints" / e["checkpoint"])
        assert ckpt.state["tables"]["1"]["checkpoint"] == t  # state.json and the log agree
        tables = ckpt.path / "tables"
        chain = ckpt.state["tables"]["1"]["chain"]
        manifest = (tables / "L1.chain.json").stat().st_size
        assert e["bytes_written"] == sum(e["files"].values()) + t["bytes_written"]
        now = {p: table_file(ckpt, 1, p) for p in PARTS}
        now = {p: MmapRowStore(f).read_range(0, MmapRowStore(f).num_rows) for p, f in now.items()}
        n, dim = now["weight"].shape
        if t["kind"] == "delta":
            delta = tables / chain[-1]["file"]
            rows = t["rows_written"]
            assert delta.stat().st_size == delta_nbytes(rows, dim)
            assert delta_nbytes(rows, dim) == 4096 + -(-8 * rows // 64) * 64 + rows * 3 * dim * 4
            assert t["bytes_written"] == delta_nbytes(rows, dim) + manifest
            assert 0 < rows < n / 2  # proportional to what changed, not to the table
            with DeltaReader(delta) as d:
                ids = set(d.rows.tolist())
            changed = torch.zeros(n, dtype=torch.bool)
            for p in PARTS:
                changed |= (now[p] != previous[p]).any(dim=1)
            assert set(torch.nonzero(changed).flatten().tolist()) <= ids
            assert len(ids) == rows
            # The chain's earlier files are hard links to the previous checkpoint's, not copies.
            assert all(os.stat(tables / f).st_nlink >= 2 for c in chain[:-1] for f in _names(c))
        else:
            assert t["rows_written"] == n
            assert t["bytes_written"] == 3 * (4096 + n * dim * 4) + manifest
        previous = now


def _names(entry: dict) -> list[str]:
    return list(entry["files"].values()) if entry["kind"] == "base" else [entry["file"]]


def test_resume_from_incremental_checkpoints_equals_uninterrupted(runs, tmp_path: Path) -> None:
    """Stopping at a chain of deltas, and again after a compaction, changes nothing."""
    run = tmp_path / "split"
    train(_delta_cfg(), run, progress=False, stop_after=3)  # step 3: base 1 + 2 deltas
    assert len(read_checkpoint(run).state["tables"]["1"]["chain"]) == 3
    train(_delta_cfg(), run, progress=False, stop_after=3)  # crosses step 5's compaction
    train(_delta_cfg(), run, progress=False)
    assert _losses(run) == _losses(runs["deltas"])
    assert torch.equal(_table(run), _table(runs["deltas"]))
    kinds = [e["tables"]["1"]["kind"] for e in _log(run)]
    assert kinds == [e["tables"]["1"]["kind"] for e in _log(runs["deltas"])]  # builds on restores
    for step in (3, 7, 10):  # every part of every kept checkpoint, bit for bit
        a = read_checkpoint(run / "checkpoints" / f"step-{step:06d}")
        b = read_checkpoint(runs["deltas"] / "checkpoints" / f"step-{step:06d}")
        for p in PARTS:
            fa, fb = MmapRowStore(table_file(a, 1, p)), MmapRowStore(table_file(b, 1, p))
            assert torch.equal(fa.read_range(0, fa.num_rows), fb.read_range(0, fb.num_rows))


def _chain_ckpt(runs, tmp_path: Path) -> Path:
    """A copy of the deltas run whose LATEST checkpoint (step 10) is base 8 + two deltas."""
    run = tmp_path / "copy"
    shutil.copytree(runs["deltas"], run)
    ckpt = read_checkpoint(run)
    for p in PARTS:  # as written: without the complete files a reader may have asked for
        (ckpt.path / "tables" / f"L1.{p}.engt").unlink(missing_ok=True)
    assert [c["kind"] for c in ckpt.state["tables"]["1"]["chain"]] == ["base", "delta", "delta"]
    return run


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing", r"L1\.delta-0001\.engd is missing"),
        ("flip", r"L1\.delta-0001\.engd is corrupt"),
        ("truncate", r"L1\.delta-0001\.engd is truncated"),
        ("swap", r"L1\.delta-0001\.engd is not the one its chain records"),
        ("base", r"L1\.base\.exp_avg\.engt is corrupt"),
    ],
)
def test_damaged_delta_chain_is_refused(runs, tmp_path: Path, damage: str, message: str) -> None:
    run = _chain_ckpt(runs, tmp_path)
    tables = run / "checkpoints" / "step-000010" / "tables"
    f = tables / "L1.delta-0001.engd"
    data = bytearray(f.read_bytes())
    f.unlink()  # a hard link: write a new file rather than through the link into step 9's
    if damage == "flip":
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[:-7]))
    elif damage == "swap":  # a valid delta, but another one (step 10's own)
        shutil.copyfile(tables / "L1.delta-0002.engd", f)
    elif damage == "base":
        f.write_bytes(bytes(data))
        b = tables / "L1.base.exp_avg.engt"
        raw = bytearray(b.read_bytes())
        b.unlink()
        raw[-5] ^= 0xFF
        b.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(run)
    if damage != "base":  # a resume (which checks every delta before applying any) refuses too
        with pytest.raises(TableChainError, match=message):
            DiskTrainedStore.restore(tmp_path / "work", 1, tables, 10)
    # The previous checkpoint (step 9), which shares the undamaged files, is still intact.
    read_checkpoint(run / "checkpoints" / "step-000009")


def test_reading_a_delta_checkpoint_materialises_its_table_once(runs, tmp_path: Path) -> None:
    run = _chain_ckpt(runs, tmp_path)
    ckpt = read_checkpoint(run)
    target = ckpt.path / "tables" / "L1.weight.engt"
    assert not target.exists()  # a chain of deltas: no complete file until a reader asks
    assert table_file(ckpt, 1) == target and target.is_file()
    mtime = target.stat().st_mtime_ns
    assert table_file(ckpt, 1) == target and target.stat().st_mtime_ns == mtime
    parts, _ = load_trained(run)  # evaluation and generation read the materialised file
    store = parts.model.engram_layers()[1].store
    assert torch.equal(store.gather(torch.arange(store.num_rows)), _table(run))
    res = generate(parts.model, [[464, 3797]], indexer=parts.indexer, max_new_tokens=3)
    assert len(res.tokens[0]) == 3
    read_checkpoint(run)  # the extra file does not disturb verification


# ---------------------------------------------------------------- the store's chain policy
def _train_rows(store: DiskTrainedStore, gen: torch.Generator, n_rows: int) -> None:
    rows = torch.randint(0, store.num_rows, (n_rows,), generator=gen)
    (store.gather(rows) * torch.randn(n_rows, store.dim, generator=gen)).sum().backward()
    store.adam_step(0.01, (0.9, 0.95), 1e-8)


def _parts(store: DiskTrainedStore) -> dict[str, torch.Tensor]:
    return {p: s.read_range(0, store.num_rows).clone() for p, s in store.parts.items()}


def test_store_chain_compacts_survives_pruning_and_failed_saves(tmp_path: Path) -> None:
    N, D = 4000, 8
    store = DiskTrainedStore.create(
        tmp_path / "work", 1, N, D, fingerprint="ab" * 8, compact_fraction=0.3, max_deltas=3
    )
    gen = torch.Generator().manual_seed(0)
    kinds, snapshots = [], {}
    for i in range(9):
        _train_rows(store, gen, 40 if i != 5 else 2000)  # step 6 touches ~40%: too big a delta
        if i == 2:  # a checkpoint that is written but never committed (e.g. killed before it)
            store.save(tmp_path / "lost")
            _train_rows(store, gen, 40)
        dest = tmp_path / f"c{i}"
        rec = store.save(dest)
        store.mark_committed(dest)
        kinds.append(rec["checkpoint"]["kind"])
        snapshots[i] = _parts(store)
        if i == 3:
            shutil.rmtree(tmp_path / "c2")  # pruning a checkpoint keeps its successors whole
    # A fresh store starts with a base; 3 deltas at most; a delta past 30% of the table is a base.
    assert kinds == ["base", "delta", "delta", "delta", "base", "base", "delta", "delta", "delta"]
    for i in (3, 4, 8):
        restored = DiskTrainedStore.restore(tmp_path / f"r{i}", 1, tmp_path / f"c{i}", i)
        got = _parts(restored)
        assert all(torch.equal(got[p], snapshots[i][p]) for p in PARTS)
        restored.close()
    # A restored store builds on its checkpoint (same policy): a delta linking c6's chain...
    policy = {"compact_fraction": 0.3, "max_deltas": 3}
    restored = DiskTrainedStore.restore(tmp_path / "r6b", 1, tmp_path / "c6", 6, **policy)
    _train_rows(restored, gen, 40)
    rec = restored.save(tmp_path / "after6")
    restored.mark_committed(tmp_path / "after6")
    assert [c["kind"] for c in rec["chain"]] == ["base", "delta", "delta"]
    expected = _parts(restored)
    restored.close()
    again = DiskTrainedStore.restore(tmp_path / "r6c", 1, tmp_path / "after6", 7)
    assert all(torch.equal(_parts(again)[p], expected[p]) for p in PARTS)
    again.close()
    # ... and a base after a chain that already has max_deltas deltas.
    restored = DiskTrainedStore.restore(tmp_path / "r3b", 1, tmp_path / "c3", 3, **policy)
    _train_rows(restored, gen, 40)
    assert restored.save(tmp_path / "after3")["checkpoint"]["kind"] == "base"
    restored.close()
    # The predecessor vanished before the next save: a full base, with a warning, not an error.
    shutil.rmtree(tmp_path / "c8")
    _train_rows(store, gen, 40)
    store.compact_fraction = 0.9
    store.max_deltas = 100
    rec = store.save(tmp_path / "c9")
    assert rec["checkpoint"]["kind"] == "base"
    store.close()


def test_store_without_compaction_budget_copies_in_full(tmp_path: Path) -> None:
    """compact_fraction=0 is the old behaviour: every checkpoint a complete copy."""
    store = DiskTrainedStore.create(
        tmp_path / "w", 1, 1000, 8, fingerprint="ab" * 8, compact_fraction=0.0
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        _train_rows(store, gen, 10)
        rec = store.save(tmp_path / f"c{i}")
        store.mark_committed(tmp_path / f"c{i}")
        assert rec["checkpoint"]["kind"] == "base" and rec["checkpoint"]["cloned"] is False
        assert sorted(f.name for f in (tmp_path / f"c{i}").iterdir()) == [
            "L1.chain.json", "L1.exp_avg.engt", "L1.exp_avg_sq.engt", "L1.weight.engt",
        ]  # fmt: skip
    store.close()
    with pytest.raises(ValueError, match="compact_fraction"):
        DiskTrainedStore(tmp_path / "w", 1, compact_fraction=1.5)


def test_export_and_serving_of_a_delta_checkpoint(runs, tmp_path: Path) -> None:
    """`table export` and serving from the table file read a chain's table, bit for bit the
    trained one (engram.export and engram.serving find the file through `table_file`)."""
    from engram.export import export_tables, read_tables
    from engram.serving import TierConfig, load_served

    run = _chain_ckpt(runs, tmp_path)
    expected = _table(runs["deltas"])
    files = export_tables(run, tmp_path / "tables")
    assert torch.equal(read_tables(files)[1], expected)
    with load_served(run, TierConfig(store="mmap", prefetch=False)) as served:
        store = served.parts.model.engram_layers()[1].store
        assert torch.equal(store.gather(torch.arange(store.num_rows)), expected)
    with load_served(run, TierConfig(store="ram")) as served:  # the table brought into RAM
        store = served.parts.model.engram_layers()[1].store
        assert torch.equal(store.gather(torch.arange(store.num_rows)), expected)


def test_base_is_a_copy_on_write_clone_where_the_filesystem_can(tmp_path: Path) -> None:
    """On a reflink filesystem (btrfs, XFS: set ENGRAM_REFLINK_DIR to a directory on one) a
    base costs no data writes, stays a valid sealed table file, and later training does not
    reach it; elsewhere the store falls back to a streamed copy (the other tests)."""
    from engram.store.tablechain import clone_to
    from engram.store.tablefile import verify_table

    root = Path(os.environ.get("ENGRAM_REFLINK_DIR", tmp_path)) / f"clone-{os.getpid()}"
    root.mkdir(parents=True)
    try:
        (root / "probe").write_bytes(b"x" * 4096)
        if not clone_to(root / "probe", root / "probe2"):
            pytest.skip(f"{root} has no copy-on-write clones (set ENGRAM_REFLINK_DIR)")
        store = DiskTrainedStore.create(root / "w", 1, 3000, 8, fingerprint="ab" * 8)
        gen = torch.Generator().manual_seed(0)
        _train_rows(store, gen, 100)
        rec = store.save(root / "c0")
        store.mark_committed(root / "c0")
        assert rec["checkpoint"]["kind"] == "base" and rec["checkpoint"]["cloned"] is True
        assert rec["checkpoint"]["bytes_written"] == (root / "c0" / "L1.chain.json").stat().st_size
        saved = _parts(store)
        for p in PARTS:
            verify_table(root / "c0" / f"L1.{p}.engt", expected_fingerprint="ab" * 8)
        _train_rows(store, gen, 100)  # the working files change; the clone must not
        restored = DiskTrainedStore.restore(root / "r", 1, root / "c0", 1)  # cloned back too
        assert all(torch.equal(_parts(restored)[p], saved[p]) for p in PARTS)
        restored.close()
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_checkpoint_of_the_full_copy_format_still_resumes(runs, tmp_path: Path) -> None:
    """A checkpoint written before chains existed (three files, no chain record) resumes."""
    run = tmp_path / "old"
    shutil.copytree(runs["mmap"], run)
    root = run / "checkpoints"
    shutil.rmtree(root / "step-000008")
    (root / "LATEST").write_text("step-000004\n")
    ckpt = root / "step-000004"
    (ckpt / "tables" / "L1.chain.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("chain", "checkpoint", "save"):
        del state["tables"]["1"][key]
    del state["sha256"]["tables/L1.chain.json"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert torch.equal(_table(ckpt), _table(runs["mmap"] / "checkpoints" / "step-000004"))
    train(_cfg(), run, progress=False)
    assert _losses(run) == _losses(runs["mmap"])
    assert torch.equal(_table(run), _table(runs["mmap"]))
