"""Engram table files (`.engt`) and the mmap row store: round trips, integrity, atomicity, export."""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.export import export_tables
from engram.store import (
    MemoryRowStore,
    MmapRowStore,
    RowOutOfRangeError,
    RowStore,
    TableFileError,
    create_table_file,
    dequantize_int8,
    describe_table,
    quantize_int8,
    read_header,
    read_table,
    read_tables,
    verify_table,
    write_table,
)
from engram.store.tablefile import FLAG_DIRTY, HEADER_NBYTES, pack_header

FP = "0123456789abcdef" * 4  # a sha256-shaped fingerprint
DTYPES = ["float32", "bfloat16", "float16", "int8"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (see conftest)."""


def _table(num_rows: int = 257, dim: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, dim, generator=g)  # (num_rows, dim)
    x[3] = 0.0  # an all-zero row: int8 scale 0, reads back exactly 0
    return x


def _write(path: Path, x: torch.Tensor, dtype: str = "float32", **kw) -> Path:
    kw.setdefault("fingerprint", FP)
    kw.setdefault("layer_id", 1)
    write_table(path, x, dtype=dtype, **kw)
    return path


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_each_dtype(tmp_path, dtype):
    x = _table()
    meta = {"sub_table_sizes": [100, 157], "note": "hi"}
    h = write_table(
        tmp_path / "t.engt", x, dtype=dtype, fingerprint=FP, layer_id=7, meta=meta, chunk_rows=50
    )
    assert (h.num_rows, h.dim, h.dtype, h.layer_id, h.fingerprint) == (257, 12, dtype, 7, FP)
    assert h.meta == meta and not h.dirty
    assert h.data_offset % 4096 == 0 and h.file_nbytes == (tmp_path / "t.engt").stat().st_size
    assert read_header(tmp_path / "t.engt") == h == verify_table(tmp_path / "t.engt")
    y = read_table(tmp_path / "t.engt")
    assert y.dtype == torch.float32 and y.shape == x.shape
    if dtype == "float32":
        assert torch.equal(y, x)  # bit-exact
    elif dtype in ("bfloat16", "float16"):
        assert torch.equal(y, x.to(getattr(torch, dtype)).float())
    else:
        scale = x.abs().amax(dim=1) / 127
        assert (y - x).abs().le(scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
        assert torch.equal(y[3], torch.zeros(12))
        assert h.scale_offset % 64 == 0 and h.scale_nbytes == 257 * 4
        assert h.bytes_per_row == 12 + 4
    assert (tmp_path / "t.engt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_int8_is_a_quarter_of_float32_plus_scales(tmp_path):
    x = _table(4096, 64)
    f32 = _write(tmp_path / "a.engt", x).stat().st_size - HEADER_NBYTES
    i8 = _write(tmp_path / "b.engt", x, "int8").stat().st_size - HEADER_NBYTES
    assert f32 == 4096 * 64 * 4
    assert i8 == 4096 * 64 + 4096 * 4  # rows + one float32 scale per row (already 64-aligned)


def test_quantize_int8_codec():
    x = _table(64, 32)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (64,) and int(q.abs().max()) == 127
    assert float(scale[3]) == 0.0 and not q[3].any()
    err = (dequantize_int8(q, scale) - x).abs()
    assert err.le(scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_callable_and_ndarray_sources_write_the_same_bytes(tmp_path, dtype):
    x = _table(1000, 16)
    _write(tmp_path / "tensor.engt", x, dtype, chunk_rows=1000)
    calls = []

    def source(start, stop):
        calls.append((start, stop))
        return x[start:stop].clone()

    write_table(
        tmp_path / "callable.engt",
        source,
        dtype=dtype,
        fingerprint=FP,
        layer_id=1,
        num_rows=1000,
        dim=16,
        chunk_rows=300,
    )
    assert calls == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    np.save(tmp_path / "x.npy", x.numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # an mmap'd ndarray source
    _write(tmp_path / "ndarray.engt", mapped, dtype, chunk_rows=128)
    _write(tmp_path / "bigendian.engt", x.numpy().astype(">f4"), dtype, chunk_rows=999)
    ref = (tmp_path / "tensor.engt").read_bytes()
    for name in ("callable", "ndarray", "bigendian"):
        assert (tmp_path / f"{name}.engt").read_bytes() == ref, name


def test_create_table_file_zeros_and_init(tmp_path):
    h = create_table_file(tmp_path / "z.engt", 10, 4, fingerprint=FP, layer_id=0)
    assert h.num_rows == 10 and torch.equal(read_table(tmp_path / "z.engt"), torch.zeros(10, 4))
    create_table_file(
        tmp_path / "r.engt",
        10,
        4,
        fingerprint=FP,
        layer_id=0,
        init=lambda a, b: torch.arange(a, b).float()[:, None].expand(-1, 4),
        chunk_rows=3,
    )
    assert torch.equal(read_table(tmp_path / "r.engt")[:, 0], torch.arange(10).float())


def test_bad_sources_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_table(
            tmp_path / "t.engt",
            lambda a, b: torch.zeros(b - a, 3),
            fingerprint=FP,
            layer_id=0,
            num_rows=5,
            dim=4,
        )
    with pytest.raises(ValueError, match="num_rows= and dim="):
        write_table(tmp_path / "t.engt", lambda a, b: None, fingerprint=FP, layer_id=0)
    with pytest.raises(ValueError, match="unknown table dtype"):
        write_table(tmp_path / "t.engt", _table(), dtype="fp8", fingerprint=FP, layer_id=0)
    with pytest.raises(ValueError, match="fingerprint"):
        write_table(tmp_path / "t.engt", _table(), fingerprint="x" * 65, layer_id=0)
    with pytest.raises(ValueError, match="float tensor"):
        write_table(
            tmp_path / "t.engt", torch.zeros(4, 4, dtype=torch.long), fingerprint=FP, layer_id=0
        )
    assert not (tmp_path / "t.engt").exists() and _no_temp_files(tmp_path)


def test_large_metadata_grows_the_header_by_whole_pages(tmp_path):
    h = write_table(
        tmp_path / "t.engt", _table(), fingerprint=FP, layer_id=0, meta={"blob": "x" * 5000}
    )
    assert h.header_nbytes == h.data_offset == 8192
    assert torch.equal(read_table(tmp_path / "t.engt"), _table())


# -------------------------------------------------------------------------------- integrity
def test_truncated_files_are_refused_naming_the_path(tmp_path):
    path = _write(tmp_path / "t.engt", _table())
    data = path.read_bytes()
    for cut in (len(data) - 1, HEADER_NBYTES - 1, 100, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(TableFileError, match="truncated") as e:
            read_header(path)
        assert str(path) in str(e.value)
    path.write_bytes(data + b"\0")
    with pytest.raises(TableFileError, match="longer than its header says"):
        read_header(path)


def test_flipped_data_byte_fails_verification_only(tmp_path):
    for dtype, where in (("float32", HEADER_NBYTES + 1000), ("int8", -3)):  # int8: in the scales
        path = _write(tmp_path / f"{dtype}.engt", _table(), dtype)
        data = bytearray(path.read_bytes())
        data[where] ^= 0x40
        path.write_bytes(bytes(data))
        read_header(path)  # the header is intact
        with pytest.raises(TableFileError, match="data crc32") as e:
            verify_table(path)
        assert str(path) in str(e.value)
        with pytest.raises(TableFileError, match="corrupt"):
            read_table(path)
        with pytest.raises(TableFileError, match="corrupt"):
            MmapRowStore(path, verify=True)


@pytest.mark.parametrize("offset", [30, 90, 200, 4000])  # dim, fingerprint, meta, padding
def test_flipped_header_byte_fails_the_header_crc(tmp_path, offset):
    path = _write(tmp_path / "t.engt", _table(), meta={"k": "v"})
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TableFileError, match="header crc32") as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_wrong_magic_and_version(tmp_path):
    path = _write(tmp_path / "t.engt", _table())
    data = path.read_bytes()
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(TableFileError, match=r"not an Engram table file: magic b'PK"):
        read_header(path)
    bad = bytearray(data)
    struct.pack_into("<I", bad, 8, 2)  # version 2, with a consistent header crc
    struct.pack_into("<I", bad, 16, 0)
    struct.pack_into("<I", bad, 16, zlib.crc32(bytes(bad[:HEADER_NBYTES])))
    path.write_bytes(bytes(bad))
    with pytest.raises(TableFileError, match="format version 2; this engram reads version 1"):
        read_header(path)
    with pytest.raises(TableFileError, match="does not exist"):
        read_header(tmp_path / "missing.engt")


def test_fingerprint_mismatch(tmp_path):
    path = _write(tmp_path / "t.engt", _table())
    other = "f" * 64
    with pytest.raises(TableFileError, match="0123456789abcdef, but ffffffffffffffff") as e:
        read_header(path, expected_fingerprint=other)
    assert str(path) in str(e.value)
    with pytest.raises(TableFileError, match="hash configuration"):
        MmapRowStore(path, expected_fingerprint=other)
    with pytest.raises(TableFileError, match="hash configuration"):
        read_table(path, expected_fingerprint=other)
    assert read_header(path, expected_fingerprint=FP).fingerprint == FP


def test_dirty_file_refused_read_only_unless_allowed(tmp_path):
    path = _write(tmp_path / "t.engt", _table())
    h = read_header(path)
    with open(path, "r+b") as f:  # what a crashed writer leaves behind
        f.write(pack_header(replace(h, flags=h.flags | FLAG_DIRTY)))
    with pytest.raises(TableFileError, match="not sealed: a writer crashed or still has it open"):
        read_header(path)
    with pytest.raises(TableFileError, match="not sealed"):
        MmapRowStore(path)
    assert read_header(path, allow_dirty=True).dirty
    assert describe_table(path, verify=False)["dirty"]
    with MmapRowStore(path, allow_dirty=True) as store:
        assert torch.equal(store.gather(torch.arange(5)), _table()[:5])
    # Reopening writable and closing reseals it.
    MmapRowStore(path, writable=True, allow_dirty=True).close()
    assert not verify_table(path).dirty


# ------------------------------------------------------------------------------- atomicity
def test_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    path = _write(tmp_path / "t.engt", _table())
    before = path.read_bytes()
    new = _table(seed=1)

    def source(start, stop):
        if start > 0:
            raise RuntimeError("disk on fire")
        return new[start:stop]

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_table(path, source, fingerprint=FP, layer_id=1, num_rows=257, dim=12, chunk_rows=100)
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)
    with pytest.raises(RuntimeError, match="disk on fire"):  # also when nothing was there
        write_table(
            tmp_path / "new.engt",
            source,
            fingerprint=FP,
            layer_id=1,
            num_rows=257,
            dim=12,
            chunk_rows=100,
        )
    assert not (tmp_path / "new.engt").exists() and _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------ mmap store
def _memory_store(x: torch.Tensor) -> MemoryRowStore:
    store = MemoryRowStore(x.shape[0], x.shape[1])
    with torch.no_grad():
        store.weight.copy_(x)
    return store


def test_mmap_gather_equals_memory_gather(tmp_path):
    x = _table(500, 8)
    path = _write(tmp_path / "t.engt", x)
    ref = _memory_store(x)
    g = torch.Generator().manual_seed(0)
    with MmapRowStore(path) as store:
        assert isinstance(store, RowStore)
        assert (store.num_rows, store.dim, store.dtype, store.storage_dtype) == (
            500,
            8,
            torch.float32,
            "float32",
        )
        assert store.nbytes == path.stat().st_size and store.path == path
        assert store.trainable_parameters() == []
        for shape in [(), (5,), (2, 3, 4), (0,)]:
            rows = torch.randint(0, 500, shape, generator=g)
            out = store.gather(rows)
            assert out.shape == (*shape, 8)
            assert torch.equal(out, ref.gather(rows).detach())
        assert torch.equal(store.gather(torch.tensor([0, 499], dtype=torch.int32)), x[[0, 499]])
        for bad in (torch.tensor([0, 500]), torch.tensor([[-1]])):
            with pytest.raises(RowOutOfRangeError, match=r"out of range \[0, 500\)"):
                store.gather(bad)
        with pytest.raises(TypeError, match="integer"):
            store.gather(torch.tensor([1.0]))
        with pytest.raises(TableFileError, match="read-only"):
            store.apply_row_update(torch.tensor([0]), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="closed"):
        store.gather(torch.tensor([0]))
    store.close()  # idempotent


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_low_precision_stores_gather_the_dequantised_rows(tmp_path, dtype):
    x = _table(300, 16)
    path = _write(tmp_path / "t.engt", x, dtype)
    ref = read_table(path)  # dequantised float32
    rows = torch.randint(0, 300, (4, 7), generator=torch.Generator().manual_seed(1))
    with MmapRowStore(path) as store:
        assert store.storage_dtype == dtype and store.dtype == torch.float32
        assert torch.equal(store.gather(rows), ref[rows])
    with MmapRowStore(path, out_dtype=torch.bfloat16) as store:
        out = store.gather(rows)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref[rows].bfloat16())
    with pytest.raises(TableFileError, match="only float32 tables can be opened writable"):
        MmapRowStore(path, writable=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_read_range_and_page_advice_change_nothing(tmp_path, dtype):
    """Sequential `read_range` and the MADV_WILLNEED path give exactly what `gather` does."""
    x = _table(5000, 12)  # 48-byte rows: some rows straddle a page boundary
    path = _write(tmp_path / "t.engt", x, dtype)
    ids = torch.randint(0, 5000, (3, 40), generator=torch.Generator().manual_seed(2))
    with MmapRowStore(path, willneed_max=4096) as advised, MmapRowStore(path) as plain:
        assert torch.equal(advised.gather(ids), plain.gather(ids))
        whole = plain.gather(torch.arange(5000))
        assert torch.equal(advised.read_range(0, 5000), whole)
        assert torch.equal(advised.read_range(1234, 1301), whole[1234:1301])
        assert advised.read_range(7, 7).shape == (0, 12)
        with pytest.raises(ValueError, match=r"row range \[10, 5001\)"):
            advised.read_range(10, 5001)


def test_concurrent_gathers(tmp_path):
    x = _table(1000, 8)
    path = _write(tmp_path / "t.engt", x)
    errors = []
    with MmapRowStore(path) as store:

        def work(seed):
            g = torch.Generator().manual_seed(seed)
            for _ in range(50):
                rows = torch.randint(0, 1000, (64,), generator=g)
                if not torch.equal(store.gather(rows), x[rows]):
                    errors.append(seed)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_writable_store_updates_like_memory_store_then_seals(tmp_path):
    x = _table(200, 6)
    path = _write(tmp_path / "t.engt", x)
    ref = _memory_store(x)
    rows = torch.tensor([5, 7, 5, 199, 5, 0])  # duplicates accumulate
    delta = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    with MmapRowStore(path, writable=True) as store:
        assert read_header(path, allow_dirty=True).dirty  # marked on open
        with pytest.raises(TableFileError, match="not sealed"):
            MmapRowStore(path)
        store.apply_row_update(rows, delta)
        ref.apply_row_update(rows, delta)
        assert torch.equal(store.gather(torch.arange(200)), ref.weight.detach())
        store.write_rows(torch.tensor([1, 2]), torch.full((2, 6), 3.0))
        with pytest.raises(ValueError, match="distinct"):
            store.write_rows(torch.tensor([1, 1]), torch.zeros(2, 6))
        with pytest.raises(RowOutOfRangeError):
            store.apply_row_update(torch.tensor([200]), torch.zeros(1, 6))
        with pytest.raises(ValueError, match=r"\(R, dim\)"):
            store.apply_row_update(torch.tensor([1]), torch.zeros(1, 5))
        h = store.seal()  # sealed while still open ...
        assert not h.dirty and verify_table(path) == h
        store.apply_row_update(torch.tensor([9]), torch.ones(1, 6))  # ... dirty again on write
        assert read_header(path, allow_dirty=True).dirty
    expected = ref.weight.detach().clone()
    expected[1:3] = 3.0
    expected[9] += 1.0
    assert not verify_table(path).dirty  # close sealed it
    assert torch.equal(read_table(path), expected)
    # close(seal=False) leaves the file dirty, as a crash would.
    store = MmapRowStore(path, writable=True)
    store.close(seal=False)
    assert read_header(path, allow_dirty=True).dirty


# ---------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def engram_run(tmp_path_factory):
    """A tiny trained Engram run (2 steps) with its checkpoint."""
    from engram.presets import tiny_engram
    from engram.run import train
    from engram.run_config import apply_overrides

    cfg = apply_overrides(
        tiny_engram(), ["train.steps=2", "train.eval_every=2", "train.ckpt_every=2"]
    )
    run = tmp_path_factory.mktemp("tablefile-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "train-cache"))
        train(cfg, run, progress=False)
    return run


def test_export_tables_round_trip_from_a_checkpoint(engram_run, tmp_path):
    from safetensors.torch import load_file

    from engram.checkpoint import MODEL_FILE, read_checkpoint

    ckpt = read_checkpoint(engram_run)
    weights = load_file(str(ckpt.path / MODEL_FILE))
    paths = export_tables(engram_run, tmp_path / "tables")
    assert list(paths) == [1] and paths[1].name == "table_L1.engt"
    fp = ckpt.state["hash_fingerprint"]
    tables = read_tables(paths, expected_fingerprint=fp)
    assert torch.equal(tables[1], weights["blocks.1.engram.store.weight"])  # bit-exact
    h = read_header(paths[1])
    assert h.layer_id == 1 and h.fingerprint == fp and h.meta["step"] == 2
    assert sum(h.meta["sub_table_sizes"]) == h.num_rows
    assert h.meta["source_checkpoint"] == str(ckpt.path.resolve())
    # A single-layer model may export to a file path; int8 halves nothing but stays close.
    one = export_tables(engram_run, tmp_path / "single.engt", dtype="int8")
    assert one == {1: tmp_path / "single.engt"}
    with MmapRowStore(one[1], expected_fingerprint=fp) as store:
        q = store.gather(torch.arange(h.num_rows))
    scale = tables[1].abs().amax(dim=1) / 127
    assert (q - tables[1]).abs().le(scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    info = describe_table(paths[1])
    assert info["num_rows"] == h.num_rows and info["size_on_disk"] == h.file_nbytes
    assert info["verified"] and info["row_norm"]["sampled_rows"] > 0
    json.dumps(info)  # JSON-able


def test_export_refuses_baselines(tmp_path):
    from engram.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint(
        tmp_path / "ckpts",
        1,
        torch.nn.Linear(2, 2),
        None,
        {"config": {"name": "b", "engram": None}, "hash_fingerprint": None},
    )
    with pytest.raises(CheckpointError, match="no Engram layers"):
        export_tables(tmp_path / "ckpts", tmp_path / "out")
