"""A frequency-aware hot-row cache in front of any (slower) row store.

N-gram traffic is Zipfian: a few thousand rows (" of the", " in the", ...) take a large share of
all reads, and most rows are read once or never. `CachedRowStore` keeps the hottest rows of an
inner `RowStore` (an mmap'd file, a remote shard, ...) in a preallocated in-memory tensor and
serves them from there; everything else is read from the inner store in one batched call.

Axes used in shape comments: S the ids of a request (flattened), U its distinct ids, M the
distinct ids that missed, C the capacity in rows, R the resident rows (R <= C), T the memo size,
d the sketch depth, w the sketch width.

Design choices:
- Memory is bounded by the capacity, never by the table: the rows live in one preallocated
  (C, dim) tensor of the inner store's dtype (on `device`); the bookkeeping lives in host memory
  as numpy arrays: two (C,) int64 arrays (the id in each slot, -1 = empty, and its score), a
  sorted (R,) index of resident ids with their slots, a (T,) int64 memo with T = next_pow2(C)
  (below), two (C,) int32 scratch arrays, and, for "lfu", a fixed (d=4, w) int32 count-min sketch
  with w = the next power of two >= max(256, 2C): at most 120 bytes per cached row on top of the
  rows themselves, and nothing per table row (`memory_bytes()` reports the total).
- Policy "lfu" is TinyLFU (Einziger et al. 2017): the sketch estimates every row's recent access
  frequency (each requested id adds its number of occurrences; after `sample_size` additions,
  max(10C, 2^14) by default, every counter and every cached score is halved, so old popularity
  fades; the floor keeps a small cache from forgetting everything between two large batches).
  A missed row is admitted only if its estimate beats the score of the least frequent resident
  victim, so a one-off scan cannot flush the hot set. A resident row's score is its sketch
  estimate at its last access (halved with the sketch), so choosing victims needs no sketch
  query over the whole cache. Policy "lru" admits every miss and evicts the least recently used
  slots (one logical clock tick per `gather` call), for comparison.
- Everything is vectorised per call, and the common case (every id resident) is cheap:
  * lookup, per occurrence, through a memo: a direct-mapped (T,) table from a multiply-shift
    hash of the id to the slot it was last seen in. A hint is validated against the slot table
    (`slot_id[memo[h(id)]] == id`), so a stale or colliding entry is only a memo miss; memo misses
    fall back to a binary search of the sorted resident index (`np.searchsorted`) and refresh the
    memo. Hot ids are found with two gathers instead of a sort or a binary search, and the hit
    rows are read with one `index_select` straight into the (S, dim) output.
  * small requests (S <= 128 ids, e.g. one decode step: layers x heads): no dedup at all. The
    sketch adds one per occurrence (`np.add.at` accumulates duplicates, the same sums as adding
    each distinct id's count) and a Python set counts the distinct ids for the stats. numpy on
    a few dozen ids costs ~1 us per op against ~4 us for a small torch op.
  * large requests (a training batch): the hits are deduplicated by their slot with a linear
    scatter/gather over two (C,) scratch arrays (no sort of S); only the missed ids, usually
    few, go through `torch.unique`. The sketch is then updated once per distinct id with its
    count.
  * all misses are fetched with ONE `inner.gather`; admission pairs the candidates (best first)
    with the victims (`torch.topk` over the scores, worst first) and admits the prefix of pairs
    where the candidate wins; the resident index is updated by linear `np.delete`/`np.insert`
    (no re-sort). Two short-cuts skip the O(C) victim search with the same outcome: while the
    cache fills, never-used slots (a fill pointer) are taken directly; for "lfu", a lower bound
    of the smallest resident score (exact after every victim search; scores only grow between
    agings) rejects candidates that cannot beat any slot.
  Per call this is O(S) for the lookups of memo hits (plus O(log R) per memo miss and
  O(M log M) for the misses) plus O(C) when rows are admitted into a full cache; no Python loop
  runs per row, except over the ids of a small request. Measured with one thread, a 4M x 16
  float32 in-RAM inner store, C = 512K, Zipf ids, steady state (all hits): 16 ids per call
  ~26 us (was ~110 us with torch ops throughout; a raw `index_select` is ~3 us); 16,384 ids
  per call ~220 us (was ~720 us; raw ~56 us). Still, batch a whole step's ids into one call
  rather than calling per token and sub-table.
- Admission is batch-wise, so a row requested several times in one call counts as one fetch; the
  rows of the current call are never chosen as victims for that call's misses. Among victims of
  equal score, the choice is `torch.topk`'s (unspecified); everything else is deterministic, and
  the small- and large-request paths make identical decisions.
- Results are copies of what `inner.gather` returned, so they are bit-identical to reading the
  inner store directly. Stats count per requested id: a request's occurrence is a hit if its row
  was resident when the call started; every other occurrence (duplicates of a missed row
  included) is a miss. `unique_*` counts distinct ids per call (`unique_misses` = rows fetched).
- Thread safety: one `threading.Lock` guards the bookkeeping (memo and scratch arrays included)
  and the reads of cached rows; it is released while the inner store is read, so a background
  prefetch thread fetching a slow batch does not block the main thread's hits. Admission re-checks residency (another thread may have admitted the same row) and is
  skipped when the store was written to (`apply_row_update` / `invalidate` bump an epoch) during
  the fetch, so a stale copy is never cached.
- Writes: `apply_row_update` forwards to the inner store and then re-reads the affected resident
  rows from it (under the lock), so cached copies stay bit-identical to the inner store.
  `invalidate` drops cached values (all, or some rows) but keeps the frequency sketch.
- Not an `nn.Module` and not differentiable: `gather` returns detached rows and
  `trainable_parameters()` is empty. The cache is a serving/reading tier; training updates go
  through `apply_row_update`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Final, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engram._ext import load_extension
from engram.store.base import PartialGather, RowStore, check_row_ids, complete_gather

POLICIES: Final = ("lfu", "lru")
_SKETCH_DEPTH: Final = 4
_MIN_SKETCH_WIDTH: Final = 256
_MIN_SAMPLE_SIZE: Final = 1 << 14  # a small cache still remembers a few batches of traffic
_MAX_SAMPLE_SIZE: Final = 1 << 29  # keeps int32 sketch counters far from overflow
_SMALL_REQUEST: Final = 128  # requests of at most this many ids take the per-occurrence path
_AT_HAND_MIN: Final = 0.5  # gather_nowait asks the inner store while this share pays ...
_AT_HAND_WEIGHT: Final = 0.2  # ... averaged with this weight per probe ...
_PROBE_EVERY: Final = 16  # ... and otherwise every this many calls
_INT64_MAX: Final = (1 << 63) - 1
_PROTECTED: Final = _INT64_MAX  # score of a slot that must not be evicted in this call
_ALWAYS: Final = _INT64_MAX - 1  # LRU candidate priority: beats every unprotected victim

# Odd 64-bit multipliers (splitmix64 / xxhash constants) of the multiply-shift sketch hashes.
_SKETCH_MULTIPLIERS: Final = (
    0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xC2B2AE3D27D4EB4F,
)  # fmt: skip

_MEMO_MULTIPLIER: Final = np.uint64(0xD6E8FEB86659FD93)  # another odd 64-bit constant
_MIN_MEMO_SIZE: Final = 256
_EMPTY: Final = np.zeros(0, dtype=np.int64)


@lru_cache(maxsize=1)
def _load_kernel() -> Any:
    """`engram_cache_probe` from the optional C extension (`engram/_cachekernel.c`), or None when
    it was not built. Loaded with ctypes.PyDLL: the call keeps the GIL (it takes a microsecond;
    releasing the GIL would invite the prefetch thread to take it for longer)."""
    lib = load_extension("engram._cachekernel", keep_gil=True)
    if lib is None:
        return None
    try:
        fn = lib.engram_cache_probe
    except AttributeError:  # a stale build
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [i64, p, p, i64, p, p, p, p, p, i64, i64, i64, p, p, ctypes.c_uint64]
    fn.restype = i64
    return fn


def kernel_available() -> bool:
    """Whether the C probe (`engram/_cachekernel.c`) is built and loaded."""
    return _load_kernel() is not None


class _Misses(NamedTuple):
    """What phase 1 of a gather hands to the fetch and admission of its misses."""

    miss_occ: np.ndarray  # (S_miss,) positions in the request that missed
    missing: np.ndarray  # (M,) the distinct missed ids, sorted
    miss_j: np.ndarray  # (S_miss,) index into `missing` of each missed position
    key: np.ndarray  # (M,) lfu: sketch estimate; lru: last position in the request
    hit_ids: np.ndarray  # ids that hit (repeats allowed) ...
    hit_slots: np.ndarray  # ... and their slots: protected from eviction by this call


@dataclass(frozen=True)
class CacheStats:
    """Counters since construction or the last `reset_stats`, plus the current occupancy."""

    lookups: int  # requested ids, duplicates within a call included
    unique_lookups: int  # distinct ids per call, summed over calls
    hits: int  # requested ids whose row was resident when the call started
    misses: int  # lookups - hits
    unique_hits: int
    unique_misses: int  # rows fetched from the inner store
    admissions: int  # rows written into the cache (warm included)
    evictions: int  # resident rows replaced by admissions
    resident: int  # rows in the cache now
    capacity: int  # rows the cache can hold

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def unique_hit_rate(self) -> float:
        return self.unique_hits / self.unique_lookups if self.unique_lookups else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["unique_hit_rate"] = self.unique_hit_rate
        return d


def _capacity_rows(capacity_rows: int | None, capacity_bytes: int | None, row_bytes: int) -> int:
    if (capacity_rows is None) == (capacity_bytes is None):
        raise ValueError(
            "give exactly one of capacity_rows and capacity_bytes, got "
            f"capacity_rows={capacity_rows!r}, capacity_bytes={capacity_bytes!r}"
        )
    if capacity_rows is not None:
        if isinstance(capacity_rows, bool) or not isinstance(capacity_rows, int):
            raise ValueError(f"capacity_rows must be an int, got {capacity_rows!r}")
        if capacity_rows < 1:
            raise ValueError(f"capacity_rows must be >= 1, got {capacity_rows}")
        return capacity_rows
    assert capacity_bytes is not None
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise ValueError(f"capacity_bytes must be an int, got {capacity_bytes!r}")
    rows = capacity_bytes // row_bytes
    if rows < 1:
        raise ValueError(
            f"capacity_bytes={capacity_bytes} holds no row: one row is {row_bytes} bytes "
            "(dim * itemsize of the inner store's dtype)"
        )
    return rows


def _index_update(
    ids: np.ndarray, val: np.ndarray, removed: np.ndarray, add_ids: np.ndarray, add_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (n,) ids with payload `val`, minus `removed` (a subset of ids), plus `add_ids` (not
    in ids) with payload `add_val`: the new sorted arrays (linear passes; no sort of n)."""
    if removed.size:
        pos_r = np.searchsorted(ids, removed)
        ids, val = np.delete(ids, pos_r), np.delete(val, pos_r)
    if add_ids.size:
        order = np.argsort(add_ids)
        add_ids, add_val = add_ids[order], add_val[order]
        pos_b = np.searchsorted(ids, add_ids)
        ids, val = np.insert(ids, pos_b, add_ids), np.insert(val, pos_b, add_val)
    return ids, val


def _host_ids(rows: Tensor) -> np.ndarray:
    """Integer ids of any shape and device -> a flat (S,) int64 numpy array on the host (a
    zero-copy view where possible; never written to)."""
    if not rows.is_cpu:
        rows = rows.cpu()
    if rows.dtype != torch.int64:
        rows = rows.to(torch.int64)
    return rows.numpy().reshape(-1)


class CachedRowStore:
    """A bounded hot-row cache (TinyLFU or LRU) in front of any `RowStore`; same contract.

    Args:
        inner: the store holding every row (its `gather` is called only for misses).
        capacity_rows / capacity_bytes: exactly one; bytes are converted to rows of
            dim * itemsize(inner.dtype). A capacity above `inner.num_rows` is clamped to it.
        policy: "lfu" (TinyLFU admission, least-frequent eviction) or "lru".
        device: where the cached rows and outputs live (default CPU); the bookkeeping always
            lives in host memory.
        sketch_width: count-min sketch width (rounded up to a power of two); default
            next_pow2(max(256, 2 * capacity)).
        sample_size: sketch additions between two halvings (aging); default
            max(10 * capacity, 16384).
        check_bounds: bounds-check ids on every call (two reductions).
        kernel: probe small requests with the C kernel when it is built (False: numpy, for
            tests; both make the same decisions).
    """

    def __init__(
        self,
        inner: RowStore,
        *,
        capacity_rows: int | None = None,
        capacity_bytes: int | None = None,
        policy: str = "lfu",
        device: torch.device | str | None = None,
        sketch_width: int | None = None,
        sample_size: int | None = None,
        check_bounds: bool = True,
        kernel: bool = True,
    ) -> None:
        if not isinstance(inner, RowStore):
            raise TypeError(f"inner must implement RowStore, got {type(inner).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        self.inner = inner
        self.policy = policy
        self._lfu = policy == "lfu"
        self.check_bounds = bool(check_bounds)
        self.device = torch.device(device if device is not None else "cpu")
        self._on_host = self.device.type == "cpu"
        row_bytes = inner.dim * torch.empty((), dtype=inner.dtype).element_size()
        cap = _capacity_rows(capacity_rows, capacity_bytes, row_bytes)
        self.capacity = min(cap, int(inner.num_rows))

        C = self.capacity
        self._dim = int(inner.dim)
        self._rows = torch.zeros(C, self._dim, dtype=inner.dtype, device=self.device)  # (C, dim)
        # Bookkeeping: host tensors (for torch.topk) with numpy views (cheap small ops).
        self._score_t = torch.full((C,), -1, dtype=torch.long)  # (C,) freq or time, -1 = empty
        self._score = self._score_t.numpy()
        self._slot_id = np.full(C, -1, dtype=np.int64)  # (C,) id in each slot, -1 = empty
        self._index_ids = _EMPTY  # (R,) sorted resident ids
        self._index_slot = _EMPTY  # (R,) their slots
        memo_bits = (max(_MIN_MEMO_SIZE, C) - 1).bit_length()  # T = next_pow2(C)
        self._memo = np.zeros(1 << memo_bits, dtype=np.int64)  # (T,) hash(id) -> slot, a hint
        self._memo_shift = np.uint64(64 - memo_bits)
        self._stamp = np.zeros(C, dtype=np.int32)  # (C,) scratch of _distinct_slots
        self._count = np.zeros(C, dtype=np.int32)  # (C,) scratch of _distinct_slots, all 0
        self._fill = 0  # slots >= _fill have never held a row since the last full invalidate
        self._score_floor = -1  # a lower bound of min(_score) (lfu admission short-cut)

        width = max(_MIN_SKETCH_WIDTH, 2 * C) if sketch_width is None else int(sketch_width)
        if width < 1:
            raise ValueError(f"sketch_width must be >= 1, got {sketch_width}")
        self._sketch_bits = max(1, (width - 1).bit_length())
        self.sketch_width = 1 << self._sketch_bits
        default_sample = max(10 * C, _MIN_SAMPLE_SIZE)
        self.sample_size = min(
            _MAX_SAMPLE_SIZE, default_sample if sample_size is None else int(sample_size)
        )
        if self.sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        n_counters = _SKETCH_DEPTH * self.sketch_width if self._lfu else 0  # lru: unused
        self._sketch = np.zeros(n_counters, dtype=np.int32)  # (d*w,) flat count-min sketch
        self._mult = np.array(_SKETCH_MULTIPLIERS[:_SKETCH_DEPTH], dtype=np.uint64)[:, None]
        self._shift = np.uint64(64 - self._sketch_bits)
        self._row_base = (np.arange(_SKETCH_DEPTH, dtype=np.uint64) * self.sketch_width)[:, None]
        self._sketch_adds = 0
        self._clock = 0
        self._epoch = 0
        self._kernel = _load_kernel() if kernel else None
        self._at_hand = 1.0  # running share of misses the inner store's gather_nowait served
        self._probe_skips = 0
        # the probe's fixed arguments: these arrays are only ever modified in place
        self._probe_args = (
            self._memo.ctypes.data, int(self._memo_shift), self._slot_id.ctypes.data,
            self._sketch.ctypes.data if self._lfu else None, self._mult.ctypes.data,
            _SKETCH_DEPTH, int(self._shift), self.sketch_width,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(
            ("lookups", "unique_lookups", "hits", "unique_hits", "admissions", "evictions"), 0
        )

    # ------------------------------------------------------------------ RowStore properties
    @property
    def num_rows(self) -> int:
        return int(self.inner.num_rows)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Empty: the cache returns detached rows (train through `apply_row_update`)."""
        return []

    # ------------------------------------------------------------------ sketch
    def _record(self, ids: np.ndarray, counts: np.ndarray | None, n_added: int) -> np.ndarray:
        """Add `counts` (n,) (None: one each) to the sketch for `ids` (n,) (duplicates allowed)
        and return their new (n,) int32 estimates; every `sample_size` additions, halve all
        counters and scores (aging). Caller holds the lock."""
        # multiply-shift: the top bits of id * a_j (mod 2^64) pick the counter in row j
        h = ids.view(np.uint64) * self._mult  # (d, n)
        h >>= self._shift
        h += self._row_base
        pos = h.view(np.int64).reshape(-1)  # (d*n,) flat counter positions
        if counts is None:
            add = np.ones(pos.size, dtype=np.int32)
        else:
            add = np.tile(counts.astype(np.int32), _SKETCH_DEPTH)
        np.add.at(self._sketch, pos, add)  # duplicate positions accumulate
        self._age(n_added)
        return self._sketch[pos].reshape(_SKETCH_DEPTH, -1).min(axis=0)  # int32

    def _age(self, n_added: int) -> bool:
        """Count `n_added` sketch additions; every `sample_size`, halve all counters and scores
        (TinyLFU reset). Whether it halved. Caller holds the lock."""
        self._sketch_adds += n_added
        aged = False
        while self._sketch_adds >= self.sample_size:
            self._sketch >>= 1
            positive = self._score > 0
            self._score[positive] >>= 1
            self._score_floor >>= 1  # floor(x / 2) keeps -1 and 0; scores halve the same way
            self._sketch_adds //= 2
            aged = True
        return aged

    # ------------------------------------------------------------------ index
    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (hit mask (n,), slot (n,)) by binary search in the sorted resident index;
        a miss gets some valid slot (or 0)."""
        index = self._index_ids
        n = index.size
        if n == 0:
            return np.zeros(ids.size, dtype=bool), np.zeros(ids.size, dtype=np.int64)
        pos = np.searchsorted(index, ids)
        np.minimum(pos, n - 1, out=pos)
        return index[pos] == ids, self._index_slot[pos]

    def _memo_bucket(self, ids: np.ndarray) -> np.ndarray:
        h = ids.view(np.uint64) * _MEMO_MULTIPLIER  # wraps mod 2^64
        h >>= self._memo_shift
        return h.view(np.int64)

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Like `_lookup` (plus the number of hits), through the memo: a direct-mapped (T,)
        table from a hash of the id to the slot it was last seen in, validated against
        `_slot_id` (so a stale entry is only a memo miss); memo misses fall back to `_lookup`
        and refresh the memo."""
        bucket = self._memo_bucket(ids)  # (n,)
        slot = self._memo[bucket]  # (n,)
        hit = self._slot_id[slot] == ids  # (n,)
        n_hit = int(np.count_nonzero(hit))
        if n_hit < ids.size:
            lost = np.flatnonzero(~hit)
            l_hit, l_slot = self._lookup(ids[lost])
            found, found_slot = lost[l_hit], l_slot[l_hit]
            if found.size:
                slot[found], hit[found] = found_slot, True
                self._memo[bucket[found]] = found_slot
                n_hit += found.size
        return hit, slot, n_hit

    def _to_device(self, idx: np.ndarray) -> Tensor:
        t = torch.from_numpy(idx)
        return t if self._on_host else t.to(self.device)

    # ------------------------------------------------------------------ admission
    def _admit(
        self, ids: np.ndarray, prio: np.ndarray, rows: Tensor, order: np.ndarray,
        protected: Callable[[], np.ndarray],
    ) -> None:  # fmt: skip
        """Admit candidates ids[order] (not resident; best first: prio[order] descending) with
        their rows rows[order] (rows: (M, dim)), never evicting the slots `protected()` returns
        (called only if a victim search is needed). Caller holds the lock.

        Candidate i is paired with the i-th worst victim and admitted iff its priority beats the
        victim's score; both orders make the admitted pairs a prefix.
        """
        C = self.capacity
        order = order[:C]
        cand, prio = ids[order], prio[order]
        k = cand.size
        if k == 0:
            return
        if self._fill == self._index_ids.size and k <= C - self._fill:
            # never-used slots only (score -1): every candidate wins, no O(C) victim search
            n, slots = k, np.arange(self._fill, self._fill + k, dtype=np.int64)
            self._fill += k
        else:
            score = self._score  # (C,) -1 = empty, else frequency (lfu) or last tick (lru)
            if self._lfu:  # only candidates beating the weakest slot can get in
                k = int(np.count_nonzero(prio > self._score_floor))
                if k == 0:
                    return
            protect = protected()
            saved = score[protect]
            score[protect] = _PROTECTED
            try:
                worst = torch.topk(self._score_t, k, largest=False, sorted=True)  # ascending
            finally:
                score[protect] = saved
            worst_score = worst.values.numpy()
            if self._lfu:  # the exact minimum over all slots becomes the new floor
                self._score_floor = int(worst_score[0])
                if saved.size:
                    self._score_floor = min(self._score_floor, int(saved.min()))
            n = int(np.count_nonzero(prio[:k] > worst_score))
            if n == 0:
                return
            slots = worst.indices.numpy()[:n]  # (n,)
            self._fill = max(self._fill, int(slots.max()) + 1)
        cand = cand[:n]
        old = self._slot_id[slots]
        evicted = old[old >= 0]
        self._index_ids, self._index_slot = _index_update(
            self._index_ids, self._index_slot, evicted, cand, slots
        )
        self._slot_id[slots] = cand
        self._memo[self._memo_bucket(cand)] = slots
        self._rows[self._to_device(slots)] = rows.index_select(0, self._to_device(order[:n]))
        self._score[slots] = prio[:n] if self._lfu else self._clock
        self._counters["admissions"] += n
        self._counters["evictions"] += int(evicted.size)

    # ------------------------------------------------------------------ reading
    def _fetch(self, ids: np.ndarray) -> Tensor:
        """Rows (M,) from the inner store as a detached (M, dim) tensor on the cache's device."""
        with torch.no_grad():
            out = self.inner.gather(torch.from_numpy(ids))
        return out.detach().to(device=self.device, dtype=self.dtype)

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, any shape S) -> S + (dim,), bit-identical to
        `inner.gather(rows)` (detached, on the cache's device)."""
        shape, epoch, out, misses = self._lookup_request(rows, "CachedRowStore.gather")
        if misses is not None:  # phases 2 and 3: fetch (lock released), fill, admit
            self._serve_misses(epoch, out, misses)
        return out.view(*shape, self._dim)

    def gather_nowait(self, rows: Tensor) -> PartialGather:
        """The resident rows at once and the misses the inner store has at hand (its own
        `gather_nowait`, e.g. rows in the page cache); the rest, and the admission of every
        miss, are left to `finish` (see `engram.store.base.PartialGather`). An inner store
        without `gather_nowait` leaves every miss to `finish`; so does one whose probes have
        lately found fewer than half the misses at hand (new text against a table larger than
        RAM: probing on the model thread was measured to cost more than it saved), except for
        one call in `_PROBE_EVERY`."""
        shape, epoch, out, m = self._lookup_request(rows, "CachedRowStore.gather_nowait")
        full = (*shape, self._dim)
        if m is None:
            return complete_gather(out.view(full))
        nowait = getattr(self.inner, "gather_nowait", None)
        if nowait is None or not self._probe_inner():
            return PartialGather(
                out.view(full), m.miss_occ, lambda: self._serve_misses(epoch, out, m)
            )
        with torch.no_grad():
            part = nowait(torch.from_numpy(m.missing))  # (M, dim), some rows maybe pending
        at_hand = 1.0 - part.pending.size / m.missing.size
        self._at_hand = (1 - _AT_HAND_WEIGHT) * self._at_hand + _AT_HAND_WEIGHT * at_hand
        fetched = part.out.detach().to(device=self.device, dtype=self.dtype)
        if part.complete:
            self._place(epoch, out, m, fetched)
            return complete_gather(out.view(full))
        # the ready misses go into `out` now; `finish` rewrites all of them and admits them
        out[self._to_device(m.miss_occ)] = fetched.index_select(0, self._to_device(m.miss_j))
        wait_j = np.zeros(m.missing.size, dtype=bool)
        wait_j[part.pending] = True
        finish_inner = part.finish
        assert finish_inner is not None

        def finish() -> None:
            finish_inner()
            self._place(epoch, out, m, part.out.detach().to(device=self.device, dtype=self.dtype))

        return PartialGather(out.view(full), m.miss_occ[wait_j[m.miss_j]], finish)

    def _probe_inner(self) -> bool:
        """Whether `gather_nowait` asks the inner store for its misses at once: while that has
        paid (an average share of misses at hand of at least `_AT_HAND_MIN`), else every
        `_PROBE_EVERY`-th time, to notice when it pays again."""
        if self._at_hand >= _AT_HAND_MIN:
            return True
        self._probe_skips += 1
        if self._probe_skips < _PROBE_EVERY:
            return False
        self._probe_skips = 0
        return True

    def _lookup_request(
        self, rows: Tensor, what: str
    ) -> tuple[tuple[int, ...], int, Tensor, _Misses | None]:
        """Phase 1 of a gather, under the lock: hits, frequencies, stats. Returns the request's
        shape, the store's epoch, the (S, dim) output with every hit filled, and the misses."""
        if not isinstance(rows, Tensor) or not _is_integer(rows.dtype):
            if self.check_bounds:
                check_row_ids(rows, self.num_rows, what=what)
            raise TypeError(f"{what}: row ids must be an integer torch.Tensor")
        ids = _host_ids(rows)  # (S,)
        shape = tuple(rows.shape)
        if ids.size == 0:
            return shape, self._epoch, self._rows.new_empty(0, self._dim), None
        if self.check_bounds and (ids.min() < 0 or ids.max() >= self.num_rows):
            check_row_ids(rows, self.num_rows, what=what)  # raises
        small = ids.size <= _SMALL_REQUEST
        with self._lock:
            epoch = self._epoch
            self._clock += 1
            est = None
            if small and self._kernel is not None:
                hit, slot, n_hit, est = self._probe(ids)
            else:
                hit, slot, n_hit = self._locate(ids)  # (S,), (S,)
            out = self._rows.index_select(0, self._to_device(slot))  # (S, dim); misses: junk
            if small:
                misses = self._account_small(ids, hit, slot, n_hit, est)
            else:
                misses = self._account_large(ids, hit, slot, n_hit)
        return shape, epoch, out, misses

    def _probe(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """`_locate` plus, for "lfu", `_record(ids, None, S)`, in one C call (same results):
        hit (S,), slot (S,), hits, estimates (S,) int32 or None. Caller holds the lock."""
        n = ids.size
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        slot = np.empty(n, dtype=np.int64)
        hit = np.empty(n, dtype=bool)
        memo, memo_shift, slot_id, sketch, mult, depth, shift, width = self._probe_args
        pos = est = None
        if sketch is not None:
            pos = np.empty(depth * n, dtype=np.int64)  # (d*n,)
            est = np.empty(n, dtype=np.int32)
        n_hit = self._kernel(
            n, ids.ctypes.data, memo, memo_shift, slot_id, slot.ctypes.data, hit.ctypes.data,
            sketch, mult, depth, shift, width, None if pos is None else pos.ctypes.data,
            None if est is None else est.ctypes.data, int(_MEMO_MULTIPLIER),
        )  # fmt: skip
        if n_hit < n:  # memo misses: the sorted index decides, and the memo learns
            lost = np.flatnonzero(~hit)
            l_hit, l_slot = self._lookup(ids[lost])
            found, found_slot = lost[l_hit], l_slot[l_hit]
            if found.size:
                slot[found], hit[found] = found_slot, True
                self._memo[self._memo_bucket(ids[found])] = found_slot
                n_hit += found.size
        if est is not None:
            assert pos is not None
            if self._age(n):  # counters halved: estimate again
                est = self._sketch[pos].reshape(_SKETCH_DEPTH, -1).min(axis=0)
        return hit, slot, n_hit, est

    def _account_small(
        self, ids: np.ndarray, hit: np.ndarray, slot: np.ndarray, n_hit: int,
        est: np.ndarray | None = None,
    ) -> _Misses | None:  # fmt: skip
        """Sketch, scores and stats of a small request (S,), per occurrence: no sort; the
        sketch accumulates duplicates and Python sets count the distinct ids. `est`: the
        estimates when `_probe` already recorded the request in the sketch."""
        S = ids.size
        if est is None and self._lfu:
            est = self._record(ids, None, S)  # (S,)
        n_unique = len(set(ids.tolist()))
        c = self._counters
        c["lookups"] += S
        c["hits"] += n_hit
        c["unique_lookups"] += n_unique
        if n_hit == S:  # the common case: everything resident
            self._score[slot] = self._clock if est is None else est
            c["unique_hits"] += n_unique
            return None
        hit_slots = slot[hit]
        self._score[hit_slots] = self._clock if est is None else est[hit]
        miss_occ = np.flatnonzero(~hit)  # (S_miss,)
        miss_list = ids[miss_occ].tolist()
        # per distinct missed id: its priority key (lfu: estimate; lru: last position)
        keys = (miss_occ if est is None else est[miss_occ]).tolist()
        key = dict(zip(miss_list, keys, strict=True))  # lru: the last position wins
        c["unique_hits"] += n_unique - len(key)
        missing = sorted(key)
        where = {i: j for j, i in enumerate(missing)}
        return _Misses(
            miss_occ=miss_occ,
            missing=np.array(missing, dtype=np.int64),
            miss_j=np.array([where[i] for i in miss_list], dtype=np.int64),
            key=np.array([key[i] for i in missing], dtype=np.int64),
            hit_ids=ids[hit],
            hit_slots=hit_slots,
        )

    def _account_large(
        self, ids: np.ndarray, hit: np.ndarray, slot: np.ndarray, n_hit: int
    ) -> _Misses | None:
        """Sketch, scores and stats of a large request (S,): the hits are deduplicated by slot
        (linear scatter/gather over scratch (C,) arrays, no sort), only the misses by
        `torch.unique`."""
        S = ids.size
        all_hit = n_hit == S
        h_slots, h_counts = self._distinct_slots(slot if all_hit else slot[hit])  # (Uh,)
        h_ids = self._slot_id[h_slots]
        c = self._counters
        c["lookups"] += S
        c["hits"] += n_hit
        c["unique_hits"] += h_slots.size
        if all_hit:
            c["unique_lookups"] += h_slots.size
            est = self._record(h_ids, h_counts, S) if self._lfu else None
            self._score[h_slots] = self._clock if est is None else est
            return None
        miss_occ = np.flatnonzero(~hit)  # (S_miss,)
        uniq, inverse, counts = torch.unique(
            torch.from_numpy(ids[miss_occ]), return_inverse=True, return_counts=True
        )
        missing, miss_j = uniq.numpy(), inverse.numpy()  # (M,) sorted, (S_miss,)
        c["unique_lookups"] += h_slots.size + missing.size
        if self._lfu:
            both = np.concatenate([h_ids, missing])
            est = self._record(both, np.concatenate([h_counts, counts.numpy()]), S)
            self._score[h_slots], key = est[: h_slots.size], est[h_slots.size :]
        else:  # most recent first: by last position in this call
            self._score[h_slots] = self._clock
            last = torch.zeros(missing.size, dtype=torch.long)
            last.scatter_reduce_(0, inverse, torch.from_numpy(miss_occ), reduce="amax")
            key = last.numpy()
        return _Misses(miss_occ, missing, miss_j, key, h_ids, h_slots)

    def _distinct_slots(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) slots with repeats -> the distinct slots (u,) (in no particular order) and how
        often each occurs (u,) int32, via the (C,) scratch arrays (left as they were found)."""
        n = slots.size
        pos = np.arange(n, dtype=np.int32)
        self._stamp[slots] = pos  # one writer per slot wins ...
        distinct = slots[self._stamp[slots] == pos]  # ... and represents it
        np.add.at(self._count, slots, np.ones(n, dtype=np.int32))
        counts = self._count[distinct]
        self._count[distinct] = 0
        return distinct, counts

    def _serve_misses(self, epoch: int, out: Tensor, m: _Misses) -> None:
        """Fetch the missed rows (lock released: the slow part), write them into `out` and
        offer them for admission (skipped if the store was written to since phase 1, `epoch`,
        so a stale copy is never cached)."""
        self._place(epoch, out, m, self._fetch(m.missing))

    def _place(self, epoch: int, out: Tensor, m: _Misses, fetched: Tensor) -> None:
        """Write the missed rows `fetched` (M, dim) into `out` (S, dim) and offer them for
        admission (skipped if the store was written to since phase 1)."""
        out[self._to_device(m.miss_occ)] = fetched.index_select(0, self._to_device(m.miss_j))
        order = np.argsort(-m.key, kind="stable")  # most frequent / most recent first
        prio = m.key if self._lfu else np.full(m.missing.size, _ALWAYS, dtype=np.int64)
        with self._lock:
            if self._epoch != epoch:
                return
            again, again_slot = self._lookup(m.missing)  # another thread may have admitted some
            order = order[~again[order]]

            def protected() -> np.ndarray:  # slots of this call's ids that are resident now
                ids = np.concatenate([m.hit_ids, m.missing[again]])
                slots = np.concatenate([m.hit_slots, again_slot[again]])
                moved = self._slot_id[slots] != ids  # possible only under concurrency
                if moved.any():
                    m_hit, m_slot = self._lookup(ids[moved])
                    slots = np.concatenate([slots[~moved], m_slot[m_hit]])
                return slots

            self._admit(m.missing, prio, fetched, order, protected)

    def __call__(self, rows: Tensor) -> Tensor:
        return self.gather(rows)

    # ------------------------------------------------------------------ writing
    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """Forward `row[rows[i]] += delta[i]` to the inner store, then refresh the cached copies
        of the updated rows from it (bit-identical to the inner store afterwards)."""
        if not isinstance(rows, Tensor) or rows.dim() != 1:
            raise ValueError("apply_row_update: rows must be a 1-D (R,) tensor")
        if delta.shape != (rows.shape[0], self.dim):
            raise ValueError(
                f"apply_row_update: delta must have shape (R, dim) = ({rows.shape[0]}, "
                f"{self.dim}), got {tuple(delta.shape)}"
            )
        check_row_ids(rows, self.num_rows, what="CachedRowStore.apply_row_update")
        with self._lock:
            self._epoch += 1
            self.inner.apply_row_update(rows, delta)
            ids = np.unique(_host_ids(rows))
            hit, slot = self._lookup(ids)
            if hit.any():
                self._rows[self._to_device(slot[hit])] = self._fetch(ids[hit])

    def invalidate(self, rows: Tensor | None = None) -> None:
        """Drop the cached copies of `rows` (default: every row). Frequencies are kept."""
        with self._lock:
            self._epoch += 1
            self._score_floor = -1
            if rows is None:
                self._slot_id.fill(-1)
                self._score.fill(-1)
                self._index_ids = self._index_slot = _EMPTY
                self._fill = 0
                return
            ids = np.unique(_host_ids(rows))
            hit, slot = self._lookup(ids)
            gone, slots = ids[hit], slot[hit]
            self._index_ids, self._index_slot = _index_update(
                self._index_ids, self._index_slot, gone, _EMPTY, _EMPTY
            )
            self._slot_id[slots] = -1
            self._score[slots] = -1

    def warm(self, rows: Tensor, counts: Tensor | None = None) -> int:
        """Preload a known hot set: `rows` (R,), hottest first, with optional access `counts`
        (R,) added to the frequency sketch as a prior (default one access each; lfu only).

        At most `capacity` not-yet-resident rows (the first ones) are fetched in one inner call
        and admitted as long as they beat the cache's current victims (always, into free slots).
        Not counted as lookups. Returns the number of rows admitted.
        """
        check_row_ids(rows, self.num_rows, what="CachedRowStore.warm")
        ids, first = _first_occurrences(_host_ids(rows))  # (R',) in the caller's order
        cnt = np.ones_like(ids) if counts is None else _host_ids(counts)[first]
        with self._lock:
            hit, _ = self._lookup(ids)
            keep = np.flatnonzero(~hit)[: self.capacity]
        if keep.size == 0:
            return 0
        ids, cnt = ids[keep], cnt[keep]
        fetched = self._fetch(ids)  # (R'', dim)
        with self._lock:
            before = self._counters["admissions"]
            self._clock += 1
            if self._lfu:
                prio = self._record(ids, cnt, int(cnt.sum()))
                order = np.argsort(-prio, kind="stable")  # ties: the caller's order
            else:
                prio = np.full_like(ids, _ALWAYS)
                order = np.arange(ids.size)
            again, _ = self._lookup(ids)
            order = order[~again[order]]
            self._admit(ids, prio, fetched, order, lambda: _EMPTY)
            return self._counters["admissions"] - before

    # ------------------------------------------------------------------ introspection
    @property
    def resident(self) -> int:
        """Rows in the cache now."""
        return int(self._index_ids.size)

    def resident_ids(self) -> Tensor:
        """The ids in the cache now, sorted (R,)."""
        with self._lock:
            return torch.from_numpy(self._index_ids.copy()).to(self.device)

    def memory_bytes(self) -> int:
        """Bytes held by the cache: rows, slot bookkeeping, resident index and sketch."""
        rows = self._rows.numel() * self._rows.element_size()
        arrays = (self._slot_id, self._score, self._index_ids, self._index_slot, self._sketch,
                  self._memo, self._stamp, self._count)  # fmt: skip
        return rows + sum(a.nbytes for a in arrays)

    def stats(self) -> CacheStats:
        with self._lock:
            c = dict(self._counters)
            return CacheStats(
                lookups=c["lookups"],
                unique_lookups=c["unique_lookups"],
                hits=c["hits"],
                misses=c["lookups"] - c["hits"],
                unique_hits=c["unique_hits"],
                unique_misses=c["unique_lookups"] - c["unique_hits"],
                admissions=c["admissions"],
                evictions=c["evictions"],
                resident=int(self._index_ids.size),
                capacity=self.capacity,
            )

    def reset_stats(self) -> None:
        with self._lock:
            for key in self._counters:
                self._counters[key] = 0

    def __repr__(self) -> str:
        return (
            f"CachedRowStore(policy={self.policy!r}, capacity={self.capacity}, "
            f"resident={self.resident}, num_rows={self.num_rows}, dim={self.dim}, "
            f"inner={type(self.inner).__name__})"
        )


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _first_occurrences(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of (R,) in first-occurrence order, and their first positions."""
    _, first = np.unique(ids, return_index=True)
    first.sort()
    return ids[first], first
