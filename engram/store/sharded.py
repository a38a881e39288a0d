"""A row-sharded table: each rank owns a contiguous slice of rows; lookups cross ranks by all-to-all.

Axes: W ranks, N looked-up ids, U unique ids, R ids asked of this rank, dim row width.

Design choices:
- Ownership is pure index math (`RowSharding`): rank r owns rows [r*S, min((r+1)*S, num_rows))
  with S = ceil(num_rows / W). Contiguous blocks keep a rank's shard one tensor, make resharding
  a row-range copy, and make the owner of a sorted id list a monotone split of it.
- One lookup is three `dist.all_to_all_single` calls on the store's own process group: the
  per-owner id counts (W values), the ids themselves (uneven splits) and the rows back (the
  reverse splits). Ids are deduplicated (`torch.unique`) before anything is sent, so a row
  needed by many positions crosses the network once per rank per lookup.
- Gradients: the lookup is a small `autograd.Function` hung on a zero-size anchor that requires
  grad (as `DiskTrainedStore` does). Its backward sends each unique row's gradient back to its
  owner with one more `all_to_all_single` (the forward splits reversed), so owners receive only
  gradients of rows they own, never a dense (num_rows, dim) tensor. Received gradients are
  scaled by 1/W: each rank's loss is the mean over its own slice of the global batch, so the
  mean over ranks is the global-batch gradient, exactly what DDP does for dense parameters.
  (`dist.all_to_all_single` is wrapped by hand: torch's functional
  `all_to_all_single_autograd` was seen to crash at process exit on CPU in about 1 run in 4.)
- The owner applies `torch.optim.SparseAdam`'s update (`engram.rowadam.sparse_adam_rows`) to its
  own rows in `adam_step`, with moments kept only for its shard; the training loop steps it like
  any self-updating table. One process holding every row (W = 1) is the in-RAM run, and two
  ranks reproduce it up to float summation order (tested).
- Initialisation equals `MemoryRowStore(seed=seed)` bit for bit: the single generator stream is
  drawn in the same 65536-row chunks `DiskTrainedStore` uses, keeping only this rank's rows, so
  memory stays O(shard) while every rank spends one pass over the stream.
- Every rank must make the same sequence of lookups (same layers, same order, with or without
  grad) and run backward for the ones made with grad: the training loop guarantees it. The store
  takes its process group as an argument; use one of its own so row exchanges never interleave
  with DDP's gradient all-reduces.
- `stats` counts what crossed ranks (ids, rows, gradients; bytes sent to OTHER ranks, the
  self-to-self part of the all-to-all being a local copy) and the wall time of both exchanges,
  for `benchmarks/bench_distributed.py`. Timing is host wall time (on CUDA without a sync it
  measures launch, not transfer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from engram.rowadam import coalesce_rows, sparse_adam_rows
from engram.store.base import check_row_ids

INIT_CHUNK_ROWS = 65536  # the chunking of DiskTrainedStore.create / write_table: same stream
PARTS = ("weight", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class RowSharding:
    """Contiguous row blocks of a `num_rows` table over `world_size` ranks (pure index math)."""

    num_rows: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")

    @property
    def shard_rows(self) -> int:
        """Rows per rank (the last ranks may own fewer, or none for a tiny table)."""
        return math.ceil(self.num_rows / self.world_size)

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the rows `rank` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        s = self.shard_rows
        return min(rank * s, self.num_rows), min((rank + 1) * s, self.num_rows)

    def owner(self, rows: Tensor) -> Tensor:
        """The rank owning each global row id (same shape)."""
        return torch.div(rows, self.shard_rows, rounding_mode="floor")

    def counts(self, rows: Tensor) -> Tensor:
        """(W,) how many of `rows` each rank owns."""
        return torch.bincount(self.owner(rows), minlength=self.world_size)


@dataclass
class ExchangeStats:
    """What this rank's lookups sent and how long the exchanges took (cumulative)."""

    lookups: int = 0  # gather calls
    ids: int = 0  # ids looked up, duplicates included
    unique_ids: int = 0  # after deduplication: the rows this rank needed
    remote_ids: int = 0  # unique ids owned by another rank (sent out)
    remote_ids_dup: int = 0  # ids owned by another rank counting repeats (no-dedup traffic)
    id_bytes_sent: int = 0  # ids sent to other owners
    row_bytes_sent: int = 0  # rows this rank served to other ranks
    row_bytes_received: int = 0  # rows other ranks served to this one
    grad_bytes_sent: int = 0  # gradients this rank sent to other owners
    forward_s: float = 0.0  # wall time of the forward exchange (3 all-to-alls + local gather)
    backward_s: float = 0.0  # wall time of the gradient exchange

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class _Plan:
    """One lookup's routing: what this rank asked of each owner and what it was asked."""

    send_counts: list[int]  # (W,) unique ids this rank asks of each rank
    recv_counts: list[int]  # (W,) ids each rank asks of this one
    local: Tensor  # (R,) the asked rows, as offsets into this rank's shard


def _all_to_all(
    out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> None:
    dist.all_to_all_single(
        out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
    )


class _ShardedLookup(torch.autograd.Function):
    """Unique ids (U,) -> their rows (U, dim); backward sends the row gradients to their owners."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, plan: _Plan, store: ShardedRowStore) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.store = plan, store
        return store._serve(plan)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        ctx.store._return_grad(ctx.plan, grad)
        return None, None, None


class ShardedRowStore:
    """This rank's slice of a (num_rows, dim) table, trained with row-wise SparseAdam."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        group: Any,
        *,
        std: float = 1.0,
        seed: int = 0,
        device: torch.device | str | None = None,
        check_bounds: bool = True,
        init: bool = True,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sharding = RowSharding(int(num_rows), self.world_size)
        self.start, self.stop = self.sharding.bounds(self.rank)
        self._dim = int(dim)
        self.std, self.seed = float(std), int(seed)
        self.check_bounds = bool(check_bounds)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n_local = self.stop - self.start
        self.weight = torch.zeros(n_local, self._dim, device=self.device)  # (S_r, dim)
        self.exp_avg = torch.zeros_like(self.weight)
        self.exp_avg_sq = torch.zeros_like(self.weight)
        self.step_count = 0
        self.grad_scale = 1.0 / self.world_size
        self.anchor = torch.zeros(0, requires_grad=True)  # hangs lookups on the autograd graph
        self._pending: list[tuple[Tensor, Tensor]] = []
        self.stats = ExchangeStats()
        if init:
            self.reset_parameters()

    # ---------------------------------------------------------------------------- RowStore
    @property
    def num_rows(self) -> int:
        return self.sharding.num_rows

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def reset_parameters(self) -> None:
        """This rank's rows of `MemoryRowStore(seed=self.seed, std=self.std)`; zero moments."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        for c0 in range(0, self.stop, INIT_CHUNK_ROWS):  # chunks past `stop` are never needed
            c1 = min(c0 + INIT_CHUNK_ROWS, self.num_rows)
            chunk = torch.empty(c1 - c0, self.dim).normal_(0.0, self.std, generator=gen)
            lo, hi = max(c0, self.start), min(c1, self.stop)
            if lo < hi:
                self.weight[lo - self.start : hi - self.start] = chunk[lo - c0 : hi - c0]
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step_count = 0

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at global ids (any shape S) -> S + (dim,), fetched from their owners.

        Collective: every rank of the group must call it, in the same order.
        """
        if self.check_bounds:
            check_row_ids(rows, self.num_rows, what="ShardedRowStore.gather")
        flat = rows.reshape(-1).to(self.device, torch.long)  # (N,)
        uniq, inverse, repeats = torch.unique(
            flat, sorted=True, return_inverse=True, return_counts=True
        )  # (U,), (N,), (U,)
        t0 = time.perf_counter()
        plan = self._plan(uniq, repeats)
        if torch.is_grad_enabled():
            vals = _ShardedLookup.apply(self.anchor, plan, self)  # (U, dim)
        else:
            vals = self._serve(plan)
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.lookups += 1
        self.stats.ids += flat.numel()
        self.stats.unique_ids += uniq.numel()
        return vals[inverse].view(*rows.shape, self.dim)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        """In place on the rows this rank owns (ids elsewhere are another rank's to update)."""
        if rows.dim() != 1 or delta.shape != (rows.shape[0], self.dim):
            raise ValueError(
                f"apply_row_update: rows must be (R,) and delta (R, {self.dim}), got "
                f"{tuple(rows.shape)} and {tuple(delta.shape)}"
            )
        check_row_ids(rows, self.num_rows, what="ShardedRowStore.apply_row_update")
        mine = (rows >= self.start) & (rows < self.stop)
        with torch.no_grad():
            self.weight.index_add_(
                0, (rows[mine] - self.start).to(self.device), delta[mine].to(self.weight)
            )

    # ---------------------------------------------------------------------------- exchange
    def _plan(self, uniq: Tensor, repeats: Tensor) -> _Plan:
        """Two all-to-alls: per-owner counts, then the sorted unique ids split by owner."""
        W = self.world_size
        owner = self.sharding.owner(uniq)  # (U,)
        send = torch.bincount(owner, minlength=W)  # (W,)
        recv = torch.empty_like(send)
        _all_to_all(recv, send, [1] * W, [1] * W, self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        asked = uniq.new_empty(sum(recv_counts))  # (R,)
        _all_to_all(asked, uniq, recv_counts, send_counts, self.group)
        remote = sum(send_counts) - send_counts[self.rank]
        self.stats.remote_ids += remote
        self.stats.remote_ids_dup += int(repeats[owner != self.rank].sum())
        self.stats.id_bytes_sent += remote * uniq.element_size()
        return _Plan(send_counts, recv_counts, asked - self.start)

    def _serve(self, plan: _Plan) -> Tensor:
        """The third all-to-all: the asked rows back to whoever asked -> (U, dim)."""
        local = self.weight[plan.local]  # (R, dim)
        out = local.new_empty(sum(plan.send_counts), self.dim)  # (U, dim)
        _all_to_all(out, local, plan.send_counts, plan.recv_counts, self.group)
        served_remote = sum(plan.recv_counts) - plan.recv_counts[self.rank]
        row = self.dim * local.element_size()
        self.stats.row_bytes_sent += served_remote * row
        self.stats.row_bytes_received += (sum(plan.send_counts) - plan.send_counts[self.rank]) * row
        return out

    def _return_grad(self, plan: _Plan, grad: Tensor) -> None:
        """Backward: (U, dim) gradients to their owners; this rank keeps (R, dim) of its own."""
        t0 = time.perf_counter()
        grad = grad.contiguous()
        mine = grad.new_empty(sum(plan.recv_counts), self.dim)  # (R, dim)
        _all_to_all(mine, grad, plan.recv_counts, plan.send_counts, self.group)
        self._pending.append((plan.local, mine.mul_(self.grad_scale)))
        remote = sum(plan.send_counts) - plan.send_counts[self.rank]
        self.stats.grad_bytes_sent += remote * self.dim * grad.element_size()
        self.stats.backward_s += time.perf_counter() - t0

    # --------------------------------------------------------------------------- optimizer
    def zero_grad(self) -> None:
        """Forget the row gradients received since the last step."""
        self._pending.clear()

    @torch.no_grad()
    def adam_step(self, lr: float, betas: tuple[float, float], eps: float) -> int:
        """SparseAdam's update on the owned rows that received gradients; returns how many.

        Local: no communication (the gradients arrived in backward). Every rank counts the step,
        touched or not, as SparseAdam counts per parameter, so bias correction agrees with one
        process holding the whole table.
        """
        self.step_count += 1
        if not self._pending:
            return 0
        rows = torch.cat([r for r, _ in self._pending])  # (N_r,)
        grads = torch.cat([g for _, g in self._pending])  # (N_r, dim)
        self._pending.clear()
        uniq, grad = coalesce_rows(rows, grads, max(1, self.stop - self.start))
        w, m, v = sparse_adam_rows(
            grad, self.weight[uniq], self.exp_avg[uniq], self.exp_avg_sq[uniq],
            self.step_count, lr, betas, eps,
        )  # fmt: skip
        self.weight[uniq], self.exp_avg[uniq], self.exp_avg_sq[uniq] = w, m, v
        return len(uniq)

    # --------------------------------------------------------------------------- state
    def shard_state(self) -> dict[str, Tensor]:
        """This rank's rows of the three parts, (S_r, dim) each (CPU, contiguous)."""
        return {p: getattr(self, p).detach().cpu().contiguous() for p in PARTS}

    @torch.no_grad()
    def load_rows(self, read: Callable[[str, int, int], Tensor], step: int) -> None:
        """Fill this shard from `read(part, start, stop) -> (stop - start, dim)` global rows."""
        for p in PARTS:
            rows = read(p, self.start, self.stop)
            if tuple(rows.shape) != (self.stop - self.start, self.dim):
                raise ValueError(
                    f"{p} rows [{self.start}, {self.stop}) came back with shape "
                    f"{tuple(rows.shape)}, expected ({self.stop - self.start}, {self.dim})"
                )
            getattr(self, p).copy_(rows)
        self.step_count = int(step)
        self._pending.clear()

    def __repr__(self) -> str:
        return (
            f"ShardedRowStore(rows [{self.start}, {self.stop}) of {self.num_rows} x {self.dim}, "
            f"rank {self.rank}/{self.world_size}, step {self.step_count})"
        )
