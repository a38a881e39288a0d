"""PNG figures: loss curves of one or more runs, and sweep curves (loss against a knob).

Design choices:
- matplotlib with the non-interactive Agg backend, chosen explicitly through `Figure` objects
  (no pyplot global state), so plotting works headless and never touches a user's backend.
- Files are written atomically (temp file + rename), like every other output of the library.
- Training curves are smoothed with an exponential moving average (raw values stay in the
  metrics file); validation points are drawn unsmoothed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engram.atomic import atomic_write_bytes


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _ema(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    out = np.empty(len(values))
    acc = None
    for i, v in enumerate(values):
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out[i] = acc
    return out


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    title: str = "training and validation loss",
) -> Path:
    """One line per run (EMA of train loss vs tokens) plus its validation points."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (name, records) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        train = [r for r in records if "loss" in r]
        if train:
            tokens = np.array([r["tokens"] for r in train], dtype=float)
            ax.plot(tokens, _ema([r["loss"] for r in train]), color=color, lw=1.5,
                    label=f"{name} train (EMA)")  # fmt: skip
        val = [r for r in records if "val_loss" in r]
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o--", color=color,
                    ms=4, lw=1, label=f"{name} validation")  # fmt: skip
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep_curve(
    xs: Sequence[float],
    losses: Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    title: str,
    log_x: bool = False,
    invert_x: bool = False,
    reference: tuple[str, float] | None = None,
) -> Path:
    """Validation loss against a swept quantity: each seed as a dot, the mean as a line.

    `reference` = (label, loss) draws a horizontal dashed line, e.g. the MoE baseline.
    """
    if len(xs) != len(losses) or not xs:
        raise ValueError(f"need one loss list per x value, got {len(xs)} x and {len(losses)}")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    means = [float(np.mean(v)) for v in losses]
    for x, v in zip(xs, losses, strict=True):
        ax.plot([x] * len(v), v, "o", color="tab:gray", ms=4, alpha=0.6)
    ax.plot(xs, means, "o-", color="tab:blue", lw=1.8, ms=6,
            label="mean over seeds" if max(map(len, losses)) > 1 else "validation loss")  # fmt: skip
    if reference is not None:
        ax.axhline(reference[1], color="tab:orange", ls="--", lw=1.2, label=reference[0])
    best = int(np.argmin(means))
    ax.plot([xs[best]], [means[best]], "*", color="tab:red", ms=14, label="lowest")
    if log_x:
        ax.set_xscale("log")
    if invert_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _arm_panel(ax: Any, arms: Sequence[Mapping[str, Any]], kind: str, title: str) -> None:
    names = [a["name"] for a in arms if a[kind]["losses"]]
    for i, a in enumerate(a for a in arms if a[kind]["losses"]):
        st = a[kind]
        color = "tab:blue" if a["name"] == "engram" else "tab:gray"
        ax.errorbar([st["mean"]], [i], xerr=[[st["std"] or 0.0], [st["std"] or 0.0]], fmt="s",
                    color=color, ms=7, capsize=3)  # fmt: skip
        ax.plot(st["losses"], [i] * len(st["losses"]), "o", color=color, alpha=0.45, ms=4)
    eng = next((a for a in arms if a["name"] == "engram" and a[kind]["losses"]), None)
    if eng is not None:
        ax.axvline(eng[kind]["mean"], color="tab:blue", lw=0.8, ls=":")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("loss (nats/token): seeds as dots, mean ± std")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)


def _ladder_panel(ax: Any, arms: list[Mapping[str, Any]], ladder: list[Mapping[str, Any]],
                  kind: str, color: str, title: str) -> None:  # fmt: skip
    """Loss against table slots (log scale) for one text, with the no-table controls as lines."""
    pts = sorted((a for a in ladder if a[kind]["losses"]), key=lambda a: a["table_slots"])
    ax.errorbar([a["table_slots"] for a in pts], [a[kind]["mean"] for a in pts],
                yerr=[a[kind]["std"] or 0.0 for a in pts], fmt="o-", color=color,
                capsize=3, label="table of this size")  # fmt: skip
    for ref, ls in (("no-information", "--"), ("experts", ":"), ("baseline", "-.")):
        r = next((a for a in arms if a["name"] == ref and a[kind]["losses"]), None)
        if r is not None:
            ax.axhline(r[kind]["mean"], color="gray", ls=ls, lw=1, label=ref)
    ax.set_xscale("log")
    ax.set_xlabel("table slots (log scale), same heads and backbone")
    ax.set_ylabel("loss (nats/token), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)


def plot_ablation_panels(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """An ablation report (`AblationResult.to_dict()`): every arm in-domain and on the second
    text, then the capacity ladder (loss against table slots, log scale) with the no-table
    controls, one panel per text so that each keeps its own loss scale."""
    arms = report["arms"]
    has_second = any(a["second"]["losses"] for a in arms)
    ladder = [a for a in arms if a["scale"] is not None]
    kinds = [k for k in ("val", "second") if sum(bool(a[k]["losses"]) for a in ladder) > 1]
    n = 1 + has_second + len(kinds)
    fig = Figure(figsize=(5.2 * n, 4.2))
    _arm_panel(fig.add_subplot(1, n, 1), arms, "val", "held-out split (in-domain)")
    second_title = f"second text: {report.get('second_text')}"
    if has_second:
        _arm_panel(fig.add_subplot(1, n, 2), arms, "second", second_title)
    for col, kind in enumerate(kinds, start=2 + has_second):
        color, title = (
            ("tab:blue", "capacity ladder, in-domain")
            if kind == "val"
            else ("tab:green", "capacity ladder, " + second_title)
        )
        _ladder_panel(fig.add_subplot(1, n, col), arms, ladder, kind, color, title)
    fig.tight_layout()
    return _save(fig, path)
