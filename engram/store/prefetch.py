"""Background row prefetch: gather a store's rows while the current step computes.

Engram's row addresses depend on the tokens alone, so they are known before the layer runs: at the
start of a decode step every Engram layer's ids are known (the layer at block 15 can have its rows
fetched while blocks 0-14 compute), and in prefill the next chunk's rows can be fetched while the
current chunk computes. `PrefetchingStore` wraps any `RowStore`; `prefetch(global_ids)` starts
`inner.gather(global_ids)` on a background worker, and the layer's ordinary `gather(global_ids)`
takes that result when the ids match. The layer stays oblivious: it only ever calls `gather`.

Design choices:
- Threading model: a `Prefetcher` owns ONE daemon worker thread that runs submitted jobs in FIFO
  order. Several stores (one per Engram layer) may share one prefetcher, so a model costs one
  thread, and jobs run in the order they were asked for (the order the layers need them). The
  gathers are torch ops, which release the GIL, so they overlap the caller's compute. Like
  `engram.data.BatchLoader`, the worker never references its owner: dropping the prefetcher (or
  interpreter exit) runs its shutdown through `weakref.finalize`.
- Only waiting goes to the worker. A store that offers `gather_nowait` (`engram.store.base`;
  RAM, the hot-row cache, the pread reader) serves the rows it has at hand -- in RAM, in the row
  cache, in the page cache -- right in `prefetch`, on the caller's thread, and the worker gets
  only the reads that would wait on storage (no I/O, not even a read-ahead hint, is started on
  the caller's thread: the worker starts them microseconds later). A warm step then
  costs no thread hand-off at all: measured on a 2-core machine, handing every gather to the
  worker made warm decoding 5-10% slower than RAM, though the reads took a fraction of that, as
  the two threads' Python took turns with the GIL. Other stores (mmap, sharded) are gathered
  whole on the worker, as before. `stats.ready_time_s` is the time spent serving at `prefetch`
  (counted as read and as exposed time: the caller did it); `stats.ready_prefetches` counts
  the prefetches that needed no job.
- Bounded memory: at most `max_pending` jobs are outstanding (queued or running); `submit` blocks
  until one finishes, or raises `TimeoutError` after `timeout`. The queue is a deque under one
  `threading.Condition` (not a `queue.Queue`), so "is it closed?" and "enqueue" are one atomic
  step: no job can slip in after `close` and be left pending forever. A cancelled job leaves the
  queue at once (it frees its slot). A store keeps at most `max_entries` unconsumed prefetches in
  a FIFO; a new prefetch beyond that drops the oldest (cancelled if not started). Results are held
  only by the store's entries, so dropped prefetches free their rows; a run of prefetches that are
  never consumed holds at most `max_entries + max_pending` results.
- Handles are `concurrent.futures.Future`s (`PrefetchHandle`): `result(timeout)`, `done()`,
  `cancel()` (only before the job starts), `exception()`. A job's exception is stored and
  re-raised -- the same object, so the same type, with the worker's frames in its traceback and a
  note naming the worker thread -- by `result()`, i.e. by the `gather` that consumes it. An
  exception never stops the worker; later jobs run normally.
- Shutdown: `close(wait=True)` marks the queue closed, cancels every queued job (their `result()`
  raises `CancelledError`; a store then gathers synchronously), wakes the worker and joins it
  after its current job (`wait=False` does not join). It is idempotent, runs on `__exit__` (also
  when the body raised, KeyboardInterrupt included) and at interpreter exit (join bounded to 5 s).
  The worker only ever blocks on the queue's condition, which `close` notifies, never on a full
  queue; callers block only in `submit`/`result`, whose waits are interruptible. After close,
  `submit` (so `prefetch`) raises `RuntimeError`; `gather` keeps working synchronously.
- Matching: `gather(rows)` takes a pending prefetch made with EQUAL ids: the same tensor object
  at the same version counter (`Tensor._version`, bumped by in-place writes) is the fast path,
  else equal shape, device and values (`torch.equal`; on an accelerator that is one host sync).
  Ids written in place after their prefetch never match (the worker may have read either
  contents); such an entry is dropped. Inference tensors have no version counter, so their ids
  are cloned at `prefetch` (small next to the rows) and matched by value. No match -> a
  synchronous `inner.gather`.
- Consistency: `apply_row_update` first invalidates this store's prefetches -- cancels the queued
  ones and waits for a running one, so the worker never reads rows while they are written -- then
  forwards to the inner store. Writes to the inner store made behind the wrapper's back must be
  followed by `invalidate()`. The inner store's `gather` must tolerate being called from the worker
  thread concurrently with the caller's own (synchronous) `gather`; `MemoryRowStore` does.
- Gradients: the wrapper is not differentiable (`trainable_parameters()` is empty; training goes
  through `apply_row_update`), so both paths gather under `torch.no_grad()`: no autograd graph is
  built, in either thread, into a table the optimizer does not own through this store.
- CUDA staging (`device` is a CUDA device; requires `torch.cuda.is_available()`): the worker runs
  on a side `torch.cuda.Stream`. If the ids are on the GPU, `prefetch` records an event on the
  caller's current stream and the side stream waits on it before the ids are read. A CPU result is
  copied into a page-locked staging buffer (a bounded per-store pool, buffers reused once their
  last copy has completed, sizes rounded up to a power of two), then sent to the device with
  `non_blocking=True` on the side stream, and an event is recorded. `gather` makes the current
  stream wait on that event and calls `record_stream(current)` on the result, so the caching
  allocator does not reuse its memory while the current stream may still read it. On the CPU
  (device None or cpu) the worker is a plain thread and no memory is pinned.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeVar

import torch
from torch import Tensor

from engram.store.base import PartialGather, RowStore

_T = TypeVar("_T")

_EXIT_JOIN_TIMEOUT_S: Final = 5.0  # join bound when shutdown runs from GC / interpreter exit


class PrefetchHandle(Future[_T]):
    """The future of one submitted job: `result(timeout=None)`, `done()`, `cancel()`.

    `result()` re-raises the job's exception (same object and type; traceback from the worker).
    `cancel()` succeeds only before the job starts; a cancelled handle's `result()` raises
    `concurrent.futures.CancelledError`.
    """


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    handle: PrefetchHandle[Any]


class _JobQueue:
    """Bounded FIFO of jobs shared by a `Prefetcher` and its worker (never the prefetcher itself)."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.cond = threading.Condition()
        self.jobs: deque[_Job] = deque()
        self.running = 0
        self.closed = False

    def outstanding(self) -> int:
        with self.cond:
            return len(self.jobs) + self.running

    def put(self, job: _Job, timeout: float | None) -> None:
        with self.cond:
            has_room = self.cond.wait_for(
                lambda: self.closed or len(self.jobs) + self.running < self.max_pending, timeout
            )
            if self.closed:
                raise RuntimeError("the Prefetcher is closed; submit needs an open one")
            if not has_room:
                raise TimeoutError(
                    f"the Prefetcher still had {self.max_pending} outstanding job(s) after "
                    f"{timeout} s (max_pending={self.max_pending})"
                )
            self.jobs.append(job)
            self.cond.notify_all()

    def get(self) -> _Job | None:
        """The next job (counted as running until `finished`), or None once closed."""
        with self.cond:
            while not self.jobs and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            self.running += 1
            return self.jobs.popleft()

    def finished(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()

    def discard(self, handle: PrefetchHandle[Any]) -> None:
        """Drop the queued job of a cancelled `handle`, freeing its slot (no-op if not queued)."""
        with self.cond:
            for job in self.jobs:
                if job.handle is handle:
                    self.jobs.remove(job)
                    self.cond.notify_all()
                    return

    def close(self) -> list[_Job]:
        """Mark closed, wake everyone, and hand back the jobs that never started."""
        with self.cond:
            self.closed = True
            drained = list(self.jobs)
            self.jobs.clear()
            self.cond.notify_all()
        return drained


def _run_job(job: _Job, thread_name: str) -> None:
    if not job.handle.set_running_or_notify_cancel():
        return  # cancelled after the worker took it from the queue
    try:
        result = job.fn(*job.args)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        exc.add_note(f"(raised in the prefetch worker thread {thread_name!r})")
        job.handle.set_exception(exc)
        job = None  # type: ignore[assignment]  # break exc -> traceback -> frame -> job -> exc
    else:
        job.handle.set_result(result)


def _worker(jobs: _JobQueue, thread_name: str) -> None:
    while (job := jobs.get()) is not None:
        try:
            _run_job(job, thread_name)
        finally:
            job = None  # drop the job's args and result before waiting for the next one
            jobs.finished()


def _shutdown(jobs: _JobQueue, thread: threading.Thread, join_timeout: float | None) -> None:
    for job in jobs.close():
        job.handle.cancel()
    if join_timeout != 0 and thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=join_timeout)


class Prefetcher:
    """One daemon worker thread running submitted jobs in order, at most `max_pending` at a time.

    `submit(fn, *args)` returns a `PrefetchHandle`. Use as a context manager or call `close()`;
    dropping the last reference (or interpreter exit) also stops the thread.
    """

    def __init__(self, max_pending: int = 2, *, name: str = "engram-prefetch") -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.max_pending = max_pending
        self.name = name
        self._jobs = _JobQueue(max_pending)
        self._thread = threading.Thread(
            target=_worker, args=(self._jobs, name), name=name, daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._jobs, self._thread, _EXIT_JOIN_TIMEOUT_S
        )

    def submit(
        self, fn: Callable[..., _T], *args: Any, timeout: float | None = None
    ) -> PrefetchHandle[_T]:
        """Queue `fn(*args)` for the worker and return its handle.

        Blocks while `max_pending` jobs are outstanding; with `timeout` (seconds), raises
        `TimeoutError` if no slot frees up in time. Raises `RuntimeError` once closed.
        """
        handle: PrefetchHandle[_T] = PrefetchHandle()
        jobs = self._jobs
        jobs.put(_Job(fn, args, handle), timeout)
        # A cancelled, not yet started job leaves the queue at once. The callback holds neither
        # the job nor self: no reference cycle keeps a finished handle's result alive.
        handle.add_done_callback(lambda h: jobs.discard(h) if h.cancelled() else None)
        return handle

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (queued or running)."""
        return self._jobs.outstanding()

    @property
    def closed(self) -> bool:
        return self._jobs.closed

    @property
    def is_alive(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread.is_alive()

    def close(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Cancel queued jobs, stop the worker and (if `wait`) join it; idempotent.

        A job already running finishes first (its handle gets its result); `timeout` bounds the
        join. Later `submit` calls raise `RuntimeError`.
        """
        self._finalizer.detach()
        _shutdown(self._jobs, self._thread, timeout if wait else 0)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pending={self.pending}"
        return f"Prefetcher(name={self.name!r}, max_pending={self.max_pending}, {state})"


# ----------------------------------------------------------------------------- the store


@dataclass
class PrefetchStats:
    """Counters of a `PrefetchingStore` (`as_dict()` for logs)."""

    prefetches: int = 0  # prefetch requests submitted to the worker
    skipped: int = 0  # prefetch requests not submitted (queue still full after `timeout`)
    prefetched_hits: int = 0  # gathers served by a prefetch
    sync_gathers: int = 0  # gathers served synchronously (no usable matching prefetch)
    wait_time_s: float = 0.0  # time gathers spent waiting for prefetched results
    sync_time_s: float = 0.0  # time spent in synchronous gathers
    stale_dropped: int = 0  # unconsumed prefetches pushed out of the FIFO or outdated by writes
    invalidated: int = 0  # pending prefetches dropped by apply_row_update / invalidate
    fetch_time_s: float = 0.0  # time the worker spent in inner.gather for prefetches
    ready_prefetches: int = 0  # prefetches served whole at once (inner.gather_nowait): no job
    ready_time_s: float = 0.0  # time `prefetch` spent in inner.gather_nowait, on the caller

    @property
    def read_time_s(self) -> float:
        """All time spent fetching rows: on the worker, at `prefetch` and synchronously."""
        return self.fetch_time_s + self.ready_time_s + self.sync_time_s

    @property
    def exposed_time_s(self) -> float:
        """Time the caller was blocked on rows: waiting for prefetches, serving the rows at hand
        in `prefetch`, and synchronous gathers."""
        return self.wait_time_s + self.ready_time_s + self.sync_time_s

    @property
    def hidden_fraction(self) -> float:
        """Share of the read time that overlapped other work: 1 - exposed / read (0 if none)."""
        total = self.read_time_s
        return max(0.0, 1.0 - self.exposed_time_s / total) if total > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["read_time_s"] = self.read_time_s
        d["exposed_time_s"] = self.exposed_time_s
        d["hidden_fraction"] = self.hidden_fraction
        return d


@dataclass(frozen=True, eq=False)
class _Fetched:
    tensor: Tensor
    event: Any = None  # torch.cuda.Event the current stream must wait on (CUDA path only)


@dataclass(frozen=True, eq=False)
class _Entry:
    rows: Tensor
    version: int | None  # rows._version at prefetch time; None: a private copy of the ids
    handle: PrefetchHandle[_Fetched] | None  # the worker's job; None when `ready`
    ready: Tensor | None = None  # the rows, served at `prefetch` (no job)


def _version_of(t: Tensor) -> int | None:
    """`t._version` (bumped by every in-place write), or None for an inference tensor."""
    if t.is_inference():
        return None
    return t._version


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _PinnedPool:
    """Page-locked staging buffers for the CUDA path; used by the worker thread only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[Tensor, Any]] = []  # (flat pinned buffer, event of its last copy)

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        for i, (buf, event) in enumerate(self._free):
            if buf.dtype == dtype and buf.numel() >= numel:
                del self._free[i]
                if event is not None:
                    event.synchronize()  # its previous host-to-device copy has read it
                return buf
        return torch.empty(_next_pow2(numel), dtype=dtype, pin_memory=True)

    def give(self, buf: Tensor, event: Any) -> None:
        self._free.append((buf, event))
        if len(self._free) > self.capacity:
            # The host caching allocator keeps the oldest buffer alive until its copy completes.
            self._free.pop(0)


class PrefetchingStore:
    """A `RowStore` wrapper whose `prefetch(rows)` starts `inner.gather(rows)` in the background.

    `gather(rows)` returns the result of a pending prefetch made with equal ids (waiting for it,
    re-raising its error), else gathers synchronously; the values always equal `inner.gather(rows)`
    (moved to `device`, if given). With `serve_at_hand` (default) the rows the inner store has
    at hand are served in `prefetch` itself (see the module doc); False sends every prefetch to
    the worker whole. Use it from one thread (the model's); `prefetcher` may be
    shared by several stores and is closed by its owner, not by the store.
    """

    def __init__(
        self,
        inner: RowStore,
        prefetcher: Prefetcher,
        *,
        device: torch.device | str | None = None,
        max_entries: int = 4,
        serve_at_hand: bool = True,
    ) -> None:
        if not isinstance(inner, RowStore):
            raise TypeError(f"inner must be a RowStore, got {type(inner).__name__}")
        if not isinstance(prefetcher, Prefetcher):
            raise TypeError(f"prefetcher must be a Prefetcher, got {type(prefetcher).__name__}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.inner = inner
        self.prefetcher = prefetcher
        self.max_entries = max_entries
        self.device = None if device is None else torch.device(device)
        self._cuda = self.device is not None and self.device.type == "cuda"
        # serve rows at hand in `prefetch` (inner.gather_nowait); False: every gather on the worker
        self.serve_at_hand = bool(serve_at_hand)
        self._stream: Any = None
        self._pool: _PinnedPool | None = None
        if self._cuda:
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device} requested but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._stream = torch.cuda.Stream(device=self.device)
            self._pool = _PinnedPool(capacity=prefetcher.max_pending + 1)
        self._lock = threading.Lock()
        self._entries: deque[_Entry] = deque()
        self._orphans: list[PrefetchHandle[_Fetched]] = []  # dropped while running
        self.stats = PrefetchStats()

    # ------------------------------------------------------------------ RowStore interface
    @property
    def num_rows(self) -> int:
        return self.inner.num_rows

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (shape S) -> S + (dim,): a matching prefetch, else inner's."""
        entry = self._take_match(rows) if isinstance(rows, Tensor) else None
        if entry is not None and entry.ready is not None:
            self.stats.prefetched_hits += 1
            return entry.ready
        if entry is not None:
            assert entry.handle is not None
            start = time.perf_counter()
            try:
                fetched = entry.handle.result()
            except CancelledError:  # the prefetcher closed before the job ran
                fetched = None
            finally:
                self.stats.wait_time_s += time.perf_counter() - start
            if fetched is not None:
                self.stats.prefetched_hits += 1
                return self._deliver(fetched)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.inner.gather(rows)
            if self.device is not None:
                out = out.to(self.device)
        self.stats.sync_gathers += 1
        self.stats.sync_time_s += time.perf_counter() - start
        return out

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """Invalidate pending prefetches (waiting for a running one), then update the inner store."""
        self.invalidate()
        self.inner.apply_row_update(rows, delta)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, rows: Tensor, *, timeout: float | None = None) -> None:
        """Start `inner.gather(rows)`; a later `gather` of equal ids takes the result.

        With `serve_at_hand`, the rows the inner store has at hand are served here and now
        (`inner.gather_nowait`) and only the rest is read on the worker. Blocks while the prefetcher's queue is full; with `timeout`, a request that still finds
        it full is skipped (counted in `stats.skipped`): a prefetch is only a hint. Raises
        `RuntimeError` if the prefetcher is closed. Errors of the gather itself (e.g. ids out of
        range) surface from the `gather` that consumes it.
        """
        if not isinstance(rows, Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        with self._lock:  # make room first, so a stale job of ours does not hold a queue slot
            while len(self._entries) >= self.max_entries:
                self._drop(self._entries.popleft())
                self.stats.stale_dropped += 1
            self._orphans = [h for h in self._orphans if not h.done()]
        version = _version_of(rows)
        if version is None:  # an inference tensor (no version counter): keep a private copy
            rows = rows.clone()
        nowait = None
        if self.serve_at_hand and not self._cuda:
            nowait = getattr(self.inner, "gather_nowait", None)
        if nowait is not None:
            if self.prefetcher.closed:
                raise RuntimeError("the Prefetcher is closed; submit needs an open one")
            entry, part = self._serve_ready(nowait, rows, version)
            if entry is not None:  # everything was at hand (or the request failed): no job
                with self._lock:
                    self._entries.append(entry)
                    self.stats.prefetches += 1
                return
            fn, args = self._finish, (part,)
        else:
            ready = None
            if self._cuda and rows.is_cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(rows.device))
            fn, args = self._fetch, (rows, ready)
        try:
            handle = self.prefetcher.submit(fn, *args, timeout=timeout)
        except TimeoutError:
            self.stats.skipped += 1
            return
        with self._lock:
            self._entries.append(_Entry(rows, version, handle))
            self.stats.prefetches += 1

    def invalidate(self) -> None:
        """Drop every pending prefetch; returns once none of them can still read the inner store."""
        with self._lock:
            handles = [e.handle for e in self._entries if e.handle is not None] + self._orphans
            self.stats.invalidated += len(self._entries)
            self._entries.clear()
            self._orphans = []
        for handle in handles:
            if not handle.cancel():
                handle.exception()  # running: wait for it to finish (its error is moot)

    @property
    def pending(self) -> int:
        """Prefetches made and not yet consumed or dropped."""
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"PrefetchingStore(inner={type(self.inner).__name__}, num_rows={self.num_rows}, "
            f"dim={self.dim}, device={self.device}, pending={self.pending})"
        )

    # ------------------------------------------------------------------ internals
    def _drop(self, entry: _Entry) -> None:
        if entry.handle is None:
            return
        if not entry.handle.cancel() and not entry.handle.done():
            self._orphans.append(entry.handle)

    def _take_match(self, rows: Tensor) -> _Entry | None:
        with self._lock:
            match = None
            for entry in list(self._entries):
                if entry.version is not None and entry.rows._version != entry.version:
                    # the ids were written in place since: the worker may have read either contents
                    self._entries.remove(entry)
                    self._drop(entry)
                    self.stats.stale_dropped += 1
                elif match is None and self._same_ids(entry.rows, rows):
                    match = entry
            if match is not None:
                self._entries.remove(match)
            return match

    @staticmethod
    def _same_ids(a: Tensor, b: Tensor) -> bool:
        if a is b:
            return True
        return a.shape == b.shape and a.device == b.device and torch.equal(a, b)

    def _serve_ready(
        self, nowait: Callable[[Tensor], PartialGather], rows: Tensor, version: int | None
    ) -> tuple[_Entry | None, PartialGather | None]:
        """On the caller: `inner.gather_nowait(rows)`. A finished entry when every row was at
        hand (or the request failed: the consuming `gather` re-raises), else the partial
        result whose `finish` the worker runs."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                part = nowait(rows)
        except Exception as exc:  # surfaces from the gather that consumes it, as on the worker
            handle: PrefetchHandle[_Fetched] = PrefetchHandle()
            handle.set_exception(exc)
            return _Entry(rows, version, handle), None
        finally:
            self.stats.ready_time_s += time.perf_counter() - start
        if not part.complete:
            return None, part
        self.stats.ready_prefetches += 1
        out = part.out if self.device is None else part.out.to(self.device)
        return _Entry(rows, version, None, ready=out), None

    def _finish(self, part: PartialGather) -> _Fetched:
        """Runs on the worker thread: the reads `gather_nowait` left."""
        start = time.perf_counter()
        try:
            assert part.finish is not None
            part.finish()
            out = part.out if self.device is None else part.out.to(self.device)
            return _Fetched(out)
        finally:
            self.stats.fetch_time_s += time.perf_counter() - start

    def _fetch(self, rows: Tensor, ready: Any) -> _Fetched:
        """Runs on the worker thread."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if self._cuda:
                    return self._fetch_cuda(rows, ready)
                out = self.inner.gather(rows)
                if self.device is not None:
                    out = out.to(self.device)
                return _Fetched(out)
        finally:
            self.stats.fetch_time_s += time.perf_counter() - start

    def _fetch_cuda(self, rows: Tensor, ready: Any) -> _Fetched:
        assert self._pool is not None
        stream = self._stream
        with torch.cuda.stream(stream):
            if ready is not None:  # ids made on the caller's stream: wait until they exist
                stream.wait_event(ready)
                rows.record_stream(stream)
            out = self.inner.gather(rows)
            done = torch.cuda.Event()
            if out.device.type == "cpu":
                buf = self._pool.take(out.numel(), out.dtype)
                staged = buf[: out.numel()].view(out.shape)
                staged.copy_(out)
                result = staged.to(self.device, non_blocking=True)
                done.record(stream)
                self._pool.give(buf, done)
            else:
                result = out.to(self.device, non_blocking=True)
                done.record(stream)
        return _Fetched(result, done)

    def _deliver(self, fetched: _Fetched) -> Tensor:
        if fetched.event is None:
            return fetched.tensor
        current = torch.cuda.current_stream(self.device)
        current.wait_event(fetched.event)
        fetched.tensor.record_stream(current)  # allocated on the side stream, used on this one
        return fetched.tensor
