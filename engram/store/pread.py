"""A row store that reads exactly the requested rows of a `.engt` table file: rows, not pages.

`MmapRowStore` lets the kernel fault a table in page by page: a 32-byte row costs at least a
4 KiB page read, the page is mapped into the process (RssFile) and each cold fault waits alone
unless the whole request was advised first. `PreadRowStore` instead reads each requested row with
`os.preadv` into a reused staging buffer and gathers the result from there.

Axes in shape comments: S the ids of a request (flattened), U its distinct ids, N the reads after
coalescing, K the rows staged (U plus the gap rows that coalescing reads along).

Design choices:
- One gather is planned as a whole: the ids are deduplicated and sorted (`np.unique`), runs of
  adjacent rows (and, with `coalesce_gap` > 0, rows at most that many rows apart) become ONE read
  each, and the reads go out in file order. Duplicates cost nothing: the output is an
  `index_select` of the staged rows by the inverse map, so it is bit-identical to `MmapRowStore`
  and to an in-RAM table (same dtype conversions, in the same order: int8 rows are dequantised as
  q.float() * scale[rows], bf16/fp16 rows cast after the select).
- Several reads in flight without a thread per read. Buffered mode (the default) reads through
  the page cache with the file advised POSIX_FADV_RANDOM (no read-ahead). Each read is first tried
  with RWF_NOWAIT: a row already in the page cache is copied at once (one syscall, no waiting).
  The reads that would block are then all announced with POSIX_FADV_WILLNEED, which queues their
  disk reads together in the kernel (queue depth = the request's misses), and only then read with
  blocking `preadv`s, which find their pages arriving. With `threads` > 0 the reads are also
  split over a pool of that many threads. Measured on this project's virtual disk (random reads
  at ~30 us each whatever the queue depth), threads do not make a cold request faster; they are
  there for disks that serve reads in parallel.
- One GIL release per request: the three phases run in one call into a small C kernel
  (`engram/_preadkernel.c`, an optional extension loaded with ctypes, like the hashing kernel),
  so a prefetch thread reading a step's rows never queues for the GIL between two rows while the
  model thread runs Python. Without a compiler the same phases run in Python (`os.preadv`
  releases the GIL around each syscall); `kernel=False` forces that path (tests run both).
- `direct=True` opens the file a second time with O_DIRECT: reads skip the page cache, are aligned
  to the device's logical block (512 B where the filesystem allows, else 4 KiB; the reader probes)
  into page-aligned anonymous buffers, and the rows are cut out of the aligned spans. A row then
  costs 512 B from storage instead of 4 KiB, but nothing stays cached between requests (only the
  hot-row cache in front), so a warm row costs a disk read every time. Needs `threads` for depth.
  Refused with a clear error where the filesystem does not support O_DIRECT.
- Staging buffers are per calling thread (`threading.local`) and grow by doubling, so concurrent
  gathers (the model thread and a prefetch thread) never share one and a steady stream of small
  requests allocates nothing but its output. The output is always a fresh tensor.
- Counters (`stats()`, `ReadStats`): rows served (ids returned, duplicates included), rows read
  (distinct rows fetched), rows staged (with coalesced gaps), reads issued, reads that found their
  bytes in the page cache, bytes read, and wall time in the read phase. `proc_read_bytes()` reads
  /proc/self/io's read_bytes (what this process made the kernel fetch from storage), to compare
  the two readers' amplification from outside.
- Read-only: the file is never written; `apply_row_update` raises `TableFileError` (training on
  disk writes through `MmapRowStore(writable=True)`). The header is validated as by every table
  reader (`tablefile.read_header`: magic, version, crc, exact size, sealed, fingerprint; `verify`
  also checks the data crc).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engram.store.base import PartialGather, check_row_ids, complete_gather, finish_by_gather
from engram.store.filestore import TableFileStore
from engram.store.readkernel import load_kernel
from engram.store.tablefile import (
    TableFileError,
)

_PAGE = mmap.PAGESIZE
_DIRECT_ALIGNS = (512, 4096)  # O_DIRECT alignments to try, smallest first
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14; 0 = not available
_SMALL_REQUEST = 256  # requests of at most this many ids are planned in plain Python


def proc_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes), or None
    where the kernel does not report it."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _Plan(NamedTuple):
    """How one request is read: the reads, where they land, and how to gather from them."""

    first: np.ndarray  # (N,) first row of each read
    nrows: np.ndarray  # (N,) rows per read
    dest: np.ndarray  # (N,) staging row where each read lands
    index: np.ndarray  # (S,) staging row of each requested id
    unique: int  # U
    staged: int  # K


def plan_reads(flat: np.ndarray, coalesce_gap: int = 0) -> _Plan:
    """Ids (S,) int64 -> the sorted, deduplicated, coalesced reads that fetch them.

    Rows whose ids differ by at most `coalesce_gap` + 1 share a read (0: only adjacent rows)."""
    if flat.size == 0:
        z = np.zeros(0, dtype=np.int64)
        return _Plan(z, z, z, z, 0, 0)
    if flat.size <= _SMALL_REQUEST and coalesce_gap == 0:
        return _plan_small(flat)
    unique, inverse = np.unique(flat, return_inverse=True)  # (U,), (S,)
    brk = np.flatnonzero(np.diff(unique) > coalesce_gap + 1) + 1
    starts = np.concatenate(([0], brk))  # (N,) into unique
    ends = np.concatenate((brk, [unique.size]))
    first = unique[starts]
    nrows = unique[ends - 1] - first + 1
    dest = np.zeros_like(nrows)
    np.cumsum(nrows[:-1], out=dest[1:])
    run = np.repeat(np.arange(first.size), ends - starts)  # (U,) read of each distinct id
    slot = dest[run] + (unique - first[run])  # (U,) staging row of each distinct id
    return _Plan(first, nrows, dest, slot[inverse.reshape(-1)], int(unique.size), int(nrows.sum()))


def _plan_small(flat: np.ndarray) -> _Plan:
    """`plan_reads` for a few ids without gaps, in plain Python (numpy's per-call overhead
    dominates at this size): staging row = rank among the distinct ids."""
    ids = flat.tolist()
    unique = sorted(set(ids))
    rank = {v: i for i, v in enumerate(unique)}
    first, nrows, dest = [unique[0]], [1], [0]
    for i in range(1, len(unique)):
        if unique[i] == unique[i - 1] + 1:
            nrows[-1] += 1
        else:
            first.append(unique[i])
            nrows.append(1)
            dest.append(i)
    return _Plan(
        np.array(first, dtype=np.int64),
        np.array(nrows, dtype=np.int64),
        np.array(dest, dtype=np.int64),
        np.array([rank[v] for v in ids], dtype=np.int64),
        len(unique),
        len(unique),
    )


class _Jobs(NamedTuple):
    """Reads of one request: file offsets, byte counts and staging offsets, each (N,) int64."""

    off: np.ndarray
    size: np.ndarray
    at: np.ndarray


class _Staging:
    """One thread's reusable buffers (grown by doubling)."""

    def __init__(self) -> None:
        self.data: Any = None  # bytearray or anonymous mmap (page-aligned, for O_DIRECT)
        self.data_t: Tensor | None = None  # uint8 view of `data`
        self.scale: bytearray | None = None
        self.scale_t: Tensor | None = None


def _grow(nbytes: int, aligned: bool) -> tuple[Any, Tensor]:
    size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
    buf: Any = mmap.mmap(-1, size) if aligned else bytearray(size)
    return buf, torch.frombuffer(buf, dtype=torch.uint8)


class PreadRowStore(TableFileStore):
    """A read-only (num_rows, dim) table read row by row from a `.engt` file with `preadv`.

    Args:
        path: the table file.
        expected_fingerprint: refuse a file made for another hash configuration.
        verify: recompute the data crc at open (a full read of the file).
        out_dtype: floating dtype `gather` returns (float32 by default).
        check_bounds: bounds-check ids on every call.
        allow_dirty: open an unsealed file anyway.
        threads: reader threads for the blocking reads of a request (0 = the calling thread).
        direct: read with O_DIRECT (no page cache; see the module doc).
        advise: announce a request's missing rows with POSIX_FADV_WILLNEED before reading them.
        coalesce_gap: rows this far apart (or closer) share one read; 0 = only adjacent rows.
        kernel: read through the C kernel when it is built (False: the Python loop, for tests).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        verify: bool = False,
        out_dtype: torch.dtype = torch.float32,
        check_bounds: bool = True,
        allow_dirty: bool = False,
        threads: int = 0,
        direct: bool = False,
        advise: bool = True,
        coalesce_gap: int = 0,
        kernel: bool = True,
    ) -> None:
        for name, value in (("threads", threads), ("coalesce_gap", coalesce_gap)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        h = self._open_header(
            path, expected_fingerprint=expected_fingerprint, verify=verify,
            allow_dirty=allow_dirty, out_dtype=out_dtype,
        )  # fmt: skip
        self.check_bounds = bool(check_bounds)
        self.advise = bool(advise)
        self.coalesce_gap = coalesce_gap
        self._direct = bool(direct)
        self._storage = h.torch_dtype
        self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._dfd = -1
        self._align = 1
        try:
            if os.fstat(self._fd).st_size != h.file_nbytes:  # replaced since the header check
                raise TableFileError(f"table file {self._path} changed while being opened")
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            if self._direct:
                self._open_direct()
        except BaseException:
            self._close_fds()
            raise
        self._nowait = bool(_NOWAIT) and not self._direct
        self._kernel = load_kernel() if kernel else None
        self._local = threading.local()
        self._threads = threads
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="engram-pread") if threads else None
        )
        self._closed = False

    def _open_direct(self) -> None:
        """Open the O_DIRECT descriptor and find the smallest alignment the filesystem takes."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            raise TableFileError("direct=True: this platform has no O_DIRECT")
        try:
            self._dfd = os.open(self._path, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise TableFileError(
                f"direct=True: the filesystem of {self._path} refuses O_DIRECT ({e.strerror})"
            ) from e
        probe = mmap.mmap(-1, 2 * _PAGE)
        try:
            for align in _DIRECT_ALIGNS:
                try:
                    os.preadv(self._dfd, [memoryview(probe)[:align]], align)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        continue
                    raise
                self._align = align
                return
        finally:
            probe.close()
        raise TableFileError(f"direct=True: no O_DIRECT alignment in {_DIRECT_ALIGNS} works here")

    # ------------------------------------------------------------------ properties
    @property
    def direct(self) -> bool:
        return self._direct

    @property
    def direct_alignment(self) -> int:
        """Bytes O_DIRECT reads are aligned to (1 when not direct)."""
        return self._align

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def uses_kernel(self) -> bool:
        """Whether reads go through the C kernel (one GIL release per request)."""
        return self._kernel is not None

    # ------------------------------------------------------------------ reading
    def _flat_ids(self, rows: Tensor, what: str) -> np.ndarray:
        self._check_open(what.rpartition(".")[2])
        if self.check_bounds:
            check_row_ids(rows, self.num_rows, what=what)
        elif not isinstance(rows, Tensor):
            raise TypeError(f"{what}: row ids must be a torch.Tensor, got {rows!r}")
        elif rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise TypeError(f"{what}: row ids must be integer, got {rows.dtype}")
        return rows.reshape(-1).to(device="cpu", dtype=torch.long).numpy()  # (S,)

    def _assemble(self, staged: Tensor, scale: Tensor | None, plan: _Plan) -> Tensor:
        """Staged rows (K, dim) -> the requested rows (S, dim) in `out_dtype`, a fresh tensor."""
        index = torch.from_numpy(plan.index)  # (S,)
        out = torch.index_select(staged, 0, index)  # (S, dim) storage dtype
        if scale is not None:
            out = out.float() * scale.index_select(0, index)[:, None]
        return out.to(self._out_dtype)

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, shape S) -> S + (dim,) in `out_dtype`, on the CPU."""
        flat = self._flat_ids(rows, "PreadRowStore.gather")
        plan = plan_reads(flat, self.coalesce_gap)
        staged, scale, _ = self._read(plan)  # (K, dim) storage dtype, (K,) float32 or None
        return self._assemble(staged, scale, plan).reshape(*rows.shape, self.dim)  # S + (dim,)

    def gather_nowait(self, rows: Tensor) -> PartialGather:
        """The rows of `rows` whose bytes are in the page cache, read at once (RWF_NOWAIT); the
        others are left to `finish`, which reads them with `gather` (see
        `engram.store.base.PartialGather`). No disk I/O is started here: the caller is the model
        thread, and `finish` runs on the prefetch worker. A row is tried only if mincore() on
        a mapping of the file (never read through) says its pages are cached, because a
        RWF_NOWAIT read that misses starts the disk read before returning EAGAIN (measured:
        probing on the model thread that way made decoding new text 5% slower). Without the C
        kernel, with O_DIRECT, where the filesystem refuses RWF_NOWAIT or mincore is refused,
        every row is left to `finish`."""

        flat = self._flat_ids(rows, "PreadRowStore.gather_nowait")
        shape = (*rows.shape, self.dim)
        if not self._nowait or self._kernel is None or not self._probe_address():
            out = torch.empty(flat.size, self.dim, dtype=self._out_dtype)  # (S, dim)
            pending = np.arange(flat.size, dtype=np.int64)
        else:
            plan = plan_reads(flat, self.coalesce_gap)
            staged, scale, waiting = self._read(plan, only=True)  # waiting: (N,) bool or None
            out = self._assemble(staged, scale, plan)  # (S, dim); waiting rows: junk
            if waiting is None:
                return complete_gather(out.view(shape))
            pending = np.flatnonzero(np.repeat(waiting, plan.nrows)[plan.index])  # (P,)
        finish = finish_by_gather(self, torch.from_numpy(flat), out, pending)
        return PartialGather(out.view(shape), pending, finish)

    def _fileno(self) -> int:
        return self._fd

    def _probe_address(self) -> int | None:
        """Address of the residency probe's mapping, for the kernel's PROBE phase (or None)."""
        probe = self._residency()
        return None if probe is None else probe.address

    def read_rows(self, rows: np.ndarray) -> Tensor:
        """Distinct sorted ids (U,) int64 -> their rows (U, dim) in the storage dtype (int8 rows
        are NOT dequantised): the raw reader, for callers that manage their own ids."""
        self._check_open("read_rows")
        plan = plan_reads(np.ascontiguousarray(rows, dtype=np.int64))
        staged, _, _ = self._read(plan, scales=False)
        return staged.index_select(0, torch.from_numpy(plan.index))

    def _staging(self, data_nbytes: int, scale_nbytes: int) -> _Staging:
        st = getattr(self._local, "staging", None)
        if st is None:
            st = self._local.staging = _Staging()
        if st.data is None or len(st.data) < data_nbytes:
            st.data, st.data_t = _grow(data_nbytes, aligned=self._direct)
        if scale_nbytes and (st.scale is None or len(st.scale) < scale_nbytes):
            st.scale, st.scale_t = _grow(scale_nbytes, aligned=False)
        return st

    def _read(
        self, plan: _Plan, *, scales: bool = True, only: bool = False
    ) -> tuple[Tensor, Tensor | None, np.ndarray | None]:
        """Execute `plan`: (staged rows (K, dim) storage dtype, staged scales (K,) or None,
        None or (N,) bool: with `only`, the reads that would have waited, left unread).

        The tensors are views of this thread's staging buffers, valid until its next read."""
        h, rb = self._header, self._row_nbytes
        K = plan.staged
        want_scales = scales and h.scale_nbytes > 0
        t0 = time.perf_counter()
        if self._direct:
            jobs = self._direct_spans(plan)
            data_nbytes = int(jobs.at[-1] + jobs.size[-1]) if K else 0
        else:
            jobs = _Jobs(h.data_offset + plan.first * rb, plan.nrows * rb, plan.dest * rb)
            data_nbytes = K * rb
        st = self._staging(data_nbytes, 4 * K if want_scales else 0)
        assert st.data_t is not None
        fd = self._dfd if self._direct else self._fd
        reads, cached, waiting = self._run_jobs(fd, st.data_t, jobs, only)
        nbytes = jobs.size
        if want_scales:
            assert st.scale_t is not None
            sjobs = _Jobs(h.scale_offset + 4 * plan.first, 4 * plan.nrows, 4 * plan.dest)
            sr, sc, swait = self._run_jobs(self._fd, st.scale_t, sjobs, only)
            reads, cached, nbytes = reads + sr, cached + sc, nbytes + sjobs.size
            if swait is not None:
                waiting = swait if waiting is None else waiting | swait
        served, unique, staged = plan.index.size, plan.unique, K
        if waiting is not None:  # only the reads done now count; `finish` counts the rest
            staged_wait = np.repeat(waiting, plan.nrows)  # (K,)
            pos_wait = staged_wait[plan.index]  # (S,)
            served -= int(np.count_nonzero(pos_wait))
            unique -= np.unique(plan.index[pos_wait]).size
            staged -= int(np.count_nonzero(staged_wait))
            nbytes = nbytes[~waiting]
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            s = self._stats
            s.gathers += 1
            s.rows_served += served
            s.rows_read += unique
            s.rows_staged += staged
            s.reads += reads
            s.cached_reads += cached
            s.bytes_read += int(nbytes.sum())
            s.read_time_s += elapsed
        if self._direct:
            data = self._cut_direct(st.data_t, plan, jobs)  # (K, dim)
        else:
            data = st.data_t[: K * rb].view(self._storage).view(K, h.dim)  # (K, dim)
        scale = None
        if want_scales:
            assert st.scale_t is not None
            scale = st.scale_t[: 4 * K].view(torch.float32)  # (K,)
        return data, scale, waiting

    def _direct_spans(self, plan: _Plan) -> _Jobs:
        """O_DIRECT reads: each read widened to whole aligned blocks, packed in the staging."""
        h, rb, a = self._header, self._row_nbytes, self._align
        lo = h.data_offset + plan.first * rb  # (N,)
        start = lo // a * a
        size = -(-(lo + plan.nrows * rb) // a) * a - start
        at = np.zeros_like(size)
        np.cumsum(size[:-1], out=at[1:])
        return _Jobs(start, size, at)

    def _cut_direct(self, buf: Tensor, plan: _Plan, spans: _Jobs) -> Tensor:
        """The staged rows (K, dim) cut out of the aligned spans in `buf` (uint8)."""
        h, rb = self._header, self._row_nbytes
        K = plan.staged
        if K == 0:
            return torch.empty(0, h.dim, dtype=self._storage)
        skew = h.data_offset + plan.first * rb - spans.off  # (N,) row bytes into each span
        base = np.repeat(spans.at + skew, plan.nrows)  # (K,) byte where each read's rows start
        within = np.arange(K, dtype=np.int64) - np.repeat(plan.dest, plan.nrows)
        starts = torch.from_numpy(base + within * rb)  # (K,)
        idx = starts[:, None] + torch.arange(rb)  # (K, rb)
        return buf[idx.reshape(-1)].view(self._storage).view(K, h.dim)

    # ------------------------------------------------------------------ I/O
    def _run_jobs(
        self, fd: int, buf: Tensor, jobs: _Jobs, only: bool = False
    ) -> tuple[int, int, np.ndarray | None]:
        """Read every job into `buf` (a uint8 staging tensor): (reads issued, served cached,
        None or with `only` (N,) bool: the jobs that would have waited, left unread)."""
        n = jobs.off.size
        if n == 0:
            return 0, 0, None
        k = min(self._threads + 1, n) if self._pool is not None and not only else 1
        if k == 1:
            return self._read_part(fd, buf, jobs, only)
        parts = [_Jobs(*(np.ascontiguousarray(x[i::k]) for x in jobs)) for i in range(k)]
        futures = [self._pool.submit(self._read_part, fd, buf, p) for p in parts[1:]]  # type: ignore[union-attr]
        counts = [self._read_part(fd, buf, parts[0])] + [f.result() for f in futures]
        return sum(c[0] for c in counts), sum(c[1] for c in counts), None

    def _read_part(
        self, fd: int, buf: Tensor, jobs: _Jobs, only: bool = False
    ) -> tuple[int, int, np.ndarray | None]:
        kernel = self._kernel
        if kernel is None:
            assert not only, "gather_nowait needs the C kernel"
            return self._read_part_py(fd, memoryview(buf.numpy()), jobs)
        n = jobs.off.size
        off, size, at = (np.ascontiguousarray(x, dtype=np.int64) for x in jobs)
        counts = np.zeros(4, dtype=np.int64)
        scratch = np.empty(n, dtype=np.int64)
        advise = self.advise and not self._direct and not only  # `only`: no I/O on this thread
        flags = (1 if self._nowait else 0) | (2 if advise else 0) | (4 if only else 0)
        eof = self._header.file_nbytes if self._direct else 1 << 62
        probe = self._probe_address() if only else None
        flags |= 8 if probe else 0
        rc = kernel.jobs(
            fd, n, off.ctypes.data, size.ctypes.data, at.ctypes.data, buf.data_ptr(), flags, eof,
            counts.ctypes.data, scratch.ctypes.data, probe,
        )  # fmt: skip
        if counts[2]:
            self._nowait = False
        if rc == 1:
            raise self._truncated()
        if rc < 0:
            raise OSError(-rc, f"reading rows of {self._path}: {os.strerror(-rc)}")
        waiting = None
        if only and counts[3]:
            waiting = np.zeros(n, dtype=bool)
            waiting[scratch[: counts[3]]] = True
        return int(counts[0]), int(counts[1]), waiting

    def _truncated(self) -> TableFileError:
        return TableFileError(
            f"table file {self._path} ended early while reading rows: it was truncated after it "
            "was opened"
        )

    def _read_part_py(self, fd: int, view: memoryview, jobs: _Jobs) -> tuple[int, int, None]:
        """The same phases as the C kernel (_preadkernel.c), one syscall per row in Python
        (no NOWAIT_ONLY: `gather_nowait` needs the kernel's mincore probe)."""
        reads = cached = 0
        triples = list(zip(jobs.off.tolist(), jobs.size.tolist(), jobs.at.tolist(), strict=True))
        pending = triples
        if self._nowait:
            pending = []
            for off, nb, at in triples:
                try:
                    n = os.preadv(fd, [view[at : at + nb]], off, _NOWAIT)
                except BlockingIOError:
                    n = 0
                except OSError as e:  # EOPNOTSUPP: the filesystem cannot; stop trying
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._nowait = False
                    pending = triples
                    break
                if n:
                    reads += 1
                if n == nb:
                    cached += 1
                else:
                    pending.append((off + n, nb - n, at + n))
        if not pending:
            return reads, cached, None
        if self.advise and len(pending) > 1 and not self._direct:
            with contextlib.suppress(OSError):
                for off, nb, _ in pending:
                    os.posix_fadvise(fd, off, nb, os.POSIX_FADV_WILLNEED)
        eof = self._header.file_nbytes if self._direct else 1 << 62
        for off, nb, at in pending:
            while nb:
                n = os.preadv(fd, [view[at : at + nb]], off)
                if n <= 0 and off >= eof:
                    break  # an aligned O_DIRECT span past the end of the file: not needed
                if n <= 0:
                    raise self._truncated()
                reads += 1
                off, nb, at = off + n, nb - n, at + n
        return reads, cached, None

    def read_range(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) as (stop - start, dim) `out_dtype`, read sequentially."""
        self._check_open("read_range")
        h = self._header
        if not 0 <= start <= stop <= h.num_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside [0, {h.num_rows})")
        return self.gather(torch.arange(start, stop))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """Refused: the reader is read-only (train on disk through `MmapRowStore(writable=True)`)."""
        raise TableFileError(
            f"PreadRowStore.apply_row_update: {self._path} is served read-only by the row "
            "reader; open it with MmapRowStore(path, writable=True) to update rows"
        )

    # ------------------------------------------------------------------ lifetime
    def _close_fds(self) -> None:
        self._close_probe()
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def close(self) -> None:
        """Stop the reader threads and close the file (idempotent). Do not close mid-gather."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._close_fds()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        mode = f"direct/{self._align}" if self._direct else "buffered"
        return (
            f"PreadRowStore({str(self._path)!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"storage={self.storage_dtype}, out={self._out_dtype}, {mode}, "
            f"threads={self._threads})"
        )
