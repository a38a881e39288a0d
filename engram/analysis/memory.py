"""The memory explorer: which rows an n-gram hits, how full those rows are, who else is there.

Two questions a user asks of a trained Engram memory:

- *an n-gram* (text): which row does it hit in each Engram layer and head, what is that row's
  norm (and its percentile in the layer), and how many OTHER frequent corpus n-grams collide on
  the same row (``explore_ngram``);
- *a row* (layer, head, local row): which frequent corpus n-grams map to it (``explore_row``).

``analyze_memory`` answers both for a run directory and writes ``memory.json``, a
self-contained ``memory.html`` and ``row_norms.png``, plus per-layer and per-head statistics
that compare the observed collisions with what uniform hashing predicts.

Axes used in shape comments: U frequent n-grams of one order, n the order, N the largest
order, L Engram layers, H = (N-1)*K sub-tables ("heads") per layer, R rows of a layer's table.

Design choices:
- Counts are taken on COMPRESSED ids, because that is what is hashed: surface variants that
  compress together (" King of" and " king of") are one n-gram to the memory. For display each
  compressed n-gram keeps one representative surface form, the raw ids of its first occurrence.
- Document rule, exactly the hasher's: the separator (``<|endoftext|>``) belongs to the document
  it ends, so an n-gram may END with it (the model reads that n-gram at the separator's
  position) but never contain it anywhere else, i.e. no n-gram crosses a document boundary.
  Positions whose window reaches before the document start read the pad id in the model; those
  padded windows are not corpus n-grams and are not counted (only full n-grams inside a
  document). The reset test runs on compressed ids, as the hasher's does.
- Corpus: the TRAINING split of the run's data config (``engram.data.prepare_data``; the val
  split is never read), its first ``max_tokens`` tokens in corpus order. The default (2M) covers
  the whole built-in KJV (about 1M training tokens); a smaller budget sees only the first books.
- Counting is numpy only: the n compressed ids of every valid window are packed into one int64
  key (big-endian, so key order is lexicographic order) and ``np.unique`` counts them; when
  ``n * bits(V')`` exceeds 63 bits a stable ``np.lexsort`` over the id columns does the same.
  N-grams seen fewer than ``min_count`` times are dropped (their totals are kept).
- Cache: counts are saved as ``.npz`` (atomic write; a sha256 of the arrays and a fingerprint in
  the metadata). The fingerprint covers what the counts depend on -- the data cache key (source
  content, tokenizer, separator, text field), the split (val fraction, seed), the compressor,
  max_tokens, min_count and the largest order -- but not the hash seeds or table sizes, so runs
  that differ only in their memory's shape share one count file. A file that fails to load or
  verify is rebuilt with a warning, never trusted.
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

import base64
import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engram.analysis.runs import NoEngramError, load_engram_run
from engram.atomic import atomic_write_bytes, atomic_write_text
from engram.compress import TokenizerCompressor
from engram.data import DataConfig, cache_key, prepare_data
from engram.hashing import NgramHasher
from engram.indexer import NgramIndexer
from engram.layer import Engram
from engram.tokenizer import EOT_ID
from engram.train import RunParts

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

COUNTS_FORMAT: Final = "engram.NgramCounts/1"
"""Format tag of count files; part of every counts fingerprint. Bump on any counting change."""

COUNTS_FILE: Final = "ngram_counts.npz"
DEFAULT_MAX_TOKENS: Final = 2_000_000
DEFAULT_MIN_COUNT: Final = 2
_HASH_CHUNK: Final = 1 << 16  # n-grams hashed per hash_all call (bounds the (L, U, n, H) buffer)
_GATHER_CHUNK: Final = 1 << 16  # rows per gather when a store has no weight tensor


# ============================================================================ counting


@dataclass(frozen=True, eq=False)
class OrderCounts:
    """The frequent n-grams of one order n, lexicographically sorted by compressed ids."""

    order: int
    grams: np.ndarray  # (U, n) int64 compressed ids
    counts: np.ndarray  # (U,) int64 occurrences in the corpus (all >= min_count)
    surface: np.ndarray  # (U, n) int64 raw ids of the first occurrence (for display)
    total: int  # full n-grams counted, frequent or not (the count mass of the order)
    n_distinct: int  # distinct n-grams counted, frequent or not

    def __len__(self) -> int:
        return int(self.counts.shape[0])


def _bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def _pack(mat: np.ndarray, bits: int) -> np.ndarray:
    """(M, n) non-negative ids < 2**bits -> (M,) int64 keys, first id most significant."""
    key = np.zeros(mat.shape[0], dtype=np.int64)
    for j in range(mat.shape[1]):
        key = (key << bits) | mat[:, j]
    return key


def _group_rows(mat: np.ndarray, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of mat (M, n) in lexicographic order: (first index (G,), counts (G,)).

    ``bits``: pack into int64 keys (``n * bits <= 63``), else (None) a stable lexsort.
    """
    if mat.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if bits is not None:
        _, first, counts = np.unique(_pack(mat, bits), return_index=True, return_counts=True)
        return first.astype(np.int64), counts.astype(np.int64)
    order = np.lexsort(mat[:, ::-1].T)  # stable; column 0 is the primary key
    srt = mat[order]
    new = np.ones(len(srt), dtype=bool)
    new[1:] = np.any(srt[1:] != srt[:-1], axis=1)
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(srt)))
    return order[starts].astype(np.int64), counts.astype(np.int64)


def valid_starts(compressed: np.ndarray, n: int, sep: int) -> np.ndarray:
    """Start positions of every full n-gram of a 1-D compressed stream that crosses no document
    boundary: the separator may be its LAST token only. (W,) int64."""
    T = len(compressed)
    if n > T:
        return np.zeros(0, dtype=np.int64)
    seps = np.concatenate([[0], np.cumsum(compressed == sep)])  # (T+1,) seps in [0, i)
    s = np.arange(T - n + 1)
    return np.flatnonzero(seps[s + n - 1] - seps[s] == 0).astype(np.int64)


class NgramCounts:
    """Frequent n-grams of a corpus for every order 2..max_order, on compressed ids.

    Build with ``from_tokens`` (or ``corpus_counts`` for a run's training data); persist with
    ``save``/``load``; look an n-gram up with ``find``/``count_of``.
    """

    def __init__(self, orders: dict[int, OrderCounts], meta: dict[str, Any]) -> None:
        self.orders = dict(orders)
        self.meta = dict(meta)
        self._keys: dict[int, np.ndarray | None] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tokens(
        cls,
        tokens: np.ndarray,
        compressor: TokenizerCompressor,
        *,
        sep_id: int,
        max_order: int,
        min_count: int = DEFAULT_MIN_COUNT,
        max_tokens: int | None = None,
        fingerprint: str = "",
        _force_lexsort: bool = False,
    ) -> NgramCounts:
        """Count the n-grams of a 1-D packed raw-id stream (documents each ending in ``sep_id``).

        ``sep_id`` is the RAW separator id; the stream must start at a document start. Only the
        first ``max_tokens`` tokens are read (None: all).
        """
        if int(max_order) < 2:
            raise ValueError(f"max_order must be >= 2, got {max_order}")
        if int(min_count) < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        raw = np.asarray(tokens)
        if raw.ndim != 1:
            raise ValueError(f"tokens must be a 1-D packed stream, got shape {raw.shape}")
        if max_tokens is not None:
            raw = raw[: int(max_tokens)]
        raw = raw.astype(np.int64)
        if raw.size and raw.min() < 0:
            raise ValueError("tokens must be raw ids >= 0 (no padding sentinels)")
        comp = np.asarray(compressor.compress(raw), dtype=np.int64)  # (T,)
        sep = compressor.compress_id(int(sep_id))
        bits = _bits(compressor.compressed_vocab_size)
        orders: dict[int, OrderCounts] = {}
        for n in range(2, int(max_order) + 1):
            starts = valid_starts(comp, n, sep)  # (W,)
            idx = starts[:, None] + np.arange(n)  # (W, n)
            mat = comp[idx]  # (W, n)
            packable = n * bits <= 63 and not _force_lexsort
            first, counts = _group_rows(mat, bits if packable else None)  # (G,), (G,)
            keep = counts >= int(min_count)
            pos = idx[first[keep]]  # (U, n) positions of each kept n-gram's first occurrence
            orders[n] = OrderCounts(
                order=n,
                grams=np.ascontiguousarray(comp[pos]),
                counts=np.ascontiguousarray(counts[keep]),
                surface=np.ascontiguousarray(raw[pos]),
                total=len(starts),
                n_distinct=len(counts),
            )
        meta = {
            "format": COUNTS_FORMAT,
            "fingerprint": str(fingerprint),
            "max_order": int(max_order),
            "min_count": int(min_count),
            "max_tokens": None if max_tokens is None else int(max_tokens),
            "n_tokens": int(raw.size),
            "sep_id": int(sep_id),
            "compressed_sep_id": int(sep),
            "compressed_vocab_size": int(compressor.compressed_vocab_size),
            "compressor_fingerprint": compressor.fingerprint,
        }
        return cls(orders, meta)

    # ------------------------------------------------------------------ properties
    @property
    def max_order(self) -> int:
        return int(self.meta["max_order"])

    @property
    def min_count(self) -> int:
        return int(self.meta["min_count"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def order(self, n: int) -> OrderCounts:
        """The frequent n-grams of order ``n`` (2..max_order)."""
        if n not in self.orders:
            raise ValueError(f"order {n} was not counted; counted orders are 2..{self.max_order}")
        return self.orders[n]

    def summary(self) -> dict[str, Any]:
        """Sizes per order, JSON-friendly."""
        return {
            "n_tokens": self.n_tokens,
            "min_count": self.min_count,
            "max_tokens": self.meta.get("max_tokens"),
            "orders": {
                str(n): {
                    "frequent": len(o),
                    "distinct": o.n_distinct,
                    "total": o.total,
                    "frequent_mass": int(o.counts.sum()),
                }
                for n, o in self.orders.items()
            },
        }

    # ------------------------------------------------------------------ lookup
    def find(self, compressed_ids: Sequence[int] | np.ndarray) -> int | None:
        """Index of a compressed n-gram in ``order(len(ids))``'s arrays, or None if not frequent."""
        q = np.asarray(compressed_ids, dtype=np.int64).reshape(-1)  # (n,)
        o = self.order(len(q))
        if len(o) == 0 or q.min() < 0:
            return None
        bits = _bits(int(self.meta["compressed_vocab_size"]))
        if len(q) * bits <= 63 and q.max() < (1 << bits):
            keys = self._keys.get(o.order)
            if keys is None:
                keys = self._keys[o.order] = _pack(o.grams, bits)  # (U,) sorted
            key = int(_pack(q[None], bits)[0])
            i = int(np.searchsorted(keys, key))
            return i if i < len(keys) and int(keys[i]) == key else None
        hit = np.flatnonzero(np.all(o.grams == q, axis=1))
        return int(hit[0]) if len(hit) else None

    def count_of(self, compressed_ids: Sequence[int] | np.ndarray) -> int:
        """Corpus count of a compressed n-gram; 0 when it is below ``min_count`` (or absent)."""
        i = self.find(compressed_ids)
        return 0 if i is None else int(self.order(len(compressed_ids)).counts[i])

    # ------------------------------------------------------------------ persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        ids = "<i4" if self._fits_int32() else "<i8"  # ids as int32 when they fit: half the file
        for n, o in sorted(self.orders.items()):
            out[f"grams_{n}"] = np.ascontiguousarray(o.grams, dtype=ids)
            out[f"counts_{n}"] = np.ascontiguousarray(o.counts, dtype="<i8")
            out[f"surface_{n}"] = np.ascontiguousarray(o.surface, dtype=ids)
            out[f"totals_{n}"] = np.array([o.total, o.n_distinct], dtype="<i8")
        return out

    def _fits_int32(self) -> bool:
        limit = np.iinfo(np.int32).max
        return all(
            (o.grams.size == 0 or int(o.grams.max()) <= limit)
            and (o.surface.size == 0 or int(o.surface.max()) <= limit)
            for o in self.orders.values()
        )

    @staticmethod
    def _checksum(arrays: dict[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for name in sorted(arrays):
            a = arrays[name]
            h.update(f"{name}:{a.dtype.str}:{a.shape}\0".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path: PathLike) -> Path:
        """Write a compressed ``.npz`` (arrays plus JSON metadata holding a sha256 of the arrays),
        atomically."""
        arrays = self._arrays()
        meta = dict(self.meta, sha256=self._checksum(arrays))
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: PathLike, expected_fingerprint: str | None = None) -> NgramCounts:
        """Read a file written by ``save`` and verify it (``ValueError`` if bad or mismatched)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no n-gram counts file at {path}")
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                arrays = {k: np.asarray(z[k]) for k in z.files if k != "meta"}
        except Exception as exc:  # zipfile/npy/json raise their own types on damaged files
            raise ValueError(f"{path} is not a readable n-gram counts file: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != COUNTS_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{path} has format {got!r}, expected {COUNTS_FORMAT!r}")
        if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
            raise ValueError(
                f"{path} was counted for another corpus/compressor/budget (fingerprint "
                f"{str(meta.get('fingerprint'))[:16]}..., expected {expected_fingerprint[:16]}...)"
            )
        if meta.pop("sha256", None) != cls._checksum(arrays):
            raise ValueError(f"{path} is corrupt: array checksum mismatch")
        orders: dict[int, OrderCounts] = {}
        try:
            for n in range(2, int(meta["max_order"]) + 1):
                grams, counts = arrays[f"grams_{n}"], arrays[f"counts_{n}"]
                surface, totals = arrays[f"surface_{n}"], arrays[f"totals_{n}"]
                U = counts.shape[0]
                if grams.shape != (U, n) or surface.shape != (U, n) or totals.shape != (2,):
                    raise ValueError(f"order {n} arrays have inconsistent shapes")
                orders[n] = OrderCounts(
                    n, grams.astype(np.int64), counts.astype(np.int64),
                    surface.astype(np.int64), int(totals[0]), int(totals[1]),
                )  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid n-gram counts file: {exc}") from exc
        return cls(orders, meta)

    @classmethod
    def load_or_build(
        cls, path: PathLike, fingerprint: str, build: Callable[[], NgramCounts]
    ) -> tuple[NgramCounts, bool]:
        """The counts cached at ``path`` if they verify and match ``fingerprint``, else
        ``build()`` saved there. Returns (counts, reused)."""
        path = Path(path)
        if path.exists():
            try:
                return cls.load(path, expected_fingerprint=fingerprint), True
            except (OSError, ValueError) as exc:
                logger.warning("rebuilding n-gram counts %s: %s", path, exc)
        counts = build()
        counts.save(path)
        return counts, False

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(o)}" for n, o in sorted(self.orders.items()))
        return f"NgramCounts(n_tokens={self.n_tokens}, min_count={self.min_count}, {{{sizes}}})"


def counts_fingerprint(
    data_cfg: DataConfig,
    tokenizer: Any,
    compressor: TokenizerCompressor,
    *,
    max_order: int,
    max_tokens: int | None,
    min_count: int,
    sep_id: int = EOT_ID,
) -> str:
    """sha256 of everything the training-split counts depend on (see the module docstring)."""
    payload = {
        "format": COUNTS_FORMAT,
        "corpus": cache_key(data_cfg.source, tokenizer, sep_id, data_cfg.text_field),
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "compressor": compressor.fingerprint,
        "max_order": int(max_order),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "min_count": int(min_count),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def corpus_counts(
    parts: RunParts,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    min_count: int = DEFAULT_MIN_COUNT,
    data_source: str | None = None,
    cache_path: PathLike | None = None,
) -> tuple[NgramCounts, bool]:
    """Frequent n-grams of a run's training split (orders 2..N of its Engram config).

    ``data_source`` replaces the run's ``data.source``; with ``cache_path`` the counts are read
    from / written to that ``.npz``. Returns (counts, reused_from_cache).
    """
    _require_engram(parts)
    data_cfg = parts.cfg.data
    if data_source is not None:
        data_cfg = dataclasses.replace(data_cfg, source=data_source)
    max_order = parts.indexer.cfg.max_ngram_size
    fp = counts_fingerprint(
        data_cfg, parts.tokenizer, parts.compressor,
        max_order=max_order, max_tokens=max_tokens, min_count=min_count,
    )  # fmt: skip

    def build() -> NgramCounts:
        splits = prepare_data(data_cfg, parts.tokenizer, EOT_ID)
        return NgramCounts.from_tokens(
            splits.train.tokens, parts.compressor, sep_id=EOT_ID, max_order=max_order,
            min_count=min_count, max_tokens=max_tokens, fingerprint=fp,
        )  # fmt: skip

    if cache_path is None:
        return build(), False
    return NgramCounts.load_or_build(cache_path, fp, build)


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
        indexer = _require_engram(parts)
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


def _baseline_message(parts: RunParts) -> str:
    return (
        f"run {parts.cfg.name!r} has no Engram layers (a baseline without memory); the memory "
        "explorer needs a run trained with an engram config"
    )


def _require_engram(parts: RunParts) -> NgramIndexer:
    if parts.indexer is None or not parts.model.engram_layers():
        raise NoEngramError(_baseline_message(parts))
    return parts.indexer


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


@dataclass(frozen=True)
class NgramEntry:
    """A frequent corpus n-gram as shown to a user: representative surface form and count."""

    text: str
    tokens: list[str]
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "count": self.count}


@dataclass(frozen=True)
class HeadHit:
    """What a queried n-gram reads from one sub-table of one Engram layer."""

    layer_id: int
    head: int
    order: int
    head_in_order: int
    ngram_text: str
    ngram_tokens: list[str]
    padded: bool  # the text is shorter than the order: the model reads pad before it
    local_row: int
    global_row: int
    table_size: int
    norm: float
    norm_percentile: float  # among all rows of the layer's table
    norm_percentile_head: float  # among the rows of this sub-table
    count: int  # corpus count of the n-gram (0: below min_count or padded)
    frequent: bool
    n_colliding: int  # OTHER frequent n-grams of this order on the same row
    colliding_mass: int  # their total corpus count
    expected_colliding_uniform: float  # (u - [frequent]) / p
    top_colliders: list[NgramEntry]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top_colliders"] = [c.to_dict() for c in self.top_colliders]
        return d


@dataclass(frozen=True)
class NgramReport:
    """``explore_ngram``'s answer: the text as tokenized and one ``HeadHit`` per (layer, head)."""

    text: str  # as asked
    tokenized: str  # as tokenized (leading space added, see the module docstring)
    tokens: list[str]
    hits: list[HeadHit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokenized": self.tokenized,
            "tokens": self.tokens,
            "hits": [h.to_dict() for h in self.hits],
        }


@dataclass(frozen=True)
class RowReport:
    """``explore_row``'s answer: the frequent n-grams that map to one row, by count."""

    layer_id: int
    head: int
    order: int
    head_in_order: int
    local_row: int
    global_row: int
    table_size: int
    norm: float
    norm_percentile: float
    n_ngrams: int  # frequent n-grams on the row (all, not just those listed)
    mass: int  # their total corpus count
    expected_ngrams_uniform: float  # u / p
    ngrams: list[NgramEntry]  # the top ``limit`` by count (ties: lexicographic compressed ids)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ngrams"] = [g.to_dict() for g in self.ngrams]
        return d


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
    indexer = _require_engram(parts)
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
    indexer = _require_engram(parts)
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


@dataclass
class MemoryReport:
    """What ``analyze_memory`` found and wrote."""

    run_dir: str
    run_name: str
    step: int
    hash_fingerprint: str
    counts: dict[str, Any]  # NgramCounts.summary() plus cache path and reuse flag
    layers: list[dict[str, Any]]  # LayerMemory.stats() per layer
    ngrams: list[NgramReport]
    rows: list[RowReport]
    timings: dict[str, float]
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "run_name": self.run_name,
            "step": self.step,
            "hash_fingerprint": self.hash_fingerprint,
            "counts": self.counts,
            "layers": self.layers,
            "ngrams": [r.to_dict() for r in self.ngrams],
            "rows": [r.to_dict() for r in self.rows],
            "timings": self.timings,
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


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
    atomic_write_text(report.paths["html"], _html(report, png))
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
    text = _visible(text.strip())
    return text if len(text) <= n else text[: n - 1] + "…"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _q(text: str) -> str:
    """An n-gram's text, escaped, spaces kept and line breaks shown as \\n."""
    return f"<code>{_e(_visible(text))}</code>"


def _visible(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}"
    return _e(x)


def _table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _colliders(entries: list[NgramEntry]) -> str:
    return "<br>".join(f"{_q(c.text)} ×{c.count}" for c in entries) or "–"


def _html(report: MemoryReport, png: bytes) -> str:
    c = report.counts
    parts: list[str] = [
        f"<h1>Engram memory of {_e(report.run_name)} (step {report.step})</h1>",
        f"<p>Run <code>{_e(report.run_dir)}</code>; hash fingerprint "
        f"<code>{_e(report.hash_fingerprint[:16])}…</code>. Frequent n-grams: counted on "
        f"compressed ids over {c['n_tokens']:,} training tokens, kept when seen at least "
        f"{c['min_count']} times (counts {'reused from' if c['reused'] else 'written to'} "
        f"<code>{_e(c['cache'])}</code>).</p>",
        _table(
            ["order", "frequent n-grams", "distinct", "occurrences", "frequent mass"],
            [
                [
                    _e(n),
                    f"{o['frequent']:,}",
                    f"{o['distinct']:,}",
                    f"{o['total']:,}",
                    f"{o['frequent_mass']:,}",
                ]
                for n, o in c["orders"].items()
            ],
        ),
        "<h2>Occupancy and collisions</h2>",
        "<p>Collisions of an n-gram = other frequent n-grams of its order on the same row. "
        "Uniform hashing predicts (u-1)/p of them for u frequent n-grams in a sub-table of p "
        "rows, and a fraction 1-(1-1/p)<sup>u</sup> of rows hit.</p>",
    ]
    for s in report.layers:
        parts.append(
            f"<h3>Layer {s['layer_id']}: {s['rows_hit']:,} of {s['table_rows']:,} rows hit "
            f"({s['frac_rows_hit']:.1%}, uniform {s['expected_frac_rows_hit_uniform']:.1%}); "
            f"mean collisions {s['mean_collisions']:.3f} (uniform "
            f"{s['expected_collisions_uniform']:.3f})</h3>"
        )
        parts.append(
            _table(
                [
                    "head",
                    "order",
                    "p",
                    "frequent u",
                    "rows hit",
                    "hit (uniform)",
                    "mean collisions",
                    "uniform (u-1)/p",
                    "max on a row",
                ],
                [
                    [
                        _e(h["head"]),
                        _e(h["order"]),
                        f"{h['table_size']:,}",
                        f"{h['n_frequent']:,}",
                        f"{h['frac_rows_hit']:.1%}",
                        f"{h['expected_frac_rows_hit_uniform']:.1%}",
                        f"{h['mean_collisions']:.3f}",
                        f"{h['expected_collisions_uniform']:.3f}",
                        _e(h["max_ngrams_on_a_row"]),
                    ]
                    for h in s["heads"]
                ],
            )
        )
    parts.append(
        f'<h2>Row norms</h2><img alt="row norm histograms" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    )
    for rep in report.ngrams:
        parts.append(
            f"<h2>N-gram {_q(rep.text)}</h2><p>tokenized as {_q(rep.tokenized)}: "
            + " | ".join(_q(t) for t in rep.tokens)
            + "</p>"
        )
        parts.append(
            _table(
                [
                    "layer",
                    "head",
                    "order",
                    "n-gram",
                    "count",
                    "local row",
                    "global row",
                    "norm",
                    "pct (layer)",
                    "pct (head)",
                    "colliding",
                    "uniform",
                    "top colliders",
                ],
                [
                    [
                        _e(h.layer_id),
                        _e(h.head),
                        _e(h.order),
                        _q(h.ngram_text) + (" (padded)" if h.padded else ""),
                        f"{h.count:,}" if h.frequent else "&lt; min",
                        _e(h.local_row),
                        _e(h.global_row),
                        _fmt(h.norm),
                        f"{h.norm_percentile:.1f}",
                        f"{h.norm_percentile_head:.1f}",
                        f"{h.n_colliding} (×{h.colliding_mass:,})",
                        _fmt(h.expected_colliding_uniform),
                        _colliders(h.top_colliders),
                    ]
                    for h in rep.hits
                ],
            )
        )
    for rr in report.rows:
        parts.append(
            f"<h2>Row {rr.local_row} of layer {rr.layer_id}, head {rr.head} (order "
            f"{rr.order})</h2><p>global row {rr.global_row}, norm {_fmt(rr.norm)} "
            f"(percentile {rr.norm_percentile:.1f}); {rr.n_ngrams} frequent n-grams "
            f"(×{rr.mass:,}), uniform expectation {_fmt(rr.expected_ngrams_uniform)}.</p>"
        )
        parts.append(
            _table(
                ["n-gram", "tokens", "count"],
                [
                    [_q(g.text), " | ".join(_q(t) for t in g.tokens), f"{g.count:,}"]
                    for g in rr.ngrams
                ],
            )
        )
    t = report.timings
    parts.append(
        "<p class=note>Timings: " + ", ".join(f"{_e(k)} {v:.2f} s" for k, v in t.items()) + "</p>"
    )
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:1300px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px;vertical-align:top}"
        "th{background:#f0f0f0}code{white-space:pre;background:#f6f6f6}"
        "img{max-width:100%}.note{color:#666;font-size:12px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Engram memory: {_e(report.run_name)}</title><style>{style}</style></head>"
        "<body>" + "\n".join(parts) + "</body></html>\n"
    )
