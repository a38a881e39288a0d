"""Sensitivity: what the model loses when its Engram memory is switched off at inference.

`analyze_sensitivity(run_dir, out_dir)` loads a trained Engram run and measures, over the same
validation batches, the loss of the model as trained, with every Engram layer switched off, and
(with more than one layer) with each layer off on its own. Per predicted token it takes
delta = loss_off - loss_normal (positive: the memory helped that prediction), then writes into
`out_dir`:

- `sensitivity.png`: validation loss per condition, and the distribution of per-token deltas;
- `sensitivity.html`: a validation passage (~200 tokens) coloured by delta (diverging: red = the
  model does worse without Engram, blue = better); tooltips give both losses;
- `sensitivity.json`: the losses per condition, delta statistics, the target token types that
  lose the most (and the least) on average, and the single positions that lose the most, each
  with the tokens before it as context.

Design choices:
- `engram_disabled` shadows the chosen layers' `forward` on the instances (removed afterwards,
  even on error) with one returning zeros shaped like its input `h`, so `h + engram(h)` is `h`:
  the backbone runs exactly as if those Engram layers were absent. No model code changes, and
  nothing else (attention, experts, the other layers, hyper-connections) is touched. Outside the
  block the model is bit-for-bit what it was.
- `per_token_loss` captures the final-norm output with a forward hook (removed afterwards) and
  computes the cross-entropy of every position in float32 chunks against the LM head, so the
  (B, T, V) logits never exist at once; its mean is `engram.train.evaluate`'s loss on the same
  batches (proven in the tests). Losses are returned as float64, shaped like the targets.
- The passage in the html is the first validation windows, concatenated: windows are contiguous
  text, but the model reads each one separately (attention and the memory's conv restart at each
  window start), as in validation; the page says so.
- A run (or model) without Engram layers is refused with `NoEngramError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from engram.analysis.hidden import shared_val_data
from engram.analysis.html import token_heat_html, write_html
from engram.analysis.runs import NoEngramError, load_engram_run
from engram.atomic import atomic_write_text
from engram.indexer import NgramIndexer
from engram.model import EngramLM
from engram.plots import _save

_MISSING = object()
CONTEXT_TOKENS = 8  # tokens of context shown before each listed position (the input included)


@contextmanager
def engram_disabled(
    model: EngramLM, layer_ids: Iterable[int] | None = None
) -> Iterator[tuple[int, ...]]:
    """Inside the block the chosen Engram layers (default: all) contribute exactly zero.

    Yields the layer ids switched off. Raises `NoEngramError` for a model without Engram layers
    and `ValueError` for an id that is not an Engram layer of `model`.
    """
    layers = model.engram_layers()
    if not layers:
        raise NoEngramError("this model has no Engram layers to switch off")
    ids = tuple(layers) if layer_ids is None else tuple(dict.fromkeys(int(i) for i in layer_ids))
    unknown = [i for i in ids if i not in layers]
    if unknown:
        raise ValueError(
            f"layer ids {unknown} are not Engram layers of this model; it has {list(layers)}"
        )
    saved: dict[int, Any] = {}

    def off(
        hidden: Tensor, rows: Tensor, mask: Tensor | None = None, conv_state: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        y = torch.zeros_like(hidden)
        return y if conv_state is None else (y, conv_state)

    try:
        for lid in ids:
            saved[lid] = layers[lid].__dict__.get("forward", _MISSING)
            layers[lid].forward = off  # type: ignore[method-assign]
        yield ids
    finally:
        for lid, prev in saved.items():
            if prev is _MISSING:
                layers[lid].__dict__.pop("forward", None)
            else:
                layers[lid].forward = prev  # type: ignore[method-assign]


@torch.no_grad()
def per_token_loss(
    model: EngramLM,
    indexer: NgramIndexer | None,
    batches: Iterable[tuple[Any, Any]],
    *,
    chunk: int = 1024,
) -> np.ndarray:
    """Next-token cross-entropy at every position of `(x, y)` batches (numpy or torch, (B, T)).

    Returns float64 (sum of B over batches, T): the batches' rows stacked in order, so entry
    [i, t] is the loss of target y[i, t]. Targets equal to -1 give NaN. Runs in eval mode and
    float32 (no autocast), on the model's device.
    """
    device = model.tok_emb.weight.device
    weight = model.lm_head.weight
    bias = model.lm_head.bias
    captured: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for x_in, y_in in batches:
            x = torch.as_tensor(x_in, dtype=torch.long).cpu()
            y = torch.as_tensor(y_in, dtype=torch.long)
            if x.dim() != 2 or tuple(y.shape) != tuple(x.shape):
                raise ValueError(
                    f"batches must be (x, y) of equal shape (B, T), got {tuple(x.shape)} and "
                    f"{tuple(y.shape)}"
                )
            rows = None if indexer is None else torch.as_tensor(indexer.rows(x.numpy()))
            captured.clear()
            model(x.to(device), None if rows is None else rows.to(device), return_logits=False)
            if len(captured) != 1:
                raise RuntimeError(f"expected one final-norm call per forward, saw {len(captured)}")
            h = captured[0].reshape(-1, captured[0].shape[-1]).float()  # (N, D)
            t = y.reshape(-1).to(device)  # (N,)
            w32 = weight.float()
            losses = torch.empty(t.shape[0], dtype=torch.float32, device=device)
            valid = t != -1
            safe_t = torch.where(valid, t, 0)
            for s in range(0, t.shape[0], chunk):
                logits = h[s : s + chunk] @ w32.T  # (C, V)
                if bias is not None:
                    logits += bias.float()
                losses[s : s + chunk] = F.cross_entropy(
                    logits, safe_t[s : s + chunk], reduction="none"
                )  # (C,)
            arr = losses.double().cpu().numpy().reshape(tuple(y.shape))
            arr[y.numpy() == -1] = np.nan
            out.append(arr)
    finally:
        handle.remove()
        model.train(was_training)
    if not out:
        raise ValueError("per_token_loss got no batches")
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class SensitivityReport:
    """What `analyze_sensitivity` measured and wrote (arrays are (windows, T), like targets)."""

    conditions: dict[str, float]  # "normal", "engram off", "layer L off" -> mean val loss
    inputs: np.ndarray  # int64 input ids
    targets: np.ndarray  # int64 target ids
    loss_normal: np.ndarray  # float64 per-token loss as trained
    loss_off: np.ndarray  # float64 per-token loss with every Engram layer off
    stats: dict[str, float]  # summary of delta = loss_off - loss_normal
    types_losing: list[dict[str, Any]]  # target token types, highest mean delta first
    types_gaining: list[dict[str, Any]]  # lowest mean delta first
    positions: list[dict[str, Any]]  # single positions, highest delta first, with context
    min_count: int
    png: Path
    html: Path
    json: Path
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> np.ndarray:
        return self.loss_off - self.loss_normal

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"source": self.source} if self.source else {}),
            "n_windows": int(self.targets.shape[0]),
            "seq_len": int(self.targets.shape[1]),
            "n_tokens": int(self.targets.size),
            "val_loss": {k: round(v, 6) for k, v in self.conditions.items()},
            "delta": self.stats,
            "min_count": self.min_count,
            "token_types_losing_most": self.types_losing,
            "token_types_losing_least": self.types_gaining,
            "positions_losing_most": self.positions,
            "files": {"png": self.png.name, "html": self.html.name},
        }


def _token_types(
    targets: np.ndarray, delta: np.ndarray, normal: np.ndarray, off: np.ndarray,
    text: Any, min_count: int, top: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    ok = ~np.isnan(delta)
    ids, inverse = np.unique(targets[ok], return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids))

    def per_type(v: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=v[ok], minlength=len(ids)) / counts

    mean_d, mean_n, mean_o = per_type(delta), per_type(normal), per_type(off)
    keep = np.flatnonzero(counts >= min_count)
    order = keep[np.argsort(-mean_d[keep], kind="stable")]

    def item(k: int) -> dict[str, Any]:
        return {
            "token": text(int(ids[k])),
            "id": int(ids[k]),
            "count": int(counts[k]),
            "mean_delta": round(float(mean_d[k]), 4),
            "sum_delta": round(float(mean_d[k] * counts[k]), 3),
            "mean_loss_normal": round(float(mean_n[k]), 4),
            "mean_loss_off": round(float(mean_o[k]), 4),
        }

    return [item(int(k)) for k in order[:top]], [item(int(k)) for k in order[::-1][:top]]


def _positions(
    inputs: np.ndarray, targets: np.ndarray, normal: np.ndarray, off: np.ndarray,
    text: Any, seq_text: Any, top: int,
) -> list[dict[str, Any]]:  # fmt: skip
    delta = np.nan_to_num(off - normal, nan=-np.inf).ravel()
    T = targets.shape[1]
    out = []
    for flat in np.argsort(-delta, kind="stable")[:top]:
        w, t = divmod(int(flat), T)
        ctx = inputs[w, max(0, t - CONTEXT_TOKENS + 1) : t + 1]
        out.append(
            {
                "window": w,
                "position": t,
                "context": seq_text(ctx),
                "target": text(int(targets[w, t])),
                "loss_normal": round(float(normal[w, t]), 4),
                "loss_off": round(float(off[w, t]), 4),
                "delta": round(float(off[w, t] - normal[w, t]), 4),
            }
        )
    return out


def plot_sensitivity(
    conditions: dict[str, float], delta: np.ndarray, path: str | os.PathLike[str]
) -> Path:
    """Two panels: validation loss per condition (bars), and a histogram of per-token deltas."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
    names, values = list(conditions), list(conditions.values())
    colors = ["tab:blue" if k == "normal" else "tab:red" if k == "engram off" else "tab:orange"
              for k in names]  # fmt: skip
    bars = ax1.bar(range(len(names)), values, color=colors)
    ax1.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=9)
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 0.05) * 0.6
    ax1.set_ylim(max(0.0, lo - pad), hi + pad)
    for b, v in zip(bars, values, strict=True):
        ax1.text(b.get_x() + b.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("validation loss, Engram on vs off (y axis zoomed)", fontsize=10)
    ax1.grid(axis="y", alpha=0.3)

    d = delta[~np.isnan(delta)].ravel()
    lo_q, hi_q = np.quantile(d, [0.002, 0.998]) if d.size else (-1.0, 1.0)
    span = max(abs(lo_q), abs(hi_q), 1e-6)
    ax2.hist(np.clip(d, -span, span), bins=100, range=(-span, span), color="tab:gray")
    ax2.set_yscale("log")
    ax2.axvline(0.0, color="black", lw=0.8)
    ax2.axvline(float(d.mean()) if d.size else 0.0, color="tab:red", lw=1.2, ls="--",
                label=f"mean {d.mean():+.4f}" if d.size else "mean")  # fmt: skip
    ax2.set_xlabel("per-token delta = loss(Engram off) - loss(normal)  [clipped to 99.6% range]")
    ax2.set_ylabel("tokens")
    frac = float((d > 0).mean()) if d.size else 0.0
    ax2.set_title(f"{d.size:,} validation tokens; {frac:.1%} lose without Engram", fontsize=10)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def _passage_html(
    report_inputs: tuple[np.ndarray, np.ndarray, np.ndarray], text: Any, n_tokens: int,
    conditions: dict[str, float],
) -> str:  # fmt: skip
    targets, normal, off = report_inputs
    T = targets.shape[1]
    n_win = min(targets.shape[0], -(-n_tokens // T))
    tgt = targets[:n_win].ravel()[:n_tokens]
    ln, lo = normal[:n_win].ravel()[:n_tokens], off[:n_win].ravel()[:n_tokens]
    delta = lo - ln
    finite = np.abs(delta[~np.isnan(delta)])
    span = float(np.quantile(finite, 0.98)) if finite.size else 1.0
    span = span if span > 0 else 1.0
    notes = [
        f"Validation loss: normal {conditions['normal']:.4f}, every Engram layer off "
        f"{conditions['engram off']:.4f} nats/token (over all validation batches read).",
        "Each token is a predicted target, coloured by delta = loss(Engram off) - loss(normal): "
        "red = the model does worse without its memory, blue = better, white = no change "
        f"(colour scale clipped at +-{span:.3g}, the 98th percentile of |delta| on this page).",
        f"The passage is the first {len(tgt)} validation targets; the model reads them in "
        f"windows of {T} tokens (attention and the memory's conv restart every {T} tokens), "
        "exactly as validation does.",
    ]
    return token_heat_html(
        "Engram sensitivity: what each token loses without the memory",
        [text(int(i)) for i in tgt],
        {"delta (off - normal)": delta},
        vmin=-span, vmax=span, diverging=True, notes=notes,
        extra={"loss normal": ln, "loss Engram off": lo},
    )  # fmt: skip


def sensitivity_report(
    model: EngramLM,
    indexer: NgramIndexer,
    batches: Sequence[tuple[Any, Any]],
    out_dir: str | os.PathLike[str],
    *,
    per_layer: bool = True,
    top: int = 30,
    min_count: int = 10,
    passage_tokens: int = 200,
    source: dict[str, Any] | None = None,
) -> SensitivityReport:
    """The sensitivity report of an in-memory model on `batches` (see the module docstring);
    `analyze_sensitivity` loads a run and its validation batches and calls this."""
    layers = model.engram_layers()
    if not layers:
        raise NoEngramError("this model has no Engram layers: there is nothing to switch off")
    batches = list(batches)
    if not batches:
        raise ValueError("no validation batches to measure on")
    inputs = np.concatenate([np.asarray(torch.as_tensor(x).cpu()) for x, _ in batches]).astype(
        np.int64
    )
    targets = np.concatenate([np.asarray(torch.as_tensor(y).cpu()) for _, y in batches]).astype(
        np.int64
    )
    normal = per_token_loss(model, indexer, batches)
    with engram_disabled(model):
        off = per_token_loss(model, indexer, batches)
    conditions = {"normal": float(np.nanmean(normal)), "engram off": float(np.nanmean(off))}
    if per_layer and len(layers) > 1:
        for lid in layers:
            with engram_disabled(model, [lid]):
                conditions[f"layer {lid} off"] = float(
                    np.nanmean(per_token_loss(model, indexer, batches))
                )

    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            cache[i] = indexer.token_text(i)
        return cache[i]

    def seq_text(ids: np.ndarray) -> str:  # decoded together: multi-byte characters survive
        if indexer.tokenizer is None:
            return "".join(text(int(i)) for i in ids)
        return indexer.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    delta = off - normal
    d = delta[~np.isnan(delta)]
    stats = {
        "mean": round(float(d.mean()), 6),
        "median": round(float(np.median(d)), 6),
        "std": round(float(d.std()), 6),
        "frac_positive": round(float((d > 0).mean()), 4),
        "p01": round(float(np.quantile(d, 0.01)), 4),
        "p99": round(float(np.quantile(d, 0.99)), 4),
    }
    losing, gaining = _token_types(targets, delta, normal, off, text, min_count, top)
    positions = _positions(inputs, targets, normal, off, text, seq_text, top)

    out = Path(out_dir)
    png = plot_sensitivity(conditions, delta, out / "sensitivity.png")
    page = _passage_html((targets, normal, off), text, passage_tokens, conditions)
    html_path = write_html(out / "sensitivity.html", page)
    json_path = out / "sensitivity.json"
    report = SensitivityReport(
        conditions, inputs, targets, normal, off, stats, losing, gaining, positions, min_count,
        png, html_path, json_path, dict(source or {}),
    )  # fmt: skip
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    return report


def analyze_sensitivity(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    max_batches: int | None = None,
    per_layer: bool = True,
    data_source: str | None = None,
    top: int = 30,
    *,
    min_count: int = 10,
    passage_tokens: int = 200,
) -> SensitivityReport:
    """Load the trained Engram run `run_dir`, measure its validation loss with Engram on and off
    over the run's own validation batches (the first `max_batches`, default all; `data_source`
    replaces `DataConfig.source`), and write the report into `out_dir`.

    Token types are listed only when they occur at least `min_count` times as targets.
    Refuses a run without Engram layers (`NoEngramError`).
    """
    parts, ckpt = load_engram_run(run_dir, "the sensitivity analysis")
    assert parts.indexer is not None
    data = shared_val_data(parts, data_source)
    batches = list(data.val_batches(max_batches))
    source = {
        "run_dir": os.fspath(run_dir),
        "checkpoint": ckpt.path.name,
        "step": ckpt.step,
        "data_source": data.cfg.source,
        "max_batches": max_batches,
    }
    return sensitivity_report(
        parts.model, parts.indexer, batches, out_dir, per_layer=per_layer, top=top,
        min_count=min_count, passage_tokens=passage_tokens, source=source,
    )  # fmt: skip


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze sensitivity`'s text: losses, the per-token change, the most hurt types."""
    loss = d["val_loss"]
    lines = [f"validation loss over {d['n_tokens']:,} tokens:"]
    lines += [f"  {name:<24} {v:.4f}" for name, v in loss.items()]
    st = d["delta"]
    lines.append(
        f"per-token loss change with Engram off: mean {st['mean']:+.4f}, median "
        f"{st['median']:+.4f}, {st['frac_positive']:.1%} of tokens lose"
    )
    types = ", ".join(f"{t['token']!r} {t['mean_delta']:+.2f}"
                      for t in d["token_types_losing_most"][:8])  # fmt: skip
    lines.append(f"token types losing the most: {types}")
    return lines
