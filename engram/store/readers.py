"""Opening a table file for serving: which reader (mmap or pread), with the serving defaults.

Design choices:
- One place decides how a `.engt` file is read, so `engram.serving` (runs) and `engram.hf.io`
  (Hugging Face saves) build the same innermost store; it lives in the store package because
  both of those import it, and the store package imports nothing above it.
- "auto" reads a file larger than `AUTO_PREAD_RAM_FRACTION` of physical memory row by row with
  pread (exactly the requested bytes; no mapped pages count against the process) and maps a
  smaller one (from the page cache a mapped gather is the cheapest); measured in
  benchmarks/RESULTS.md. The pread-only options (threads, O_DIRECT) imply pread.
"""

from __future__ import annotations

import os
from pathlib import Path

from engram.store.base import RowStore
from engram.store.mmap import MmapRowStore
from engram.store.pread import PreadRowStore

READERS = ("auto", "mmap", "pread")  # how a table file is read
AUTO_PREAD_RAM_FRACTION = 0.5  # "auto": pread for a table file larger than this share of RAM
WILLNEED_MAX = 4096  # rows per request advised to the kernel up front (a decode step reads B*H)


def choose_reader(
    reader: str,
    path: str | os.PathLike[str],
    *,
    pread_options: bool = False,
    ram_fraction: float = AUTO_PREAD_RAM_FRACTION,
) -> str:
    """ "mmap" or "pread" for `reader` ("auto", "mmap" or "pread"): "auto" is decided by the
    file's size against RAM (pread whenever `pread_options`, threads or O_DIRECT, are asked)."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {list(READERS)}, got {reader!r}")
    if reader != "auto":
        return reader
    if pread_options:
        return "pread"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported: assume the table fits
        return "mmap"
    return "pread" if Path(path).stat().st_size > ram_fraction * ram else "mmap"


def open_table_file(
    path: str | os.PathLike[str],
    reader: str = "auto",
    *,
    fingerprint: str | None = None,
    verify: bool = False,
    threads: int = 0,
    direct: bool = False,
    willneed: bool = True,
) -> RowStore:
    """The table file at `path` as a read-only row store, read as `reader` says (bounds are
    checked by the Engram layer, not here)."""
    if choose_reader(reader, path, pread_options=bool(threads or direct)) == "pread":
        return PreadRowStore(
            path, expected_fingerprint=fingerprint, verify=verify, check_bounds=False,
            threads=threads, direct=direct,
        )  # fmt: skip
    return MmapRowStore(
        path, expected_fingerprint=fingerprint, verify=verify, check_bounds=False,
        willneed_max=WILLNEED_MAX if willneed else 0,
    )  # fmt: skip
