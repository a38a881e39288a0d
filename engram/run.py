"""`train(cfg, out_dir)`: the trainer with its tables and dense model placed from outside.

This is the one place where `engram.train` (the loop, which knows nothing of tiers or process
groups) meets `engram.parallel.placement.place` (which knows nothing of the loop). It is
the `train` the CLI, `engram.train` (the package root) and the rest of the library use.
(`engram.runner` is something else: it runs many such trainings side by side.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engram.data import DataSplits
from engram.parallel.context import DistContext
from engram.parallel.placement import Placed, check_placement, place
from engram.run_config import RunConfig
from engram.train import Trainer, TrainResult, resolve_device, torch_threads


def train(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    data: DataSplits | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir`, resuming from its latest checkpoint when there is one.

    `stop_after` ends this call after that many steps (with a checkpoint), as an interruption
    would; `data` reuses already-prepared splits (same data config) across runs.

    With `dist` (one call per rank, see `engram.parallel`), `cfg.data.batch_size` is the global
    batch: each rank trains on its block, Engram tables are row-sharded over the ranks and the
    dense parameters replicated with DDP; rank 0 writes the metrics and commits checkpoints,
    whose tables are saved as shards that reload on any number of ranks (or in one process).
    `cfg.train.threads` (when > 0) sets PyTorch's thread count for the call.

    With `cfg.base` (a local Hugging Face model, see `engram.hf.base`) the run trains that
    model, Engram attached when `cfg.engram` is set; the base's fingerprint is recorded in the
    run's config on the first call and a later call (a resume) refuses another base.

    Refusals (`ValueError` subclasses, one line each): another process holds the run directory
    (`engram.rundir.RunDirLocked`), its config differs, a write failed (`RunDirError`,
    `CheckpointError`). SIGINT/SIGTERM save the step in progress and raise
    `engram.train.TrainingInterrupted` (a `KeyboardInterrupt`) after printing where.
    """
    if cfg.base is not None:  # record (or check) the base model's fingerprint first
        from engram.hf.base import resolve_base

        cfg = resolve_base(cfg)
    with torch_threads(cfg.train.threads):
        device = resolve_device(cfg.train.device) if dist is None else dist.device
        check_placement(cfg, dist, device)

        def placer(build: Any, resume_from: Path | None) -> Placed:
            return place(build, cfg, dist, device, run_dir=Path(out_dir), resume_from=resume_from)

        trainer = Trainer(cfg, out_dir, placer, dist=dist, data=data, progress=progress)
        return trainer.run(resume=resume, stop_after=stop_after)
