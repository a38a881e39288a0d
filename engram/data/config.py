"""The data config and the error type every stage of the data pipeline raises.

Design choices:
- ``DataConfig`` is frozen and validated in ``__post_init__``: a bad value fails when the config
  is made, naming the field, not later in the middle of tokenizing or training.
- ``DataError`` subclasses ``ValueError`` so callers that predate it still catch bad input; every
  message names the file (and line or row) or the field, and what was expected.
- No module-level mutable state: the token cache location is an argument (default
  ``default_cache_dir() / "data"``, so ``$ENGRAM_CACHE_DIR`` is respected as in
  :mod:`engram.compress`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from engram.compress import default_cache_dir
from engram.config import check_known_keys
from engram.tokenizer import MAX_BPE_VOCAB, MIN_BPE_VOCAB

BUILTIN: Final = "builtin"


class DataError(ValueError):
    """Bad data input: a missing or unsupported source, malformed records, too little data."""


PathLike = str | os.PathLike[str]
GroupedDocument = tuple[str, Hashable]
"""A document's text and its group key (documents sharing a key are never split apart)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is split, and the shape of a batch."""

    # "builtin", "builtin:kjv,web" (subset of translations), or a .txt/.jsonl/.parquet file or dir.
    source: str = BUILTIN
    # Field holding the text in .jsonl objects and .parquet rows.
    text_field: str = "text"
    # Fraction of documents held out for validation (whole groups, at least one document).
    val_fraction: float = 0.05
    # Seed of the group permutation that picks the validation documents.
    split_seed: int = 0
    # Tokens per training sequence T (windows hold T+1 tokens: inputs and shifted targets).
    seq_len: int = 128
    # Sequences per batch B.
    batch_size: int = 16
    # Token cache directory; None -> default_cache_dir() / "data" ($ENGRAM_CACHE_DIR respected).
    cache_dir: str | None = None
    # "gpt2" (built-in), "bpe:N" (N ids trained on this source's training split), or a path to
    # a tokenizer.json: the vocabulary sets the output layer's cost (see engram.data.tokenize).
    tokenizer: str = "gpt2"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise DataError(f"source must be a non-empty string, got {self.source!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if not (isinstance(self.val_fraction, int | float) and 0.0 < self.val_fraction < 1.0):
            raise DataError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for name in ("split_seed", "seq_len", "batch_size"):
            value = getattr(self, name)
            lowest = 0 if name == "split_seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise DataError(f"{name} must be an int >= {lowest}, got {value!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str | os.PathLike):
            raise DataError(f"cache_dir must be a path string or None, got {self.cache_dir!r}")
        _check_tokenizer_spec(self.tokenizer)

    def resolved_cache_dir(self) -> Path:
        """The token cache directory this config uses."""
        return resolve_cache_dir(self.cache_dir)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["cache_dir"] is not None:
            d["cache_dir"] = os.fspath(d["cache_dir"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        check_known_keys(cls, d, DataError)
        return cls(**d)


def _check_tokenizer_spec(spec: Any) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"tokenizer must be a non-empty string, got {spec!r}")
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or not MIN_BPE_VOCAB <= int(n) <= MAX_BPE_VOCAB:
            raise DataError(
                f"tokenizer {spec!r}: expected 'bpe:N' with N an integer in "
                f"[{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB}] (256 bytes + <|endoftext|> + merges)"
            )


def resolve_cache_dir(cache_dir: PathLike | None) -> Path:
    """``cache_dir`` itself, or ``default_cache_dir() / "data"`` when it is None."""
    if cache_dir is None:
        return default_cache_dir() / "data"
    return Path(cache_dir).expanduser()
