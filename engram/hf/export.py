"""`export_base`: a finished `--base` run as a Hugging Face model directory, the next `--base`.

Design choices:
- The directory holds the run's base (trained in full mode, the frozen original in adapter
  mode) written by `save_pretrained`, without Engram's tensors, plus the run's tokenizer.json,
  so `from_pretrained` and `engram train --base` read it as a plain model.
- A run with Engram also gets its Engram layers in the subdirectory `engram/`, in
  `engram.hf.io`'s format (`load_engram(base, out / "engram", tokenizer)` attaches them to the
  exported base; `from_pretrained` ignores the subdirectory). The base's weights are not saved
  twice: they are the directory itself.
- Like `init_base`, it writes into a hidden temporary directory and renames it into place, and
  refuses an `--out` that is not new or empty.
- This module sits above the trainer (it loads the run with `engram.train.load_trained`);
  `engram.hf.base` and `engram.hf.lm` sit below it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from engram.hf.base import (
    TOKENIZER_FILE,
    BaseModelError,
    check_new_dir,
    commit_dir,
    quiet_transformers,
)

ENGRAM_SUBDIR = "engram"  # where a run's Engram goes (engram.hf.io's format)


@dataclass(frozen=True)
class ExportedBase:
    """What `export_base` wrote."""

    path: Path
    architecture: str
    step: int
    trained_base: bool  # False: an adapter run's frozen base (a copy of the original)
    engram: Path | None  # Engram's save directory (engram.hf.io), None for a run without one


def export_base(ckpt_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> ExportedBase:
    """Write a base run's model (its trained base, without Engram) and tokenizer as a model
    directory usable as the next `--base`; a run with Engram also gets its Engram layers in
    `out/engram` (`engram.hf.io.save_engram`: `load_engram(base, out / "engram", tokenizer)`
    attaches them to the exported base)."""
    from engram.checkpoint import read_checkpoint
    from engram.train import load_trained

    target = Path(out).expanduser()
    check_new_dir(target)
    ckpt = read_checkpoint(ckpt_path, verify=False)
    if not ckpt.config.get("base"):
        raise BaseModelError(
            f"{ckpt.path} is a run of engram's own model (no base section): only a run trained "
            "with --base exports as a Hugging Face model directory"
        )
    parts, ckpt = load_trained(ckpt_path)
    model = parts.model
    hf = model.hf
    engram_prefix = "engram."
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith(engram_prefix)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    engram_dir = None
    try:
        with quiet_transformers():
            hf.save_pretrained(str(tmp), state_dict=state)
        parts.tokenizer.save(str(tmp / TOKENIZER_FILE))
        if model.attachment is not None:
            engram_dir = _save_engram(hf, parts.tokenizer, tmp / ENGRAM_SUBDIR)
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedBase(
        path=target,
        architecture=type(hf).__name__,
        step=ckpt.step,
        trained_base=bool(parts.cfg.base.train_base),
        engram=None if engram_dir is None else target / ENGRAM_SUBDIR,
    )


def _save_engram(hf: nn.Module, tokenizer: Any, where: Path) -> Path:
    """Engram's weights through `engram.hf.io.save_engram`; the base beside it is the one
    they belong to, so its weights are not saved again."""
    from engram.hf.io import save_engram

    return save_engram(hf, where, tokenizer=tokenizer, base_weights=False)
