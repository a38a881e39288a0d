"""Linear CKA between the layers of two models read on the same tokens.

For features X (n, d1) and Y (n, d2) with centered columns,
    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
which equals the normalised HSIC of the linear kernels XX^T and YY^T (Kornblith et al., 2019)
but costs d x d memory instead of n x n. It is invariant to orthogonal transforms and isotropic
scaling of either side, not to arbitrary invertible linear maps; 1 means the same geometry.

Design choices:
- `linear_cka` is the one-shot reference: it centers the data it is given, in float64.
- `CKAAccumulator` streams: it keeps, per feature set, the count, the column sums and X^T X, and
  per pair of sets Y^T X, all float64, and centers only when asked
  (C_yx = S_yx - n m_y m_x^T). To keep that subtraction from cancelling when the means are large
  next to the spread (residual streams often have a large mean direction), every set is first
  shifted by its FIRST batch's column means; the shift cancels exactly in the centered result.
  Memory is sum_ij d_i d_j * 8 bytes for the pairs: 25 x 128 x 128 x 8 B = 3.3 MB for two
  4-block models with d = 128.
- `cka_matrix` reads both models with `block_outputs` (forward hooks) on the same tokens, each
  with its own rows (the two models may have different Engram configurations, or none), and
  refuses batches whose tokens differ. Every token of every batch counts.
- `analyze_cka` loads two runs, reads them on the first run's validation tokens and writes
  `cka.png` (heatmap: rows = run A's layers, columns = run B's; "emb" = embedding output, "i" = the
  output of the i-th block, 0-based index i-1) and `cka.json`, both atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from engram.analysis.hidden import (
    PathLike,
    block_outputs,
    data_summary,
    load_runs,
    shared_val_data,
    val_inputs,
)
from engram.analysis.lens import check_max_batches, layer_labels
from engram.atomic import atomic_write_text
from engram.model import EngramLM
from engram.plots import _save

ArrayLike = np.ndarray | Tensor


def _features(name: str, a: Any) -> Tensor:
    """A 2-D float64 tensor of finite values (kept on its device), or a clear error."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(a.shape)}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no features: shape {tuple(a.shape)}, expected d >= 1")
    a = a.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} holds non-finite values (nan or inf)")
    return a


def _cka_from_centered(cross: Tensor, gram_x: Tensor, gram_y: Tensor, what: str) -> float:
    """||C_yx||_F^2 / (||C_xx||_F ||C_yy||_F) from centered cross-products (float64)."""
    norm_x = float(torch.linalg.matrix_norm(gram_x))
    norm_y = float(torch.linalg.matrix_norm(gram_y))
    for side, norm in (("X", norm_x), ("Y", norm_y)):
        if norm == 0.0:
            raise ValueError(f"{what}: {side} is constant over the tokens (zero variance)")
    return float(torch.linalg.matrix_norm(cross) ** 2) / (norm_x * norm_y)


def linear_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA of X (n, d1) and Y (n, d2), rows = the same n examples; in [0, 1]."""
    x, y = _features("X", X), _features("Y", Y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and Y must hold the same examples: X has n={x.shape[0]} rows, Y n={y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 examples (rows), got n={x.shape[0]}")
    y = y.to(x.device)
    x = x - x.mean(dim=0)  # (n, d1)
    y = y - y.mean(dim=0)  # (n, d2)
    return _cka_from_centered(y.T @ x, x.T @ x, y.T @ y, "linear_cka")


class _Moments:
    """Count, shifted column sums and shifted X^T X of one feature set."""

    def __init__(self, first: Tensor) -> None:
        self.shift = first.mean(dim=0)  # (d,)
        self.dim = first.shape[1]
        self.sum = torch.zeros_like(self.shift)  # (d,)
        self.gram = first.new_zeros(self.dim, self.dim)  # (d, d)

    def add(self, shifted: Tensor) -> None:
        self.sum += shifted.sum(dim=0)
        self.gram += shifted.T @ shifted

    def centered(self, n: int) -> Tensor:
        m = self.sum / n  # (d,) mean of the shifted values
        return self.gram - n * torch.outer(m, m)  # (d, d)


class CKAAccumulator:
    """Streaming linear CKA between every feature set of side A and every one of side B.

    `update(xs, ys)` takes a batch: `xs` one (n, d_i) array or a sequence of them (side A),
    `ys` likewise (side B), all with the same n rows (the same examples). The number of sets
    and their widths are fixed by the first update. `matrix()` gives the (len(xs), len(ys))
    CKA values over every row seen so far; `value()` the single one when both sides hold one
    set. The result equals `linear_cka` on the concatenated rows.
    """

    def __init__(self) -> None:
        self.n = 0
        self._a: list[_Moments] = []
        self._b: list[_Moments] = []
        self._cross: list[list[Tensor]] = []  # [i][j] (d_bj, d_ai) shifted Y_j^T X_i

    @staticmethod
    def _as_list(side: str, sets: ArrayLike | Sequence[ArrayLike]) -> list[Tensor]:
        items = [sets] if isinstance(sets, np.ndarray | Tensor) else list(sets)
        if not items:
            raise ValueError(f"{side} is empty; expected at least one (n, d) feature array")
        return [_features(f"{side}[{i}]", a) for i, a in enumerate(items)]

    def update(
        self, xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike]
    ) -> CKAAccumulator:
        """Add one batch of rows (see the class docstring). Returns self."""
        a, b = self._as_list("xs", xs), self._as_list("ys", ys)
        device = a[0].device
        b = [y.to(device) for y in b]
        n = a[0].shape[0]
        if n == 0:
            raise ValueError("xs[0] has no rows (n=0); expected a batch of at least one example")
        for side, sets in (("xs", a), ("ys", b)):
            for i, t in enumerate(sets):
                if t.shape[0] != n:
                    raise ValueError(
                        f"every feature array of a batch must have the same rows: xs[0] has "
                        f"n={n}, {side}[{i}] has n={t.shape[0]}"
                    )
        if not self._a:
            self._a = [_Moments(t) for t in a]
            self._b = [_Moments(t) for t in b]
            self._cross = [[t.new_zeros(m.dim, s.dim) for m in self._b] for s in self._a]
        for side, sets, moments in (("xs", a, self._a), ("ys", b, self._b)):
            widths = [t.shape[1] for t in sets]
            expected = [m.dim for m in moments]
            if widths != expected:
                raise ValueError(
                    f"{side} widths {widths} differ from the first batch's {expected}: every "
                    f"batch must hold the same feature sets"
                )
        shifted_a = [t - m.shift.to(t.device) for t, m in zip(a, self._a, strict=True)]
        shifted_b = [t - m.shift.to(t.device) for t, m in zip(b, self._b, strict=True)]
        for t, m in zip(shifted_a, self._a, strict=True):
            m.add(t)
        for t, m in zip(shifted_b, self._b, strict=True):
            m.add(t)
        for i, ta in enumerate(shifted_a):
            for j, tb in enumerate(shifted_b):
                self._cross[i][j] += tb.T @ ta  # (d_bj, d_ai)
        self.n += n
        return self

    def matrix(self) -> np.ndarray:
        """CKA of every (A set, B set) pair over the rows seen: float64 (len(xs), len(ys))."""
        if self.n < 2:
            raise ValueError(f"CKA needs at least 2 examples (rows), got n={self.n}")
        n = self.n
        gram_a = [m.centered(n) for m in self._a]
        gram_b = [m.centered(n) for m in self._b]
        out = np.empty((len(self._a), len(self._b)), dtype=np.float64)
        for i, ma in enumerate(self._a):
            mean_a = ma.sum / n  # (d_ai,)
            for j, mb in enumerate(self._b):
                cross = self._cross[i][j] - n * torch.outer(mb.sum / n, mean_a)  # (d_bj, d_ai)
                out[i, j] = _cka_from_centered(cross, gram_a[i], gram_b[j], f"pair ({i}, {j})")
        return out

    def value(self) -> float:
        """The CKA when both sides hold a single feature set."""
        if len(self._a) != 1 or len(self._b) != 1:
            raise ValueError(
                f"value() needs one feature set per side, got {len(self._a)} x {len(self._b)}; "
                "use matrix()"
            )
        return float(self.matrix()[0, 0])


def cka_matrix(
    model_a: EngramLM,
    model_b: EngramLM,
    batches_a: Iterable[tuple[Tensor, Tensor | None]],
    batches_b: Iterable[tuple[Tensor, Tensor | None]],
) -> np.ndarray:
    """Linear CKA between every layer of `model_a` and every layer of `model_b`.

    `batches_a` and `batches_b` yield (x (B, T), rows or None) for the SAME tokens x, each with
    the rows of its own model (as `val_inputs` does). Returns float64 (La + 1, Lb + 1): rows are
    model A's layers, columns model B's (0 = embedding output, i = after 0-based block i-1).
    """
    return _cka(model_a, model_b, batches_a, batches_b)[0]


def _cka(
    model_a: EngramLM,
    model_b: EngramLM,
    batches_a: Iterable[tuple[Tensor, Tensor | None]],
    batches_b: Iterable[tuple[Tensor, Tensor | None]],
) -> tuple[np.ndarray, int, int]:
    """(CKA matrix, tokens read, batches read)."""
    acc = CKAAccumulator()
    it_a, it_b = iter(batches_a), iter(batches_b)
    n_batches = 0
    while True:
        item_a, item_b = next(it_a, None), next(it_b, None)
        if item_a is None and item_b is None:
            break
        if item_a is None or item_b is None:
            short = "batches_a" if item_a is None else "batches_b"
            raise ValueError(f"{short} ended after {n_batches} batches; the other did not")
        (xa, rows_a), (xb, rows_b) = item_a, item_b
        if xa.shape != xb.shape or not torch.equal(xa.cpu(), xb.cpu()):
            raise ValueError(
                f"batch {n_batches}: the two models must read the same tokens; got x of shapes "
                f"{tuple(xa.shape)} and {tuple(xb.shape)}"
                + (" with different ids" if xa.shape == xb.shape else "")
            )
        ha = block_outputs(model_a, xa, rows_a)  # La + 1 of (B, T, D_a)
        hb = block_outputs(model_b, xb, rows_b)  # Lb + 1 of (B, T, D_b)
        acc.update(
            [h.reshape(-1, h.shape[-1]) for h in ha], [h.reshape(-1, h.shape[-1]) for h in hb]
        )
        n_batches += 1
    if acc.n < 2:
        raise ValueError(f"CKA needs at least 2 tokens, got {acc.n} (from {n_batches} batches)")
    return acc.matrix(), acc.n, n_batches


@dataclass(frozen=True)
class CKAReport:
    """Linear CKA between the layers of two runs on the same tokens, and the files written."""

    names: tuple[str, str]  # (run A, run B)
    run_dirs: tuple[str, str]
    matrix: np.ndarray  # (La + 1, Lb + 1): rows = run A's layers, columns = run B's
    n_tokens: int
    n_batches: int
    data: dict[str, Any]  # source, seq_len, batch_size of the tokens read
    seconds: float
    png: Path
    json: Path

    def to_dict(self) -> dict[str, Any]:
        La, Lb = self.matrix.shape[0] - 1, self.matrix.shape[1] - 1
        return {
            "metric": "linear CKA between residual streams (emb = embedding output, i = output "
            "of the i-th block)",
            "run_a": {"name": self.names[0], "run_dir": self.run_dirs[0]},
            "run_b": {"name": self.names[1], "run_dir": self.run_dirs[1]},
            "layout": "cka[i][j] = CKA(run_a layer rows[i], run_b layer cols[j])",
            "rows": layer_labels(La),
            "cols": layer_labels(Lb),
            "cka": [[float(v) for v in row] for row in self.matrix],
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "data": self.data,
            "seconds": round(self.seconds, 3),
            "png": str(self.png),
        }


def plot_cka(matrix: np.ndarray, names: tuple[str, str], path: PathLike) -> Path:
    """Heatmap of `matrix` (rows = run A's layers, cols = run B's), values written in the cells
    when the matrix is small enough to read them."""
    n_rows, n_cols = matrix.shape
    fig = Figure(figsize=(1.0 + 0.6 * max(n_cols, 4) + 1.2, 1.0 + 0.6 * max(n_rows, 4)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    ax.set_yticks(np.arange(n_rows), layer_labels(n_rows - 1))
    ax.set_xticks(np.arange(n_cols), layer_labels(n_cols - 1))
    ax.set_ylabel(f"{names[0]}: layer")
    ax.set_xlabel(f"{names[1]}: layer")
    ax.set_title("linear CKA of the residual stream")
    if n_rows <= 16 and n_cols <= 16:
        for i in range(n_rows):
            for j in range(n_cols):
                v = float(matrix[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")  # fmt: skip
    fig.colorbar(im, ax=ax, label="CKA")
    return _save(fig, path)


def analyze_cka(
    run_a: PathLike,
    run_b: PathLike,
    out_dir: PathLike,
    max_batches: int = 8,
    data_source: str | None = None,
) -> CKAReport:
    """Linear CKA between every layer of run A and every layer of run B (run or checkpoint
    dirs) on run A's validation tokens (`data_source` replaces their source).

    Writes `out_dir/cka.png` and `out_dir/cka.json`. Runs are named by their config names
    (suffixed " (A)"/" (B)" when equal, e.g. a run against itself).
    """
    check_max_batches(max_batches)
    t0 = time.perf_counter()
    runs = load_runs({"A": run_a, "B": run_b})
    pa, pb = runs["A"], runs["B"]
    names = (pa.cfg.name, pb.cfg.name)
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    data = shared_val_data(pa, data_source)
    matrix, n_tokens, n_batches = _cka(
        pa.model, pb.model, val_inputs(pa, data, max_batches), val_inputs(pb, data, max_batches)
    )
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_cka(matrix, names, out / "cka.png")
    report = CKAReport(
        names=names,
        run_dirs=(os.fspath(run_a), os.fspath(run_b)),
        matrix=matrix,
        n_tokens=n_tokens,
        n_batches=n_batches,
        data=data_summary(data),
        seconds=seconds,
        png=png,
        json=out / "cka.json",
    )
    atomic_write_text(report.json, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return report


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze cka`'s text: the CKA matrix, from `CKAReport.to_dict()`."""
    a, b = d["run_a"]["name"], d["run_b"]["name"]
    lines = [f"linear CKA, rows = {a} layers, columns = {b} layers ({d['n_tokens']:,} tokens)"]
    lines.append("       " + " ".join(f"{c:>6}" for c in d["cols"]))
    for lab, row in zip(d["rows"], d["cka"], strict=True):
        lines.append(f"  {lab:>4} " + " ".join(f"{v:6.3f}" for v in row))
    return lines
