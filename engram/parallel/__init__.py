"""Training on several processes and machines with torch.distributed (gloo on CPU, NCCL on GPU).

- `context`: the process groups of a run, made from torchrun's environment; bounded failures.
- `tables`: sharded table checkpoints that reload on any number of ranks.
- `launch`: `engram train --nproc N`, torchrun's elastic agent on this machine.
- `placement`: `place`, the one function that puts a run's tables in RAM, on disk or sharded
  over the ranks and wraps its dense model (DDP, compile); `engram.run.train` applies it to the
  trainer of `engram.train`, which imports nothing from this package.
- `engram.store.sharded`: the row-sharded table itself (all-to-all lookups and gradients).

The model imports none of this: `parallelize` builds the Engram layers over sharded stores and
wraps the dense parameters in DDP from outside, as torchtitan's `parallelize` does.
"""

from engram.parallel.context import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    DistributedError,
    init_from_env,
    launched_by_torchrun,
    shutdown,
)
from engram.parallel.parallelize import (
    parallelize,
    rank_slice,
    sharded_stores,
    sync_router_loads,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "init_from_env",
    "launched_by_torchrun",
    "parallelize",
    "rank_slice",
    "sharded_stores",
    "shutdown",
    "sync_router_loads",
]
