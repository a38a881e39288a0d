"""Training batches: ``Batch`` (ids plus Engram rows as torch tensors) and the threaded loader.

Design choices:
- A batch is a pure function of (split, seed, step): ``BatchLoader`` only moves making it off the
  training thread, so its batches equal ``make_batch(step)`` whatever the timing.
- The loader's worker is a daemon ``threading.Thread`` (the hash kernel releases the GIL, numpy
  mostly does too) filling a bounded ``queue.Queue``. It never references the loader itself, so
  dropping the loader stops it (``weakref.finalize``); ``close`` stops it explicitly; a blocked
  ``put`` polls a stop event, so an early stop cannot deadlock. A worker exception is re-raised by
  the consumer's next ``next()`` (and every one after). ``wait_seconds`` is the consumer's total
  time blocked in ``next()``: near zero means data preparation is off the critical path.
- Evaluation batches are not prefetched: ``PackedSplit.val_batches`` / ``DataSplits.val_batches``
  (:mod:`engram.data.packing`) yield them in order as numpy arrays, and the evaluator hashes them.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from engram.data.config import DataConfig, DataError
from engram.data.packing import DataSplits, PackedSplit, check_shard
from engram.indexer import NgramIndexer


@dataclass
class Batch:
    """One training step's data, as CPU torch tensors."""

    step: int  # the training step this batch belongs to (-1 for evaluation batches)
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 target ids (x shifted by one)
    rows: torch.Tensor | None  # (L, B, T, H) int64 Engram rows of x, or None without Engram
    build_seconds: float = 0.0  # time spent making it (windows + hashing, in the loader)

    @classmethod
    def from_numpy(
        cls,
        step: int,
        x: np.ndarray,
        y: np.ndarray,
        indexer: NgramIndexer | None,
        positions: np.ndarray | None = None,
    ) -> Batch:
        """Wrap (x, y) and hash x with ``indexer`` (resets at its separator), if any.

        ``positions`` (B, T): the tokens' offsets in the packed stream, for the "position"
        address control (see ``NgramIndexer.rows``).
        """
        start = time.perf_counter()
        kw = {} if positions is None else {"positions": positions}
        rows = None if indexer is None else torch.from_numpy(np.asarray(indexer.rows(x, **kw)))
        return cls(
            step, torch.from_numpy(x), torch.from_numpy(y), rows, time.perf_counter() - start
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device` (a no-op on the CPU; asynchronous from pinned memory on CUDA)."""
        if torch.device(device).type == "cpu":
            return self
        x, y = (t.to(device, non_blocking=non_blocking) for t in (self.x, self.y))
        rows = None if self.rows is None else self.rows.to(device, non_blocking=non_blocking)
        return Batch(self.step, x, y, rows, self.build_seconds)

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (faster, asynchronous host-to-GPU copies)."""
        pin = [t.pin_memory() for t in (self.x, self.y)]
        rows = None if self.rows is None else self.rows.pin_memory()
        return Batch(self.step, pin[0], pin[1], rows, self.build_seconds)


@dataclass(frozen=True, eq=False)
class _Producer:
    """Everything the worker needs, and nothing that points back at the loader."""

    split: PackedSplit
    batch_size: int
    seq_len: int
    seed: int
    indexer: NgramIndexer | None
    pin_memory: bool
    rank: int = 0
    world_size: int = 1

    def make_batch(self, step: int) -> Batch:
        start = time.perf_counter()
        starts = self.split.train_starts(
            step, self.batch_size, self.seq_len, self.seed, self.rank, self.world_size
        )
        x, y = self.split.windows(starts, self.seq_len)
        positions = None
        if getattr(self.indexer, "needs_positions", False):
            positions = starts[:, None] + np.arange(self.seq_len, dtype=np.int64)
        batch = Batch.from_numpy(step, x, y, self.indexer, positions)
        if self.pin_memory:
            batch = batch.pin_memory()
        batch.build_seconds = time.perf_counter() - start
        return batch


@dataclass(frozen=True, eq=False)
class _Failure:
    step: int
    exc: BaseException


def _worker(producer: _Producer, start_step: int, out: queue.Queue, stop: threading.Event) -> None:
    step = start_step
    while not stop.is_set():
        try:
            item: Batch | _Failure = producer.make_batch(step)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            item = _Failure(step, exc)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return
        step += 1


def _shutdown(stop: threading.Event, out: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    while True:  # drop prefetched batches so their memory goes now
        try:
            out.get_nowait()
        except queue.Empty:
            break
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=5.0)


class BatchLoader:
    """Iterator of training ``Batch``es for steps ``start_step, start_step + 1, ...``.

    A background thread makes them (random windows, then ``indexer.rows``) ``prefetch`` ahead.
    Batch contents equal ``make_batch(step)``, whatever the timing. With ``world_size`` > 1 each
    batch is this ``rank``'s block of the global batch (see ``PackedSplit.train_batch``). Use as a context manager or
    call ``close()``; dropping the last reference also stops the thread.
    """

    def __init__(
        self,
        data: PackedSplit | DataSplits,
        data_cfg: DataConfig,
        indexer: NgramIndexer | None,
        start_step: int = 0,
        prefetch: int = 2,
        seed: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        split = data.train if isinstance(data, DataSplits) else data
        if not isinstance(split, PackedSplit):
            raise TypeError(f"data must be a PackedSplit or DataSplits, got {type(data).__name__}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if start_step < 0 or seed < 0:
            raise ValueError(f"start_step and seed must be >= 0, got {start_step}, {seed}")
        split.check_seq_len(data_cfg.seq_len)
        if indexer is not None:
            expected = indexer.compressor.compress_id(split.sep_id)
            if indexer.sep_id != expected:
                raise DataError(
                    f"the indexer's separator (compressed id {indexer.sep_id}) is not the "
                    f"corpus separator {split.sep_id} (compressed {expected}); build the "
                    f"NgramIndexer with sep_id={split.sep_id} so n-grams do not cross documents"
                )
        self._producer = _Producer(
            split,
            data_cfg.batch_size,
            data_cfg.seq_len,
            seed,
            indexer,
            pin_memory and torch.cuda.is_available(),
            rank,
            world_size,
        )
        check_shard(data_cfg.batch_size, rank, world_size)
        self._next_step = start_step
        self._failure: _Failure | None = None
        self._closed = False
        self.wait_seconds = 0.0  # total time next() spent blocked on the worker
        self.build_seconds = 0.0  # total worker time of the batches served
        self.n_batches = 0  # batches served
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_worker,
            args=(self._producer, start_step, self._queue, self._stop),
            name=f"engram-batch-loader-{start_step}",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)

    def make_batch(self, step: int) -> Batch:
        """The batch of ``step``, computed synchronously in the caller's thread."""
        return self._producer.make_batch(step)

    @property
    def next_step(self) -> int:
        """The step of the batch the next ``next()`` returns."""
        return self._next_step

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        if self._failure is not None:
            raise self._failure.exc
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        start = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    try:  # it may have put its last item just before exiting
                        item = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        raise RuntimeError("the BatchLoader worker stopped unexpectedly") from None
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failure):
            self._failure = item
            item.exc.add_note(f"(raised in the BatchLoader worker making step {item.step})")
            self.close()
            raise item.exc
        if item.step != self._next_step:
            raise RuntimeError(f"BatchLoader got step {item.step}, expected {self._next_step}")
        self._next_step += 1
        self.n_batches += 1
        self.build_seconds += item.build_seconds
        return item

    def close(self) -> None:
        """Stop and join the worker (idempotent); later ``next()`` calls raise."""
        self._closed = True
        self._finalizer()

    @property
    def is_alive(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
