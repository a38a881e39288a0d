"""Validation loss of a trained run on a second text: generalisation beside memorisation.

A run's own validation split shows how well it predicts held-out documents of the corpus it
trained on. A second text shows whether what it learned transfers: another built-in translation
(its held-out chapters were never trained on in any wording) or a user's file.

Design choices:
- The text is tokenized with the RUN's tokenizer (a BPE trained on the run's corpus included),
  never with the tokenizer its own data config would name, so the loss is over the same ids the
  model predicts.
- ``split="val"`` takes the second source's held-out documents under the run's split settings
  (for a built-in translation: the same chapter references as the run's validation split);
  ``split="all"`` every document (a file the model has never seen).
- Results are cached in ``<run>/heldout.json`` keyed by checkpoint step, source, split and batch
  cap, and written atomically: re-reporting an ablation or a demo costs nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engram.atomic import atomic_write_text
from engram.checkpoint import find_latest
from engram.data import DataError, PackedSplit, prepare_data

HELDOUT_FILE = "heldout.json"
SPLITS = ("val", "all")


def _key(step: int, source: str, split: str, max_batches: int | None) -> str:
    return f"step={step}|source={source}|split={split}|batches={max_batches}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def heldout_loss(
    run_dir: str | os.PathLike[str],
    source: str,
    *,
    split: str = "val",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """{"loss", "tokens", "source", "split", "step"} of the run's latest checkpoint on `source`."""
    from engram.train import evaluate, load_trained

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    run = Path(run_dir)
    latest = find_latest(run / "checkpoints")
    if latest is None:
        raise DataError(f"{run} holds no checkpoint to evaluate")
    step = int(latest.name.split("-")[-1])
    cache_path = run / HELDOUT_FILE
    cache = _read_cache(cache_path)
    key = _key(step, source, split, max_batches)
    if key in cache:
        return cache[key]
    parts, _ = load_trained(latest)
    data_cfg = replace(parts.cfg.data, source=source)
    splits = prepare_data(data_cfg, parts.tokenizer, parts.eot_id)
    if split == "val":
        packed = splits.val
    else:
        packed = PackedSplit.from_corpus(
            splits.corpus, np.arange(splits.corpus.n_docs, dtype=np.int64), "all"
        )
    positions = bool(getattr(parts.indexer, "needs_positions", False))
    batches = list(
        packed.val_batches(data_cfg.batch_size, data_cfg.seq_len, max_batches, positions)
    )
    loss = evaluate(parts.model, batches, parts.indexer)
    record = {
        "loss": loss,
        "tokens": int(sum(b[1].size for b in batches)),
        "source": source,
        "split": split,
        "step": step,
    }
    cache = _read_cache(cache_path)  # another process may have added entries meanwhile
    cache[key] = record
    atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return record
