"""From raw token ids (or text) to the rows every Engram layer reads: compress, then hash.

Design choices:
- Composition only: a tokenizer, a :class:`~engram.compress.TokenizerCompressor` and a
  :class:`~engram.hashing.NgramHasher` built from one :class:`~engram.config.EngramConfig`.
  The index math lives in those modules; this one wires them and translates raw ids (the pad and
  the document separator) into compressed ids once, so callers never mix the two id spaces.
- ``explain`` turns rows back into words: for each token, the n-grams (as token strings) whose
  hashes it produces and the rows they hit, which is what a person asks of the memory.
- The config's ``addressing`` is applied here: a control run ("constant", "position"; see
  :mod:`engram.addressing`) gets its content-free rows from the same ``rows`` call, so the data
  pipeline, evaluation and generation need no special case. Its ``fingerprint`` differs from
  the hash fingerprint, so a control's tables can never be loaded as real n-gram tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engram.addressing import constant_rows, position_rows
from engram.compress import TokenizerCompressor
from engram.config import EngramConfig, small_config
from engram.hashing import Array, NgramHasher
from engram.tokenizer import EOT_ID, load_builtin_tokenizer


@dataclass(frozen=True)
class TokenRows:
    """What one token position reads from one Engram layer."""

    position: int
    token: str  # the raw token as text
    ngrams: tuple[str, ...]  # order 2..N n-grams ending here, oldest token first
    rows: tuple[tuple[int, ...], ...]  # per order: the K local rows (one per head)


class NgramIndexer:
    """Raw ids -> compressed ids -> rows (L, B, T, H) for every Engram layer of ``cfg``."""

    def __init__(
        self,
        cfg: EngramConfig,
        compressor: TokenizerCompressor,
        tokenizer: Any | None = None,
        sep_id: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.compressor = compressor
        self.tokenizer = tokenizer
        self.pad_id = compressor.compress_id(cfg.pad_id)
        self.sep_id = None if sep_id is None else compressor.compress_id(sep_id)
        self.hasher = NgramHasher.from_config(cfg, compressor.compressed_vocab_size, self.pad_id)
        self.addressing = cfg.addressing

    @property
    def needs_positions(self) -> bool:
        """Whether ``rows`` reads token positions (the "position" address control)."""
        return self.addressing == "position"

    def fingerprint(self) -> str:
        """The hash fingerprint, extended with the addressing for a control run."""
        fp = self.hasher.fingerprint()
        if self.addressing == "ngram":
            return fp
        return hashlib.sha256(f"{fp}:addressing={self.addressing}".encode()).hexdigest()

    @classmethod
    def builtin(cls, cfg: EngramConfig | None = None, cache_dir: Any = None) -> NgramIndexer:
        """The built-in GPT-2 tokenizer (offline), its cached compressor, ``<|endoftext|>`` as
        the document separator. ``cfg`` defaults to :func:`engram.config.small_config`."""
        tok = load_builtin_tokenizer()
        kwargs = {} if cache_dir is None else {"cache_dir": cache_dir}
        compressor = TokenizerCompressor.from_tokenizer(tok, **kwargs)
        return cls(cfg or small_config(), compressor, tok, sep_id=EOT_ID)

    def encode(self, text: str) -> np.ndarray:
        """Raw token ids of ``text`` (1-D int64)."""
        if self.tokenizer is None:
            raise ValueError("this indexer has no tokenizer; pass raw ids instead of text")
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def rows(
        self,
        raw_ids: Array,
        *,
        reset_at_separator: bool = True,
        positions: Array | None = None,
    ) -> Array:
        """Rows of every layer for raw ids (B, T): (L, B, T, H) int64, same kind as the input.

        With ``reset_at_separator`` (and a separator configured) no n-gram crosses a document end.
        ``positions`` (B, T): each token's offset in its token stream, read by the "position"
        control only (default: 0..T-1 in every sequence).
        """
        compressed = self.compressor.compress(raw_ids)
        if self.addressing == "ngram":
            sep = self.sep_id if reset_at_separator else None
            return self.hasher.hash_all(compressed, sep_id=sep)
        B, T = compressed.shape
        if self.addressing == "constant":
            out = constant_rows(len(self.cfg.layer_ids), B, T, self.hasher.n_subtables)
        else:
            if positions is None:
                positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
            pos = positions.cpu().numpy() if isinstance(positions, torch.Tensor) else positions
            if tuple(pos.shape) != (B, T):
                raise ValueError(f"positions must have the ids' shape {(B, T)}, got {pos.shape}")
            sizes = np.array([self.hasher.flat_table_sizes(i) for i in self.cfg.layer_ids])
            out = position_rows(np.asarray(pos), sizes, self.cfg.seed)
        if isinstance(compressed, torch.Tensor):
            return torch.from_numpy(out).to(compressed.device)
        return out

    def explain(self, text_or_ids: str | Array, layer_id: int) -> list[TokenRows]:
        """For each token of a single sequence: its n-grams and the rows they hit in ``layer_id``."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"explain takes one sequence (T,), got shape {ids.shape}")
        rows = self.hasher.hash(self.compressor.compress(ids[None]), layer_id)[0]  # (T, H)
        K, N = self.cfg.n_head_per_ngram, self.cfg.max_ngram_size
        words = [self.token_text(int(t)) for t in ids]
        out = []
        for t, word in enumerate(words):
            grams = []
            for n in range(2, N + 1):
                parts = ["<pad>" if t - j < 0 else words[t - j] for j in range(n - 1, -1, -1)]
                grams.append("".join(parts))
            per_order = tuple(
                tuple(int(r) for r in rows[t, (n - 2) * K : (n - 1) * K]) for n in range(2, N + 1)
            )
            out.append(TokenRows(t, word, tuple(grams), per_order))
        return out

    def token_text(self, token_id: int) -> str:
        """One raw token as text (special tokens kept), or ``[id]`` without a tokenizer."""
        if self.tokenizer is None:
            return f"[{token_id}]"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
