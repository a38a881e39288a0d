"""The in-memory row store: the whole table as one trainable `nn.Parameter`.

Design choices:
- The table is a single (num_rows, dim) `nn.Parameter` named `weight`, so it moves with
  `.to(device)`, appears in `state_dict()` as `<prefix>.weight`, and the optimizer can place it in
  the table group via `trainable_parameters()`.
- `gather` is `F.embedding(rows, weight, sparse=True)`: backward yields a SPARSE gradient (a
  `torch.sparse_coo` tensor holding only the touched rows), never a dense (num_rows, dim) one, so
  `torch.optim.SparseAdam` (or a row-wise Adam) updates only those rows and keeps state only where
  it must. `sparse=False` gives the ordinary dense gradient for users who want plain Adam(W).
- Initialisation is deterministic and independent of the global RNG: normal(0, std) drawn from a
  CPU `torch.Generator` seeded with `seed`, then moved to the target device/dtype, so the same seed
  gives bit-identical tables on any machine. The default std = 1.0 matches `nn.Embedding`, which the
  reference demo uses. (Drawing on the CPU costs host memory of one float32 table at init; tables
  too large for that belong in an on-disk store.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.store.base import PartialGather, check_row_ids, complete_gather


class MemoryRowStore(nn.Module):
    """A (num_rows, dim) table in RAM or device memory, trainable with sparse row gradients."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        std: float = 1.0,
        seed: int = 0,
        sparse: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_bounds: bool = True,
    ) -> None:
        super().__init__()
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.sparse = bool(sparse)
        self.check_bounds = bool(check_bounds)
        self.std = float(std)
        self.seed = int(seed)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(num_rows, dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw the table: normal(0, std) from a CPU generator seeded with `self.seed`."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        init = torch.empty(self.weight.shape, dtype=torch.float32).normal_(
            0.0, self.std, generator=gen
        )
        with torch.no_grad():
            self.weight.copy_(init.to(device=self.weight.device, dtype=self.weight.dtype))

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids `rows` (integer, shape S) -> (S + (dim,)); sparse grad if `sparse`."""
        if self.check_bounds:
            check_row_ids(rows, self.num_rows, what="MemoryRowStore.gather")
        elif rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise TypeError(f"MemoryRowStore.gather: row ids must be integer, got {rows.dtype}")
        rows = rows.to(device=self.weight.device, dtype=torch.long)
        return F.embedding(rows, self.weight, sparse=self.sparse)  # S + (dim,)

    def gather_nowait(self, rows: Tensor) -> PartialGather:
        """`gather(rows)` without autograd: rows in RAM never wait (see `engram.store.base`)."""
        with torch.no_grad():
            return complete_gather(self.gather(rows))

    def forward(self, rows: Tensor) -> Tensor:
        """Same as `gather` (so the store can be called like an `nn.Embedding`)."""
        return self.gather(rows)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """In place, without autograd: weight[rows[i]] += delta[i]; duplicate ids accumulate."""
        if rows.dim() != 1:
            raise ValueError(
                f"apply_row_update: rows must be 1-D (R,), got shape {tuple(rows.shape)}"
            )
        if delta.shape != (rows.shape[0], self.dim):
            raise ValueError(
                f"apply_row_update: delta must have shape (R, dim) = ({rows.shape[0]}, {self.dim}), "
                f"got {tuple(delta.shape)}"
            )
        check_row_ids(rows, self.num_rows, what="MemoryRowStore.apply_row_update")
        with torch.no_grad():
            self.weight.index_add_(
                0, rows.to(self.weight.device, torch.long), delta.to(self.weight)
            )

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse}, std={self.std}, seed={self.seed}"
