"""Make a built model distributed from outside: sharded tables, DDP on the dense parameters.

Design choices:
- Tables are never built whole: `sharded_stores` is handed to `engram.train.build_run` as the
  Engram layers' stores, so each rank allocates only its rows (and draws them from the same
  stream a single process would, see `engram.store.sharded`).
- Dense parameters are replicated with `DistributedDataParallel` on the context's `group`;
  the tables are not parameters, so DDP never sees them. A model with experts can leave an
  expert without tokens on one rank, so MoE models set `find_unused_parameters`.
- Things that are not gradients but must agree across ranks are synchronised explicitly:
  the MoE load counts behind the router-bias update are summed before `update_router_biases`,
  so every rank (and a single process on the whole batch) applies the same bias step; and each
  MoE gets a `count_reducer`, so its balance loss uses the global batch's expert fractions
  (one E-element all-reduce per MoE layer per forward) and the ranks' mean loss is the
  single-process loss, not a mean of per-rank balance terms.
- The per-rank slice of a batch is the contiguous block `rank` of W along the batch axis, so
  the union over ranks is exactly the single-process batch, in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from engram.indexer import NgramIndexer
from engram.parallel.context import DistContext, collective_errors
from engram.store.sharded import ShardedRowStore


def sharded_stores(
    ctx: DistContext, layer_ids: tuple[int, ...], head_dim: int, engram_seed: int, table_std: float
) -> Callable[[NgramIndexer], dict[int, ShardedRowStore]]:
    """Stores for `build_run(stores=...)`: this rank's shard of every Engram layer's table.

    Seeds and std are those of the in-RAM default (`engram_seed + layer_id`, `table_std`).
    """

    def make(indexer: NgramIndexer) -> dict[int, ShardedRowStore]:
        stores = {}
        for lid in layer_ids:
            stores[lid] = ShardedRowStore(
                sum(indexer.hasher.flat_table_sizes(lid)), head_dim, ctx.table_group,
                std=table_std, seed=engram_seed + lid, device=ctx.device, check_bounds=False,
            )  # fmt: skip
        return stores

    return make


@dataclass
class DenseCommStats:
    """DDP's gradient all-reduce on this rank (cumulative), measured by its comm hook."""

    buckets: int = 0  # bucket all-reduces completed
    bytes: int = 0  # gradient bytes all-reduced (each rank's ring traffic is ~2x this)
    seconds: float = 0.0  # summed issue-to-completion time of the buckets (overlaps backward)


def _timed_allreduce(state: tuple[Any, DenseCommStats], bucket):  # type: ignore[no-untyped-def]
    """DDP's default hook (average = divide by N, then all-reduce), timed per bucket.

    `bucket` and the return value stay unannotated: DDP inspects a hook's annotations and
    accepts only the classes themselves, which postponed (string) annotations are not.
    """
    group, stats = state
    t0 = time.perf_counter()
    buf = bucket.buffer()
    buf.div_(dist.get_world_size(group))
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

    def done(f: torch.futures.Future) -> Tensor:
        stats.seconds += time.perf_counter() - t0
        stats.buckets += 1
        stats.bytes += buf.numel() * buf.element_size()
        return f.value()[0]

    return fut.then(done)


def parallelize(
    model: nn.Module, ctx: DistContext, comm_stats: DenseCommStats | None = None
) -> DistributedDataParallel:
    """Wrap `model`'s dense parameters in DDP over `ctx.group` (tables stay sharded).

    Also installs the global-batch expert-count reducer on every MoE layer. With `comm_stats`,
    DDP's all-reduce is timed into it (the same averaging as DDP's default).
    """
    moes = list(getattr(model, "moe_layers", lambda: iter(()))())
    for moe in moes:
        moe.count_reducer = _count_reducer(ctx)
    has_moe = bool(moes)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(
        model, device_ids=device_ids, process_group=ctx.group,
        find_unused_parameters=has_moe, forward_sync_buffers=False,
    )  # fmt: skip
    if comm_stats is not None:
        ddp.register_comm_hook((ctx.group, comm_stats), _timed_allreduce)
    return ddp


def _count_reducer(ctx: DistContext) -> Callable[[Tensor], Tensor]:
    def reduce(counts: Tensor) -> Tensor:  # (E,) this rank's -> (E,) summed over ranks
        total = counts.detach().clone()
        with collective_errors(ctx, "the MoE balance-loss count all-reduce"):
            dist.all_reduce(total, group=ctx.group)
        return total

    return reduce


@torch.no_grad()
def sync_router_loads(model: nn.Module, ctx: DistContext) -> None:
    """Sum every MoE's load counts over ranks (call before `update_router_biases`)."""
    loads = [moe.load_counts for moe in getattr(model, "moe_layers", lambda: iter(()))()]
    if not loads:
        return
    flat = torch.cat(loads)
    with collective_errors(ctx, "the router-load all-reduce"):
        dist.all_reduce(flat, group=ctx.group)
    offset = 0
    for load in loads:
        load.copy_(flat[offset : offset + load.numel()])
        offset += load.numel()


def rank_slice(t: Tensor, ctx: DistContext) -> Tensor:
    """This rank's contiguous block of `t` along dim 0 (the last blocks may be shorter)."""
    return torch.tensor_split(t, ctx.world_size)[ctx.rank]
