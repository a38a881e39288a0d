"""Frequent corpus n-grams on compressed ids, counted per order and cached on disk.

The memory explorer (``engram.analysis.memory``) needs, for every order n of a run's Engram
config, the n-grams its training corpus contains at least ``min_count`` times: ``corpus_counts``
counts them (``NgramCounts``, one ``OrderCounts`` per order) and caches them as ``.npz``.

Axes used in shape comments: T tokens of the stream, n the order, W full windows of order n
that cross no document boundary, G distinct n-grams among them, U the frequent ones.

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
- A run without Engram layers is refused with ``NoEngramError``
  (``engram.analysis.runs.require_engram``): there is no order to count up to.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from engram.analysis.hidden import data_config
from engram.analysis.runs import require_engram
from engram.atomic import atomic_write_bytes
from engram.compress import TokenizerCompressor
from engram.data import DataConfig, cache_key, prepare_data
from engram.train import RunParts

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

COUNTS_FORMAT: Final = "engram.NgramCounts/1"
"""Format tag of count files; part of every counts fingerprint. Bump on any counting change."""

COUNTS_FILE: Final = "ngram_counts.npz"
DEFAULT_MAX_TOKENS: Final = 2_000_000
DEFAULT_MIN_COUNT: Final = 2


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
    sep_id: int,
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
    require_engram(parts, "the memory explorer")
    data_cfg = data_config(parts, data_source)
    max_order = parts.indexer.cfg.max_ngram_size
    fp = counts_fingerprint(
        data_cfg, parts.tokenizer, parts.compressor,
        max_order=max_order, max_tokens=max_tokens, min_count=min_count, sep_id=parts.eot_id,
    )  # fmt: skip

    def build() -> NgramCounts:
        splits = prepare_data(data_cfg, parts.tokenizer, parts.eot_id)
        return NgramCounts.from_tokens(
            splits.train.tokens, parts.compressor, sep_id=parts.eot_id, max_order=max_order,
            min_count=min_count, max_tokens=max_tokens, fingerprint=fp,
        )  # fmt: skip

    if cache_path is None:
        return build(), False
    return NgramCounts.load_or_build(cache_path, fp, build)
