"""Training an Engram table that lives on disk: an mmap'd table plus its Adam moments.

A `DiskTrainedStore` holds one layer's table in three writable `.engt` files in a working
directory: the rows (`weight`) and Adam's two moments (`exp_avg`, `exp_avg_sq`), all
(num_rows, dim) float32. RAM holds only what a step touches.

Design choices:
- Gradients without a dense parameter: `gather` runs a small `autograd.Function` hung on a
  zero-size anchor tensor that requires grad; its backward hands the (rows, grad rows) pairs to
  the store instead of producing a (num_rows, dim) gradient. `adam_step` then sums duplicates,
  reads the touched rows and moments, applies the update and writes the three back: O(rows
  touched) memory and I/O per step.
- The update is `torch.optim.SparseAdam`'s, operation for operation (moments updated only at
  touched rows, bias correction by the store's own step count), so a run on disk reproduces
  the same run with the table in RAM (tested).
- Crash safety comes from the checkpoint, not from the working files: the working files are
  scratch (DIRTY while open), and a run killed at any moment, mid-write included, resumes by
  rebuilding them from the last complete checkpoint (`restore`), which is never modified.
- Checkpoints cost what changed, not the table (`engram.store.tablechain`): the store keeps a
  dirty map (one bool per row) of the rows written since the last committed checkpoint, and
  `save` writes only those rows (ids + weight + both moments) as a delta file, hard-linking
  the previous checkpoint's immutable base and deltas beside it. It writes a full base instead
  (compaction) when there is no committed predecessor to build on (a fresh store, or its
  files cannot be linked), when the chain's deltas would exceed `compact_fraction` of the
  table's bytes (default 0.5: a restore then reads at most 1.5x the table), or when the chain
  already has `max_deltas` deltas (default 32). `compact_fraction=0` gives the old behaviour,
  a full copy every time. A base is a copy-on-write clone of the (sealed) working files where
  the filesystem supports it (btrfs, XFS), an ordinary streamed copy otherwise.
- The dirty map is cleared only when the checkpoint holding the delta is committed
  (`mark_committed`, called by `engram.checkpoint.save_checkpoint` after its rename), so a
  checkpoint that failed or was killed half-written leaves the next one to carry its rows.
- Each save reports what it wrote (`last_save`: kind, rows, bytes, seconds, chain length), and
  the checkpoint records it.
- Initialisation matches `MemoryRowStore` bit for bit (normal(0, std) from a CPU generator
  seeded with `seed`), drawn chunk by chunk, so a table larger than RAM can be created.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engram.atomic import fsync_dir
from engram.rowadam import coalesce_rows, sparse_adam_rows
from engram.store.mmap import MmapRowStore
from engram.store.tablechain import (
    PARTS,
    apply_deltas,
    base_entry,
    can_clone,
    check_chain,
    clone_to,
    copy_file,
    delta_entry,
    delta_file,
    delta_nbytes,
    linked_base_file,
    part_file,
    read_chain,
    verify_delta,
    write_delta,
    write_manifest,
)
from engram.store.tablefile import TableFileError, TableHeader, write_table

logger = logging.getLogger(__name__)

__all__ = ["PARTS", "DiskTrainedStore", "part_file"]

COMPACT_FRACTION = 0.5  # deltas in a chain may add up to this fraction of the table's bytes
MAX_DELTAS = 32  # ... and number at most this many before the next save writes a full base
# Why linking a predecessor's files can fail without anything being wrong with this run: the
# predecessor was deleted, lives on another filesystem, or the filesystem has no hard links.
_LINK_ERRNOS = (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP)


class _GatherRows(torch.autograd.Function):
    """rows (N,) -> values (N, dim); backward gives (rows, grad) to the store, no dense grad."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, rows: Tensor, store: DiskTrainedStore) -> Tensor:  # type: ignore[override]
        ctx.store = store
        ctx.save_for_backward(rows)
        return store.weight.gather(rows)  # (N, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        ctx.store._pending.append((rows, grad.detach()))
        return None, None, None


class DiskTrainedStore:
    """One layer's table and Adam moments in writable mmap'd files, trained row by row."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        layer_id: int,
        step: int = 0,
        *,
        compact_fraction: float = COMPACT_FRACTION,
        max_deltas: int = MAX_DELTAS,
    ) -> None:
        if not 0.0 <= compact_fraction < 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1), got {compact_fraction!r}")
        if max_deltas < 0:
            raise ValueError(f"max_deltas must be >= 0, got {max_deltas!r}")
        self.directory = Path(directory)
        self.layer_id = int(layer_id)
        self.step_count = int(step)
        self.compact_fraction, self.max_deltas = float(compact_fraction), int(max_deltas)
        files = {p: self.directory / part_file(layer_id, p) for p in PARTS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise TableFileError(f"trained-table files missing: {missing}")
        self.parts: dict[str, MmapRowStore] = {}
        try:
            for p, f in files.items():
                self.parts[p] = MmapRowStore(f, writable=True, check_bounds=False)
        except BaseException:
            self.close()
            raise
        w = self.weight
        for p in PARTS[1:]:
            if (self.parts[p].num_rows, self.parts[p].dim) != (w.num_rows, w.dim):
                raise TableFileError(
                    f"{files[p]} has shape ({self.parts[p].num_rows}, {self.parts[p].dim}), "
                    f"but {files['weight']} has ({w.num_rows}, {w.dim})"
                )
        self.anchor = torch.zeros(0, requires_grad=True)  # hangs gathers on the autograd graph
        self._pending: list[tuple[Tensor, Tensor]] = []
        # Rows written since the last committed checkpoint: (num_rows,) bool.
        self._dirty = torch.zeros(w.num_rows, dtype=torch.bool)
        # The last committed checkpoint's tables directory and chain (None: a full base next).
        self._committed: tuple[Path, list[dict[str, Any]]] | None = None
        # Saves not committed yet: {save number: (chain, the dirty rows it holds)}.
        self._staged: dict[int, tuple[list[dict[str, Any]], Tensor]] = {}
        self._saves = 0
        self._clone: bool | None = None  # copy-on-write clones work here (None: not probed)
        self.last_save: dict[str, Any] | None = None
        self.saved_bytes = 0  # cumulative, over this store's saves
        self.saved_seconds = 0.0

    # --------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        layer_id: int,
        num_rows: int,
        dim: int,
        *,
        fingerprint: str,
        std: float = 1.0,
        seed: int = 0,
        meta: Mapping[str, Any] | None = None,
        **policy: Any,
    ) -> DiskTrainedStore:
        """Fresh files: rows normal(0, std) exactly as `MemoryRowStore(seed=seed)`, zero moments.

        `policy` is `compact_fraction=` / `max_deltas=` (see the module docstring).
        """
        directory = Path(directory)
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def normal(start: int, stop: int) -> Tensor:  # called in order: one generator stream
            return torch.empty(stop - start, dim).normal_(0.0, std, generator=gen)

        def zeros(start: int, stop: int) -> Tensor:
            return torch.zeros(stop - start, dim)

        for part, source in zip(PARTS, (normal, zeros, zeros), strict=True):
            write_table(
                directory / part_file(layer_id, part), source, fingerprint=fingerprint,
                layer_id=layer_id, meta={**(meta or {}), "part": part},
                num_rows=num_rows, dim=dim,
            )  # fmt: skip
        return cls(directory, layer_id, **policy)

    @classmethod
    def restore(
        cls,
        directory: str | os.PathLike[str],
        layer_id: int,
        saved: str | os.PathLike[str],
        step: int,
        *,
        expected_fingerprint: str | None = None,
        **policy: Any,
    ) -> DiskTrainedStore:
        """Working files rebuilt from the checkpoint tables in `saved` (which stay untouched):
        its base copied (cloned where possible), then its deltas replayed in order.

        Every delta's crc is checked before any is applied; a missing or damaged file of the
        chain is a `TableChainError` naming it. The next `save` builds on this checkpoint.
        """
        directory, saved = Path(directory), Path(saved)
        directory.mkdir(parents=True, exist_ok=True)
        chain = read_chain(saved, layer_id)
        _, deltas = check_chain(saved, chain, expected_fingerprint=expected_fingerprint, full=False)
        for e in chain[1:]:
            verify_delta(saved / e["file"], expected_fingerprint=expected_fingerprint)
        for part in PARTS:
            copy_file(saved / chain[0]["files"][part], directory / part_file(layer_id, part))
        store = cls(directory, layer_id, step, **policy)
        try:
            apply_deltas(
                saved, chain, deltas, lambda p, ids, values: store.parts[p].write_rows(ids, values)
            )
        except BaseException:
            store.close()
            raise
        store._committed = (saved, list(chain))
        return store

    # ---------------------------------------------------------------------------- RowStore
    @property
    def weight(self) -> MmapRowStore:
        return self.parts["weight"]

    @property
    def num_rows(self) -> int:
        return self.weight.num_rows

    @property
    def dim(self) -> int:
        return self.weight.dim

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def table_nbytes(self) -> int:
        """Bytes of the three parts' rows (what a full copy writes, headers aside)."""
        return 3 * self.num_rows * self.dim * 4

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids (any shape S) -> S + (dim,); differentiable into `adam_step`."""
        flat = rows.reshape(-1).long()  # (N,)
        if torch.is_grad_enabled():
            out = _GatherRows.apply(self.anchor, flat, self)
        else:
            out = self.weight.gather(flat)
        return out.view(*rows.shape, self.dim)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        self.weight.apply_row_update(rows, delta)
        self._dirty[rows.reshape(-1).long()] = True

    @property
    def dirty_rows(self) -> int:
        """How many rows were written since the last committed checkpoint."""
        return int(self._dirty.sum())

    # --------------------------------------------------------------------------- optimizer
    def zero_grad(self) -> None:
        """Forget the row gradients collected since the last step."""
        self._pending.clear()

    @torch.no_grad()
    def adam_step(self, lr: float, betas: tuple[float, float], eps: float) -> int:
        """SparseAdam's update on the rows touched since `zero_grad`; returns how many."""
        if not self._pending:
            return 0
        rows = torch.cat([r for r, _ in self._pending])  # (N,)
        grads = torch.cat([g.reshape(-1, self.dim) for _, g in self._pending])  # (N, dim)
        self._pending.clear()
        uniq, grad = coalesce_rows(rows, grads, self.num_rows)  # (U,), (U, dim)
        self.step_count += 1
        w_new, m_new, v_new = sparse_adam_rows(
            grad, self.weight.gather(uniq), self.parts["exp_avg"].gather(uniq),
            self.parts["exp_avg_sq"].gather(uniq), self.step_count, lr, betas, eps,
        )  # fmt: skip
        self._dirty[uniq] = True  # before the writes: a failed write leaves them marked
        self.weight.write_rows(uniq, w_new)
        self.parts["exp_avg"].write_rows(uniq, m_new)
        self.parts["exp_avg_sq"].write_rows(uniq, v_new)
        return len(uniq)

    # --------------------------------------------------------------------------- lifecycle
    def save(self, dest: str | os.PathLike[str], chunk_rows: int = 65536) -> dict[str, Any]:
        """Write this checkpoint's table files into `dest`; returns the json-able record.

        A delta of the rows written since the last committed checkpoint (its files linked
        beside it), or a full base (see the module docstring for when). The record holds the
        step, the chain with each file's crc, the canonical `files` names and the `checkpoint`
        report (also `last_save`) and the store's number for this save. Call `mark_committed`
        once `dest` is committed.
        """
        t0 = time.perf_counter()
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        rows = torch.nonzero(self._dirty).reshape(-1)  # (U,) increasing
        chain, written, cloned = None, 0, False
        if self._committed is not None and self._delta_fits(len(rows)):
            chain = self._link_previous(dest)
            if chain is not None and len(rows):
                name = delta_file(self.layer_id, len(chain))
                h = write_delta(
                    dest / name, rows, lambda part, idx: self.parts[part].gather(idx),
                    layer_id=self.layer_id, num_rows=self.num_rows, dim=self.dim,
                    step=self.step_count, fingerprint=self.weight.header.fingerprint,
                    chunk_rows=chunk_rows,
                )  # fmt: skip
                chain.append(delta_entry(self.step_count, name, h))
                written = h.file_nbytes
        kind = "delta"
        if chain is None:
            kind = "base"
            headers, written, cloned = self._write_base(dest, chunk_rows)
            files = {p: part_file(self.layer_id, p) for p in PARTS}
            chain = [base_entry(self.step_count, files, headers)]
        manifest = {"layer_id": self.layer_id, "step": self.step_count, "chain": chain}
        written += write_manifest(dest, self.layer_id, manifest).stat().st_size
        fsync_dir(dest)  # the links, too, must survive a crash once the checkpoint is committed
        seconds = time.perf_counter() - t0
        report = {
            "kind": kind,
            "rows_written": len(rows) if kind == "delta" else self.num_rows,
            "rows_dirty": len(rows),
            "bytes_written": int(written),
            "cloned": cloned,
            "seconds": round(seconds, 6),
            "chain_length": len(chain),
            "chain_nbytes": sum(int(e["nbytes"]) for e in chain),
            "table_nbytes": self.table_nbytes,
        }
        self._saves += 1
        self._staged[self._saves] = (chain, rows)
        self.last_save = report
        self.saved_bytes += int(written)
        self.saved_seconds += seconds
        return {
            "step": self.step_count,
            "save": self._saves,
            "files": {p: part_file(self.layer_id, p) for p in PARTS},
            "chain": chain,
            "checkpoint": report,
        }

    def mark_committed(
        self, tables_dir: str | os.PathLike[str], record: Mapping[str, Any] | None = None
    ) -> None:
        """A save (the one that returned `record`; default the last) is now a committed
        checkpoint's tables in `tables_dir`: the next save builds on it, and the rows it holds
        are no longer dirty. Other uncommitted saves are forgotten."""
        key = self._saves if record is None else int(record["save"])
        if key not in self._staged:
            raise RuntimeError(
                f"mark_committed: save {key} of layer {self.layer_id} is not an uncommitted save "
                f"of this store (uncommitted: {sorted(self._staged)})"
            )
        chain, rows = self._staged[key]
        self._committed = (Path(tables_dir), chain)
        self._dirty[rows] = False
        self._staged.clear()

    def _delta_fits(self, count: int) -> bool:
        """Whether a delta of `count` rows keeps the chain within the compaction bounds."""
        assert self._committed is not None
        deltas = self._committed[1][1:]
        if len(deltas) >= self.max_deltas:
            return False
        total = sum(int(e["nbytes"]) for e in deltas) + delta_nbytes(count, self.dim)
        return total <= self.compact_fraction * self.table_nbytes

    def _link_previous(self, dest: Path) -> list[dict[str, Any]] | None:
        """Hard-link the committed chain's files into `dest`; None (nothing left) if impossible."""
        assert self._committed is not None
        prev_dir, prev = self._committed
        made: list[Path] = []
        chain: list[dict[str, Any]] = []
        try:
            for e in prev:
                if e["kind"] == "base":
                    files = {}
                    for p in PARTS:
                        files[p] = linked_base_file(self.layer_id, p)
                        os.link(prev_dir / e["files"][p], dest / files[p])
                        made.append(dest / files[p])
                    chain.append({**e, "files": files})
                else:
                    os.link(prev_dir / e["file"], dest / e["file"])
                    made.append(dest / e["file"])
                    chain.append(dict(e))
        except OSError as err:
            if err.errno not in _LINK_ERRNOS:
                raise
            for f in made:
                f.unlink(missing_ok=True)
            logger.warning(
                "engram: cannot link the previous checkpoint's table files (%s); writing a full "
                "copy of layer %d's table instead", err, self.layer_id,
            )  # fmt: skip
            return None
        return chain

    def _write_base(self, dest: Path, chunk_rows: int) -> tuple[dict[str, TableHeader], int, bool]:
        """The three parts as complete table files: (headers, bytes written, cloned)."""
        headers: dict[str, TableHeader] = {}
        written, clones = 0, 0
        if self._clone is None:
            self._clone = can_clone(self.directory, dest)
        for part, store in self.parts.items():
            target = dest / part_file(self.layer_id, part)
            if self._clone:
                h = store.seal()  # a sealed working file is a valid table file to clone
                if clone_to(store.path, target):
                    headers[part], clones = h, clones + 1
                    continue
                self._clone = False
            h = store.header
            headers[part] = write_table(
                target, store.read_range, fingerprint=h.fingerprint, layer_id=self.layer_id,
                meta=h.meta, num_rows=h.num_rows, dim=h.dim, chunk_rows=chunk_rows,
            )  # fmt: skip
            written += headers[part].file_nbytes
        return headers, written, clones == len(PARTS)

    def close(self) -> None:
        """Seal and close the working files (idempotent)."""
        for store in self.parts.values():
            store.close()

    def __repr__(self) -> str:
        return (
            f"DiskTrainedStore(layer {self.layer_id}, {self.num_rows} x {self.dim}, "
            f"step {self.step_count}, dir={str(self.directory)!r})"
        )
