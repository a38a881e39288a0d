"""A frequency-aware hot-row cache in front of any (slower) row store.

N-gram traffic is Zipfian: a few thousand rows (" of the", " in the", ...) take a large share of
all reads, and most rows are read once or never. `CachedRowStore` keeps the hottest rows of an
inner `RowStore` (an mmap'd file, a remote shard, ...) in a preallocated in-memory tensor and
serves them from there; everything else is read from the inner store in one batched call.

Axes used in shape comments: S the shape of a request, U the distinct ids of a request (sorted),
M the distinct ids that missed, C the capacity in rows, R the resident rows (R <= C), d the
sketch depth, w the sketch width.

Design choices:
- Memory is bounded by the capacity, never by the table: the rows live in one preallocated
  (C, dim) tensor of the inner store's dtype; bookkeeping is two (C,) int64 tensors (the id in
  each slot, -1 = empty, and its score), a sorted (R,) index of resident ids with their slots
  (looked up with `torch.searchsorted`), and, for "lfu", a fixed (d=4, w) int32 count-min sketch
  with w = the next power of two >= max(256, 2C): at most ~100 bytes per cached row on top of
  the rows themselves, and nothing per table row (`memory_bytes()` reports the total).
- Policy "lfu" is TinyLFU (Einziger et al. 2017): the sketch estimates every row's recent access
  frequency (each requested id adds its number of occurrences; after `sample_size` additions,
  max(10C, 2^14) by default, every counter and every cached score is halved, so old popularity
  fades; the floor keeps a small cache from forgetting everything between two large batches).
  A missed row is admitted only if its estimate beats the score of the least frequent resident
  victim, so a one-off scan cannot flush the hot set. A resident row's score is its sketch
  estimate at its last access (halved with the sketch), so choosing victims needs no sketch
  query over the whole cache. Policy "lru" admits every miss and evicts the least recently used
  slots (one logical clock tick per `gather` call), for comparison.
- Everything is vectorised per call: `torch.unique(return_inverse=True)` -> (U,) ids; one
  `searchsorted` over the resident index finds hits; all misses are fetched with ONE
  `inner.gather`; admission pairs the candidates (best first) with the victims (`topk`, worst
  first) and admits the prefix of pairs where the candidate wins; the resident index is updated
  by a linear scatter-merge (no re-sort). Per call this is O(S log S + U log R) for the lookups
  plus O(C) when rows are admitted; no Python loop runs per row. The fixed cost is a few dozen
  small tensor ops (a few hundred microseconds on a CPU), so batch a whole step's ids into one
  call rather than calling per token and sub-table.
- Admission is batch-wise, so a row requested several times in one call counts as one fetch; the
  rows of the current call are never chosen as victims for that call's misses.
- Results are copies of what `inner.gather` returned, so they are bit-identical to reading the
  inner store directly. Stats count per requested id: a request's occurrence is a hit if its row
  was resident when the call started; every other occurrence (duplicates of a missed row
  included) is a miss. `unique_*` counts distinct ids per call (`unique_misses` = rows fetched).
- Thread safety: one `threading.Lock` guards the bookkeeping; it is released while the inner store
  is read, so a background prefetch thread fetching a slow batch does not block the main thread's
  hits. Admission re-checks residency (another thread may have admitted the same row) and is
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

import threading
from dataclasses import asdict, dataclass
from typing import Any, Final

import torch
from torch import Tensor

from engram.store.base import RowStore, check_row_ids

POLICIES: Final = ("lfu", "lru")
_SKETCH_DEPTH: Final = 4
_MIN_SKETCH_WIDTH: Final = 256
_MIN_SAMPLE_SIZE: Final = 1 << 14  # a small cache still remembers a few batches of traffic
_MAX_SAMPLE_SIZE: Final = 1 << 29  # keeps int32 sketch counters far from overflow
_INT64_MAX: Final = (1 << 63) - 1
_PROTECTED: Final = _INT64_MAX  # score of a slot that must not be evicted in this call
_ALWAYS: Final = _INT64_MAX - 1  # LRU candidate priority: beats every unprotected victim


def _as_int64(v: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


# Odd 64-bit multipliers (splitmix64 / xxhash constants) of the multiply-shift sketch hashes.
_SKETCH_MULTIPLIERS: Final = tuple(
    _as_int64(v)
    for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xC2B2AE3D27D4EB4F)
)


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
    ids: Tensor, val: Tensor, removed: Tensor, add_ids: Tensor, add_val: Tensor
) -> tuple[Tensor, Tensor]:
    """Sorted (n,) ids with payload `val`, minus `removed` (a subset of ids), plus `add_ids` (not
    in ids) with payload `add_val`: the new sorted arrays, by one linear scatter (no sort of n)."""
    n_r, n_b = removed.numel(), add_ids.numel()
    if n_r == 0 and n_b == 0:
        return ids, val
    order = torch.argsort(add_ids)
    add_ids, add_val = add_ids[order], add_val[order]  # (n_b,) sorted
    if ids.numel() == 0:
        return add_ids, add_val
    n_a, dev = ids.numel(), ids.device
    n_out = n_a - n_r + n_b
    pos_r = torch.searchsorted(ids, removed)  # (n_r,) where the removed ids sit
    pos_b = torch.searchsorted(ids, add_ids)  # (n_b,) #ids below each added id
    # shift[i] = #added ids below ids[i] - #removed ids at or before i (one histogram, one cumsum)
    shift = torch.zeros(n_a + 1, dtype=torch.long, device=dev)
    shift.index_add_(0, pos_b, torch.ones_like(pos_b))
    shift.index_add_(0, pos_r, torch.full_like(pos_r, -1))
    dest_a = torch.arange(n_a, device=dev) + shift.cumsum(0)[:n_a]  # (n_a,)
    dest_a[pos_r] = n_out  # removed ids go to a dump slot
    # added id j lands at j + #kept ids below it
    below_removed = torch.zeros(n_a + 1, dtype=torch.long, device=dev)
    below_removed.index_add_(0, pos_r + 1, torch.ones_like(pos_r))
    dest_b = torch.arange(n_b, device=dev) + pos_b - below_removed.cumsum(0)[pos_b]  # (n_b,)
    out_ids = torch.empty(n_out + 1, dtype=ids.dtype, device=dev)
    out_val = torch.empty(n_out + 1, dtype=val.dtype, device=dev)
    out_ids[dest_a], out_val[dest_a] = ids, val
    out_ids[dest_b], out_val[dest_b] = add_ids, add_val
    return out_ids[:n_out], out_val[:n_out]


class CachedRowStore:
    """A bounded hot-row cache (TinyLFU or LRU) in front of any `RowStore`; same contract.

    Args:
        inner: the store holding every row (its `gather` is called only for misses).
        capacity_rows / capacity_bytes: exactly one; bytes are converted to rows of
            dim * itemsize(inner.dtype). A capacity above `inner.num_rows` is clamped to it.
        policy: "lfu" (TinyLFU admission, least-frequent eviction) or "lru".
        device: where the cached rows, bookkeeping and outputs live (default CPU).
        sketch_width: count-min sketch width (rounded up to a power of two); default
            next_pow2(max(256, 2 * capacity)).
        sample_size: sketch additions between two halvings (aging); default
            max(10 * capacity, 16384).
        check_bounds: bounds-check ids on every call (one reduction).
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
    ) -> None:
        if not isinstance(inner, RowStore):
            raise TypeError(f"inner must implement RowStore, got {type(inner).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        self.inner = inner
        self.policy = policy
        self.check_bounds = bool(check_bounds)
        self.device = torch.device(device if device is not None else "cpu")
        row_bytes = inner.dim * torch.empty((), dtype=inner.dtype).element_size()
        cap = _capacity_rows(capacity_rows, capacity_bytes, row_bytes)
        self.capacity = min(cap, int(inner.num_rows))

        C, dev = self.capacity, self.device
        self._rows = torch.zeros(C, inner.dim, dtype=inner.dtype, device=dev)  # (C, dim)
        self._slot_id = torch.full((C,), -1, dtype=torch.long, device=dev)  # (C,) -1 = empty
        self._score = torch.full((C,), -1, dtype=torch.long, device=dev)  # (C,) freq or time
        self._index_ids = torch.zeros(0, dtype=torch.long, device=dev)  # (R,) sorted ids
        self._index_slot = torch.zeros(0, dtype=torch.long, device=dev)  # (R,) their slots

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
        n_counters = _SKETCH_DEPTH * self.sketch_width if policy == "lfu" else 0  # lru: unused
        self._sketch = torch.zeros(n_counters, dtype=torch.int32, device=dev)  # (d*w,) flat
        self._mult = torch.tensor(_SKETCH_MULTIPLIERS[:_SKETCH_DEPTH], device=dev).view(-1, 1)
        self._row_base = (torch.arange(_SKETCH_DEPTH, device=dev) * self.sketch_width).view(-1, 1)
        self._sketch_adds = 0
        self._clock = 0
        self._epoch = 0
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
    def _sketch_index(self, ids: Tensor) -> Tensor:
        """(U,) ids -> (d, U) flat counter positions (multiply-shift: the top bits of id * a_j)."""
        h = (ids.view(1, -1) * self._mult) >> (64 - self._sketch_bits)  # (d, U), wraps mod 2^64
        return (h & (self.sketch_width - 1)) + self._row_base

    def _record(self, ids: Tensor, counts: Tensor, n_added: int) -> Tensor:
        """Add `counts` (U,) to the sketch for `ids` (U,) and return their new (U,) int64
        estimates; every `sample_size` additions, halve all counters and scores (aging)."""
        idx = self._sketch_index(ids)  # (d, U)
        add = counts.to(torch.int32).view(1, -1).expand_as(idx)
        self._sketch.index_add_(0, idx.reshape(-1), add.reshape(-1))
        self._sketch_adds += n_added
        while self._sketch_adds >= self.sample_size:  # TinyLFU reset
            self._sketch >>= 1
            self._score.copy_(torch.where(self._score > 0, self._score >> 1, self._score))
            self._sketch_adds //= 2
        return self._sketch[idx].amin(dim=0).long()

    # ------------------------------------------------------------------ index
    def _lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(U,) ids -> (hit mask (U,), slot (U,), meaningful where hit)."""
        n = self._index_ids.numel()
        if n == 0 or ids.numel() == 0:
            return torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
        pos = torch.searchsorted(self._index_ids, ids).clamp_(max=n - 1)  # (U,)
        hit = self._index_ids[pos] == ids
        return hit, self._index_slot[pos]

    # ------------------------------------------------------------------ admission
    def _admit(self, cand: Tensor, prio: Tensor, rows: Tensor, protect: Tensor) -> None:
        """Admit candidates (M,) (not resident; best first, priorities (M,) descending) with
        their rows (M, dim), never evicting the resident ids in `protect`. Caller holds the lock.

        Candidate i is paired with the i-th worst victim and admitted iff its priority beats the
        victim's score; both orders make the admitted pairs a prefix.
        """
        k = min(cand.numel(), self.capacity)
        if k == 0:
            return
        score = self._score  # (C,) -1 = empty, else frequency (lfu) or last tick (lru)
        p_hit, p_slot = self._lookup(protect)
        p_slot = p_slot[p_hit]
        saved = score[p_slot]
        score[p_slot] = _PROTECTED
        try:
            if self.policy == "lfu":  # only candidates beating the weakest slot can get in
                k = min(k, int((prio[:k] > score.min()).sum()))
            if k == 0:
                return
            worst = torch.topk(score, k, largest=False, sorted=True)  # (k,) ascending
            n = int((prio[:k] > worst.values).sum())
        finally:
            score[p_slot] = saved
        if n == 0:
            return
        slots = worst.indices[:n]  # (n,)
        old = self._slot_id[slots]
        evicted = old[old >= 0]
        self._index_ids, self._index_slot = _index_update(
            self._index_ids, self._index_slot, evicted, cand[:n], slots
        )
        self._slot_id[slots] = cand[:n]
        self._rows[slots] = rows[:n]
        self._score[slots] = prio[:n] if self.policy == "lfu" else self._clock
        self._counters["admissions"] += n
        self._counters["evictions"] += int(evicted.numel())

    # ------------------------------------------------------------------ reading
    def _fetch(self, ids: Tensor) -> Tensor:
        """Rows (M,) from the inner store as a detached (M, dim) tensor on the cache's device."""
        with torch.no_grad():
            out = self.inner.gather(ids)
        return out.detach().to(device=self.device, dtype=self.dtype)

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, any shape S) -> S + (dim,), bit-identical to
        `inner.gather(rows)` (detached, on the cache's device)."""
        if self.check_bounds:
            check_row_ids(rows, self.num_rows, what="CachedRowStore.gather")
        elif (
            not isinstance(rows, Tensor) or rows.dtype.is_floating_point or rows.dtype == torch.bool
        ):
            raise TypeError("CachedRowStore.gather: row ids must be an integer torch.Tensor")
        shape, dim = tuple(rows.shape), self.dim
        flat = rows.reshape(-1).to(device=self.device, dtype=torch.long)  # (S,)
        if flat.numel() == 0:
            return torch.empty(*shape, dim, dtype=self.dtype, device=self.device)
        uniq, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)  # (U,)
        out_u = torch.empty(uniq.numel(), dim, dtype=self.dtype, device=self.device)  # (U, dim)

        with self._lock:  # phase 1: hits, frequencies, stats
            epoch = self._epoch
            self._clock += 1
            hit, slot = self._lookup(uniq)  # (U,), (U,)
            hit_idx = hit.nonzero().squeeze(1)  # (U_hit,)
            hit_slots = slot[hit_idx]
            out_u[hit_idx] = self._rows[hit_slots]
            if self.policy == "lfu":
                est = self._record(uniq, counts, flat.numel())  # (U,)
                self._score[hit_slots] = est[hit_idx]
            else:
                self._score[hit_slots] = self._clock
            n_uhits = hit_idx.numel()
            c = self._counters
            c["lookups"] += flat.numel()
            c["unique_lookups"] += uniq.numel()
            c["hits"] += int(counts[hit_idx].sum()) if n_uhits else 0
            c["unique_hits"] += n_uhits

        if n_uhits < uniq.numel():
            miss_idx = (~hit).nonzero().squeeze(1)  # (M,)
            missing = uniq[miss_idx]  # (M,) sorted
            fetched = self._fetch(missing)  # (M, dim) -- lock released: the slow part
            out_u[miss_idx] = fetched
            if self.policy == "lfu":  # most frequent first
                prio = est[miss_idx]
                order = torch.argsort(prio, descending=True, stable=True)
            else:  # most recent first: by last position in this call
                last = torch.zeros(uniq.numel(), dtype=torch.long, device=self.device)
                pos = torch.arange(flat.numel(), device=self.device)
                last.scatter_reduce_(0, inverse, pos, reduce="amax")
                prio = torch.full_like(missing, _ALWAYS)
                order = torch.argsort(last[miss_idx], descending=True, stable=True)
            with self._lock:  # phase 3: admission (skipped if the store was written meanwhile)
                if self._epoch == epoch:
                    again, _ = self._lookup(missing)  # another thread may have admitted some
                    order = order[~again[order]]
                    self._admit(missing[order], prio[order], fetched[order], protect=uniq)
        return out_u[inverse].view(*shape, dim)

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
            ids = torch.unique(rows.to(device=self.device, dtype=torch.long))
            hit, slot = self._lookup(ids)
            if bool(hit.any()):
                self._rows[slot[hit]] = self._fetch(ids[hit])

    def invalidate(self, rows: Tensor | None = None) -> None:
        """Drop the cached copies of `rows` (default: every row). Frequencies are kept."""
        with self._lock:
            self._epoch += 1
            if rows is None:
                self._slot_id.fill_(-1)
                self._score.fill_(-1)
                self._index_ids = self._index_ids[:0]
                self._index_slot = self._index_slot[:0]
                return
            ids = torch.unique(rows.reshape(-1).to(device=self.device, dtype=torch.long))
            hit, slot = self._lookup(ids)
            gone, slots = ids[hit], slot[hit]
            self._index_ids, self._index_slot = _index_update(
                self._index_ids, self._index_slot, gone, gone[:0], slots[:0]
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
        ids = rows.reshape(-1).to(device=self.device, dtype=torch.long)
        ids, first = _first_occurrences(ids)  # (R',) in the caller's order
        cnt = (
            torch.ones_like(ids)
            if counts is None
            else counts.reshape(-1).to(device=self.device, dtype=torch.long)[first]
        )
        with self._lock:
            hit, _ = self._lookup(ids)
            keep = (~hit).nonzero().squeeze(1)[: self.capacity]
        if keep.numel() == 0:
            return 0
        ids, cnt = ids[keep], cnt[keep]
        fetched = self._fetch(ids)  # (R'', dim)
        with self._lock:
            before = self._counters["admissions"]
            self._clock += 1
            if self.policy == "lfu":
                prio = self._record(ids, cnt, int(cnt.sum()))
                order = torch.argsort(prio, descending=True, stable=True)  # ties: caller's order
            else:
                prio = torch.full_like(ids, _ALWAYS)
                order = torch.arange(ids.numel(), device=self.device)
            again, _ = self._lookup(ids)
            order = order[~again[order]]
            self._admit(ids[order], prio[order], fetched[order], protect=ids[:0])
            return self._counters["admissions"] - before

    # ------------------------------------------------------------------ introspection
    @property
    def resident(self) -> int:
        """Rows in the cache now."""
        return int(self._index_ids.numel())

    def resident_ids(self) -> Tensor:
        """The ids in the cache now, sorted (R,)."""
        with self._lock:
            return self._index_ids.clone()

    def memory_bytes(self) -> int:
        """Bytes held by the cache: rows, slot bookkeeping, resident index and sketch."""
        tensors = (self._rows, self._slot_id, self._score, self._index_ids, self._index_slot,
                   self._sketch)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)

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
                resident=int(self._index_ids.numel()),
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


def _first_occurrences(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct ids of (R,) in first-occurrence order, and their first positions."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
    first = torch.sort(first).values
    return ids[first], first
