"""Splitting documents into train/val and packing each split into one token stream to cut.

Design choices:
- Splits hold out whole groups of documents (no window straddles train and val): a seeded
  permutation of the groups (``numpy.random.default_rng(split_seed)``) moves groups into val until
  it holds at least ``round(n_docs * val_fraction)`` documents, at least one group on each side.
  The built-in corpus is split by chapter reference, so all translations of a chapter land on the
  same side and val is paraphrase-free: no translation of a val chapter is trained on (passages
  the Bible itself repeats, e.g. Kings/Chronicles, are not grouped). With one document per group
  this is exactly the plain per-document permutation split.
- A split is packed once, in RAM: its documents (each with its trailing separator) concatenated in
  document-id order, copied out of the memory-mapped cache run by run.
- Training windows are T+1 tokens at uniform positions of the packed train stream, drawn from
  ``default_rng([seed, step])``: a batch depends only on (seed, step), so resuming at a step is
  exact and needs no saved RNG state. Windows may span a document end; the separator marks it,
  and the Engram rows reset there (no n-gram crosses it). With several ranks, each takes its own
  contiguous block of the global batch's windows (``check_shard`` refuses an uneven split).
- Validation windows are contiguous at stride T over the packed val stream (every val token but
  the first is a target exactly once; the partial tail window is dropped, the last batch may be
  smaller); the set of windows depends only on T, not on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engram.data.cache import TokenizedCorpus
from engram.data.config import DataConfig, DataError


def split_documents(
    n_docs: int, val_fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train_doc_ids, val_doc_ids), sorted int64, never splitting a group of documents.

    Without ``groups``: ``round(n_docs * val_fraction)`` (>= 1) val documents chosen by
    ``default_rng(seed).permutation``; at least one train document. With ``groups`` (one integer
    label per document): the groups, numbered in first-seen order, are permuted by
    ``default_rng(seed).permutation`` and whole groups move into val, in that order, until it
    holds at least ``round(n_docs * val_fraction)`` documents (at least one group); at least one
    group must remain for training. One document per group gives the ungrouped split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = max(1, math.floor(n_docs * val_fraction + 0.5))
    if groups is not None:
        return _split_groups(n_docs, val_fraction, seed, groups, n_val)
    if n_docs - n_val < 1:
        raise DataError(
            f"cannot split {n_docs} document(s) with val_fraction={val_fraction}: need at least "
            "one training and one validation document; add documents (for a .txt file, separate "
            "them with blank lines)"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def dense_groups(groups: np.ndarray) -> np.ndarray:
    """Integer group labels renumbered ``0..G-1`` in order of first appearance (int64)."""
    labels = np.asarray(groups)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"groups must be a 1-D array of integer labels, got {labels.dtype} {labels.shape}"
        )
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=np.int64)
    return rank[inverse.reshape(-1)]


def _split_groups(
    n_docs: int, val_fraction: float, seed: int, groups: np.ndarray, n_val: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = dense_groups(groups)
    if len(ids) != n_docs:
        raise DataError(f"groups holds {len(ids)} labels for {n_docs} documents; expected one each")
    n_groups = int(ids.max()) + 1 if n_docs else 0
    perm = np.random.default_rng(seed).permutation(n_groups)
    sizes = np.bincount(ids, minlength=n_groups)
    # Fewest leading groups of the permutation holding >= n_val documents (at least one group).
    n_val_groups = int(np.searchsorted(np.cumsum(sizes[perm]), n_val)) + 1
    if n_val_groups >= n_groups:
        raise DataError(
            f"cannot split {n_docs} document(s) in {n_groups} group(s) with "
            f"val_fraction={val_fraction}: need at least one training and one validation group; "
            "add documents or use a smaller val_fraction"
        )
    is_val = np.zeros(n_groups, dtype=bool)
    is_val[perm[:n_val_groups]] = True
    doc_is_val = is_val[ids]
    return np.flatnonzero(~doc_is_val).astype(np.int64), np.flatnonzero(doc_is_val).astype(np.int64)


@dataclass(frozen=True, eq=False)
class PackedSplit:
    """One split's documents (each with its trailing separator) concatenated in id order."""

    name: str  # "train" or "val"
    doc_ids: np.ndarray  # sorted corpus document ids (int64)
    tokens: np.ndarray  # 1-D packed ids, the corpus dtype (in RAM)
    sep_id: int  # the end-of-document separator id

    @classmethod
    def from_corpus(cls, corpus: TokenizedCorpus, doc_ids: np.ndarray, name: str) -> PackedSplit:
        """Copy the documents ``doc_ids`` (sorted, distinct) out of ``corpus``, run by run."""
        ids = np.asarray(doc_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise DataError(f"split {name!r} needs a non-empty 1-D list of document ids")
        if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= corpus.n_docs:
            raise DataError(
                f"split {name!r}: document ids must be sorted, distinct and in [0, {corpus.n_docs})"
            )
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        run_first = ids[np.concatenate([[0], breaks])]
        run_last = ids[np.concatenate([breaks - 1, [len(ids) - 1]])]
        off = corpus.doc_offsets
        tokens = np.concatenate(
            [corpus.tokens[off[a] : off[b + 1]] for a, b in zip(run_first, run_last, strict=True)]
        )
        return cls(name, ids, np.asarray(tokens), corpus.sep_id)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``DataError`` unless the split holds at least one window of seq_len+1 tokens."""
        if self.n_tokens < seq_len + 1:
            hint = "a larger val_fraction" if self.name == "val" else "more data"
            raise DataError(
                f"the {self.name} split has {self.n_tokens} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use a smaller seq_len or {hint}"
            )

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 (len(starts), seq_len) for windows of seq_len+1 tokens at ``starts``."""
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)  # (n, T+1)
        buf = self.tokens[idx].astype(np.int64)  # (n, T+1) -> x = buf[:, :-1], y = buf[:, 1:]
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """B random windows, positions from ``default_rng([seed, step])``: (x, y) int64 (B, T).

        With ``world_size`` > 1, only block ``rank`` of the B windows, (B / world_size, T): the
        ranks' blocks put together are the single-process batch, and each rank reads and
        hashes only its own.
        """  # fmt: skip
        starts = self.train_starts(step, batch_size, seq_len, seed, rank, world_size)
        return self.windows(starts, seq_len)

    def train_starts(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> np.ndarray:
        """Stream offsets (int64) of the windows ``train_batch`` cuts for this step and rank."""
        if step < 0 or seed < 0:
            raise DataError(f"step and seed must be >= 0, got step={step}, seed={seed}")
        check_shard(batch_size, rank, world_size)
        self.check_seq_len(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_tokens - seq_len, size=batch_size)
        per = batch_size // world_size
        return np.asarray(starts[rank * per : (rank + 1) * per], dtype=np.int64)

    def n_val_windows(self, seq_len: int) -> int:
        """Number of contiguous stride-``seq_len`` windows ``val_batches`` yields in all."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def val_batches(
        self,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        with_positions: bool = False,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Contiguous windows at stride T (targets never overlap), B per batch, in order.

        Yields (x, y), or (x, y, positions) with ``with_positions``: each token's stream offset.
        """
        self.check_seq_len(seq_len)
        n_windows = self.n_val_windows(seq_len)
        n_batches = math.ceil(n_windows / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max(0, max_batches))
        return self._val_batches(batch_size, seq_len, n_windows, n_batches, with_positions)

    def _val_batches(
        self, batch_size: int, seq_len: int, n_windows: int, n_batches: int, with_positions: bool
    ) -> Iterator[tuple[np.ndarray, ...]]:
        for b in range(n_batches):
            first = b * batch_size
            starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * seq_len
            x, y = self.windows(starts, seq_len)
            if with_positions:
                yield x, y, starts[:, None] + np.arange(seq_len, dtype=np.int64)  # (n, T)
            else:
                yield x, y


@dataclass(frozen=True, eq=False)
class DataSplits:
    """What the training loop needs: the corpus, both packed splits and the config."""

    cfg: DataConfig
    corpus: TokenizedCorpus
    train: PackedSplit
    val: PackedSplit

    @property
    def n_docs(self) -> int:
        return self.corpus.n_docs

    @property
    def n_train_docs(self) -> int:
        return self.train.n_docs

    @property
    def n_val_docs(self) -> int:
        return self.val.n_docs

    @property
    def n_train_tokens(self) -> int:
        return self.train.n_tokens

    @property
    def n_val_tokens(self) -> int:
        return self.val.n_tokens

    def train_batch(self, step: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of ``step`` (see ``PackedSplit.train_batch``)."""
        return self.train.train_batch(step, self.cfg.batch_size, self.cfg.seq_len, seed)

    def val_batches(
        self, max_batches: int | None = None, with_positions: bool = False
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """The deterministic validation batches (see ``PackedSplit.val_batches``)."""
        return self.val.val_batches(
            self.cfg.batch_size, self.cfg.seq_len, max_batches, with_positions
        )

    def summary(self) -> dict[str, Any]:
        """Sizes and provenance, JSON-friendly, for logs and run records."""
        return {
            "source": self.corpus.meta.get("source"),
            "cache": str(self.corpus.path),
            "n_docs": self.n_docs,
            "n_groups": self.corpus.n_groups,
            "val_groups": len(np.unique(self.corpus.groups[self.val.doc_ids])),
            "n_tokens": self.corpus.n_tokens,
            "train_docs": self.n_train_docs,
            "val_docs": self.n_val_docs,
            "train_tokens": self.n_train_tokens,
            "val_tokens": self.n_val_tokens,
        }


def prepare_data(data_cfg: DataConfig, tokenizer: Any, sep_id: int) -> DataSplits:
    """Load (or build) the token cache of ``data_cfg.source``, split it and pack both splits."""
    corpus = TokenizedCorpus.load_or_build(
        data_cfg.source, tokenizer, sep_id, data_cfg.resolved_cache_dir(), data_cfg.text_field
    )
    train_ids, val_ids = split_documents(
        corpus.n_docs, data_cfg.val_fraction, data_cfg.split_seed, corpus.groups
    )
    train = PackedSplit.from_corpus(corpus, train_ids, "train")
    val = PackedSplit.from_corpus(corpus, val_ids, "val")
    train.check_seq_len(data_cfg.seq_len)
    val.check_seq_len(data_cfg.seq_len)
    return DataSplits(data_cfg, corpus, train, val)


def check_shard(batch_size: int, rank: int, world_size: int) -> None:
    """Refuse a batch that does not split evenly over the ranks, naming the sizes."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    if batch_size % world_size:
        raise DataError(
            f"data.batch_size={batch_size} is the global batch and must split over {world_size} "
            f"ranks (--nproc {world_size}); use a multiple of {world_size}"
        )
