"""`engram train --nproc N`: start N workers on this machine with torchrun's elastic agent.

Design choices:
- The launcher is torchrun's own (`torch.distributed.run`), called in-process: it picks a
  free port (`--standalone`), sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
  for each worker, and watches them. No networking of ours.
- No restarts (`--max-restarts=0`): when a worker fails, the agent stops the others and the
  launch fails with the failed rank and its exit code. Training resumes from the last committed
  checkpoint by running the same command again.
- Several machines: run `torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT
  -m engram train ...` on each (a shared filesystem for the run directory); the workers are
  the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class LaunchError(RuntimeError):
    """A worker of a launched run failed; the message names it."""


def launch(nproc: int, argv: Sequence[str], monitor_interval_s: float = 0.2) -> None:
    """Run `python -m engram *argv` on `nproc` local workers; raise `LaunchError` if one fails."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Each worker gets an equal share of the cores (torchrun would otherwise warn and pick 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            f"--monitor-interval={monitor_interval_s}",
            "-m",
            "engram",
            *argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        how = (
            f"killed by signal {-first.exitcode}" if first.exitcode < 0
            else f"exit code {first.exitcode}"
        )  # fmt: skip
        others = sorted(r for r in e.failures if r != rank)
        raise LaunchError(
            f"distributed run failed: rank {rank} failed first ({how})"
            + (f", then ranks {others} stopped" if others else "")
            + "; every worker has stopped. The last committed checkpoint is intact: rerun the "
            "same command to resume"
        ) from None
