"""The row-store interface: where an Engram layer's table rows live.

A row store holds one flat table of shape (num_rows, dim) -- for an Engram layer, all of its
(N-1)*K hash sub-tables laid end to end -- and answers one question: "give me these rows".

Design choices:
- One small `typing.Protocol` (`RowStore`) rather than a base class, so a store need not be an
  `nn.Module` (an on-disk table has no parameters) and tiers compose by wrapping: an in-RAM table
  (`memory.py`), an mmap'd file, a hot-row cache in front of a slower store, a background prefetcher
  and a row-sharded store (later issues) all implement the same three properties and two methods.
  The Engram layer calls only `gather`; it never knows which tier served a row.
- `gather` takes GLOBAL row ids (the layer adds the sub-table offsets) of any shape S and returns
  S + (dim,). Ids are bounds-checked on every call with `check_row_ids`, which names the offending
  id and the valid range; out-of-range ids raise `RowOutOfRangeError`, which is both an
  `IndexError` (what a lookup failure is) and a `ValueError` (what a bad argument is), so callers
  may catch either.
- Training has two paths, and a store declares which it supports:
  * autograd: `trainable_parameters()` returns the parameters whose gradients come out of
    `gather` (for the in-RAM store, its weight, with a *sparse* gradient). The optimizer puts them
    in the table group (sparse / row-wise Adam). Stores that cannot be differentiated through
    return an empty list.
  * explicit: `apply_row_update(rows, delta)` adds `delta[i]` to row `rows[i]` in place (duplicates
    accumulate). This is the hook a row-wise optimizer or a store without autograd (mmap, sharded)
    uses to write updates back; it never needs a dense gradient over the table.
- Reading without waiting is optional: a store that can tell which rows it has at hand (in RAM,
  in the page cache, in a hot-row cache) may offer `gather_nowait(rows) -> PartialGather`, which
  serves those at once and hands back a `finish` for the rest (the reads that would wait on
  storage). `PrefetchingStore` uses it to serve warm rows on the caller's thread and send only
  the slow reads to its worker; stores without it are prefetched whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


class RowOutOfRangeError(IndexError, ValueError):
    """A row id outside a table (or sub-table). Catchable as IndexError or ValueError."""


def check_row_ids(rows: Tensor, num_rows: int, *, what: str = "row store") -> None:
    """Raise unless `rows` is an integer tensor with every id in [0, num_rows).

    The message names the first offending id, its position (index into `rows`) and the range.
    Costs one reduction (and, on an accelerator, one host sync); callers on a hot path that have
    validated their ids elsewhere may skip it.
    """
    if not isinstance(rows, Tensor):
        raise TypeError(f"{what}: row ids must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype == torch.bool or rows.dtype.is_floating_point or rows.dtype.is_complex:
        raise TypeError(f"{what}: row ids must be an integer tensor, got dtype {rows.dtype}")
    if rows.numel() == 0:
        return
    bad = (rows < 0) | (rows >= num_rows)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(rows[pos])
        raise RowOutOfRangeError(
            f"{what}: row id {value} at index {pos} is out of range [0, {num_rows}) "
            f"({int(bad.sum())} offending id(s) in total)"
        )


@runtime_checkable
class RowStore(Protocol):
    """A table of `num_rows` rows of `dim` values, read by `gather`, written by row updates.

    Implementations: `MemoryRowStore` (in RAM / on device, trainable with sparse gradients);
    tiered stores (mmap file, hot-row cache, prefetch, sharded) follow the same contract.
    """

    @property
    def num_rows(self) -> int:
        """Number of rows in the table."""
        ...

    @property
    def dim(self) -> int:
        """Width of one row."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the rows that `gather` returns."""
        ...

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, any shape S) -> tensor of shape S + (dim,).

        Raises `RowOutOfRangeError` naming the offending id and the range [0, num_rows), and
        `TypeError` for a non-integer `rows`.
        """
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained through autograd on `gather`'s output (empty if none)."""
        ...

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """In place: row[rows[i]] += delta[i] for rows (R,) and delta (R, dim); duplicates add up."""
        ...


class PartialGather(NamedTuple):
    """What `gather_nowait(rows)` served at once, and how to read the rest.

    `out` has the shape `gather(rows)` returns, S + (dim,); the rows at the flat positions
    `pending` are not filled yet. `finish()` fills them in place (it may block on storage and may
    run on another thread; call it once); it is None when nothing is pending.
    """

    out: Tensor  # S + (dim,)
    pending: np.ndarray  # (P,) int64 flat positions into S still to read; empty = complete
    finish: Callable[[], None] | None

    @property
    def complete(self) -> bool:
        return self.finish is None


def finish_by_gather(
    store: RowStore, flat: Tensor, out: Tensor, pending: np.ndarray
) -> Callable[[], None]:
    """A `PartialGather.finish` that reads the pending rows with `store.gather` and writes them
    into `out` ((S, dim) view of the partial output) at the flat positions `pending` (P,)."""
    pos = torch.from_numpy(pending)

    def finish() -> None:
        with torch.no_grad():
            got = store.gather(flat.index_select(0, pos))  # (P, dim)
            out.index_copy_(0, pos.to(out.device), got.to(device=out.device, dtype=out.dtype))

    return finish


def complete_gather(out: Tensor) -> PartialGather:
    """A `PartialGather` with every row served."""
    return PartialGather(out, np.zeros(0, dtype=np.int64), None)
