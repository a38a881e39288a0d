"""What the two readers of a `.engt` table file share: opening checks, properties and counters.

`MmapRowStore` (engram.store.mmap) and `PreadRowStore` (engram.store.pread) read the same file
format in two ways. This base holds what does not depend on the way: the header check at open
(magic, crc, size, sealed flag, fingerprint; optionally the data crc), the read-only properties
that describe the table, the `ReadStats` counters and their lock, and the closed-store check.

Design choices:
- A base class, not a helper: the properties are the stores' public API, written once here.
- `_open_header` only reads and checks; opening the file (mmap or a descriptor) stays with each
  store, which also owns `close()` and `__repr__`.
- Both stores answer `gather_nowait` from the same page-cache residency probe
  (`engram.store.readkernel.ResidencyProbe`), made here on first use from the store's descriptor
  (`_fileno`) and closed by the store's `close` (`_close_probe`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor

from engram.store.readkernel import ResidencyProbe
from engram.store.tablefile import ITEMSIZE, TableHeader, _check_host, read_header, verify_table


@dataclass
class ReadStats:
    """Counters of a table-file store since construction or `reset_stats()` (MmapRowStore fills
    gathers, rows served and read time; PreadRowStore all of them)."""

    gathers: int = 0  # gather calls
    rows_served: int = 0  # ids returned (duplicates within a call included)
    rows_read: int = 0  # distinct rows fetched from the file
    rows_staged: int = 0  # rows read including the gap rows coalescing read along
    reads: int = 0  # preadv calls that returned data (after coalescing; retries included)
    cached_reads: int = 0  # reads answered from the page cache without blocking (RWF_NOWAIT)
    bytes_read: int = 0  # bytes copied from the file (rows + gaps + int8 scales; direct: aligned)
    read_time_s: float = 0.0  # wall time in the read phase of gathers

    @property
    def bytes_per_row_served(self) -> float:
        return self.bytes_read / self.rows_served if self.rows_served else 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d["bytes_per_row_served"] = self.bytes_per_row_served
        return d


class TableFileStore:
    """Base of the stores that read a `.engt` file: call `_open_header` first in `__init__`."""

    _path: Path
    _out_dtype: torch.dtype
    _header: TableHeader
    _row_nbytes: int
    _closed: bool

    def _open_header(
        self,
        path: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None,
        verify: bool,
        allow_dirty: bool,
        out_dtype: torch.dtype,
    ) -> TableHeader:
        """Check the host, `out_dtype` and the file's header (and data crc if `verify`)."""
        _check_host()
        if not out_dtype.is_floating_point:
            raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
        self._path = Path(path)
        self._out_dtype = out_dtype
        self._closed = True
        self._stats_lock = threading.Lock()
        self._stats = ReadStats()
        self._probe: ResidencyProbe | None = None  # made on first use by `_residency`
        check = verify_table if verify else read_header
        h = check(self._path, expected_fingerprint=expected_fingerprint, allow_dirty=allow_dirty)
        self._header = h
        self._row_nbytes = h.dim * ITEMSIZE[h.dtype]  # data stride (int8 scales live apart)
        return h

    @property
    def num_rows(self) -> int:
        return self._header.num_rows

    @property
    def dim(self) -> int:
        return self._header.dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `gather` returns (`out_dtype`)."""
        return self._out_dtype

    @property
    def storage_dtype(self) -> str:
        """The file's row dtype: "float32", "bfloat16", "float16" or "int8"."""
        return self._header.dtype

    @property
    def header(self) -> TableHeader:
        return self._header

    @property
    def path(self) -> Path:
        return self._path

    @property
    def nbytes(self) -> int:
        """Size of the file on disk."""
        return self._header.file_nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> ReadStats:
        """A copy of the counters."""
        with self._stats_lock:
            return replace(self._stats)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = ReadStats()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__}.{what}: the store for {self._path} is closed")

    def _fileno(self) -> int:
        """The store's open descriptor of the file."""
        raise NotImplementedError

    def _residency(self) -> ResidencyProbe | None:
        """The page-cache residency probe of this file (made on first use), or None where it
        cannot be made (no C kernel, no mapping, store closed)."""
        if self._probe is None and not self._closed:
            with self._stats_lock:
                if self._probe is None:
                    self._probe = ResidencyProbe(self._fileno(), self._header.file_nbytes)
        return self._probe if self._probe is not None and self._probe.available else None

    def _close_probe(self) -> None:
        probe, self._probe = getattr(self, "_probe", None), None
        if probe is not None:
            probe.close()

    def gather(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, rows: Tensor) -> Tensor:
        return self.gather(rows)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
