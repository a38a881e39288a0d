"""Tests of the background prefetcher and the prefetching row store (engram.store.prefetch)."""

from __future__ import annotations

import gc
import itertools
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from concurrent.futures import CancelledError

import pytest
import torch
from torch import Tensor

from engram.store.base import PartialGather, RowOutOfRangeError, RowStore, finish_by_gather
from engram.store.memory import MemoryRowStore
from engram.store.prefetch import Prefetcher, PrefetchHandle, PrefetchingStore

_names = itertools.count()


def _name() -> str:
    """A thread name unique to this test, to find the worker in threading.enumerate()."""
    return f"test-prefetch-{next(_names)}"


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def prefetcher() -> Iterator[Prefetcher]:
    p = Prefetcher(max_pending=2, name=_name())
    try:
        yield p
    finally:
        p.close()


class SlowStore:
    """A MemoryRowStore whose gather first sleeps (or waits on an event) and counts its calls."""

    def __init__(
        self,
        num_rows: int = 50,
        dim: int = 4,
        delay: float = 0.0,
        gate: threading.Event | None = None,
    ) -> None:
        self.table = MemoryRowStore(num_rows, dim, seed=1)
        self.delay = delay
        self.gate = gate
        self.calls = 0
        self.started = threading.Event()
        self.outputs: list[weakref.ref[Tensor]] = []

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def dim(self) -> int:
        return self.table.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def gather(self, rows: Tensor) -> Tensor:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=5.0)
        if self.delay:
            time.sleep(self.delay)
        out = self.table.gather(rows).detach()
        self.outputs.append(weakref.ref(out))
        return out

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        self.table.apply_row_update(rows, delta)

    def expected(self, rows: Tensor) -> Tensor:
        return self.table.weight.detach()[rows.long()]


def _blocker(p: Prefetcher) -> tuple[threading.Event, threading.Event, PrefetchHandle[str]]:
    """Occupy the worker until `release` is set; returns (started, release, handle)."""
    started, release = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        assert release.wait(timeout=5.0)
        return "released"

    handle = p.submit(job)
    assert started.wait(timeout=5.0)
    return started, release, handle


# ----------------------------------------------------------------------------- Prefetcher


def test_submit_returns_result(prefetcher: Prefetcher) -> None:
    handle = prefetcher.submit(lambda a, b: a + b, 2, 3)
    assert isinstance(handle, PrefetchHandle)
    assert handle.result(timeout=5.0) == 5
    assert handle.done()
    assert prefetcher.pending == 0


def test_worker_exception_reraised_with_traceback_and_worker_survives(
    prefetcher: Prefetcher,
) -> None:
    def exploding_job() -> None:
        raise KeyError("boom")

    handle = prefetcher.submit(exploding_job)
    with pytest.raises(KeyError, match="boom") as info:
        handle.result(timeout=5.0)
    text = "".join(traceback.format_exception(info.value))
    assert "exploding_job" in text  # the worker's frames are in the traceback
    assert prefetcher.name in text  # the note names the worker thread
    assert prefetcher.submit(lambda: 7).result(timeout=5.0) == 7
    assert prefetcher.is_alive


def test_cancel_only_before_start(prefetcher: Prefetcher) -> None:
    _, release, running = _blocker(prefetcher)
    queued = prefetcher.submit(lambda: "never")
    assert not running.cancel()  # already started
    assert queued.cancel()
    assert prefetcher.pending == 1  # the cancelled job left the queue at once
    release.set()
    assert running.result(timeout=5.0) == "released"
    with pytest.raises(CancelledError):
        queued.result(timeout=5.0)


def test_submit_blocks_when_full_then_times_out(prefetcher: Prefetcher) -> None:
    _, release, running = _blocker(prefetcher)
    prefetcher.submit(lambda: 1)  # 2 outstanding == max_pending
    assert prefetcher.pending == 2
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="max_pending=2"):
        prefetcher.submit(lambda: 2, timeout=0.05)
    assert time.perf_counter() - start < 2.0

    submitted = threading.Event()
    results: list[int] = []

    def blocked_submitter() -> None:
        results.append(prefetcher.submit(lambda: 3).result(timeout=5.0))
        submitted.set()

    t = threading.Thread(target=blocked_submitter, daemon=True)
    t.start()
    assert not submitted.wait(timeout=0.05)  # still blocked: the queue is full
    release.set()
    t.join(timeout=5.0)
    assert not t.is_alive() and results == [3]
    assert running.result(timeout=5.0) == "released"


def test_close_with_jobs_in_flight_is_prompt_and_idempotent() -> None:
    name = _name()
    p = Prefetcher(max_pending=4, name=name)
    _, release, running = _blocker(p)
    queued = [p.submit(time.sleep, 0.1) for _ in range(3)]
    p.close(wait=False)  # returns at once even though a job is running
    assert all(h.cancelled() for h in queued)
    with pytest.raises(CancelledError):
        queued[0].result(timeout=1.0)
    release.set()
    start = time.perf_counter()
    p.close()  # joins: only the running job finishes, the queued ones never run
    p.close()
    assert time.perf_counter() - start < 1.0
    assert running.result(timeout=1.0) == "released"
    assert not p.is_alive and not _threads_named(name)


def test_close_wakes_a_blocked_submitter() -> None:
    p = Prefetcher(max_pending=1, name=_name())
    _, release, _ = _blocker(p)
    errors: list[BaseException] = []

    def blocked_submitter() -> None:
        try:
            p.submit(lambda: None)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked_submitter, daemon=True)
    t.start()
    t.join(timeout=0.05)
    assert t.is_alive()  # blocked on the full queue
    p.close(wait=False)
    t.join(timeout=5.0)
    assert not t.is_alive() and len(errors) == 1 and "closed" in str(errors[0])
    release.set()
    p.close()


def test_submit_after_close_raises() -> None:
    p = Prefetcher(name=_name())
    p.close()
    assert p.closed
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(lambda: None)


def test_context_manager_stops_thread() -> None:
    name = _name()
    with Prefetcher(name=name) as p:
        assert p.submit(lambda: 1).result(timeout=5.0) == 1
        assert len(_threads_named(name)) == 1
    assert not _threads_named(name)
    assert "closed" in repr(p)


def test_dropping_the_prefetcher_stops_thread() -> None:
    name = _name()
    p = Prefetcher(name=name)
    p.submit(lambda: 1).result(timeout=5.0)
    thread = _threads_named(name)[0]
    del p
    gc.collect()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_keyboard_interrupt_in_consumer_shuts_down() -> None:
    name = _name()
    with pytest.raises(KeyboardInterrupt), Prefetcher(max_pending=1, name=name) as p:
        _, release, _ = _blocker(p)
        release.set()
        raise KeyboardInterrupt
    assert not _threads_named(name)


def test_invalid_max_pending() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        Prefetcher(0)


# ----------------------------------------------------------------------------- the store


def test_store_satisfies_protocol(prefetcher: Prefetcher) -> None:
    inner = MemoryRowStore(12, 5, dtype=torch.float64)
    store = PrefetchingStore(inner, prefetcher)
    assert isinstance(store, RowStore)
    assert (store.num_rows, store.dim, store.dtype) == (12, 5, torch.float64)
    assert store.trainable_parameters() == []
    with pytest.raises(TypeError, match="RowStore"):
        PrefetchingStore(object(), prefetcher)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_gather_equals_inner(prefetcher: Prefetcher, shape: tuple[int, ...]) -> None:
    inner = MemoryRowStore(17, 6, seed=3)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.randint(0, 17, shape)
    expected = inner.gather(rows).detach()
    assert torch.equal(store.gather(rows), expected)  # synchronous
    store.prefetch(rows.clone())
    out = store.gather(rows)  # prefetched
    assert torch.equal(out, expected) and not out.requires_grad
    assert (store.stats.sync_gathers, store.stats.prefetched_hits) == (1, 1)


def test_prefetch_then_gather_returns_prefetched_tensor(prefetcher: Prefetcher) -> None:
    inner = SlowStore()
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([[1, 2, 3], [4, 5, 6]])
    store.prefetch(rows)
    assert store.pending == 1
    out = store.gather(rows.clone())  # equal ids, another tensor
    assert torch.equal(out, inner.expected(rows))
    assert inner.outputs[-1]() is out  # the worker's tensor itself, not a second gather
    assert inner.calls == 1
    store.prefetch(rows)
    assert torch.equal(store.gather(rows), inner.expected(rows))  # same object: fast path
    assert inner.calls == 2 and store.pending == 0
    stats = store.stats.as_dict()
    assert stats["prefetched_hits"] == 2 and stats["sync_gathers"] == 0
    assert stats["prefetches"] == 2 and stats["wait_time_s"] >= 0.0


def test_prefetch_overlaps_other_work(prefetcher: Prefetcher) -> None:
    inner = SlowStore(delay=0.1)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.arange(10)
    start = time.perf_counter()
    store.prefetch(rows)
    time.sleep(0.1)  # the "other work" of blocks 0..14
    out = store.gather(rows)
    elapsed = time.perf_counter() - start
    assert torch.equal(out, inner.expected(rows))
    assert store.stats.prefetched_hits == 1
    assert elapsed < 0.18, f"no overlap: {elapsed:.3f} s for 0.1 s work + 0.1 s gather"


def test_mismatching_ids_gather_synchronously(prefetcher: Prefetcher) -> None:
    inner = SlowStore()
    store = PrefetchingStore(inner, prefetcher)
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    store.prefetch(a)
    assert torch.equal(store.gather(b), inner.expected(b))
    assert torch.equal(store.gather(b.reshape(3, 1)), inner.expected(b.reshape(3, 1)))
    assert (store.stats.sync_gathers, store.stats.prefetched_hits) == (2, 0)
    assert torch.equal(store.gather(a), inner.expected(a))  # the prefetch is still there
    assert store.stats.prefetched_hits == 1


def test_ids_written_in_place_after_prefetch_are_not_served_stale(prefetcher: Prefetcher) -> None:
    inner = SlowStore()
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([1, 2, 3])
    store.prefetch(rows)
    rows[0] = 9  # same object, new contents
    assert torch.equal(store.gather(rows), inner.expected(rows))
    assert store.stats.sync_gathers == 1 and store.stats.stale_dropped == 1


def test_inference_mode_ids(prefetcher: Prefetcher) -> None:
    inner = SlowStore()
    store = PrefetchingStore(inner, prefetcher)
    with torch.inference_mode():
        rows = torch.tensor([5, 6, 7])
        store.prefetch(rows)
        rows[0] = 8  # no version counter: the prefetch kept its own copy of the ids
        assert torch.equal(store.gather(rows), inner.expected(rows))
        assert store.stats.sync_gathers == 1
        assert torch.equal(
            store.gather(torch.tensor([5, 6, 7])), inner.expected(rows.new_tensor([5, 6, 7]))
        )
        assert store.stats.prefetched_hits == 1


def test_worker_exception_propagates_from_gather(prefetcher: Prefetcher) -> None:
    inner = SlowStore(9, 2)  # no gather_nowait: the whole gather runs on the worker
    store = PrefetchingStore(inner, prefetcher)
    bad = torch.tensor([0, 9])
    store.prefetch(bad)
    with pytest.raises(RowOutOfRangeError, match="row id 9") as info:
        store.gather(bad.clone())
    assert "prefetch worker" in "".join(traceback.format_exception(info.value))
    good = torch.tensor([1, 2])  # the worker survived
    store.prefetch(good)
    assert torch.equal(store.gather(good), inner.expected(good))
    assert store.stats.prefetched_hits == 1


def test_stale_prefetches_dropped_memory_bounded(prefetcher: Prefetcher) -> None:
    inner = SlowStore(num_rows=1000, dim=8)
    store = PrefetchingStore(inner, prefetcher, max_entries=3)
    for i in range(1000):
        store.prefetch(torch.tensor([i]))
        assert store.pending <= 3 and prefetcher.pending <= prefetcher.max_pending
    assert store.stats.prefetches == 1000
    assert store.stats.stale_dropped == 997
    rows = torch.tensor([999])
    assert torch.equal(store.gather(rows), inner.expected(rows))  # the newest is still pending
    gc.collect()
    alive = sum(ref() is not None for ref in inner.outputs)
    assert alive <= store.max_entries + prefetcher.max_pending


def test_prefetch_with_timeout_skips_when_full(prefetcher: Prefetcher) -> None:
    _, release, _ = _blocker(prefetcher)
    prefetcher.submit(lambda: None)
    inner = SlowStore()
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([1])
    store.prefetch(rows, timeout=0.02)  # a hint: dropped, not raised
    assert store.stats.skipped == 1 and store.pending == 0
    release.set()
    assert torch.equal(store.gather(rows), inner.expected(rows))
    assert store.stats.sync_gathers == 1


def test_apply_row_update_invalidates_pending_prefetches(prefetcher: Prefetcher) -> None:
    inner = MemoryRowStore(10, 3, seed=2)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([1, 4])
    store.prefetch(rows)
    prefetcher.submit(lambda: None).result(timeout=5.0)  # FIFO: the prefetch has run (old rows)
    before = inner.weight.detach()[rows].clone()
    delta = torch.ones(2, 3)
    store.apply_row_update(rows, delta)
    out = store.gather(rows)
    assert torch.equal(out, before + delta)
    assert store.stats.invalidated == 1 and store.stats.prefetched_hits == 0
    assert store.pending == 0


def test_apply_row_update_waits_for_running_prefetch(prefetcher: Prefetcher) -> None:
    gate = threading.Event()
    inner = SlowStore(gate=gate)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([2])
    store.prefetch(rows)
    assert inner.started.wait(timeout=5.0)  # the worker is inside inner.gather
    done = threading.Event()

    def update() -> None:
        store.apply_row_update(rows, torch.ones(1, 4))
        done.set()

    t = threading.Thread(target=update, daemon=True)
    t.start()
    assert not done.wait(timeout=0.05)  # no write while the worker reads
    gate.set()
    t.join(timeout=5.0)
    assert done.is_set()
    assert torch.equal(store.gather(rows), inner.expected(rows))
    assert store.stats.sync_gathers == 1


def test_shared_prefetcher_serves_several_stores(prefetcher: Prefetcher) -> None:
    inners = [SlowStore(seed_rows, 3) for seed_rows in (20, 30)]
    stores = [PrefetchingStore(inner, prefetcher) for inner in inners]
    rows = torch.tensor([[1, 2], [3, 4]])
    for store in stores:  # the start of a decode step: every layer's ids are known
        store.prefetch(rows + 1)
    for store, inner in zip(stores, inners, strict=True):
        assert torch.equal(store.gather(rows + 1), inner.expected(rows + 1))
        assert store.stats.prefetched_hits == 1


def test_closed_prefetcher_prefetch_raises_gather_still_works() -> None:
    p = Prefetcher(max_pending=2, name=_name())
    _, release, _ = _blocker(p)
    inner = SlowStore()
    store = PrefetchingStore(inner, p)
    rows = torch.tensor([3, 1])
    store.prefetch(rows)  # queued behind the blocker
    p.close(wait=False)  # cancels it
    release.set()
    assert torch.equal(store.gather(rows), inner.expected(rows))  # falls back to a sync gather
    assert store.stats.sync_gathers == 1
    with pytest.raises(RuntimeError, match="closed"):
        store.prefetch(rows)
    p.close()
    assert not p.is_alive


def test_no_deadlock_when_consumer_raises_mid_stream() -> None:
    name = _name()
    outcome: list[BaseException] = []

    def consumer() -> None:
        try:
            with Prefetcher(max_pending=1, name=name) as p:
                store = PrefetchingStore(SlowStore(delay=0.01), p)
                for i in range(20):
                    store.prefetch(torch.tensor([i, i + 1]))  # blocks while the queue is full
                    if i == 5:
                        raise ValueError("consumer failed")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    t.join(timeout=5.0)
    assert not t.is_alive(), "deadlock: the consumer never finished"
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)
    assert not _threads_named(name)


def test_cuda_device_requires_cuda(prefetcher: Prefetcher) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA"):
        PrefetchingStore(MemoryRowStore(4, 2), prefetcher, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staging_matches_inner(prefetcher: Prefetcher) -> None:
    inner = MemoryRowStore(100, 16, seed=4)  # on the host: rows are staged through pinned memory
    store = PrefetchingStore(inner, prefetcher, device="cuda")
    expected = inner.weight.detach()
    for step in range(4):
        rows = torch.randint(0, 100, (2, 8, 3), generator=torch.Generator().manual_seed(step))
        store.prefetch(rows)
        out = store.gather(rows.clone())
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), expected[rows])
        cuda_rows = rows.cuda()  # ids made on the GPU's current stream
        store.prefetch(cuda_rows)
        out = store.gather(cuda_rows)
        assert torch.equal(out.cpu(), expected[rows])
    sync = store.gather(torch.tensor([5, 7]))
    assert sync.device.type == "cuda" and torch.equal(sync.cpu(), expected[[5, 7]])
    assert store.stats.prefetched_hits == 8 and store.stats.sync_gathers == 1
    torch.cuda.synchronize()


def test_engram_layer_lookup_served_by_prefetch(prefetcher: Prefetcher) -> None:
    from engram.layer import Engram

    sizes = [7, 11, 13, 5]
    layer = Engram(16, sizes, 4, 3, seed=0)
    rows = torch.stack([torch.randint(0, s, (2, 6)) for s in sizes], dim=-1)  # (B, T, H)
    expected = layer.lookup(rows).detach()
    store = PrefetchingStore(layer.store, prefetcher)
    layer.set_store(store)
    assert layer.prefetch(rows)  # the layer computes the global ids; the store is the entry point
    assert torch.equal(layer.lookup(rows), expected)
    assert store.stats.prefetched_hits == 1 and store.stats.sync_gathers == 0


def test_rows_at_hand_are_served_at_prefetch_without_a_job(prefetcher: Prefetcher) -> None:
    inner = MemoryRowStore(30, 4, seed=5)  # RAM: everything at hand (gather_nowait)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([[1, 2], [29, 1]])
    store.prefetch(rows)
    assert prefetcher.pending == 0 and store.pending == 1
    assert store.stats.ready_prefetches == 1 and store.stats.ready_time_s > 0
    assert torch.equal(store.gather(rows.clone()), inner.weight.detach()[rows])
    assert store.stats.prefetched_hits == 1 and store.stats.fetch_time_s == 0.0
    bad = torch.tensor([0, 30])  # an error at prefetch surfaces from the consuming gather
    store.prefetch(bad)
    with pytest.raises(RowOutOfRangeError, match="row id 30"):
        store.gather(bad)


def test_only_the_reads_that_would_wait_go_to_the_worker(prefetcher: Prefetcher) -> None:
    gate = threading.Event()

    class PartlyReady(SlowStore):
        """Even ids are at hand; odd ids wait for `gate` (on the worker)."""

        def __init__(self, gate: threading.Event) -> None:
            super().__init__(gate=gate)
            self.asked: list[list[int]] = []

        def gather(self, rows: Tensor) -> Tensor:
            self.asked.append(rows.tolist())
            return super().gather(rows)

        def gather_nowait(self, rows: Tensor) -> PartialGather:
            flat = rows.reshape(-1)
            out = self.table.gather(flat).detach().clone()
            pending = torch.nonzero(flat % 2 == 1).view(-1).numpy()
            out[torch.from_numpy(pending)] = float("nan")
            return PartialGather(
                out.view(*rows.shape, self.dim),
                pending,
                finish_by_gather(self, flat, out, pending),
            )

    inner = PartlyReady(gate=gate)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([2, 3, 4, 5])
    store.prefetch(rows)
    assert inner.started.wait(timeout=5.0)  # the worker is reading ...
    assert inner.calls == 1  # ... in one gather ...
    gate.set()
    out = store.gather(rows)
    assert torch.equal(out, inner.expected(rows))
    assert inner.asked == [[3, 5]]  # ... of the two odd ids only
    assert store.stats.ready_prefetches == 0 and store.stats.fetch_time_s > 0


def test_invalidate_drops_ready_prefetches(prefetcher: Prefetcher) -> None:
    inner = MemoryRowStore(10, 3, seed=2)
    store = PrefetchingStore(inner, prefetcher)
    rows = torch.tensor([1, 4])
    store.prefetch(rows)  # served at once, from the old rows
    before = inner.weight.detach()[rows].clone()
    store.apply_row_update(rows, torch.ones(2, 3))
    assert store.pending == 0 and store.stats.invalidated == 1
    assert torch.equal(store.gather(rows), before + 1)
