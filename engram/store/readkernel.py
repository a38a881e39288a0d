"""The ctypes binding of the row reader's C kernel (`engram/_preadkernel.c`).

Design choices:
- One module binds the kernel for every table-file store: the batched positional reads of
  `PreadRowStore` and the page-cache residency probe that `PreadRowStore` and `MmapRowStore`
  both use for `gather_nowait`.
- `ResidencyProbe` asks mincore() about a second, read-only mapping of the file that is never read
  through: asking costs no I/O, whereas a RWF_NOWAIT read that misses starts the disk read, and
  touching a store's own mapping faults the page in (see `engram.store.base.PartialGather`).
  Without the kernel, or where the mapping cannot be made, every range counts as not resident.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from engram._ext import load_extension


class Kernel(NamedTuple):
    jobs: Any  # engram_pread_jobs
    map_file: Any  # engram_map_file: a read-only mapping for mincore probes
    unmap_file: Any
    resident: Any  # engram_resident: which ranges are in the page cache


@lru_cache(maxsize=1)
def load_kernel() -> Kernel | None:
    """The C extension's functions (ctypes: the GIL is released during a call), or None when it
    was not built."""
    lib = load_extension("engram._preadkernel")
    if lib is None:
        return None
    try:
        fn, map_file, unmap_file = lib.engram_pread_jobs, lib.engram_map_file, lib.engram_unmap_file
        resident = lib.engram_resident
    except AttributeError:  # a stale build
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [c_int, i64, p, p, p, p, c_int, i64, p, p, p]
    fn.restype = c_int
    map_file.argtypes, map_file.restype = [c_int, i64], p
    unmap_file.argtypes, unmap_file.restype = [p, i64], c_int
    resident.argtypes, resident.restype = [p, i64, p, i64, p], i64
    return Kernel(fn, map_file, unmap_file, resident)


class ResidencyProbe:
    """Which byte ranges of an open file are in the page cache, asked without reading anything:
    mincore() on a read-only mapping of the file that is never read through (the C kernel).
    `available` is False without the kernel or where the mapping cannot be made; then every
    range counts as not resident. Thread-safe; `close()` unmaps."""

    def __init__(self, fd: int, nbytes: int) -> None:
        self._kernel = load_kernel()
        self._nbytes = nbytes
        addr = self._kernel.map_file(fd, nbytes) if self._kernel is not None else None
        self.address: int = int(addr or 0)

    @property
    def available(self) -> bool:
        return self.address != 0

    def resident(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """(n,) bool: whether each [offsets[i], offsets[i] + length) is wholly in the page cache."""
        off = np.ascontiguousarray(offsets, dtype=np.int64)
        out = np.zeros(off.size, dtype=bool)
        if self.available and off.size:
            assert self._kernel is not None
            self._kernel.resident(self.address, off.size, off.ctypes.data, length, out.ctypes.data)
        return out

    def close(self) -> None:
        if self.address and self._kernel is not None:
            self._kernel.unmap_file(self.address, self._nbytes)
        self.address = 0


def kernel_available() -> bool:
    """Whether the C read kernel (`engram/_preadkernel.c`) is built and loaded."""
    return load_kernel() is not None
