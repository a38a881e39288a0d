"""Logit lens: how far each layer's early-exit prediction is from the model's final one.

For layer l (0 = embedding output, i + 1 = after block i; see `engram.analysis.hidden`) the
early-exit distribution is p_l = softmax(lm_head(final_norm(h_l))); the lens reports the mean
over tokens of KL(p_final || p_l) in nats. The last layer's value is 0 by construction. A model
whose memory supplies the easy predictions early should reach small KL at shallower layers.

Design choices:
- The residual stream comes from `block_outputs` (forward hooks, nothing in the model code).
  The vocabulary projection is done here in chunks of tokens, sized so that one (chunk, V)
  float64 array stays under `CHUNK_BYTES`: the (tokens, V) logits of a whole batch are never
  built. The final layer's log-probabilities are computed once per chunk and reused for every
  layer.
- Logits are computed in the model's dtype, then log-softmax, KL and the running sums are in
  float64, so small KLs near the top of the network are not lost to cancellation.
- `analyze_logit_lens` runs every checkpoint on the SAME validation tokens (the first run's data
  config, its source optionally replaced), each with its own indexer's rows; runs whose
  tokenizer or sequence length differ are refused before any work (`load_runs`).
- Outputs: `logit_lens.png` (KL vs layer, one line per run; log y-axis when the values span
  more than a decade; the final layer, 0 by definition, is left off a log axis) and
  `logit_lens.json`, both written atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from engram.analysis.hidden import (
    PathLike,
    block_outputs,
    data_summary,
    final_logits,
    load_runs,
    shared_val_data,
    val_inputs,
)
from engram.atomic import atomic_write_text
from engram.model import EngramLM
from engram.plots import _save

CHUNK_BYTES = 8 * 2**20  # bytes of one (chunk, V) float64 array at most


def layer_labels(n_layers: int) -> list[str]:
    """["emb", "1", ..., "n_layers"]: layer 0 is the embedding, layer i the output of block i-1."""
    return ["emb"] + [str(i) for i in range(1, n_layers + 1)]


def _chunk_tokens(vocab_size: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is None:
        return max(1, CHUNK_BYTES // (8 * vocab_size))
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1 or None, got {chunk_tokens!r}")
    return chunk_tokens


@torch.no_grad()
def kl_sums(model: EngramLM, hidden: list[Tensor], chunk_tokens: int | None = None) -> Tensor:
    """Sum over tokens of KL(p_final || p_l) for each layer: float64 (len(hidden),).

    `hidden` is `block_outputs(...)`: n_layers + 1 tensors (B, T, D); the last is the final one.
    """
    chunk = _chunk_tokens(model.cfg.vocab_size, chunk_tokens)
    if not hidden:
        raise ValueError("hidden is empty; expected block_outputs(...): n_layers + 1 tensors")
    D = hidden[0].shape[-1]
    flat = [h.reshape(-1, D) for h in hidden]  # each (N, D)
    n = flat[0].shape[0]
    sums = torch.zeros(len(flat), dtype=torch.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logp_final = F.log_softmax(final_logits(model, flat[-1][start:stop]).double(), -1)  # (c, V)
        p_final = logp_final.exp()  # (c, V)
        for layer, h in enumerate(flat[:-1]):
            logp = F.log_softmax(final_logits(model, h[start:stop]).double(), -1)  # (c, V)
            sums[layer] += float((p_final * (logp_final - logp)).sum())
    return sums  # the last entry stays exactly 0


def _lens(
    model: EngramLM,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    chunk_tokens: int | None,
) -> tuple[np.ndarray, int, int]:
    """(mean KL per layer (n_layers + 1,), tokens read, batches read)."""
    sums = torch.zeros(model.cfg.n_layers + 1, dtype=torch.float64)
    n_tokens = n_batches = 0
    for x, rows in batches:
        hidden = block_outputs(model, x, rows)  # n_layers + 1 of (B, T, D)
        sums += kl_sums(model, hidden, chunk_tokens)
        n_tokens += x.numel()
        n_batches += 1
    if n_tokens == 0:
        raise ValueError("logit_lens got no tokens; expected at least one batch (x, rows)")
    return (sums / n_tokens).numpy(), n_tokens, n_batches


def logit_lens(
    model: EngramLM,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    chunk_tokens: int | None = None,
) -> np.ndarray:
    """Mean over all tokens of KL(p_final || p_l) per layer l: float64 (n_layers + 1,), nats.

    `batches` yields (x (B, T), rows (L, B, T, H) or None), as `val_inputs` does.
    `chunk_tokens` tokens are projected to the vocabulary at a time (default: what fits
    `CHUNK_BYTES`); the result does not depend on it (up to float32 rounding of the logits).
    """
    return _lens(model, batches, chunk_tokens)[0]


@dataclass(frozen=True)
class LensReport:
    """The logit lens of several runs on the same validation tokens, and the files written."""

    kl: dict[str, np.ndarray]  # run name -> (n_layers + 1,) mean KL(p_final || p_l), nats
    run_dirs: dict[str, str]
    engram_layer_ids: dict[str, list[int]]  # run name -> 0-based blocks with an Engram layer
    n_tokens: int
    n_batches: int
    data: dict[str, Any]  # source, seq_len, batch_size of the tokens read
    seconds: float
    png: Path
    json: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "mean over tokens of KL(p_final || p_layer), nats",
            "layers": "emb = embedding output, i = output of the i-th block (0-based index "
            "i-1); the last is the final layer (KL 0)",
            "runs": {
                name: {
                    "run_dir": self.run_dirs[name],
                    "engram_layer_ids": self.engram_layer_ids[name],
                    "layers": layer_labels(len(kl) - 1),
                    "kl": [float(v) for v in kl],
                }
                for name, kl in self.kl.items()
            },
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "data": self.data,
            "seconds": round(self.seconds, 3),
            "png": str(self.png),
        }


def plot_logit_lens(
    kl: Mapping[str, np.ndarray],
    path: PathLike,
    engram_layer_ids: Mapping[str, Sequence[int]] | None = None,
    title: str | None = None,
) -> Path:
    """KL vs layer, one labelled line per run (log y-axis when the values span > 10x).

    `engram_layer_ids` (run name -> 0-based blocks with an Engram layer) goes into the legend.
    """
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    positive = [float(v) for values in kl.values() for v in values[:-1] if v > 0]
    log_y = bool(positive) and max(positive) > 10 * min(positive)
    longest = max(len(v) for v in kl.values())
    for name, values in kl.items():
        layers = np.arange(len(values))
        shown = values[:-1] if log_y else values  # the final layer's 0 has no place on a log axis
        ids = list((engram_layer_ids or {}).get(name, []))
        label = f"{name} (Engram in block index {ids})" if ids else name
        ax.plot(layers[: len(shown)], shown, "o-", lw=1.5, ms=4, label=label)
    ax.set_xticks(np.arange(longest), layer_labels(longest - 1))
    ax.set_xlabel("layer (emb = embedding output, i = output of the i-th block)")
    if log_y:
        ax.text(0.99, 0.97, "final layer: KL = 0 by definition (not drawn on a log axis)",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.4")  # fmt: skip
    ax.set_ylabel("KL(p_final || p_layer), nats/token")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "logit lens: distance of each layer's early exit from the final output")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def check_max_batches(max_batches: int) -> None:
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")


def analyze_logit_lens(
    run_dirs: Mapping[str, PathLike],
    out_dir: PathLike,
    max_batches: int = 8,
    data_source: str | None = None,
) -> LensReport:
    """The logit lens of every run in `run_dirs` ({name: run or checkpoint dir}) on the same
    validation tokens (the first run's data config; `data_source` replaces its source).

    Writes `out_dir/logit_lens.png` and `out_dir/logit_lens.json`.
    """
    check_max_batches(max_batches)
    t0 = time.perf_counter()
    runs = load_runs(run_dirs)
    data = shared_val_data(next(iter(runs.values())), data_source)
    kl: dict[str, np.ndarray] = {}
    n_tokens = n_batches = 0
    for name, parts in runs.items():
        kl[name], n_tokens, n_batches = _lens(
            parts.model, val_inputs(parts, data, max_batches), None
        )
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer_ids = {name: list(parts.model.layer_ids) for name, parts in runs.items()}
    png = plot_logit_lens(kl, out / "logit_lens.png", layer_ids)
    report = LensReport(
        kl=kl,
        run_dirs={str(name): os.fspath(path) for name, path in run_dirs.items()},
        engram_layer_ids=layer_ids,
        n_tokens=n_tokens,
        n_batches=n_batches,
        data=data_summary(data),
        seconds=seconds,
        png=png,
        json=out / "logit_lens.json",
    )
    atomic_write_text(report.json, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return report


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze lens`'s text: mean KL per layer and run, from `LensReport.to_dict()`."""
    lines = [f"mean KL(final || layer) in nats over {d['n_tokens']:,} validation tokens"]
    for name, r in d["runs"].items():
        cells = "  ".join(f"{lab}:{v:.4f}" for lab, v in zip(r["layers"], r["kl"], strict=True))
        lines.append(f"  {name:<12} {cells}")
    return lines
