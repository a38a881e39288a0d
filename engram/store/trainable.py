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
  scratch (DIRTY while open), and `save` copies all three into a checkpoint's temporary
  directory (via the atomic, checksummed `write_table`) before that directory is renamed into
  place. A run killed at any moment, mid-write included, resumes by copying the last complete
  checkpoint's files back (`restore`), so the previous checkpoint is never modified.
- Initialisation matches `MemoryRowStore` bit for bit (normal(0, std) from a CPU generator
  seeded with `seed`), drawn chunk by chunk, so a table larger than RAM can be created.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engram.atomic import atomic_open
from engram.rowadam import coalesce_rows, sparse_adam_rows
from engram.store.mmap import MmapRowStore
from engram.store.tablefile import TableFileError, write_table

PARTS = ("weight", "exp_avg", "exp_avg_sq")


def part_file(layer_id: int, part: str) -> str:
    """File name of one part of layer `layer_id`'s trained table."""
    if part not in PARTS:
        raise ValueError(f"unknown table part {part!r}; expected one of {PARTS}")
    return f"L{layer_id}.{part}.engt"


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

    def __init__(self, directory: str | os.PathLike[str], layer_id: int, step: int = 0) -> None:
        self.directory = Path(directory)
        self.layer_id = int(layer_id)
        self.step_count = int(step)
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
    ) -> DiskTrainedStore:
        """Fresh files: rows normal(0, std) exactly as `MemoryRowStore(seed=seed)`, zero moments."""
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
        return cls(directory, layer_id)

    @classmethod
    def restore(
        cls,
        directory: str | os.PathLike[str],
        layer_id: int,
        saved: str | os.PathLike[str],
        step: int,
        *,
        expected_fingerprint: str | None = None,
    ) -> DiskTrainedStore:
        """Working copies of the files a checkpoint saved in `saved` (which stay untouched)."""
        directory, saved = Path(directory), Path(saved)
        directory.mkdir(parents=True, exist_ok=True)
        for part in PARTS:
            src = saved / part_file(layer_id, part)
            MmapRowStore(src, expected_fingerprint=expected_fingerprint).close()  # header check
            with open(src, "rb") as fin, atomic_open(directory / src.name) as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
        return cls(directory, layer_id, step)

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
        self.weight.write_rows(uniq, w_new)
        self.parts["exp_avg"].write_rows(uniq, m_new)
        self.parts["exp_avg_sq"].write_rows(uniq, v_new)
        return len(uniq)

    # --------------------------------------------------------------------------- lifecycle
    def save(self, dest: str | os.PathLike[str], chunk_rows: int = 65536) -> dict[str, Any]:
        """Copy the three parts into `dest` (checksummed, atomic per file); json-able record."""
        dest = Path(dest)
        files = {}
        for part, store in self.parts.items():
            store.flush()
            h = store.header

            write_table(
                dest / part_file(self.layer_id, part), store.read_range, fingerprint=h.fingerprint,
                layer_id=self.layer_id, meta=h.meta, num_rows=h.num_rows, dim=h.dim,
                chunk_rows=chunk_rows,
            )  # fmt: skip
            files[part] = part_file(self.layer_id, part)
        return {"step": self.step_count, "files": files}

    def close(self) -> None:
        """Seal and close the working files (idempotent)."""
        for store in self.parts.values():
            store.close()

    def __repr__(self) -> str:
        return (
            f"DiskTrainedStore(layer {self.layer_id}, {self.num_rows} x {self.dim}, "
            f"step {self.step_count}, dir={str(self.directory)!r})"
        )
