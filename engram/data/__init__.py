"""Training data: text sources -> a cached token array -> document splits -> hashed batches.

Pipeline, one module per stage:
- :mod:`engram.data.config`: ``DataConfig`` (source, split, batch shape, cache dir, tokenizer
  spec) and ``DataError``, which every stage raises on bad input;
- :mod:`engram.data.sources`: ``iter_grouped_documents`` reads documents (with their group keys)
  from the built-in corpus or ``.txt``/``.jsonl``/``.parquet`` files and directories;
- :mod:`engram.data.tokenize`: the tokenizer the config names (GPT-2, a BPE trained on the
  training split, or a ``tokenizer.json``);
- :mod:`engram.data.cache`: ``TokenizedCorpus`` tokenizes the documents once into a validated,
  memory-mapped cache keyed by (source, tokenizer, separator, text field);
- :mod:`engram.data.packing`: ``split_documents`` holds out whole document groups for
  validation, ``PackedSplit`` concatenates a split's documents and cuts windows from it,
  ``prepare_data`` runs the stages above and returns ``DataSplits``;
- :mod:`engram.data.loader`: ``BatchLoader`` cuts random windows and hashes them (compress +
  n-gram hash, via :class:`~engram.indexer.NgramIndexer`) in a background thread.

Design choices: each module's docstring states its own. Across the package: no module-level
mutable state (every cache location is an argument, default ``default_cache_dir() / "data"``, so
``$ENGRAM_CACHE_DIR`` is respected), and everything a run's data depends on is an explicit input,
so tokens, splits and batches are pure functions of (config, tokenizer, seed, step).

This package re-exports the public names of the stages; ``engram.data.tokenize`` is imported on
its own (it needs the stages, not the other way round).
"""

from engram.data.cache import FORMAT_VERSION, TokenizedCorpus, cache_key
from engram.data.config import (
    BUILTIN,
    DataConfig,
    DataError,
    GroupedDocument,
    PathLike,
    resolve_cache_dir,
)
from engram.data.loader import Batch, BatchLoader
from engram.data.packing import (
    DataSplits,
    PackedSplit,
    check_shard,
    dense_groups,
    prepare_data,
    split_documents,
)
from engram.data.sources import (
    SUPPORTED_SUFFIXES,
    iter_documents,
    iter_grouped_documents,
    source_files,
    source_fingerprint,
)

__all__ = [
    "BUILTIN",
    "FORMAT_VERSION",
    "SUPPORTED_SUFFIXES",
    "Batch",
    "BatchLoader",
    "DataConfig",
    "DataError",
    "DataSplits",
    "GroupedDocument",
    "PackedSplit",
    "PathLike",
    "TokenizedCorpus",
    "cache_key",
    "check_shard",
    "dense_groups",
    "iter_documents",
    "iter_grouped_documents",
    "prepare_data",
    "resolve_cache_dir",
    "source_files",
    "source_fingerprint",
    "split_documents",
]
