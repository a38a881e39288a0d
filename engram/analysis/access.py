"""How an Engram layer's table is read on real text: the row-access distribution and what a
hot-row cache in front of the table would hit.

``row_access_counts`` hashes a token stream with a layer's indexer and counts how often every
global row id is read; ``fit_zipf`` fits the rank-frequency law count ~ rank^-s;
``hit_rate_curve`` replays the access trace through a real :class:`~engram.store.cache.
CachedRowStore` (or computes the ideal static cache) for several capacities; ``plot_access``
draws both; ``analyze_access`` runs it all on the built-in corpus and returns a JSON-able report.

Axes used in shape comments: T tokens, H sub-tables of the layer (one row read per sub-table and
token), A = T*H row reads (the trace), U distinct rows read.

Design choices:
- The trace of a layer is exactly what its ``Engram.lookup`` would gather: for each token in time
  order, the H GLOBAL row ids (local row + sub-table offset), flattened to (T*H,). Document
  boundaries reset the n-gram window as in training (``NgramIndexer.rows``), and the rows read by
  the padded windows at a document start are real reads, so they are counted.
- Counting is sparse: ``np.unique`` over the trace, so nothing of the table's size is allocated
  (tables may have billions of rows).
- Zipf fit: least squares of log(count) = c - s * log(rank) over the HEAD of the rank-frequency
  curve, ranks 1..r_max with r_max = min(``max_rank`` = 10^4, the last rank whose count is >=
  ``min_count`` = 2), so the singleton plateau of the tail (where rank no longer resolves
  frequency) is excluded. The fit uses ~64 log-spaced ranks in that range rather than every rank:
  with every rank, the last decade would hold 90% of the points and the slope would be that of
  the noisy low-count staircase; log spacing weighs every decade of rank equally (the standard
  remedy). ``r2`` is the coefficient of determination of that fit in log-log space.
- Hit-rate curves replay the trace in calls of ``batch`` consecutive ids (default 512 = 64 tokens
  of a layer with H = 8, a prefill chunk; use ``batch = H`` to mimic one decode step per call)
  through a real ``CachedRowStore`` in front of a cheap synthetic inner store (row i = [i], so no
  table is materialised) and report the cache's own ``stats().hit_rate`` (per requested id, the
  cold start included). Policy ``"static"`` is the ideal static cache chosen in hindsight: the k
  most frequent rows of the whole trace, preloaded, hit rate = their share of all reads. It is
  the best any FIXED set of k rows can do on this trace, hence a natural reference for a
  frequency cache; a dynamic policy can beat it on a trace whose hot set drifts, so it is not a
  bound on LFU/LRU. Every policy is bounded by 1 - (distinct rows / reads) without preloading
  (each row's first read is a miss).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

from engram.atomic import atomic_write_bytes, atomic_write_text
from engram.store.base import check_row_ids
from engram.store.cache import CachedRowStore

PathLike = str | os.PathLike[str]

POLICIES: Final = ("static", "lfu", "lru")
DEFAULT_FRACTIONS: Final = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)
DEFAULT_BATCH: Final = 512
PNG_FILE: Final = "access.png"
JSON_FILE: Final = "access.json"


# ----------------------------------------------------------------------------- the trace


def access_trace(indexer: Any, raw_ids: Any, layer_id: int) -> np.ndarray:
    """Global row ids read by Engram layer ``layer_id`` for raw token ids (T,) or (B, T), in
    time order (sequence by sequence): (B*T*H,) int64."""
    ids = np.asarray(raw_ids.cpu() if isinstance(raw_ids, Tensor) else raw_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"raw_ids must be (T,) or (B, T), got shape {ids.shape}")
    hasher = indexer.hasher
    if layer_id not in hasher.layer_ids:
        raise ValueError(
            f"layer_id {layer_id} is not an Engram layer; expected one of {hasher.layer_ids}"
        )
    compressed = indexer.compressor.compress(ids)  # (B, T), as NgramIndexer.rows does
    rows = np.asarray(hasher.hash(compressed, layer_id, sep_id=indexer.sep_id))  # (B, T, H) local
    sizes = np.asarray(hasher.flat_table_sizes(layer_id), dtype=np.int64)  # (H,)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (H,)
    return (rows + offsets).reshape(-1)  # (B*T*H,)


def row_access_counts(indexer: Any, raw_ids: Any, layer_id: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each global row of layer ``layer_id`` is read for raw ids (T,) or (B, T).

    Returns (ids (U,), counts (U,)) int64 over the rows read at least once, sorted by count
    descending (ties by id ascending). Sparse: nothing of the table's size is allocated.
    """
    return _sorted_counts(access_trace(indexer, raw_ids, layer_id))


def _sorted_counts(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, counts = np.unique(np.asarray(trace, dtype=np.int64), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return ids[order], counts[order].astype(np.int64)


# ----------------------------------------------------------------------------- Zipf fit


@dataclass(frozen=True)
class ZipfFit:
    """count(rank) ~ exp(intercept) * rank^-exponent, fitted over ranks 1..max_rank_used."""

    exponent: float  # s
    intercept: float  # c, natural log of the fitted count at rank 1
    r2: float  # coefficient of determination in log-log space
    n_distinct: int  # rows read at least once
    total: int  # reads
    n_points: int  # log-spaced ranks used in the fit
    max_rank_used: int  # r_max
    min_count: int

    def predict(self, rank: Any) -> np.ndarray:
        """Fitted counts at ``rank`` (array-like, ranks from 1)."""
        return np.exp(self.intercept - self.exponent * np.log(np.asarray(rank, dtype=float)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_zipf(
    counts: Any, *, max_rank: int = 10_000, min_count: int = 2, n_points: int = 64
) -> ZipfFit:
    """Fit log(count) = c - s * log(rank) over the head of the rank-frequency curve.

    ``counts``: per-row read counts in any order (zeros are ignored). The fit uses ~``n_points``
    log-spaced ranks in 1..r_max, r_max = min(max_rank, last rank with count >= min_count); see
    the module docstring. Raises ``ValueError`` with fewer than 3 distinct ranks to fit.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    c = np.sort(c[c > 0])[::-1]  # (U,) descending
    if int(max_rank) < 3 or int(n_points) < 3 or int(min_count) < 1:
        raise ValueError(
            f"need max_rank >= 3, n_points >= 3 and min_count >= 1, got {max_rank}, {n_points}, "
            f"{min_count}"
        )
    r_max = min(int(max_rank), int(np.count_nonzero(c >= int(min_count))))
    ranks = np.unique(np.round(np.geomspace(1, max(r_max, 1), int(n_points))).astype(np.int64))
    if r_max < 3 or len(ranks) < 3:
        raise ValueError(
            f"too few frequent rows to fit a Zipf law: {r_max} rows are read >= {min_count} times "
            "(need at least 3); use more tokens"
        )
    x, y = np.log(ranks.astype(float)), np.log(c[ranks - 1].astype(float))
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return ZipfFit(
        exponent=float(-slope),
        intercept=float(intercept),
        r2=r2,
        n_distinct=len(c),
        total=int(c.sum()),
        n_points=len(ranks),
        max_rank_used=int(r_max),
        min_count=int(min_count),
    )


# ----------------------------------------------------------------------------- hit rates


class _IdRowStore:
    """A free inner store for replays: row i is [float(i)] (float64 holds ids < 2^53 exactly)."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = int(num_rows)
        self.dim = 1
        self.dtype = torch.float64

    def gather(self, rows: Tensor) -> Tensor:
        check_row_ids(rows, self.num_rows, what="_IdRowStore.gather")
        return rows.to(torch.float64).unsqueeze(-1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def apply_row_update(self, rows: Tensor, delta: Tensor) -> None:
        raise NotImplementedError("the replay store is read-only")


def static_hit_rate(counts: Any, size: int) -> float:
    """Hit rate of the ideal static cache of ``size`` rows: the share of all reads that go to
    the ``size`` most frequent rows (``counts`` per row, any order)."""
    c = np.sort(np.asarray(counts, dtype=np.int64).reshape(-1))[::-1]
    total = int(c.sum())
    return float(c[: max(0, int(size))].sum()) / total if total else 0.0


def hit_rate_curve(
    trace: Any,
    cache_sizes: Sequence[int],
    policy: str = "lfu",
    *,
    batch: int = DEFAULT_BATCH,
    num_rows: int | None = None,
) -> list[tuple[int, float]]:
    """Hit rate of a ``policy`` cache ("lfu", "lru" or the ideal "static") of each size (rows)
    on ``trace`` (A,) row ids in access order: [(size, hit_rate), ...] in the given order.

    "lfu"/"lru" replay the trace through a fresh ``CachedRowStore`` per size, ``batch`` ids per
    ``gather`` call; ``num_rows`` (default max id + 1) is the table size the cache sits in front
    of. A size of 0 hits nothing.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ids = np.asarray(trace, dtype=np.int64).reshape(-1)  # (A,)
    sizes = [int(s) for s in cache_sizes]
    if any(s < 0 for s in sizes):
        raise ValueError(f"cache sizes must be >= 0, got {sizes}")
    if ids.size == 0:
        return [(s, 0.0) for s in sizes]
    if ids.min() < 0:
        raise ValueError("trace ids must be >= 0")
    if policy == "static":
        _, counts = _sorted_counts(ids)
        cum = np.concatenate([[0], np.cumsum(counts)])  # (U+1,)
        return [(s, float(cum[min(s, len(counts))]) / float(cum[-1])) for s in sizes]
    n = int(ids.max()) + 1 if num_rows is None else int(num_rows)
    inner = _IdRowStore(n)
    chunks = torch.from_numpy(ids).split(int(batch))
    out = []
    for s in sizes:
        if s == 0:
            out.append((s, 0.0))
            continue
        cache = CachedRowStore(inner, capacity_rows=s, policy=policy, check_bounds=False)
        for chunk in chunks:
            cache.gather(chunk)
        out.append((s, cache.stats().hit_rate))
    return out


def compulsory_bound(trace: Any) -> float:
    """1 - distinct/reads: the hit rate of an infinite cache that starts empty (every row's first
    read misses); no cache without preloading does better on ``trace``."""
    ids = np.asarray(trace).reshape(-1)
    return 1.0 - len(np.unique(ids)) / ids.size if ids.size else 0.0


# ----------------------------------------------------------------------------- plot


def plot_access(
    counts: Any,
    fit: ZipfFit | None,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: PathLike,
    *,
    num_rows: int | None = None,
    title: str = "Engram row accesses",
) -> Path:
    """Two panels, written atomically as PNG: the rank-frequency curve (log-log) with the fitted
    Zipf line, and hit rate against cache size (a fraction of ``num_rows`` if given, else rows;
    log x) for each policy in ``curves``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = np.sort(np.asarray(counts, dtype=np.int64).reshape(-1))[::-1]
    c = c[c > 0]
    fig = Figure(figsize=(11, 4.2))
    ax = fig.add_subplot(1, 2, 1)
    ranks = np.arange(1, len(c) + 1)
    ax.loglog(ranks, c, ".", ms=2, color="tab:blue", alpha=0.6, label="rows (by rank)")
    if fit is not None:
        r = np.geomspace(1, max(fit.max_rank_used, 2), 50)
        ax.loglog(r, fit.predict(r), "-", color="tab:red", lw=1.5,
                  label=f"Zipf fit s={fit.exponent:.2f} (R²={fit.r2:.3f})")  # fmt: skip
        ax.axvline(fit.max_rank_used, color="tab:gray", ls=":", lw=1, label="fit range end")
    ax.set_xlabel("rank")
    ax.set_ylabel("reads")
    ax.set_title("rank-frequency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(1, 2, 2)
    styles = {"static": ("k--", "ideal static (top-k)"), "lfu": ("o-", "TinyLFU"),
              "lru": ("s-", "LRU")}  # fmt: skip
    for name, points in curves.items():
        if not points:
            continue
        xs = np.array([p[0] for p in points], dtype=float)
        ys = np.array([p[1] for p in points], dtype=float)
        keep = xs > 0
        if num_rows:
            xs = xs / float(num_rows)
        fmt, label = styles.get(name, ("^-", name))
        ax.plot(xs[keep], ys[keep], fmt, ms=4, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("cache size (fraction of the table)" if num_rows else "cache size (rows)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.set_title("hot-row cache hit rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title)

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------- report


@dataclass
class AccessReport:
    """What ``analyze_access`` measured (and wrote, when given an output directory)."""

    layer_id: int
    n_tokens: int
    n_subtables: int  # H
    num_rows: int  # rows of the layer's table
    n_reads: int  # T * H
    n_distinct: int  # rows read at least once
    fit: ZipfFit
    curves: dict[str, list[tuple[int, float]]]  # policy -> [(size, hit_rate)]
    top_share: dict[str, float]  # "top 0.1%" -> share of reads going to that fraction of rows
    compulsory_bound: float
    batch: int
    source: dict[str, Any] = field(default_factory=dict)
    png: Path | None = None
    json: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"source": self.source} if self.source else {}),
            "layer_id": self.layer_id,
            "n_tokens": self.n_tokens,
            "n_subtables": self.n_subtables,
            "num_rows": self.num_rows,
            "n_reads": self.n_reads,
            "n_distinct": self.n_distinct,
            "distinct_fraction_of_table": self.n_distinct / self.num_rows,
            "zipf": self.fit.to_dict(),
            "top_share": self.top_share,
            "compulsory_bound": self.compulsory_bound,
            "batch_ids_per_call": self.batch,
            "hit_rate": {
                policy: [
                    {"rows": s, "fraction": s / self.num_rows, "hit_rate": round(h, 6)}
                    for s, h in points
                ]
                for policy, points in self.curves.items()
            },
            "files": {
                k: p.name for k, p in (("png", self.png), ("json", self.json)) if p is not None
            },
        }


def _train_tokens(
    indexer: Any, data_source: str, max_tokens: int, cache_dir: PathLike | None
) -> np.ndarray:
    from engram.data import DataConfig, prepare_data
    from engram.tokenizer import separator_id

    if indexer.tokenizer is None:
        raise ValueError("the indexer has no tokenizer; pass raw_ids instead of a data source")
    cfg = DataConfig(source=data_source, cache_dir=None if cache_dir is None else str(cache_dir))
    splits = prepare_data(cfg, indexer.tokenizer, separator_id(indexer.tokenizer))
    return np.asarray(splits.train.tokens[: int(max_tokens)], dtype=np.int64)


def analyze_access(
    out_dir: PathLike | None = None,
    *,
    indexer: Any | None = None,
    cfg: Any | None = None,
    raw_ids: Any | None = None,
    data_source: str = "builtin",
    max_tokens: int = 200_000,
    layer_id: int | None = None,
    cache_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    policies: Sequence[str] = POLICIES,
    batch: int | None = None,
    tokens_per_call: int = 64,
    cache_dir: PathLike | None = None,
) -> AccessReport:
    """Measure one Engram layer's row-access distribution and cache hit rates on real text.

    Tokens: ``raw_ids`` if given, else the first ``max_tokens`` tokens of the TRAINING split of
    ``data_source`` (``engram.data.prepare_data``; ``cache_dir`` is its token cache). Rows: the
    ``indexer`` (default ``NgramIndexer.builtin(cfg)``, ``cfg`` default ``small_config()``),
    layer ``layer_id`` (default its first Engram layer). Caches of ``cache_fractions`` of the
    table are replayed with ``batch`` ids per call (default ``tokens_per_call * H``). With
    ``out_dir``, writes ``access.png`` and ``access.json`` there.
    """
    if indexer is None:
        from engram.indexer import NgramIndexer

        indexer = NgramIndexer.builtin(cfg)
    hasher = indexer.hasher
    layer = hasher.layer_ids[0] if layer_id is None else int(layer_id)
    if raw_ids is None:
        tokens = _train_tokens(indexer, data_source, max_tokens, cache_dir)
        source: dict[str, Any] = {"data_source": data_source, "split": "train"}
    else:
        tokens = np.asarray(raw_ids, dtype=np.int64)
        source = {"data_source": "raw_ids"}
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown policies {bad}; expected a subset of {list(POLICIES)}")
    trace = access_trace(indexer, tokens, layer)  # (A,)
    H = hasher.n_subtables
    num_rows = hasher.total_rows(layer)
    _, counts = _sorted_counts(trace)
    fit = fit_zipf(counts)
    sizes = sorted({max(1, round(float(f) * num_rows)) for f in cache_fractions})
    step = int(batch) if batch is not None else int(tokens_per_call) * H
    curves = {p: hit_rate_curve(trace, sizes, p, batch=step, num_rows=num_rows) for p in policies}
    top_share = {
        f"top {f * 100:g}%": static_hit_rate(counts, max(1, round(f * num_rows)))
        for f in (0.001, 0.01, 0.1)
    }
    report = AccessReport(
        layer_id=layer,
        n_tokens=int(tokens.size),
        n_subtables=H,
        num_rows=num_rows,
        n_reads=int(trace.size),
        n_distinct=len(counts),
        fit=fit,
        curves=curves,
        top_share=top_share,
        compulsory_bound=compulsory_bound(trace),
        batch=step,
        source=source,
    )
    if out_dir is not None:
        out = Path(out_dir)
        report.png = plot_access(
            counts, fit, curves, out / PNG_FILE, num_rows=num_rows,
            title=f"Engram layer {layer}: {tokens.size} tokens, {num_rows} rows",
        )  # fmt: skip
        report.json = out / JSON_FILE
        atomic_write_text(report.json, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze access`'s text: reads, the Zipf fit, hit rate by cache size."""
    fit = d["zipf"]
    lines = [
        f"layer {d['layer_id']}: {d['n_reads']:,} row reads from {d['n_tokens']:,} tokens hit "
        f"{d['n_distinct']:,} of {d['num_rows']:,} rows",
        f"Zipf exponent {fit['exponent']:.3f} (R^2 {fit['r2']:.3f}); reads taken by the "
        + ", ".join(f"{k} of rows: {v:.1%}" for k, v in d["top_share"].items()),
        "hit rate by cache size (rows):",
    ]
    for policy, curve in d["hit_rate"].items():
        cells = "  ".join(f"{c['rows']:,}:{c['hit_rate']:.1%}" for c in curve)
        lines.append(f"  {policy:<7} {cells}")
    return lines
