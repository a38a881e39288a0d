"""The process groups of one distributed run, made from torchrun's environment, and their errors.

Design choices:
- No global state of ours: `init_from_env` returns a `DistContext` holding the rank, the world
  size, the device and two process groups, and everything distributed takes that object as an
  argument. (torch.distributed's default group exists, as torchrun requires; nothing of ours
  reaches for it implicitly.)
- Two groups over the same ranks: `group` for DDP's gradient all-reduce and the loop's small
  control collectives, `table_group` for the Engram row exchange. Collectives on one group run
  in issue order; keeping the row all-to-alls (issued inside autograd's backward) apart from
  DDP's bucketed all-reduces (issued from its hooks) means neither can overtake the other.
- Backend by device: gloo on the CPU, NCCL on CUDA (one GPU per local rank).
- Failure is bounded: every collective carries `timeout_s`, so a rank whose peer died (the
  connection closes: an error at once) or hangs (nothing arrives: an error after the timeout)
  raises `DistributedError` naming its rank and the phase instead of waiting forever. Whatever
  checkpoint was last committed stays intact (commits are atomic renames by rank 0).
- The environment is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
  `torchrun ... -m engram train ...` and `engram train --nproc N` start the same workers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or disagreed."""


@dataclass(frozen=True)
class DistContext:
    """One rank's view of a distributed run (pass it; never look it up globally)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any  # DDP and control collectives
    table_group: Any  # Engram row exchange (all-to-all)
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and the checkpoint commit."""
        return self.rank == 0

    def barrier(self, phase: str) -> None:
        with collective_errors(self, phase):
            dist.barrier(group=self.group)

    def all_reduce_sum(self, values: list[float], phase: str) -> list[float]:
        """Sum a few floats over ranks (float64, so the order of a 2-rank sum is the only error)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        with collective_errors(self, phase):
            dist.all_reduce(t, group=self.group)
        return t.tolist()

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors live: NCCL needs them on the GPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process is a worker of torchrun (or `engram train --nproc`)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the run torchrun's environment describes; returns this rank's `DistContext`."""
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise DistributedError(
            f"distributed environment incomplete: {missing} not set; launch with "
            "`engram train --nproc N ...` or `torchrun --nproc-per-node N -m engram train ...`"
        )
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but this machine has no CUDA device")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} needs GPU {local}, but this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per machine"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
        group = dist.new_group(list(range(world)), timeout=timeout, backend=backend)
        table_group = dist.new_group(list(range(world)), timeout=timeout, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {rank}/{world}: could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g}s: {e}"
        ) from e
    return DistContext(rank, world, local, dev, group, table_group, float(timeout_s))


def shutdown(ctx: DistContext | None = None) -> None:
    """Leave the process groups (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(ctx: DistContext, phase: str) -> Iterator[None]:
    """Turn a failed collective into a `DistributedError` that says what happened and where."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, dist.DistError) or _looks_distributed(e):
            raise DistributedError(
                f"rank {ctx.rank}/{ctx.world_size}: a collective failed during {phase}: another "
                f"rank died, hung for more than the {ctx.timeout_s:g}s timeout, or left the run "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            ) from e
        raise


def _looks_distributed(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "peer"))
