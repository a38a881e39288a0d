"""The tokenizer a run's data config names: GPT-2, a BPE trained on the run's training split, a file.

`DataConfig.tokenizer` is one of:
- ``"gpt2"``: the built-in GPT-2 BPE (50,257 ids, `<|endoftext|>` = 50256), offline;
- ``"bpe:N"``: a byte-level BPE with N ids (`<|endoftext|>` = 0) trained on the TRAINING
  documents of the run's own source and split, so no validation text shapes the vocabulary;
- a path to a `tokenizer.json` (HF `tokenizers`) or a directory holding one.

Design choices:
- A trained BPE is a pure function of (source content, text field, split, vocabulary size,
  `tokenizers` version): it is cached as ``<cache>/tokenizers/bpe-<key>.json`` under the data
  cache directory, written atomically, and rebuilt if the file does not parse or does not have
  the promised size and separator. Training KJV's ~1.1k chapters takes about a second.
- The split is computed exactly as `prepare_data` computes it (same group keys, same
  `split_documents`), so "training documents" means the documents the model trains on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from engram.atomic import atomic_write_text
from engram.data.config import DataConfig, DataError
from engram.data.packing import split_documents as _split
from engram.data.sources import iter_grouped_documents, source_fingerprint
from engram.tokenizer import (
    EOT_TOKEN,
    load_builtin_tokenizer,
    load_tokenizer_file,
    train_bpe,
)

logger = logging.getLogger(__name__)

GPT2 = "gpt2"
BPE_PREFIX = "bpe:"
_FORMAT = "engram-bpe-v1"


def bpe_vocab_size(spec: str) -> int | None:
    """N of a ``"bpe:N"`` spec, None for any other spec."""
    if not spec.startswith(BPE_PREFIX):
        return None
    return int(spec[len(BPE_PREFIX) :])


def training_texts(data_cfg: DataConfig) -> list[str]:
    """The texts of the documents `prepare_data` puts in the training split of `data_cfg`."""
    docs = list(iter_grouped_documents(data_cfg.source, data_cfg.text_field))
    if not docs:
        raise DataError(f"data source {data_cfg.source!r} holds no documents (empty corpus)")
    labels: dict[Any, int] = {}
    groups = np.array([labels.setdefault(key, len(labels)) for _, key in docs], dtype=np.int64)
    train_ids, _ = _split(len(docs), data_cfg.val_fraction, data_cfg.split_seed, groups)
    return [docs[i][0] for i in train_ids]


def _bpe_key(data_cfg: DataConfig, vocab_size: int) -> str:
    payload = {
        "format": _FORMAT,
        "source": source_fingerprint(data_cfg.source),
        "text_field": data_cfg.text_field,
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "vocab_size": vocab_size,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _valid_bpe(tok: Tokenizer, vocab_size: int) -> bool:
    return (
        tok.get_vocab_size(with_added_tokens=True) == vocab_size and tok.token_to_id(EOT_TOKEN) == 0
    )


def corpus_bpe(data_cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """The BPE with `vocab_size` ids trained on `data_cfg`'s training split (cached)."""
    path = (
        data_cfg.resolved_cache_dir()
        / "tokenizers"
        / (f"bpe{vocab_size}-{_bpe_key(data_cfg, vocab_size)[:32]}.json")
    )
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
            if _valid_bpe(tok, vocab_size):
                return tok
            logger.warning("rebuilding tokenizer cache %s: wrong size or separator", path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            logger.warning("rebuilding unreadable tokenizer cache %s: %s", path, e)
    tok = train_bpe(training_texts(data_cfg), vocab_size)
    if not _valid_bpe(tok, vocab_size):
        raise DataError(
            f"the training split of {data_cfg.source!r} is too small for a BPE with "
            f"{vocab_size} ids (it learned {tok.get_vocab_size(with_added_tokens=True)}); "
            "use a smaller data.tokenizer=bpe:N or more text"
        )
    try:
        atomic_write_text(path, tok.to_str())
    except OSError as e:
        logger.warning("could not write tokenizer cache %s: %s", path, e)
    return tok


def data_tokenizer(data_cfg: DataConfig) -> Tokenizer:
    """The tokenizer `data_cfg.tokenizer` names (see the module docstring)."""
    spec = data_cfg.tokenizer
    if spec == GPT2:
        return load_builtin_tokenizer()
    n = bpe_vocab_size(spec)
    if n is not None:
        return corpus_bpe(data_cfg, n)
    try:
        return load_tokenizer_file(spec)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(
            f"data.tokenizer {spec!r}: {e} (expected 'gpt2', 'bpe:N' or a tokenizer.json path)"
        ) from None
