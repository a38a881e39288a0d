"""A row store backed by a memory-mapped Engram table file (`engram.store.tablefile`).

Design choices:
- Zero copy: the file is mapped with Python's `mmap` and its (page-aligned) data region is viewed
  as a (num_rows, dim) tensor with `torch.frombuffer`; int8 files also view their (num_rows,)
  float32 scales. `gather` is one `index_select` on that view, so with the pages in the page cache
  it costs what `index_select` on an in-RAM tensor does, and a table larger than RAM works: the
  kernel pages rows in on first touch and evicts them under pressure.
- `gather` returns `out_dtype` (float32 by default): bfloat16/float16 rows are cast after the
  select; int8 rows are dequantised as q.float() * scale[rows] (error <= scale / 2 per element).
  Only the selected rows are converted, never the whole table. Results are CPU tensors.
- Read-only by default: the map is PROT_READ, so concurrent gathers need no lock (nothing is
  mutated). The read-only map is exposed to torch as a read-only buffer; the store never hands the
  raw view out, and every gather returns a fresh tensor.
- Writable mode (float32 files only) is for optimizers that keep their table on disk: it sets the
  header's DIRTY flag (fsynced) before mapping, applies `apply_row_update` (duplicates accumulate,
  `index_add_`) and `write_rows` (set rows, `index_copy_`) straight into the shared map, and
  `seal()` flushes, recomputes the data crc and rewrites the header with DIRTY cleared. A crash
  between open and seal leaves the flag set, and read-only opens refuse the file ("not sealed")
  unless `allow_dirty=True` -- e.g. to inspect it, or to reopen it writable and reseal it. Writes
  are serialised by a lock; they are not synchronised with concurrent gathers (a gather racing a
  write to the same row may see either version, never a torn file).
- Random access is the norm (a token's rows are scattered over the table), so the map is advised
  MADV_RANDOM: a page fault reads one page instead of a read-ahead window. Measured on this
  machine's disk with a cold 32 GiB table: 5.7 ms per row with the default read-ahead, 0.08 ms
  with MADV_RANDOM. With `willneed_max` > 0, a request of up to that many rows first tells the
  kernel every page it will touch (MADV_WILLNEED), so the reads of one request are issued
  together rather than one fault at a time: 0.02-0.05 ms per row cold, but about 2-3 us per row
  of syscalls when the pages are already cached. It is off by default (a bare gather stays one
  `index_select`) and on in the serving tier, where prefetch runs it off the critical path.
  Sequential reads (`read_range`: export, checkpoint copies) use plain file reads with read-ahead.
- `gather_nowait` (what `PrefetchingStore` asks first, on the model thread) selects only the rows
  whose pages are in the page cache, found with mincore() on a second, never-touched mapping (the
  `engram.store.readkernel.ResidencyProbe`: the probe reads nothing, whereas touching the main map would
  fault a missing page in right there); the rest is left to the prefetch worker.
- No autograd: `trainable_parameters()` is empty; training goes through `apply_row_update`.
- Counters (`stats()`, the row reader's `ReadStats`): gathers, rows served and the wall time in
  `gather`. What a gather made the kernel read from storage is invisible to the store (page
  faults); compare /proc/self/io (`engram.store.pread.proc_read_bytes`) around a workload.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engram.store.base import PartialGather, check_row_ids, complete_gather, finish_by_gather
from engram.store.filestore import TableFileStore
from engram.store.tablefile import (
    FLAG_DIRTY,
    TableFileError,
    TableHeader,
    pack_header,
    write_table,
)

_CRC_CHUNK = 16 << 20


class MmapRowStore(TableFileStore):
    """A (num_rows, dim) table read through a memory map of a `.engt` file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        writable: bool = False,
        verify: bool = False,
        out_dtype: torch.dtype = torch.float32,
        check_bounds: bool = True,
        allow_dirty: bool = False,
        willneed_max: int = 0,
    ) -> None:
        self.willneed_max = int(willneed_max)
        self._writable = bool(writable)
        self.check_bounds = bool(check_bounds)
        self._lock = threading.Lock()
        h = self._open_header(
            path, expected_fingerprint=expected_fingerprint, verify=verify,
            allow_dirty=allow_dirty, out_dtype=out_dtype,
        )  # fmt: skip
        if self._writable and h.dtype != "float32":
            raise TableFileError(
                f"table file {self._path} stores {h.dtype} rows; only float32 tables can be "
                "opened writable (row updates on rounded/quantised rows would drift)"
            )
        self._file = open(self._path, "r+b" if self._writable else "rb")  # noqa: SIM115
        try:
            self._dirty_on_disk = h.dirty
            if self._writable:  # mark DIRTY (durably) before the first byte can change
                self._mark_dirty()
            access = mmap.ACCESS_WRITE if self._writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(self._file.fileno(), h.file_nbytes, access=access)
            with contextlib.suppress(AttributeError, OSError):  # not every platform has it
                self._mm.madvise(mmap.MADV_RANDOM)
            self._data, self._scale = self._views()
        except BaseException:
            self._file.close()
            raise
        self._closed = False

    # ------------------------------------------------------------------ setup
    def _views(self) -> tuple[Tensor, Tensor | None]:
        h = self._header
        with warnings.catch_warnings():  # a read-only map is a read-only buffer; we never write it
            warnings.filterwarnings("ignore", message=".*not writable.*")
            data = torch.frombuffer(
                self._mm,
                dtype=h.torch_dtype,
                count=h.num_rows * h.dim,
                offset=h.data_offset,
            ).view(h.num_rows, h.dim)  # (num_rows, dim)
            scale = None
            if h.scale_nbytes:
                scale = torch.frombuffer(
                    self._mm, dtype=torch.float32, count=h.num_rows, offset=h.scale_offset
                )  # (num_rows,)
        return data, scale

    def _write_header(self, h: TableHeader) -> None:
        """Rewrite the header through the file descriptor and fsync it."""
        os.pwrite(self._file.fileno(), pack_header(h), 0)
        os.fsync(self._file.fileno())
        self._header = h
        self._dirty_on_disk = h.dirty

    def _mark_dirty(self) -> None:
        """Set the DIRTY flag on disk (once per seal cycle) before rows change."""
        if not self._dirty_on_disk:
            self._write_header(replace(self._header, flags=self._header.flags | FLAG_DIRTY))

    # ------------------------------------------------------------------ properties
    @property
    def writable(self) -> bool:
        return self._writable

    # ------------------------------------------------------------------ reading
    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, shape S) -> S + (dim,) in `out_dtype`, on the CPU."""
        flat = self._flat_ids(rows, "gather")  # (R,)
        if 0 < flat.numel() <= self.willneed_max:
            self._will_need(flat)
        return self._select(flat).reshape(*rows.shape, self.dim)  # S + (dim,)

    def gather_nowait(self, rows: Tensor) -> PartialGather:
        """The rows whose pages are in the page cache (mincore on a separate, never-read mapping:
        the probe reads nothing from storage), selected at once; the others are left to
        `finish`, a `gather` (see `engram.store.base.PartialGather`). Without the C read kernel
        every row is left to `finish`."""
        flat = self._flat_ids(rows, "gather_nowait")  # (R,)
        shape = (*rows.shape, self.dim)
        probe = self._residency()
        if probe is None:
            ready = np.zeros(flat.numel(), dtype=bool)
        else:
            h = self._header
            ids = flat.numpy()
            ready = probe.resident(h.data_offset + ids * self._row_nbytes, self._row_nbytes)
            if self._scale is not None:
                ready &= probe.resident(h.scale_offset + ids * 4, 4)
        if ready.all():
            return complete_gather(self._select(flat).view(shape))
        out = torch.empty(flat.numel(), self.dim, dtype=self._out_dtype)  # (R, dim)
        at = np.flatnonzero(ready)
        if at.size:
            idx = torch.from_numpy(at)
            out[idx] = self._select(flat.index_select(0, idx))
        pending = np.flatnonzero(~ready)
        return PartialGather(out.view(shape), pending, finish_by_gather(self, flat, out, pending))

    def _flat_ids(self, rows: Tensor, what: str) -> Tensor:
        self._check_open(what)
        if self.check_bounds:
            check_row_ids(rows, self.num_rows, what=f"MmapRowStore.{what}")
        elif rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise TypeError(f"MmapRowStore.{what}: row ids must be integer, got {rows.dtype}")
        return rows.reshape(-1).to(device="cpu", dtype=torch.long)  # (R,)

    def _select(self, flat: Tensor) -> Tensor:
        """Rows `flat` (R,) -> (R, dim) in `out_dtype`: one index_select on the mapped view."""
        t0 = time.perf_counter()
        out = torch.index_select(self._data, 0, flat)  # (R, dim) storage dtype
        if self._scale is not None:
            out = out.float() * self._scale.index_select(0, flat)[:, None]
        out = out.to(self._out_dtype)
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self._stats.gathers += 1
            self._stats.rows_served += flat.numel()
            self._stats.read_time_s += elapsed
        return out

    def _fileno(self) -> int:
        return self._file.fileno()

    def _will_need(self, flat: Tensor) -> None:
        """Ask the kernel to read the pages of rows `flat` (R,) now, all at once (MADV_WILLNEED)."""
        h, page, stride = self._header, mmap.PAGESIZE, self._row_nbytes
        first = (h.data_offset + flat * stride) // page  # (R,) pages a row starts on
        last = (h.data_offset + (flat + 1) * stride - 1) // page
        pages = torch.unique(torch.cat([first, last])).tolist()
        if self._scale is not None:
            pages += torch.unique((h.scale_offset + flat * 4) // page).tolist()
        madvise = getattr(self._mm, "madvise", None)
        if madvise is None:
            return
        with contextlib.suppress(OSError):
            for p in pages:
                madvise(mmap.MADV_WILLNEED, p * page, page)

    def release_pages(self) -> None:
        """Unmap the pages this store has touched (MADV_DONTNEED): they leave the process's
        resident set (RssFile) and the kernel may evict them from the page cache; later gathers
        fault them in again. Written rows are not lost (the map is shared with the file)."""
        self._check_open("release_pages")
        madvise = getattr(self._mm, "madvise", None)
        if madvise is not None:
            with self._lock:
                madvise(mmap.MADV_DONTNEED)

    def read_range(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) as (stop - start, dim) `out_dtype`, read sequentially from the file
        (kernel read-ahead), for scans such as exports and checkpoint copies."""
        self._check_open("read_range")
        h, stride = self._header, self._row_nbytes
        if not 0 <= start <= stop <= h.num_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside [0, {h.num_rows})")
        n = stop - start
        if n == 0:
            return torch.empty(0, h.dim, dtype=self._out_dtype)
        raw = os.pread(self._file.fileno(), n * stride, h.data_offset + start * stride)
        out = torch.frombuffer(bytearray(raw), dtype=h.torch_dtype).view(n, h.dim)
        if self._scale is not None:
            sraw = os.pread(self._file.fileno(), n * 4, h.scale_offset + start * 4)
            out = out.float() * torch.frombuffer(bytearray(sraw), dtype=torch.float32)[:, None]
        return out.to(self._out_dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    # ------------------------------------------------------------------ writing
    def _check_writable(self, what: str) -> None:
        self._check_open(what)
        if not self._writable:
            raise TableFileError(
                f"MmapRowStore.{what}: {self._path} is open read-only; open it with "
                "writable=True to update rows"
            )

    def _check_update(self, what: str, rows: Tensor, values: Tensor) -> Tensor:
        self._check_writable(what)
        if rows.dim() != 1:
            raise ValueError(f"{what}: rows must be 1-D (R,), got shape {tuple(rows.shape)}")
        if values.shape != (rows.shape[0], self.dim):
            raise ValueError(
                f"{what}: values must have shape (R, dim) = ({rows.shape[0]}, {self.dim}), "
                f"got {tuple(values.shape)}"
            )
        check_row_ids(rows, self.num_rows, what=f"MmapRowStore.{what}")
        return rows.to(device="cpu", dtype=torch.long)

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """In place, in the file: row[rows[i]] += delta[i]; duplicate ids accumulate."""
        idx = self._check_update("apply_row_update", rows, delta)
        with self._lock:
            self._mark_dirty()
            self._data.index_add_(0, idx, delta.detach().to("cpu", torch.float32))

    def write_rows(self, rows: Tensor, values: Tensor) -> None:
        """In place, in the file: row[rows[i]] = values[i]; ids must be distinct."""
        idx = self._check_update("write_rows", rows, values)
        if idx.unique().numel() != idx.numel():
            raise ValueError("write_rows: row ids must be distinct (use apply_row_update to add)")
        with self._lock:
            self._mark_dirty()
            self._data.index_copy_(0, idx, values.detach().to("cpu", torch.float32))

    def flush(self) -> None:
        """Write dirty pages back to the file (msync)."""
        self._check_open("flush")
        if self._writable:
            with self._lock:
                self._mm.flush()

    def seal(self) -> TableHeader:
        """Flush, recompute the data crc and rewrite the header with DIRTY cleared (fsynced).

        The store stays open and writable; the next row write marks the file dirty again.
        """
        self._check_writable("seal")
        with self._lock:
            self._mm.flush()
            h = self._header
            if not self._dirty_on_disk:  # nothing written since the last seal
                return h
            crc = 0
            with memoryview(self._mm) as view:
                for offset, nbytes in (
                    (h.data_offset, h.data_nbytes),
                    (h.scale_offset, h.scale_nbytes),
                ):
                    for a in range(offset, offset + nbytes, _CRC_CHUNK):
                        crc = zlib.crc32(view[a : min(a + _CRC_CHUNK, offset + nbytes)], crc)
            # Write the sealed header; the next row write sets DIRTY again before changing a byte.
            self._write_header(replace(h, flags=h.flags & ~FLAG_DIRTY, data_crc=crc))
        return self._header

    def close(self, *, seal: bool = True) -> None:
        """Release the map and the file (idempotent); a writable store is sealed unless told not.

        Do not close while other threads are gathering: the map they read would vanish.
        """
        if self._closed:
            return
        if self._writable and seal:
            self.seal()
        with self._lock:
            self._closed = True
            if self._writable:
                self._mm.flush()
            self._data = self._scale = None  # type: ignore[assignment]  # drop the buffer exports
            self._close_probe()
            self._mm.close()
            self._file.close()

    def __del__(self) -> None:
        # Garbage collection releases the map but never seals: an unsealed writer stays DIRTY,
        # exactly as if it had crashed.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
                self.close(seal=False)

    def __repr__(self) -> str:
        mode = "writable" if self._writable else "read-only"
        return (
            f"MmapRowStore({str(self._path)!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"storage={self.storage_dtype}, out={self._out_dtype}, {mode})"
        )


def create_table_file(
    path: str | os.PathLike[str],
    num_rows: int,
    dim: int,
    *,
    fingerprint: str,
    layer_id: int,
    init: Callable[[int, int], Tensor] | None = None,
    dtype: str = "float32",
    meta: Mapping[str, Any] | None = None,
    chunk_rows: int = 65536,
) -> TableHeader:
    """A new table file of `num_rows` x `dim` rows from `init(start, stop)` (zeros if None).

    Streams through `write_table`, so the table never has to fit in memory.
    """

    def zeros(start: int, stop: int) -> Tensor:
        return torch.zeros(stop - start, dim)

    return write_table(
        path,
        init if init is not None else zeros,
        dtype=dtype,
        fingerprint=fingerprint,
        layer_id=layer_id,
        meta=meta,
        num_rows=num_rows,
        dim=dim,
        chunk_rows=chunk_rows,
    )
