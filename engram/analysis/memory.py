"""The memory explorer: which rows an n-gram hits, how full those rows are, who else is there.

Two questions a user asks of a trained Engram memory:

- *an n-gram* (text): which row does it hit in each Engram layer and head, what is that row's
  norm (and its percentile in the layer), and how many OTHER frequent corpus n-grams collide on
  the same row (``explore_ngram``);
- *a row* (layer, head, local row): which frequent corpus n-grams map to it (``explore_row``).

``analyze_memory`` answers both for a run directory and writes ``memory.json``, a
self-contained ``memory.html`` (rendered by ``engram.analysis.memory_html``) and
``row_norms.png``, plus per-layer and per-head statistics that compare the observed collisions
with what uniform hashing predicts. The frequent corpus n-grams come from
``engram.analysis.ngram_counts`` (compressed ids, the document rule, the corpus, the cache).

Axes used in shape comments: U frequent n-grams of one order, n the order, N the largest
order, L Engram layers, H = (N-1)*K sub-tables ("heads") per layer, R rows of a layer's table.

Design choices:
- Rows of the frequent n-grams are computed by the run's own hasher (``NgramHasher.hash_all``)
  on each n-gram as a short sequence of exactly n ids and read at its last position: no pad is
  involved and the bits are those the model reads wherever the n-gram ends in real text (the
  tests check this against ``hash_all`` of real corpus text). Sub-tables are per (order, head),
  so collisions only happen between n-grams of the same order.
- A query text gets a leading space unless it starts with whitespace (``leading_space=True``):
  GPT-2's BPE marks word starts with a space, and inside running text (where the corpus n-grams
  come from) every word carries one, so "king of Babylon" is read as " king| of| Babylon". The
  compressor lowercases and strips, so the space rarely changes the compressed ids, but it can
  change how BPE splits a word ("Babylon" alone vs " Babylon"). For each order n the queried
  n-gram is the LAST n tokens of the text, and its rows are what the model reads at the text's
  last token when the text starts a document; a text shorter than n gives a padded n-gram
  (marked ``padded``; it has no corpus count).
- Norms are L2 norms of the table rows (float32, as stored), read from the layer's row store
  (``store.weight`` when there is one, else chunked ``store.gather``). Percentile of a norm =
  percentage of the layer's rows (all sub-tables) with a norm <= it.
- Uniform-hashing references: with u frequent n-grams of an order in a sub-table of p rows,
  another n-gram shares a given n-gram's row with probability 1/p, so the expected number of
  colliders is (u - 1) / p (~ u / p) and the expected fraction of rows hit is 1 - (1 - 1/p)^u.
- A run without Engram layers is refused with ``NoEngramError`` (a ``ValueError``; by
  ``analyze_memory`` before any weights are read, via ``engram.analysis.runs``).
- Outputs are written atomically (``engram.atomic``); the HTML escapes every text, uses inline
  CSS and embeds the PNG as a data URI, so it loads no external resource.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engram.analysis.html import write_html
from engram.analysis.memory_html import memory_page, visible
from engram.analysis.memory_report import HeadHit, MemoryReport, NgramEntry, NgramReport, RowReport
from engram.analysis.ngram_counts import (
    COUNTS_FILE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_COUNT,
    NgramCounts,
    OrderCounts,
    corpus_counts,
)
from engram.analysis.runs import load_engram_run, require_engram
from engram.atomic import atomic_write_bytes, atomic_write_text
from engram.hashing import NgramHasher
from engram.layer import Engram
from engram.train import RunParts

PathLike = str | os.PathLike[str]

_HASH_CHUNK: Final = 1 << 16  # n-grams hashed per hash_all call (bounds the (L, U, n, H) buffer)
_GATHER_CHUNK: Final = 1 << 16  # rows per gather when a store has no weight tensor


# ============================================================================ collisions


@dataclass(frozen=True, eq=False)
class HeadCollisions:
    """Where the frequent n-grams of one sub-table's order land, and who shares each row."""

    layer_id: int
    head: int  # flat sub-table index 0..H-1 (orders ascending, heads within)
    order: int
    head_in_order: int
    table_size: int  # p, the sub-table's prime size
    offset: int  # first global row of the sub-table in the layer's table
    rows: np.ndarray  # (U,) local row of each frequent n-gram (indexes OrderCounts arrays)
    on_row: np.ndarray  # (U,) frequent n-grams on that row, itself included
    mass_on_row: np.ndarray  # (U,) total corpus count on that row
    by_row: np.ndarray  # (U,) n-gram indices sorted by row (stable)
    sorted_rows: np.ndarray  # (U,) rows[by_row]

    def members(self, row: int) -> np.ndarray:
        """Indices (into the order's arrays) of the frequent n-grams on local ``row``."""
        lo = np.searchsorted(self.sorted_rows, row, side="left")
        hi = np.searchsorted(self.sorted_rows, row, side="right")
        return self.by_row[lo:hi]

    def stats(self) -> dict[str, Any]:
        """Observed collisions next to the uniform-hashing expectation."""
        u, p = len(self.rows), self.table_size
        hit = len(np.unique(self.rows))
        return {
            "head": self.head,
            "order": self.order,
            "head_in_order": self.head_in_order,
            "table_size": p,
            "n_frequent": u,
            "rows_hit": hit,
            "frac_rows_hit": hit / p,
            "expected_frac_rows_hit_uniform": 1.0 - (1.0 - 1.0 / p) ** u,
            "mean_collisions": float(np.mean(self.on_row - 1)) if u else 0.0,
            "expected_collisions_uniform": max(u - 1, 0) / p,
            "max_ngrams_on_a_row": int(self.on_row.max()) if u else 0,
        }


def frequent_rows(hasher: NgramHasher, grams: np.ndarray) -> np.ndarray:
    """Rows of every layer for n-grams of one order, each hashed as a sequence of exactly n ids
    and read at its last position: grams (U, n) -> (L, U, K) local rows of that order's heads."""
    U, n = grams.shape
    K = hasher.n_head_per_ngram
    out = np.empty((len(hasher.layer_ids), U, K), dtype=np.int64)
    for a in range(0, U, _HASH_CHUNK):
        chunk = np.ascontiguousarray(grams[a : a + _HASH_CHUNK], dtype=np.int64)  # (u, n)
        rows = hasher.hash_all(chunk)  # (L, u, n, H)
        out[:, a : a + len(chunk)] = rows[:, :, n - 1, (n - 2) * K : (n - 1) * K]
    return out


def _head_collisions(
    layer_id: int, head: int, order: int, k: int, size: int, offset: int,
    rows: np.ndarray, counts: np.ndarray,
) -> HeadCollisions:  # fmt: skip
    by_row = np.argsort(rows, kind="stable")  # (U,)
    srt = rows[by_row]
    on_row = np.zeros(len(rows), dtype=np.int64)
    mass = np.zeros(len(rows), dtype=np.int64)
    if len(rows):
        _, starts, n_on = np.unique(srt, return_index=True, return_counts=True)
        group_mass = np.add.reduceat(counts[by_row], starts)  # (G,)
        on_row[by_row] = np.repeat(n_on, n_on)
        mass[by_row] = np.repeat(group_mass, n_on)
    return HeadCollisions(layer_id, head, order, k, size, offset, rows, on_row, mass, by_row, srt)


@dataclass(frozen=True, eq=False)
class LayerMemory:
    """One Engram layer: its row norms and the collision structure of each of its heads."""

    layer_id: int
    table_sizes: tuple[int, ...]  # (H,)
    offsets: np.ndarray  # (H,) first global row of each sub-table
    norms: np.ndarray  # (R,) float L2 norm of every table row
    sorted_norms: np.ndarray  # (R,)
    heads: list[HeadCollisions]

    @property
    def n_rows(self) -> int:
        return int(self.norms.shape[0])

    def percentile(self, norm: float, head: int | None = None) -> float:
        """Percentage of the layer's rows (or of one sub-table's) with a norm <= ``norm``."""
        if head is None:
            return 100.0 * np.searchsorted(self.sorted_norms, norm, side="right") / self.n_rows
        a = int(self.offsets[head])
        sub = self.norms[a : a + self.table_sizes[head]]
        return 100.0 * float(np.count_nonzero(sub <= norm)) / len(sub)

    def touched(self) -> np.ndarray:
        """(R,) bool: rows hit by at least one frequent n-gram."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for h in self.heads:
            mask[h.offset + h.rows] = True
        return mask

    def stats(self) -> dict[str, Any]:
        """Per-layer and per-head occupancy and collisions, with uniform-hashing expectations."""
        heads = [h.stats() for h in self.heads]
        u = np.array([s["n_frequent"] for s in heads], dtype=np.float64)
        touched = self.touched()
        total_u = float(u.sum())
        exp_hit = sum(s["table_size"] * s["expected_frac_rows_hit_uniform"] for s in heads)
        mean_c = sum(s["mean_collisions"] * s["n_frequent"] for s in heads)
        exp_c = sum(s["expected_collisions_uniform"] * s["n_frequent"] for s in heads)
        norms_t, norms_u = self.norms[touched], self.norms[~touched]
        return {
            "layer_id": self.layer_id,
            "table_rows": self.n_rows,
            "n_frequent_ngram_head_pairs": int(total_u),
            "rows_hit": int(touched.sum()),
            "frac_rows_hit": float(touched.mean()),
            "expected_frac_rows_hit_uniform": exp_hit / self.n_rows,
            "mean_collisions": mean_c / total_u if total_u else 0.0,
            "expected_collisions_uniform": exp_c / total_u if total_u else 0.0,
            "mean_norm_hit": float(norms_t.mean()) if len(norms_t) else None,
            "mean_norm_not_hit": float(norms_u.mean()) if len(norms_u) else None,
            "heads": heads,
        }


def table_row_norms(layer: Engram) -> np.ndarray:
    """(R,) L2 norm of every row of an Engram layer's table, computed in the stored dtype."""
    store = layer.store
    weight = getattr(store, "weight", None)
    with torch.no_grad():
        if isinstance(weight, torch.Tensor):
            norms = torch.linalg.norm(weight.detach(), dim=1)
        else:
            parts = []
            for a in range(0, store.num_rows, _GATHER_CHUNK):
                ids = torch.arange(a, min(a + _GATHER_CHUNK, store.num_rows))
                parts.append(torch.linalg.norm(store.gather(ids).detach(), dim=1))
            norms = torch.cat(parts)
    return norms.float().cpu().numpy().astype(np.float64)


class MemoryIndex:
    """Every Engram layer of a run with the collision structure of a set of counts.

    Build once (``MemoryIndex.build(parts, counts)``) and pass it to ``explore_ngram`` /
    ``explore_row`` as ``index=`` to answer many queries without re-hashing.
    """

    def __init__(
        self, parts: RunParts, counts: NgramCounts, layers: dict[int, LayerMemory]
    ) -> None:
        self.parts = parts
        self.counts = counts
        self.layers = layers

    @classmethod
    def build(cls, parts: RunParts, counts: NgramCounts) -> MemoryIndex:
        indexer = require_engram(parts, "the memory explorer")
        hasher = indexer.hasher
        N, K = hasher.max_ngram_size, hasher.n_head_per_ngram
        _check_counts(parts, counts)
        model_layers = parts.model.engram_layers()
        per_order = {n: frequent_rows(hasher, counts.order(n).grams) for n in range(2, N + 1)}
        layers: dict[int, LayerMemory] = {}
        for li, layer_id in enumerate(hasher.layer_ids):
            layer = model_layers[layer_id]
            sizes = tuple(hasher.flat_table_sizes(layer_id))
            if tuple(layer.table_sizes) != sizes:
                raise ValueError(
                    f"layer {layer_id}: model table sizes {layer.table_sizes} differ from the "
                    f"hasher's {sizes}"
                )
            offsets = layer.offsets.detach().cpu().numpy().astype(np.int64)  # (H,)
            heads = []
            for head in range(hasher.n_subtables):
                n, k = 2 + head // K, head % K
                rows_h = per_order[n][li, :, k]  # (U,)
                where = (layer_id, head, n, k, sizes[head], int(offsets[head]))
                heads.append(_head_collisions(*where, rows_h, counts.order(n).counts))
            norms = table_row_norms(layer)
            layers[layer_id] = LayerMemory(layer_id, sizes, offsets, norms, np.sort(norms), heads)
        return cls(parts, counts, layers)

    def layer(self, layer_id: int) -> LayerMemory:
        _check_int("layer_id", layer_id)
        if layer_id not in self.layers:
            raise ValueError(
                f"layer_id {layer_id} is not an Engram layer of this run; Engram layers are "
                f"{sorted(self.layers)}"
            )
        return self.layers[layer_id]

    def stats(self) -> list[dict[str, Any]]:
        return [m.stats() for m in self.layers.values()]


def _check_counts(parts: RunParts, counts: NgramCounts) -> None:
    N = parts.indexer.cfg.max_ngram_size
    if counts.max_order < N:
        raise ValueError(f"counts go up to order {counts.max_order}, the run hashes up to {N}")
    fp = counts.meta.get("compressor_fingerprint")
    if fp != parts.compressor.fingerprint:
        raise ValueError(
            "the counts were taken with another tokenizer compressor than this run's; "
            "recount them for this run"
        )
    sep = counts.meta.get("compressed_sep_id")
    if parts.indexer.sep_id is not None and sep != parts.indexer.sep_id:
        raise ValueError(
            f"counts reset at compressed separator {sep}, the run's indexer at "
            f"{parts.indexer.sep_id}"
        )


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


# ============================================================================ queries


def _entry(parts: RunParts, oc: OrderCounts, i: int) -> NgramEntry:
    ids = [int(t) for t in oc.surface[i]]
    text = parts.tokenizer.decode(ids, skip_special_tokens=False)
    return NgramEntry(text, [parts.indexer.token_text(t) for t in ids], int(oc.counts[i]))


def _top(oc: OrderCounts, members: np.ndarray, limit: int) -> np.ndarray:
    """Members sorted by count descending (stable: lexicographic among ties), first ``limit``."""
    order = np.argsort(-oc.counts[members], kind="stable")
    return members[order[: max(0, limit)]]


def explore_ngram(
    parts: RunParts,
    counts: NgramCounts,
    text: str,
    *,
    top: int = 5,
    leading_space: bool = True,
    index: MemoryIndex | None = None,
) -> NgramReport:
    """For each Engram layer, order n and head: the row the last n tokens of ``text`` hit, its
    norm and percentile, the n-gram's corpus count, and the frequent n-grams colliding there."""
    indexer = require_engram(parts, "the memory explorer")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    index = index if index is not None else MemoryIndex.build(parts, counts)
    tokenized = " " + text if leading_space and not text[:1].isspace() else text
    ids = indexer.encode(tokenized)  # (T,) raw
    if len(ids) == 0:
        raise ValueError(f"{text!r} tokenizes to nothing")
    comp = np.asarray(indexer.compressor.compress(ids), dtype=np.int64)  # (T,)
    rows = indexer.rows(ids[None])[:, 0, -1, :]  # (L, H): what the model reads at the last token
    # Tokens since the document start (a separator inside the text resets the hash there too).
    sep = indexer.sep_id
    seps = np.flatnonzero(comp[:-1] == sep) if sep is not None else np.zeros(0, dtype=np.int64)
    doc_len = len(ids) - (int(seps[-1]) + 1 if len(seps) else 0)
    K = indexer.cfg.n_head_per_ngram
    hits: list[HeadHit] = []
    for li, layer_id in enumerate(indexer.hasher.layer_ids):
        mem = index.layer(layer_id)
        for hc in mem.heads:
            n = hc.order
            oc = counts.order(n)
            m = min(n, doc_len)
            gram_ids = [int(t) for t in ids[len(ids) - m :]]
            padded = m < n
            i = None if padded else counts.find(comp[len(ids) - n :])
            local = int(rows[li, hc.head])
            members = hc.members(local)
            others = members[members != i] if i is not None else members
            norm = float(mem.norms[hc.offset + local])
            u = len(oc)
            shown = ["<pad>"] * (n - m) + [indexer.token_text(t) for t in gram_ids]
            hits.append(
                HeadHit(
                    layer_id=layer_id,
                    head=hc.head,
                    order=n,
                    head_in_order=hc.head % K,
                    ngram_text=parts.tokenizer.decode(gram_ids, skip_special_tokens=False),
                    ngram_tokens=shown,
                    padded=padded,
                    local_row=local,
                    global_row=hc.offset + local,
                    table_size=hc.table_size,
                    norm=norm,
                    norm_percentile=float(mem.percentile(norm)),
                    norm_percentile_head=float(mem.percentile(norm, hc.head)),
                    count=0 if i is None else int(oc.counts[i]),
                    frequent=i is not None,
                    n_colliding=len(others),
                    colliding_mass=int(oc.counts[others].sum()),
                    expected_colliding_uniform=(u - (i is not None)) / hc.table_size,
                    top_colliders=[_entry(parts, oc, int(j)) for j in _top(oc, others, top)],
                )
            )
    tokens = [indexer.token_text(int(t)) for t in ids]
    return NgramReport(text, tokenized, tokens, hits)


def explore_row(
    parts: RunParts,
    counts: NgramCounts,
    layer_id: int,
    head: int,
    row: int,
    *,
    limit: int = 20,
    index: MemoryIndex | None = None,
) -> RowReport:
    """The frequent corpus n-grams that map to local ``row`` of sub-table ``head`` (flat index,
    orders ascending then heads) of Engram layer ``layer_id``, sorted by count; the row's norm."""
    indexer = require_engram(parts, "the memory explorer")
    for name, value in (("layer_id", layer_id), ("head", head), ("row", row)):
        _check_int(name, value)
    layer_id, head, row = int(layer_id), int(head), int(row)
    if layer_id not in indexer.hasher.layer_ids:
        raise ValueError(
            f"layer_id {layer_id} is not an Engram layer of this run; Engram layers are "
            f"{indexer.hasher.layer_ids}"
        )
    H, K = indexer.hasher.n_subtables, indexer.cfg.n_head_per_ngram
    if not 0 <= head < H:
        raise ValueError(
            f"head {head} is out of range [0, {H}): layer {layer_id} has (N-1)*K = "
            f"{H // K}*{K} sub-tables (orders ascending, heads within)"
        )
    size = indexer.hasher.flat_table_sizes(layer_id)[head]
    if not 0 <= row < size:
        raise ValueError(
            f"row {row} is out of range [0, {size}) for layer {layer_id} head {head} "
            f"(order {2 + head // K}, head {head % K} of that order); rows are local to the "
            "sub-table"
        )
    index = index if index is not None else MemoryIndex.build(parts, counts)
    mem = index.layer(layer_id)
    hc = mem.heads[head]
    oc = counts.order(hc.order)
    members = hc.members(row)
    norm = float(mem.norms[hc.offset + row])
    return RowReport(
        layer_id=layer_id,
        head=head,
        order=hc.order,
        head_in_order=hc.head_in_order,
        local_row=row,
        global_row=hc.offset + row,
        table_size=hc.table_size,
        norm=norm,
        norm_percentile=float(mem.percentile(norm)),
        n_ngrams=len(members),
        mass=int(oc.counts[members].sum()),
        expected_ngrams_uniform=len(oc) / hc.table_size,
        ngrams=[_entry(parts, oc, int(j)) for j in _top(oc, members, limit)],
    )


# ============================================================================ report


def analyze_memory(
    run_dir: PathLike,
    out_dir: PathLike,
    ngrams: Sequence[str] = (),
    rows: Sequence[tuple[int, int, int]] = (),
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    min_count: int = DEFAULT_MIN_COUNT,
    data_source: str | None = None,
    *,
    counts_path: PathLike | None = None,
    top: int = 5,
    limit: int = 20,
    leading_space: bool = True,
) -> MemoryReport:
    """Explore a trained run's memory: n-gram and row queries plus occupancy statistics.

    ``rows`` are (layer_id, head, local row). Counts are cached in ``counts_path`` (default
    ``out_dir/ngram_counts.npz``) and reused while their fingerprint matches. Writes
    ``memory.json``, ``memory.html`` and ``row_norms.png`` into ``out_dir``.
    """
    if isinstance(ngrams, str):
        raise TypeError("ngrams must be a list of strings, not one string")
    queries = [tuple(q) for q in rows]
    for q in queries:
        if len(q) != 3:
            raise ValueError(f"a row query is (layer_id, head, row), got {q!r}")
    t0 = time.perf_counter()
    parts, ckpt = load_engram_run(run_dir, "the memory explorer")
    out = Path(out_dir)
    cache = Path(counts_path) if counts_path is not None else out / COUNTS_FILE
    t1 = time.perf_counter()
    counts, reused = corpus_counts(
        parts, max_tokens=max_tokens, min_count=min_count, data_source=data_source,
        cache_path=cache,
    )  # fmt: skip
    t2 = time.perf_counter()
    index = MemoryIndex.build(parts, counts)
    t3 = time.perf_counter()
    ngram_reports = [
        explore_ngram(parts, counts, q, top=top, leading_space=leading_space, index=index)
        for q in ngrams
    ]
    row_reports = [
        explore_row(parts, counts, layer_id, head, row, limit=limit, index=index)
        for layer_id, head, row in queries
    ]
    t4 = time.perf_counter()
    summary = dict(counts.summary(), cache=str(cache), reused=reused)
    report = MemoryReport(
        run_dir=str(run_dir),
        run_name=parts.cfg.name,
        step=int(ckpt.step),
        hash_fingerprint=str(parts.hash_fingerprint),
        counts=summary,
        layers=index.stats(),
        ngrams=ngram_reports,
        rows=row_reports,
        timings={
            "load_s": t1 - t0,
            "counts_s": t2 - t1,
            "index_s": t3 - t2,
            "queries_s": t4 - t3,
        },
    )
    png = _row_norms_png(index, ngram_reports, row_reports)
    report.paths = {
        "json": out / "memory.json",
        "html": out / "memory.html",
        "png": out / "row_norms.png",
        "counts": cache,
    }
    atomic_write_bytes(report.paths["png"], png)
    report.timings["total_s"] = time.perf_counter() - t0
    write_html(report.paths["html"], memory_page(report, png))
    atomic_write_text(report.paths["json"], json.dumps(report.to_dict(), indent=1) + "\n")
    return report


# ============================================================================ outputs

_COLORS: Final = ["tab:red", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:olive"]


def _row_norms_png(
    index: MemoryIndex, ngram_reports: list[NgramReport], row_reports: list[RowReport]
) -> bytes:
    """Per layer: histograms of row norms, rows hit vs never hit by frequent n-grams, with the
    queried rows as vertical lines (one color per query)."""
    layers = list(index.layers.values())
    fig = Figure(figsize=(8, 3.2 * len(layers)))
    for i, mem in enumerate(layers):
        ax = fig.add_subplot(len(layers), 1, i + 1)
        touched = mem.touched()
        lo, hi = float(mem.norms.min()), float(mem.norms.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        n_hit = int(touched.sum())
        hit_label = f"hit by frequent n-grams ({n_hit} rows)"
        ax.hist(mem.norms[touched], bins=bins, alpha=0.6, color="tab:blue", label=hit_label)
        miss_label = f"never hit ({mem.n_rows - n_hit} rows)"
        ax.hist(mem.norms[~touched], bins=bins, alpha=0.6, color="tab:gray", label=miss_label)
        ax.set_yscale("log")
        c = 0
        for rep in ngram_reports:
            xs = [h.norm for h in rep.hits if h.layer_id == mem.layer_id]
            color = _COLORS[c % len(_COLORS)]
            c += 1
            label = f"“{_short(rep.tokenized)}” ({len(xs)} heads)"
            for j, x in enumerate(xs):
                ax.axvline(x, color=color, lw=1.2, alpha=0.85, label=label if j == 0 else None)
        for rr in row_reports:
            if rr.layer_id != mem.layer_id:
                continue
            color = _COLORS[c % len(_COLORS)]
            c += 1
            label = f"row {rr.local_row} of head {rr.head}"
            ax.axvline(rr.norm, color=color, lw=1.5, ls="--", label=label)
        ax.set_title(f"Engram layer {mem.layer_id}: table row norms ({mem.n_rows} rows)")
        ax.set_xlabel("row L2 norm")
        ax.set_ylabel("rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _short(text: str, n: int = 30) -> str:
    text = visible(text.strip())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_text(d: dict[str, Any]) -> list[str]:
    """`engram analyze memory`'s text: per-layer collisions, n-gram hits, rows explained."""
    lines = []
    for layer in d["layers"]:
        lines.append(
            f"layer {layer['layer_id']}: {layer['frac_rows_hit']:.2%} of rows hit by a frequent "
            f"n-gram; {layer['mean_collisions']:.2f} collisions per frequent n-gram "
            f"(uniform hashing: {layer['expected_collisions_uniform']:.2f})"
        )
    for q in d["ngrams"]:
        lines.append(f"n-gram {q['tokenized']!r}:")
        for h in q["hits"]:
            lines.append(
                f"  layer {h['layer_id']} head {h['head']} ({h['ngram_text']!r}, count "
                f"{h['count']}): row {h['local_row']}, norm {h['norm']:.3f} "
                f"(p{h['norm_percentile']:.0f}), {h['n_colliding']} colliding n-grams"
            )
    for r in d["rows"]:
        top = ", ".join(f"{g['text']!r} x{g['count']}" for g in r["ngrams"][:5])
        lines.append(
            f"row {r['layer_id']}:{r['head']}:{r['local_row']} (norm {r['norm']:.3f}): "
            f"{r['n_ngrams']} frequent n-grams: {top}"
        )
    return lines
