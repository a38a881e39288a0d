"""Loading a finished run for analysis, refusing runs that have no Engram memory to analyse."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engram.checkpoint import Checkpoint
    from engram.indexer import NgramIndexer
    from engram.train import RunParts


class NoEngramError(ValueError):
    """The run (or model) has no Engram layers, so there is nothing to analyse."""


def load_engram_run(run_dir: str | os.PathLike[str], purpose: str) -> tuple[RunParts, Checkpoint]:
    """`load_trained(run_dir)`, after checking from the checkpoint's config that it has Engram
    layers (a baseline is refused before any weights are read). `purpose` names the analysis in
    the error message."""
    from engram.checkpoint import read_checkpoint
    from engram.train import load_trained

    ckpt = read_checkpoint(run_dir, verify=False)
    engram = ckpt.config.get("engram")
    if not engram or not engram.get("layer_ids"):
        name = ckpt.config.get("name", "?")
        raise NoEngramError(
            f"run {os.fspath(run_dir)!r} ({name!r}, checkpoint {ckpt.path.name}) has no Engram "
            f"layers (a baseline model): {purpose} needs a model with Engram memory"
        )
    return load_trained(run_dir)


def require_engram(parts: RunParts, purpose: str = "this analysis") -> NgramIndexer:
    """The loaded run's indexer; `NoEngramError` for a run without Engram layers (a baseline)."""
    if parts.indexer is None or not parts.model.engram_layers():
        raise NoEngramError(
            f"run {parts.cfg.name!r} has no Engram layers (a baseline without memory); "
            f"{purpose} needs a run trained with an engram config"
        )
    return parts.indexer
