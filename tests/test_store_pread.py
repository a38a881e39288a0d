"""The row reader (`PreadRowStore`): the same bits as mmap and RAM, exact read counters, refusals."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from serving_helpers import generate_prompts  # tests/serving_helpers.py

from engram import serving
from engram.serving import TierConfig, load_served, resolve_reader
from engram.store import (
    CachedRowStore,
    MmapRowStore,
    Prefetcher,
    PrefetchingStore,
    RowOutOfRangeError,
    TableFileError,
    read_table,
    write_table,
)
from engram.store.pread import PreadRowStore, plan_reads, proc_read_bytes
from engram.store.readkernel import kernel_available
from engram.store.stack import stack_stats

FP = "ab" * 32
DTYPES = ["float32", "bfloat16", "float16", "int8"]
NUM_ROWS, DIM = 3000, 12  # 48-byte float32 rows: not a divisor of 512, so O_DIRECT cuts rows


def _table(tmp_path: Path, dtype: str, num_rows: int = NUM_ROWS, dim: int = DIM) -> Path:
    gen = torch.Generator().manual_seed(7)
    src = torch.randn(num_rows, dim, generator=gen)
    src[3] = 0.0  # an all-zero row (int8 scale 0)
    path = tmp_path / f"t_{dtype}_{num_rows}x{dim}.engt"
    write_table(path, src, dtype=dtype, fingerprint=FP, layer_id=1)
    return path


def _ids(num_rows: int = NUM_ROWS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, num_rows, (4, 9, 5), generator=gen)
    ids[0, 0] = torch.tensor([num_rows - 1, num_rows - 1, 0, 0, 1])  # both ends, duplicates
    ids[1, 0] = torch.arange(100, 105)  # a run of adjacent rows
    return ids


def _direct_ok(path: Path) -> bool:
    try:
        PreadRowStore(path, direct=True).close()
    except TableFileError:
        return False
    return True


VARIANTS = {
    "python": {"kernel": False},
    "kernel": {},
    "threads": {"threads": 2},
    "coalesce": {"coalesce_gap": 40},
    "direct": {"direct": True, "threads": 2},
    "direct-python": {"direct": True, "kernel": False, "coalesce_gap": 3},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gathers_equal_mmap_and_ram_bit_for_bit(tmp_path: Path, dtype: str, variant: str) -> None:
    path = _table(tmp_path, dtype)
    kw = VARIANTS[variant]
    if kw.get("direct") and not _direct_ok(path):
        pytest.skip("this filesystem refuses O_DIRECT")
    ids = _ids()
    ram = read_table(path)  # (rows, dim) float32, dequantised as the stores do
    with MmapRowStore(path) as mm, PreadRowStore(path, **kw) as rd:
        if variant == "kernel" and not rd.uses_kernel:
            pytest.skip("the C read kernel is not built")
        want = mm.gather(ids)
        got = rd.gather(ids)
        assert got.shape == (*ids.shape, DIM) and got.dtype == torch.float32
        assert torch.equal(got, want)
        assert torch.equal(got, ram[ids])
        half = PreadRowStore(path, out_dtype=torch.bfloat16, **kw)
        assert torch.equal(half.gather(ids), mm.gather(ids).to(torch.bfloat16))
        half.close()
        raw = rd.read_rows(np.array([0, 5, 6, 2999]))
        assert raw.dtype == rd.header.torch_dtype and raw.shape == (4, DIM)


def test_empty_and_odd_shaped_requests(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    with PreadRowStore(path) as rd:
        assert rd.gather(torch.zeros(0, dtype=torch.long)).shape == (0, DIM)
        assert rd.gather(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, DIM)
        assert rd.gather(torch.tensor(7)).shape == (DIM,)  # a 0-d id
        assert rd.gather(torch.tensor([5], dtype=torch.int32)).shape == (1, DIM)
        assert rd.stats().bytes_read == 2 * DIM * 4  # the two non-empty requests only


def test_out_of_range_and_bad_ids_are_refused(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    with PreadRowStore(path) as rd:
        with pytest.raises(RowOutOfRangeError, match=rf"row id {NUM_ROWS} .*\[0, {NUM_ROWS}\)"):
            rd.gather(torch.tensor([1, NUM_ROWS]))
        with pytest.raises(IndexError, match="row id -1"):
            rd.gather(torch.tensor([[-1]]))
        with pytest.raises(TypeError, match="integer"):
            rd.gather(torch.tensor([1.0]))
        assert rd.stats().gathers == 0  # refused before any read
    with PreadRowStore(path, check_bounds=False) as rd, pytest.raises(TypeError, match="integer"):
        rd.gather(torch.tensor([True]))


def test_damaged_unsealed_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    bad = tmp_path / "bad.engt"
    shutil.copy(path, bad)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 48)
    with pytest.raises(TableFileError, match="truncated"):
        PreadRowStore(bad)
    shutil.copy(path, bad)
    with open(bad, "r+b") as f:  # one byte of the metadata: the header crc no longer matches
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(TableFileError, match="corrupt header"):
        PreadRowStore(bad)
    shutil.copy(path, bad)
    with open(bad, "r+b") as f:  # a row byte: only the data crc (verify=True) sees it
        f.seek(4096 + 10)
        f.write(b"\x7f")
    PreadRowStore(bad).close()
    with pytest.raises(TableFileError, match="data crc32"):
        PreadRowStore(bad, verify=True)
    shutil.copy(path, bad)
    MmapRowStore(bad, writable=True).close(seal=False)  # a writer that never sealed
    with pytest.raises(TableFileError, match="not sealed"):
        PreadRowStore(bad)
    PreadRowStore(bad, allow_dirty=True).close()
    with pytest.raises(TableFileError, match="hash configuration"):
        PreadRowStore(path, expected_fingerprint="cd" * 32)
    with pytest.raises(TableFileError, match="does not exist"):
        PreadRowStore(tmp_path / "missing.engt")
    with pytest.raises(ValueError, match="threads"):
        PreadRowStore(path, threads=-1)
    with pytest.raises(ValueError, match="out_dtype"):
        PreadRowStore(path, out_dtype=torch.int32)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_file_cut_after_opening_is_reported(tmp_path: Path, kernel: bool) -> None:
    path = _table(tmp_path, "float32")
    with PreadRowStore(path, kernel=kernel) as rd:
        os.truncate(path, 4096 + 100 * DIM * 4)  # rows >= 100 are gone
        assert rd.gather(torch.tensor([5])).shape == (1, DIM)
        with pytest.raises(TableFileError, match="truncated after it was opened"):
            rd.gather(torch.tensor([2000]))


def test_read_only_and_closed(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    rd = PreadRowStore(path)
    assert rd.trainable_parameters() == []
    with pytest.raises(TableFileError, match="read-only"):
        rd.apply_row_update(torch.tensor([1]), torch.ones(1, DIM))
    rd.close()
    rd.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        rd.gather(torch.tensor([1]))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_counters_count_exactly_the_rows_read(tmp_path: Path, dtype: str) -> None:
    path = _table(tmp_path, dtype)
    ids = torch.tensor([[10, 11, 12, 40], [12, 40, 900, 10]])  # 5 distinct, 3 runs
    row_bytes = DIM * (4 if dtype == "float32" else 1) + (4 if dtype == "int8" else 0)
    with PreadRowStore(path) as rd:
        rd.gather(ids)
        st = rd.stats()
        assert (st.gathers, st.rows_served, st.rows_read, st.rows_staged) == (1, 8, 5, 5)
        assert st.bytes_read == 5 * row_bytes  # unique rows x row bytes, nothing more
        assert st.reads == 3 * (2 if dtype == "int8" else 1)  # one per run (and its scales)
        assert st.bytes_per_row_served == st.bytes_read / 8
        rd.gather(ids)  # now in the page cache: every read is answered at once
        again = rd.stats()
        if again.cached_reads:  # RWF_NOWAIT works here
            assert again.cached_reads - st.cached_reads == st.reads
        rd.reset_stats()
        assert rd.stats().gathers == 0
    with PreadRowStore(path, coalesce_gap=30) as rd:  # 10-12 and 40 share a read
        rd.gather(ids)
        st = rd.stats()
        assert (st.rows_read, st.rows_staged) == (5, 31 + 1)
        assert st.bytes_read == 32 * row_bytes


def test_plan_reads_sorts_dedups_and_coalesces() -> None:
    flat = np.array([9, 3, 4, 9, 20, 5, 3], dtype=np.int64)
    for gap in (0, 1):
        p = plan_reads(flat, gap)
        assert p.unique == 5
        staged = np.concatenate(
            [np.arange(f, f + n) for f, n in zip(p.first, p.nrows, strict=True)]
        )
        assert (staged[p.index] == flat).all() and p.staged == staged.size
    p = plan_reads(flat, 0)
    assert p.first.tolist() == [3, 9, 20] and p.nrows.tolist() == [3, 1, 1]
    assert p.dest.tolist() == [0, 3, 4]
    big = plan_reads(np.tile(flat, 100), 0)  # over 256 ids: the numpy path, same reads
    assert big.first.tolist() == [3, 9, 20] and big.dest.tolist() == [0, 3, 4]
    assert (big.index == np.tile(p.index, 100)).all()
    p = plan_reads(flat, 5)  # 3-5 and 9 within 5 rows of each other
    assert p.first.tolist() == [3, 20] and p.nrows.tolist() == [7, 1]
    assert plan_reads(np.zeros(0, dtype=np.int64)).staged == 0


def test_concurrent_gathers_from_several_threads(tmp_path: Path) -> None:
    path = _table(tmp_path, "bfloat16")
    ram = read_table(path)
    errors: list[BaseException] = []
    with PreadRowStore(path, threads=2) as rd:

        def work(seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            try:
                for _ in range(40):
                    n = int(torch.randint(1, 400, (1,), generator=gen))
                    ids = torch.randint(0, NUM_ROWS, (n,), generator=gen)
                    assert torch.equal(rd.gather(ids), ram[ids])
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_composes_with_cache_and_prefetch(tmp_path: Path) -> None:
    path = _table(tmp_path, "float16")
    ram = read_table(path)
    rd = PreadRowStore(path, check_bounds=False)
    cache = CachedRowStore(rd, capacity_rows=64, check_bounds=False)
    with Prefetcher() as pf:
        top = PrefetchingStore(cache, pf)
        for step in range(6):
            ids = _ids()[step % 4]
            top.prefetch(ids)
            assert torch.equal(top.gather(ids), ram[ids])
        assert top.stats.prefetched_hits == 6 and top.stats.sync_gathers == 0
        assert 0.0 <= top.stats.hidden_fraction <= 1.0
        assert top.stats.read_time_s >= top.stats.fetch_time_s + top.stats.ready_time_s > 0
        stats = stack_stats({1: top})["1"]
    assert stats["reader"]["kind"] == "PreadRowStore"
    assert stats["reader"]["rows_served"] == cache.stats().unique_misses  # the cache's misses
    assert stats["cache"]["lookups"] == 6 * 45
    rd.close()


def test_proc_read_bytes_is_a_counter() -> None:
    before = proc_read_bytes()
    if before is None:
        pytest.skip("no /proc/self/io here")
    after = proc_read_bytes()
    assert after is not None and after >= before >= 0


def test_kernel_availability_is_reported(tmp_path: Path) -> None:
    with PreadRowStore(_table(tmp_path, "float32")) as rd:
        assert rd.uses_kernel == kernel_available()
    with PreadRowStore(_table(tmp_path, "float32"), kernel=False) as rd:
        assert not rd.uses_kernel


# ----------------------------------------------------------------------------- serving


@pytest.mark.usefixtures("one_thread", "analysis_env")
@pytest.mark.parametrize(
    "tier",
    [
        TierConfig(store="mmap", reader="pread", prefetch=False),
        TierConfig(store="mmap", reader="pread", cache_rows=64),
        TierConfig(store="mmap", reader="pread", reader_threads=2, cache_rows=64),
        TierConfig(store="mmap", reader="mmap", cache_rows=64),
    ],
    ids=["pread", "pread+cache+prefetch", "pread-threads", "mmap+cache+prefetch"],
)
def test_generation_with_the_reader_is_bit_identical_to_ram(run: Path, tier: TierConfig) -> None:
    with load_served(run) as ram:
        ref = generate_prompts(ram, temperature=0.9, seed=1, prefill_chunk=3)
    with load_served(run, tier) as served:
        got = generate_prompts(served, temperature=0.9, seed=1, prefill_chunk=3)
        stats = served.stats()["1"]
        store = served.parts.model.engram_layers()[1].store
    assert got.tokens == ref.tokens
    assert ref.logits is not None and got.logits is not None
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    while getattr(store, "inner", None) is not None:
        store = store.inner
    assert type(store) is (PreadRowStore if tier.reader == "pread" else MmapRowStore)
    assert stats["reader"]["rows_served"] > 0
    rows = got.stats["rows"]
    for phase in ("prefill", "decode"):
        assert rows[phase]["read_s"] > 0
        assert 0.0 <= rows[phase]["hidden_fraction"] <= 1.0
        assert rows[phase]["blocked_s"] >= 0.0
    if not tier.prefetch:  # no prefetch: every read is on the critical path
        assert rows["decode"]["hidden_fraction"] == 0.0
    else:
        assert stats["prefetch"]["prefetched_hits"] > 0
    assert "rows" in ref.stats and ref.stats["rows"]["decode"]["read_s"] == 0.0  # RAM: no reads


def test_tier_config_checks_the_reader() -> None:
    with pytest.raises(ValueError, match="reader must be one of"):
        TierConfig(store="mmap", reader="uring")
    with pytest.raises(ValueError, match="options of the pread reader"):
        TierConfig(store="mmap", reader="mmap", direct=True)
    with pytest.raises(ValueError, match="reader_threads"):
        TierConfig(store="mmap", reader="pread", reader_threads=-1)


def test_auto_reader_maps_tables_that_fit_and_preads_larger_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _table(tmp_path, "float32")
    auto = TierConfig(store="mmap", reader="auto")
    assert TierConfig().reader == "auto"  # the default (see engram.serving for why)
    assert resolve_reader(TierConfig(store="mmap"), path) == "mmap"  # which maps a small file
    assert resolve_reader(auto, path) == "mmap"  # a small file
    assert resolve_reader(TierConfig(store="mmap", reader="auto", direct=True), path) == "pread"
    assert resolve_reader(TierConfig(store="mmap", reader="pread"), path) == "pread"
    monkeypatch.setattr(serving, "AUTO_PREAD_RAM_FRACTION", 1e-12)  # "larger than RAM"
    assert resolve_reader(auto, path) == "pread"
    assert resolve_reader(TierConfig(store="mmap", reader="mmap"), path) == "mmap"


@pytest.mark.usefixtures("one_thread", "analysis_env")
def test_cli_generate_picks_the_reader(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engram.cli import main

    argv = ["generate", "--ckpt", str(run), "--prompt", "In the beginning", "--store", "mmap",
            "--max-new-tokens", "4", "--temperature", "0", "--json", "--prefill-chunk", "2"]  # fmt: skip
    assert main([*argv, "--reader", "mmap"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main([*argv, "--reader", "pread", "--reader-threads", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert ref["tiers"]["1"]["reader"]["kind"] == "MmapRowStore"
    assert got["tiers"]["1"]["reader"]["kind"] == "PreadRowStore"
    assert got["tiers"]["1"]["reader"]["bytes_read"] > 0
    assert got["outputs"] == ref["outputs"]  # greedy: the same text from either reader
    assert 0.0 <= got["rows"]["decode"]["hidden_fraction"] <= 1.0


def test_mmap_release_pages_keeps_the_rows(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    ids = _ids()
    with MmapRowStore(path) as mm:
        want = mm.gather(ids)
        mm.release_pages()
        assert torch.equal(mm.gather(ids), want)
        assert mm.stats().gathers == 2 and mm.stats().rows_served == 2 * ids.numel()


def _evict(path: Path) -> None:
    """Drop the file from the page cache (best effort: pages still on a CPU's LRU batch can
    survive one call, so it is repeated)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(3):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            time.sleep(0.01)
    finally:
        os.close(fd)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("variant", ["python", "kernel", "threads", "coalesce"])
def test_gather_nowait_serves_cached_rows_and_finish_reads_the_rest(
    tmp_path: Path, dtype: str, variant: str
) -> None:
    path = _table(tmp_path, dtype)
    ids = _ids()
    with PreadRowStore(path, **VARIANTS[variant]) as rd:
        expected = rd.gather(ids)  # the rows are now in the page cache
        warm = rd.gather_nowait(ids)
        if not rd.uses_kernel:  # no mincore probe: nothing is read on the caller's thread
            assert np.array_equal(warm.pending, np.arange(ids.numel()))
            assert warm.finish is not None
            warm.finish()
            assert torch.equal(warm.out, expected)
            return
        assert warm.complete and warm.pending.size == 0
        assert torch.equal(warm.out, expected)

        _evict(path)
        before = rd.stats()
        part = rd.gather_nowait(ids)
        assert part.out.shape == expected.shape
        flat = part.out.view(-1, DIM)
        served = np.setdiff1d(np.arange(ids.numel()), part.pending)
        assert torch.equal(flat[served], expected.view(-1, DIM)[served])  # served rows exact
        if part.complete:
            pytest.skip("this filesystem kept the file in the page cache after DONTNEED")
        pending_ids = ids.view(-1)[part.pending]
        # every occurrence of a pending id is pending, and no served id is
        assert not np.isin(ids.view(-1)[served].numpy(), pending_ids.numpy()).any()
        assert part.finish is not None
        part.finish()
        assert torch.equal(part.out, expected)
        after = rd.stats()
        assert after.rows_served - before.rows_served == ids.numel()  # each row counted once


@pytest.mark.skipif(not kernel_available(), reason="the C read kernel is not built")
@pytest.mark.parametrize("reader", ["pread", "mmap"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_gather_nowait_starts_no_disk_read(tmp_path: Path, reader: str, dtype: str) -> None:
    """The probe reads only rows whose pages are cached (mincore): on an evicted file it makes
    the kernel fetch nothing (a RWF_NOWAIT read that misses would start the disk read; touching
    the map would fault the page in)."""
    path = _table(tmp_path, dtype, num_rows=200_000, dim=8)
    if proc_read_bytes() is None:
        pytest.skip("no /proc/self/io here")
    ids = torch.randint(0, 200_000, (64,), generator=torch.Generator().manual_seed(5))
    store = PreadRowStore if reader == "pread" else MmapRowStore
    with store(path) as rd:
        warm = rd.gather(ids)
        part = rd.gather_nowait(ids)  # the pages are cached now: everything at once
        assert part.complete and torch.equal(part.out, warm)
        if reader == "mmap":
            rd.release_pages()  # mapped pages cannot be evicted
        _evict(path)
        before = proc_read_bytes()
        part = rd.gather_nowait(ids)
        assert proc_read_bytes() == before
        if part.complete:
            pytest.skip("this filesystem kept the file in the page cache after DONTNEED")
        served = np.setdiff1d(np.arange(ids.numel()), part.pending)
        assert torch.equal(part.out[served], warm[served])
        assert part.finish is not None
        part.finish()  # the reads happen here (on the prefetch worker, in serving)
        assert torch.equal(part.out, warm)


@pytest.mark.parametrize("kernel", [True, False])
def test_gather_nowait_without_rwf_nowait_leaves_everything_to_finish(
    tmp_path: Path, kernel: bool
) -> None:
    path = _table(tmp_path, "bfloat16")
    ids = _ids()
    with PreadRowStore(path, kernel=kernel) as rd:
        expected = rd.gather(ids)
        rd._nowait = False  # as on a filesystem that refuses RWF_NOWAIT (or with O_DIRECT)
        part = rd.gather_nowait(ids)
        assert not part.complete
        assert np.array_equal(part.pending, np.arange(ids.numel()))
        assert part.finish is not None
        part.finish()
        assert torch.equal(part.out, expected)


def test_gather_nowait_direct_leaves_everything_to_finish(tmp_path: Path) -> None:
    path = _table(tmp_path, "float32")
    if not _direct_ok(path):
        pytest.skip("no O_DIRECT on this filesystem")
    ids = _ids()
    with PreadRowStore(path, direct=True) as rd:
        part = rd.gather_nowait(ids)
        assert part.pending.size == ids.numel() and part.finish is not None
        part.finish()
        assert torch.equal(part.out, read_table(path)[ids])


def test_gather_nowait_checks_ids_like_gather(tmp_path: Path) -> None:
    with PreadRowStore(_table(tmp_path, "float32")) as rd:
        with pytest.raises(RowOutOfRangeError, match=f"row id {NUM_ROWS}"):
            rd.gather_nowait(torch.tensor([0, NUM_ROWS]))
        with pytest.raises(TypeError, match="integer"):
            rd.gather_nowait(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="closed"):
        rd.gather_nowait(torch.tensor([0]))


def test_cache_prefetch_over_evicted_file_reads_misses_on_the_worker(tmp_path: Path) -> None:
    """pread + row cache + prefetch: warm requests never reach the worker; after eviction the
    worker reads only what would wait, and the values are exact throughout."""
    path = _table(tmp_path, "float16")
    ram = read_table(path)
    rd = PreadRowStore(path, check_bounds=False)
    cache = CachedRowStore(rd, capacity_rows=40, check_bounds=False)
    with Prefetcher() as pf:
        top = PrefetchingStore(cache, pf)
        ids = _ids()
        for _ in range(2):  # a warm page cache: served at prefetch, no worker job
            top.prefetch(ids)
            assert torch.equal(top.gather(ids), ram[ids])
        assert top.stats.ready_prefetches == 2 and top.stats.fetch_time_s == 0.0
        _evict(path)
        other = (ids + 1000) % NUM_ROWS  # not in the row cache
        top.prefetch(other)
        assert torch.equal(top.gather(other), ram[other])
        assert top.stats.prefetched_hits == 3 and top.stats.sync_gathers == 0
        if top.stats.ready_prefetches == 3:
            pytest.skip("this filesystem kept the file in the page cache after DONTNEED")
        assert top.stats.fetch_time_s > 0  # the worker read what would have waited
    rd.close()
