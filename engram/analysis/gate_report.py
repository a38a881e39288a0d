"""Gates report: where the memory is used, per token, per Engram layer and per branch.

`analyze_gates(run_dir, out_dir)` loads a trained Engram run, reads the gate a in (0, 1) that
every Engram layer (and, with hyper-connections, every one of its M branches) applies at each
token of a text, and writes three files into `out_dir`:

- `gates.png`: a heatmap, one row per (layer, branch), tokens on x, wrapped into panels of
  `PANEL_TOKENS` tokens so every label stays readable; at most `PNG_MAX_TOKENS` tokens are
  drawn (the title says so when a text is longer; the html and json always hold every token);
- `gates.html`: the text with each token coloured by its gate (one selectable row per
  layer/branch; tooltips list every row);
- `gates.json`: the tokens, every gate value, and a ranking of the tokens with the highest and
  the lowest mean gate (mean over layers and branches).

Design choices:
- The values come from `gate_values_ids` (one forward pass; `record_gates` captures exactly what
  the model computed), so the report never re-implements the gate.
- Texts longer than the model's `max_seq_len` are REFUSED by default with a message naming both
  lengths: cutting the text into windows would reset attention and the memory's short conv at
  each window start and so report gates the model never computes on the running text. With
  `truncate=True` the report reads only the first `max_seq_len` tokens and records that in the
  json (`truncated`, `n_tokens_text`, `n_tokens_read`) and on the html page.
- A run (or model) without Engram layers is refused with `NoEngramError`, before its weights load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from engram.analysis.gates import GateReading, gate_values_ids
from engram.analysis.html import token_heat_html, write_html
from engram.analysis.runs import NoEngramError, load_engram_run
from engram.atomic import atomic_write_text
from engram.indexer import NgramIndexer
from engram.model import EngramLM
from engram.plots import _save

# Multi-token names and fixed phrases from the corpus' world (not a training sentence verbatim);
# the demo reads its gate heatmap on it too (engram.demo imports it from here).
GATE_SENTENCE = (
    "And Nebuchadnezzar the king of Babylon went up against Jerusalem, and Melchizedek "
    "king of Salem brought forth bread and wine unto the children of Israel."
)

PANEL_TOKENS = 40  # tokens per heatmap panel
PNG_MAX_TOKENS = 240  # tokens drawn in gates.png at most (6 panels)


def gate_rows(reading: GateReading) -> dict[str, np.ndarray]:
    """Row label -> (T,) gates: "layer L" per layer, or "layer L branch m" when M > 1."""
    rows: dict[str, np.ndarray] = {}
    for lid, g in reading.gates.items():
        g = np.asarray(g, dtype=np.float64)
        if g.ndim == 1:
            g = g[:, None]
        for m in range(g.shape[1]):
            rows[f"layer {lid}" if g.shape[1] == 1 else f"layer {lid} branch {m}"] = g[:, m]
    return rows


def rank_tokens(reading: GateReading, top: int = 10) -> tuple[list[dict], list[dict]]:
    """The `top` positions with the highest and with the lowest mean gate (over every row)."""
    mean = np.stack(list(gate_rows(reading).values())).mean(axis=0)  # (T,)
    order = np.argsort(-mean, kind="stable")
    k = min(top, len(mean))

    def item(i: int) -> dict[str, Any]:
        return {
            "position": int(i),
            "token": reading.tokens[i],
            "mean_gate": round(float(mean[i]), 4),
        }

    highest = [item(int(i)) for i in order[:k]]
    lowest = [item(int(i)) for i in order[::-1][:k]]
    return highest, lowest


def _tick(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "''"


def plot_gate_panels(
    tokens: list[str],
    rows: dict[str, np.ndarray],
    path: str | os.PathLike[str],
    title: str = "Engram gate per token",
    panel_tokens: int = PANEL_TOKENS,
    max_tokens: int = PNG_MAX_TOKENS,
) -> Path:
    """Heatmap of gates in [0, 1]: one row per label, tokens on x, wrapped every `panel_tokens`.

    At most `max_tokens` tokens are drawn; the title notes it when the text is longer.
    """
    labels = list(rows)
    data = np.stack([np.asarray(rows[k], dtype=float) for k in labels])  # (R, T)
    if data.shape[1] != len(tokens):
        raise ValueError(f"rows have {data.shape[1]} positions, expected {len(tokens)} tokens")
    n_total = len(tokens)
    shown = min(n_total, max_tokens)
    if shown < n_total:
        title = f"{title} (first {shown} of {n_total} tokens; all are in the html and json)"
    R = len(labels)
    n_panels = max(1, math.ceil(shown / panel_tokens))
    width = panel_tokens if n_panels > 1 else shown
    fig = Figure(
        figsize=(max(6.0, 0.36 * width + 2.5), n_panels * (1.5 + 0.32 * R) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    annotate = R <= 8
    im = None
    for p, ax in enumerate(axes):
        s, e = p * panel_tokens, min(shown, (p + 1) * panel_tokens)
        chunk = np.full((R, width), np.nan)
        chunk[:, : e - s] = data[:, s:e]
        im = ax.imshow(chunk, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(e - s), [_tick(t) for t in tokens[s:e]], rotation=60, ha="right",
                      fontsize=8)  # fmt: skip
        ax.set_yticks(range(R), labels, fontsize=8)
        ax.set_xlim(-0.5, width - 0.5)
        if n_panels > 1:
            ax.set_title(f"tokens {s}-{e - 1}", fontsize=8, loc="left")
        if annotate:
            for r in range(R):
                for c in range(e - s):
                    v = chunk[r, c]
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if v < 0.6 else "black")  # fmt: skip
    fig.suptitle(title)
    assert im is not None
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.01, label="gate a")
    return _save(fig, path)


@dataclass(frozen=True)
class GatesReport:
    """What `analyze_gates` read and wrote."""

    text: str
    reading: GateReading  # the tokens read and the gates {layer: (T, M)}
    n_tokens_text: int  # tokens in the text (more than read when truncated)
    truncated: bool
    highest: list[dict[str, Any]]  # positions with the highest mean gate
    lowest: list[dict[str, Any]]  # positions with the lowest mean gate
    png: Path
    html: Path
    json: Path
    source: dict[str, Any] = field(default_factory=dict)  # run dir, checkpoint, step

    @property
    def rows(self) -> dict[str, np.ndarray]:
        return gate_rows(self.reading)

    def to_dict(self) -> dict[str, Any]:
        rows = self.rows
        mean = np.stack(list(rows.values())).mean(axis=0)
        return {
            **({"source": self.source} if self.source else {}),
            "text": self.text,
            "n_tokens_text": self.n_tokens_text,
            "n_tokens_read": len(self.reading.tokens),
            "truncated": self.truncated,
            "tokens": self.reading.tokens,
            "gates": self.reading.to_dict()["gates"],  # layer id -> (T, M)
            "rows": {k: v.round(4).tolist() for k, v in rows.items()},  # label -> (T,)
            "mean_gate": mean.round(4).tolist(),
            "ranking": {"highest": self.highest, "lowest": self.lowest},
            "files": {"png": self.png.name, "html": self.html.name},
        }


def gates_report(
    model: EngramLM,
    indexer: NgramIndexer,
    out_dir: str | os.PathLike[str],
    text: str | None = None,
    *,
    truncate: bool = False,
    top: int = 10,
    source: dict[str, Any] | None = None,
) -> GatesReport:
    """The gates report of an in-memory model (see the module docstring); `analyze_gates` loads
    a run and calls this. `text` defaults to `GATE_SENTENCE`."""
    if not model.engram_layers():
        raise NoEngramError("this model has no Engram layers: there are no gates to report")
    if text is None:
        text = GATE_SENTENCE
    if not text.strip():
        raise ValueError("text is empty; expected a text to read the gates on")
    ids = indexer.encode(text)
    limit = model.cfg.max_seq_len
    truncated = len(ids) > limit
    if truncated and not truncate:
        raise ValueError(
            f"the text is {len(ids)} tokens but the model reads at most max_seq_len={limit}; "
            f"pass a shorter text, or truncate=True to read only its first {limit} tokens"
        )
    reading = gate_values_ids(model, indexer, ids[:limit])
    highest, lowest = rank_tokens(reading, top)
    out = Path(out_dir)
    rows = gate_rows(reading)
    png = plot_gate_panels(
        reading.tokens, rows, out / "gates.png", title="Engram gate per token (0-based layer ids)"
    )
    notes = [
        f"{len(reading.tokens)} tokens; gate a in (0, 1) per Engram layer "
        f"(0-based block ids) and branch; 1 = the memory's value passes fully."
    ]
    if truncated:
        notes.append(
            f"The text has {len(ids)} tokens; only the first {limit} (max_seq_len) are read."
        )
    if source:
        notes.append("run: " + ", ".join(f"{k}={v}" for k, v in source.items()))
    page = token_heat_html(
        "Engram gates", reading.tokens, rows, vmin=0.0, vmax=1.0, notes=notes,
        extra={"mean gate": np.stack(list(rows.values())).mean(axis=0)},
    )  # fmt: skip
    html_path = write_html(out / "gates.html", page)
    json_path = out / "gates.json"
    report = GatesReport(
        text, reading, len(ids), truncated, highest, lowest, png, html_path, json_path,
        dict(source or {}),
    )  # fmt: skip
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    return report


def analyze_gates(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    text: str | None = None,
    *,
    truncate: bool = False,
    top: int = 10,
) -> GatesReport:
    """Load the trained Engram run `run_dir` and write its gates report into `out_dir`.

    Refuses a run without Engram layers (`NoEngramError`) and, unless `truncate`, a text longer
    than the model's `max_seq_len` (`ValueError`).
    """
    parts, ckpt = load_engram_run(run_dir, "the gates report")
    assert parts.indexer is not None
    source = {"run_dir": os.fspath(run_dir), "checkpoint": ckpt.path.name, "step": ckpt.step}
    return gates_report(
        parts.model, parts.indexer, out_dir, text, truncate=truncate, top=top, source=source
    )


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze gates`'s text: mean gate per row, highest and lowest tokens."""
    lines = [f"{d['n_tokens_read']} tokens" + (" (truncated)" if d["truncated"] else "")]
    for label, values in d["rows"].items():
        lines.append(f"  {label}: mean gate {sum(values) / len(values):.3f}")
    for key in ("highest", "lowest"):
        items = ", ".join(f"{r['token']!r} {r['mean_gate']:.2f}" for r in d["ranking"][key][:8])
        lines.append(f"{key} gates: {items}")
    return lines
