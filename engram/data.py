"""Training data: text sources -> a cached token array -> document splits -> hashed batches.

Pipeline: ``iter_grouped_documents`` reads documents (with their group keys) from a source;
``TokenizedCorpus`` tokenizes them once into a memory-mapped cache; ``split_documents`` holds out
whole document groups for validation;
``PackedSplit`` concatenates a split's documents; ``BatchLoader`` cuts random windows and hashes
them (compress + n-gram hash, via :class:`~engram.indexer.NgramIndexer`) in a background thread.

Design choices:
- Sources: ``"builtin"`` (every chapter of the five built-in Bibles, one document per chapter),
  ``"builtin:kjv,web"`` (a subset, in that order), or a path to a ``.txt`` (documents separated by
  blank lines, i.e. lines that are empty after ``str.strip``; each document stripped), ``.jsonl``
  (one JSON object per line, text under ``text_field``; blank lines skipped) or ``.parquet``
  (the ``text_field`` string column, read in batches; pyarrow imported only then) file, or a
  directory of such files (recursively, sorted by relative path; hidden entries skipped). Text
  files are UTF-8 (a leading BOM is dropped). Whitespace-only documents are dropped everywhere,
  so the same texts give the same documents whatever the format. Bad input raises ``DataError``
  naming the file (and line or row) and what was expected.
- Document groups: documents that are near-copies of one another share a group key, and a split
  never separates a group. Built-in sources key a chapter by its reference ``(book_number,
  chapter)``, so every translation of a chapter is one group; in files each document is its own
  group.
- One flat token array per (source, tokenizer, separator): each document's ids followed by the
  separator (GPT-2's ``<|endoftext|>``), ``uint16`` when the vocabulary fits, else ``uint32``;
  ``doc_offsets`` (int64, n_docs+1) marks document spans, separator included; ``groups`` (int64,
  n_docs) holds each document's group id, dense ``0..G-1`` in first-seen order. The cache
  directory is named by sha256 of a format tag, the source fingerprint (built-in: translations,
  the Bible packages' and engram's versions, and the hash of ``engram/corpus.py``; files: resolved
  path, size and mtime_ns of every file), the tokenizer fingerprint, the separator and the text
  field. Any change makes a new key; nothing is ever updated in place.
- Atomic cache writes: build into a temporary directory next to the target, fsync, then rename.
  If another process published first, its (identical) cache is used and ours discarded. Loading
  verifies the metadata, the file size, the offsets, the group ids (one per document, dense, and
  their sha256) and the sha256 of ``tokens.bin`` (about 1 ms per MB, negligible next to
  tokenizing); a failing cache is moved aside and rebuilt, never used.
- A literal separator inside a document's text (``"<|endoftext|>"`` typed in the text) is kept:
  the tokenizer maps it to the separator id, so hashing treats it as a boundary. It is logged.
- Splits hold out whole groups of documents (no window straddles train and val): a seeded
  permutation of the groups (``numpy.random.default_rng(split_seed)``) moves groups into val until
  it holds at least ``round(n_docs * val_fraction)`` documents, at least one group on each side.
  The built-in corpus is split by chapter reference, so all translations of a chapter land on the
  same side and val is paraphrase-free: no translation of a val chapter is trained on (passages
  the Bible itself repeats, e.g. Kings/Chronicles, are not grouped). With one document per group
  this is exactly the plain per-document permutation split.
- Training windows are T+1 tokens at uniform positions of the packed train stream, drawn from
  ``default_rng([seed, step])``: a batch depends only on (seed, step), so resuming at a step is
  exact and needs no saved RNG state. Windows may span a document end; the separator marks it,
  and the Engram rows reset there (no n-gram crosses it). Validation windows are contiguous at
  stride T over the packed val stream (every val token but the first is a target exactly once;
  the partial tail window is dropped, the last batch may be smaller); the set of windows depends
  only on T, not on the batch size.
- The loader's worker is a daemon ``threading.Thread`` (the hash kernel releases the GIL, numpy
  mostly does too) filling a bounded ``queue.Queue``. It never references the loader itself, so
  dropping the loader stops it (``weakref.finalize``); ``close`` stops it explicitly; a blocked
  ``put`` polls a stop event, so an early stop cannot deadlock. A worker exception is re-raised by
  the consumer's next ``next()`` (and every one after). ``wait_seconds`` is the consumer's total
  time blocked in ``next()``: near zero means data preparation is off the critical path.
- No module-level mutable state: every cache location is an argument (default
  ``default_cache_dir() / "data"``, so ``$ENGRAM_CACHE_DIR`` is respected as in
  :mod:`engram.compress`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

import engram.corpus
from engram.atomic import default_mode
from engram.compress import default_cache_dir, tokenizer_fingerprint, tokenizer_vocab_size
from engram.config import check_known_keys
from engram.corpus import TRANSLATIONS, check_translations, iter_builtin_documents
from engram.indexer import NgramIndexer
from engram.tokenizer import MAX_BPE_VOCAB, MIN_BPE_VOCAB

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = "engram.data/v2"
"""Version tag of the cache layout and document rules; part of every cache key. Bump on change."""

SUPPORTED_SUFFIXES: Final = (".txt", ".jsonl", ".parquet")
"""File types ``iter_documents`` reads (matched case-insensitively)."""

BUILTIN: Final = "builtin"

_ENCODE_CHARS: Final = (
    1 << 22
)  # characters per encode_batch call (bounds memory, keeps threads busy)
_ENCODE_DOCS: Final = 4096  # documents per encode_batch call at most
_PARQUET_BATCH: Final = 4096  # rows per pyarrow record batch


class DataError(ValueError):
    """Bad data input: a missing or unsupported source, malformed records, too little data."""


PathLike = str | os.PathLike[str]
GroupedDocument = tuple[str, Hashable]
"""A document's text and its group key (documents sharing a key are never split apart)."""


# ----------------------------------------------------------------------------- config


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
    # a tokenizer.json: the vocabulary sets the output layer's cost (see engram.data_tokenizer).
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


# ----------------------------------------------------------------------------- sources


def _builtin_translations(source: str) -> tuple[str, ...] | None:
    """The translations of a built-in source, or None when ``source`` is a path."""
    if source == BUILTIN:
        return TRANSLATIONS
    if not source.startswith(BUILTIN + ":"):
        return None
    names = tuple(n.strip().lower() for n in source[len(BUILTIN) + 1 :].split(","))
    if not names or any(not n for n in names):
        raise DataError(f"source {source!r} lists no translation; expected e.g. 'builtin:kjv,web'")
    try:
        return check_translations(names)
    except ValueError as e:
        raise DataError(f"source {source!r}: {e}") from None


def _source_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist; expected 'builtin', 'builtin:kjv,web' or a "
            f"path to a {'/'.join(SUPPORTED_SUFFIXES)} file or a directory of them"
        )
    return path


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def source_files(source: PathLike) -> list[Path]:
    """The files a path source reads, in reading order (a directory: recursively, sorted)."""
    path = _source_path(os.fspath(source))
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and _supported(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise DataError(
                f"directory {str(path)!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files"
            )
        return sorted(files, key=lambda p: p.relative_to(path).parts)
    if not _supported(path):
        raise DataError(
            f"unsupported file type {path.suffix!r} for {str(path)!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (or a directory of such files)"
        )
    return [path]


def _decode_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    """Locate the first invalid byte exactly (text reads decode ahead in chunks)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        offset, reason = exc.start, exc.reason
    except UnicodeDecodeError as full:
        offset, reason = full.start, full.reason
    line = data.count(b"\n", 0, offset) + 1
    return DataError(
        f"{str(path)!r} is not valid UTF-8: {reason} at byte {offset} (line {line}); "
        "expected UTF-8 text, re-encode the file"
    )


def _iter_txt(path: Path) -> Iterator[str]:
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip()
                    lines = []
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from exc
    if lines:
        yield "".join(lines).strip()


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{str(path)!r} line {lineno}: invalid JSON ({exc.msg} at column "
                        f"{exc.colno}); expected one JSON object per line"
                    ) from exc
                if not isinstance(record, dict):
                    raise DataError(
                        f"{str(path)!r} line {lineno}: expected a JSON object, got "
                        f"{type(record).__name__}"
                    )
                if text_field not in record:
                    raise DataError(
                        f"{str(path)!r} line {lineno}: no field {text_field!r} (keys: "
                        f"{sorted(record)[:10]}); set text_field to the field holding the text"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{str(path)!r} line {lineno}: field {text_field!r} must be a string, "
                        f"got {type(text).__name__}"
                    )
                yield text
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from exc


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"reading {str(path)!r} needs pyarrow (pip install 'engram[parquet]' or pyarrow)"
        ) from exc
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{str(path)!r} is not a readable parquet file: {exc}") from exc
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(
            f"{str(path)!r} has no column {text_field!r} (columns: {schema.names}); set "
            "text_field to the column holding the text"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{str(path)!r}: column {text_field!r} must hold strings, got {kind}")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[text_field]):
        column = batch.column(0)
        if column.null_count:
            first = row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(
                f"{str(path)!r} row {first}: column {text_field!r} is null; expected a string"
            )
        yield from column.to_pylist()
        row += len(batch)


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``source`` (see the module docstring), whitespace-only ones dropped.

    The source is checked (existence, file types, translation names) before this returns; files
    are read lazily as the iterator advances.
    """
    return (text for text, _ in iter_grouped_documents(source, text_field))


def iter_grouped_documents(source: str, text_field: str = "text") -> Iterator[GroupedDocument]:
    """Yield ``(text, group_key)`` for the documents of ``source``, in ``iter_documents`` order.

    The key of a built-in chapter is its reference ``(book_number, chapter)``, shared by all its
    translations; a file document's key is its index, so each is its own group. The source is
    checked before this returns, as for ``iter_documents``.
    """
    translations = _builtin_translations(source)
    if translations is not None:
        return (
            (d.text, (d.book_number, d.chapter))
            for d in iter_builtin_documents(translations)
            if d.text.strip()
        )
    files = source_files(source)
    return ((text, i) for i, text in enumerate(_iter_files(files, text_field)))


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = _iter_txt(path)
        elif suffix == ".jsonl":
            docs = _iter_jsonl(path, text_field)
        else:
            docs = _iter_parquet(path, text_field)
        yield from (d for d in docs if d.strip())


def source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies the content of ``source`` without reading it (part of the cache key)."""
    translations = _builtin_translations(source)
    if translations is not None:
        versions = {}
        for dist in ["engram", *(f"pythonbible-{t}" for t in translations)]:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        corpus_code = Path(engram.corpus.__file__).read_bytes()
        return {
            "kind": BUILTIN,
            "translations": list(translations),
            "versions": versions,
            "corpus_py_sha256": hashlib.sha256(corpus_code).hexdigest(),
        }
    files = []
    for path in source_files(source):
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return {"kind": "files", "files": files}


def _describe(source: str) -> str:
    translations = _builtin_translations(source)
    if translations is not None:
        return f"{BUILTIN}:{','.join(translations)}"
    return str(Path(source).expanduser().resolve())


# ----------------------------------------------------------------------------- token cache


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Raw ids of each text, no special tokens added (HF tokenizers or transformers-style)."""
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _chunks(docs: Iterable[GroupedDocument]) -> Iterator[list[GroupedDocument]]:
    chunk: list[GroupedDocument] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc[0])
        if chars >= _ENCODE_CHARS or len(chunk) >= _ENCODE_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def cache_key(source: str, tokenizer: Any, sep_id: int, text_field: str = "text") -> str:
    """sha256 hex naming the cache of (source content, tokenizer, separator, text field)."""
    return _cache_key(
        source_fingerprint(source), tokenizer_fingerprint(tokenizer), sep_id, text_field
    )


def _cache_key(source_fp: dict[str, Any], tokenizer_fp: str, sep_id: int, text_field: str) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "source": source_fp,
        "tokenizer": tokenizer_fp,
        "sep_id": int(sep_id),
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_dir_name(key: str) -> str:
    return f"corpus-{key[:32]}"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class TokenizedCorpus:
    """A tokenized corpus in a cache directory: a flat memmapped id array plus document offsets.

    ``tokens[doc_offsets[i]:doc_offsets[i+1]]`` is document i followed by ``sep_id``; document i
    belongs to group ``groups[i]``. Files: ``tokens.bin`` (raw little-endian ids),
    ``doc_offsets.npy`` (int64), ``groups.npy`` (int64), ``meta.json``.
    """

    def __init__(
        self,
        path: Path,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        meta: dict[str, Any],
        groups: np.ndarray | None = None,
    ) -> None:
        self.path = path
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.meta = meta
        n_docs = len(doc_offsets) - 1
        # Without groups every document is its own group.
        self.groups = np.arange(n_docs, dtype=np.int64) if groups is None else groups

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def sep_id(self) -> int:
        return int(self.meta["sep_id"])

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    def __len__(self) -> int:
        return self.n_docs

    def doc(self, i: int) -> np.ndarray:
        """Ids of document ``i``, its trailing separator included (a view of the memmap)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def __repr__(self) -> str:
        return (
            f"TokenizedCorpus({self.meta.get('source')!r}, n_docs={self.n_docs}, "
            f"n_tokens={self.n_tokens}, dtype={self.tokens.dtype}, path={str(self.path)!r})"
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: PathLike, *, expected_key: str | None = None, verify_checksum: bool = True
    ) -> TokenizedCorpus:
        """Open a cache directory; raise ``DataError`` if anything about it is inconsistent."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(path)!r}: unreadable meta.json ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise DataError(f"{str(path)!r}: not a {FORMAT_VERSION} token cache")
        if expected_key is not None and meta.get("key") != expected_key:
            raise DataError(f"{str(path)!r}: cache key {meta.get('key')!r} != {expected_key!r}")
        try:
            dtype = np.dtype(meta["dtype"])
            n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
            sep_id = int(meta["sep_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{str(path)!r}: bad meta.json ({exc!r})") from exc
        if dtype not in (np.dtype("<u2"), np.dtype("<u4")) or n_tokens < 1 or n_docs < 1:
            raise DataError(f"{str(path)!r}: bad meta.json (dtype {dtype}, sizes {n_tokens})")
        tokens_file = path / "tokens.bin"
        size = tokens_file.stat().st_size if tokens_file.is_file() else -1
        if size != n_tokens * dtype.itemsize:
            raise DataError(
                f"{str(tokens_file)!r} has {size} bytes, expected {n_tokens * dtype.itemsize} "
                f"({n_tokens} {dtype} ids): truncated or corrupt"
            )
        try:
            offsets = np.load(path / "doc_offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(path)!r}: unreadable doc_offsets.npy ({exc})") from exc
        if (
            offsets.dtype != np.int64
            or offsets.shape != (n_docs + 1,)
            or offsets[0] != 0
            or offsets[-1] != n_tokens
            or np.any(np.diff(offsets) < 1)
        ):
            raise DataError(f"{str(path)!r}: doc_offsets.npy is inconsistent with meta.json")
        groups = _load_groups(path, n_docs, meta)
        if verify_checksum:
            digest = _file_sha256(tokens_file)
            if digest != meta.get("tokens_sha256"):
                raise DataError(f"{str(tokens_file)!r}: sha256 mismatch (corrupt)")
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(n_tokens,))
        if np.any(tokens[offsets[1:] - 1] != sep_id):
            raise DataError(f"{str(path)!r}: a document does not end with the separator")
        return cls(path, tokens, offsets, meta, groups)

    @classmethod
    def load_or_build(
        cls,
        source: str,
        tokenizer: Any,
        sep_id: int,
        cache_dir: PathLike | None = None,
        text_field: str = "text",
    ) -> TokenizedCorpus:
        """The cached corpus of ``source`` if valid, else tokenize and cache it (the entry point)."""
        return cls._load_or_build(source, tokenizer, sep_id, cache_dir, text_field, reuse=True)

    @classmethod
    def build(
        cls,
        source: str,
        tokenizer: Any,
        sep_id: int,
        cache_dir: PathLike | None = None,
        text_field: str = "text",
    ) -> TokenizedCorpus:
        """Tokenize ``source`` even if it is cached, and publish the result in the cache.

        A valid copy already published under the same key (by another process) is kept and
        returned instead: tokenization is deterministic, so both are identical.
        """
        return cls._load_or_build(source, tokenizer, sep_id, cache_dir, text_field, reuse=False)

    @classmethod
    def _load_or_build(
        cls,
        source: str,
        tokenizer: Any,
        sep_id: int,
        cache_dir: PathLike | None,
        text_field: str,
        reuse: bool,
    ) -> TokenizedCorpus:
        if isinstance(sep_id, bool) or not isinstance(sep_id, int | np.integer):
            raise DataError(f"sep_id must be an int, got {sep_id!r}")
        source_fp, tokenizer_fp = source_fingerprint(source), tokenizer_fingerprint(tokenizer)
        key = _cache_key(source_fp, tokenizer_fp, sep_id, text_field)
        target = resolve_cache_dir(cache_dir) / _cache_dir_name(key)
        if reuse and target.exists():
            try:
                return cls.load(target, expected_key=key)
            except (DataError, OSError) as exc:
                logger.warning("rebuilding invalid token cache %s: %s", target, exc)
        vocab_size = tokenizer_vocab_size(tokenizer)
        if not 0 <= sep_id < vocab_size:
            raise DataError(f"sep_id {sep_id} is not a token id of the tokenizer [0, {vocab_size})")
        docs = iter_grouped_documents(source, text_field)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            os.chmod(tmp, default_mode(directory=True))
            meta = _write_tokens(tmp, docs, tokenizer, int(sep_id), _token_dtype(vocab_size))
            if meta["n_docs"] == 0:
                raise DataError(f"data source {source!r} holds no documents (empty corpus)")
            if source_fingerprint(source) != source_fp:
                raise DataError(f"data source {source!r} changed while it was tokenized; retry")
            meta.update(
                format=FORMAT_VERSION,
                key=key,
                source=_describe(source),
                source_fingerprint=source_fp,
                tokenizer_fingerprint=tokenizer_fp,
                text_field=text_field,
            )
            _fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            logger.info(
                "tokenized %s: %d documents (%d groups), %d tokens in %.1f s",
                meta["source"],
                meta["n_docs"],
                meta["n_groups"],
                meta["n_tokens"],
                meta["build_seconds"],
            )
            return cls._publish(tmp, target, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def _publish(cls, tmp: Path, target: Path, key: str) -> TokenizedCorpus:
        """Rename ``tmp`` to ``target``; keep a valid ``target`` published by someone else."""
        for _ in range(5):
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
            else:
                return cls.load(target, expected_key=key, verify_checksum=False)
            try:  # someone published first: theirs is identical by construction
                return cls.load(target, expected_key=key)
            except (DataError, OSError):
                pass
            trash = target.with_name(f".{target.name}.trash-{uuid.uuid4().hex}")
            try:
                os.rename(target, trash)
            except FileNotFoundError:
                continue  # another process moved it aside already
            shutil.rmtree(trash, ignore_errors=True)
        raise DataError(f"could not publish the token cache {str(target)!r}")


def _write_tokens(
    directory: Path,
    docs: Iterable[GroupedDocument],
    tokenizer: Any,
    sep_id: int,
    dtype: np.dtype,
) -> dict[str, Any]:
    """Tokenize ``(text, group_key)`` pairs into ``directory``; return the size part of the meta.

    Documents that tokenize to nothing are dropped; group ids are dense over the kept documents,
    numbered in first-seen order.
    """
    start = time.perf_counter()
    sha = hashlib.sha256()
    lengths: list[np.ndarray] = []
    group_ids: dict[Hashable, int] = {}
    groups: list[int] = []
    n_tokens = n_inner_seps = 0
    sep = np.array([sep_id], dtype=dtype)
    with open(directory / "tokens.bin", "wb") as f:
        for chunk in _chunks(docs):
            encoded = _encode_batch(tokenizer, [text for text, _ in chunk])
            ids = []
            for (_, key), doc_ids in zip(chunk, encoded, strict=True):
                if len(doc_ids):
                    ids.append(doc_ids)
                    groups.append(group_ids.setdefault(key, len(group_ids)))
            if not ids:
                continue
            parts = []
            for i in ids:
                parts += (np.asarray(i, dtype=dtype), sep)
            flat = np.concatenate(parts)
            n_inner_seps += int(np.count_nonzero(flat == sep_id)) - len(ids)
            data = flat.tobytes()
            f.write(data)
            sha.update(data)
            lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1)
            n_tokens += len(flat)
        f.flush()
        os.fsync(f.fileno())
    if n_inner_seps:
        logger.warning("%d separator ids occur inside documents (kept as boundaries)", n_inner_seps)
    offsets = np.zeros(1 + sum(len(lens) for lens in lengths), dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    with open(directory / "doc_offsets.npy", "wb") as f:
        np.save(f, offsets, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    group_array = np.asarray(groups, dtype=np.int64)
    with open(directory / "groups.npy", "wb") as f:
        np.save(f, group_array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {
        "sep_id": sep_id,
        "n_docs": len(offsets) - 1,
        "n_groups": len(group_ids),
        "n_tokens": n_tokens,
        "dtype": dtype.str,
        "tokens_sha256": sha.hexdigest(),
        "groups_sha256": hashlib.sha256(group_array.tobytes()).hexdigest(),
        "build_seconds": round(time.perf_counter() - start, 3),
    }


def _load_groups(path: Path, n_docs: int, meta: dict[str, Any]) -> np.ndarray:
    """``groups.npy`` of a cache, checked: int64, one per document, dense first-seen ids."""
    try:
        groups = np.load(path / "groups.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r}: unreadable groups.npy ({exc})") from exc
    if groups.dtype != np.int64 or groups.shape != (n_docs,):
        raise DataError(
            f"{str(path)!r}: groups.npy holds {groups.dtype} {groups.shape}, expected int64 "
            f"({n_docs},), one group id per document"
        )
    seen = np.maximum.accumulate(groups)  # dense first-seen ids: each is <= 1 + max before it
    if (
        groups[0] != 0
        or np.any(groups < 0)
        or np.any(groups[1:] > seen[:-1] + 1)
        or meta.get("n_groups") != int(seen[-1]) + 1
        or meta.get("groups_sha256") != hashlib.sha256(groups.tobytes()).hexdigest()
    ):
        raise DataError(f"{str(path)!r}: groups.npy is inconsistent with meta.json")
    return groups


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- splits


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
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
        buf = self.tokens[idx].astype(np.int64)
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
                yield x, y, starts[:, None] + np.arange(seq_len, dtype=np.int64)
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


# ----------------------------------------------------------------------------- batches


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


@dataclass
class Batch:
    """One training step's data, as CPU torch tensors."""

    step: int  # the training step this batch belongs to (-1 for evaluation batches)
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 target ids (x shifted by one)
    rows: torch.Tensor | None  # (L, B, T, H) int64 Engram rows of x, or None without Engram
    build_seconds: float = 0.0  # time spent making it (windows + hashing, in the loader)

    @classmethod
    def from_numpy(
        cls,
        step: int,
        x: np.ndarray,
        y: np.ndarray,
        indexer: NgramIndexer | None,
        positions: np.ndarray | None = None,
    ) -> Batch:
        """Wrap (x, y) and hash x with ``indexer`` (resets at its separator), if any.

        ``positions`` (B, T): the tokens' offsets in the packed stream, for the "position"
        address control (see ``NgramIndexer.rows``).
        """
        start = time.perf_counter()
        kw = {} if positions is None else {"positions": positions}
        rows = None if indexer is None else torch.from_numpy(np.asarray(indexer.rows(x, **kw)))
        return cls(
            step, torch.from_numpy(x), torch.from_numpy(y), rows, time.perf_counter() - start
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device` (a no-op on the CPU; asynchronous from pinned memory on CUDA)."""
        if torch.device(device).type == "cpu":
            return self
        x, y = (t.to(device, non_blocking=non_blocking) for t in (self.x, self.y))
        rows = None if self.rows is None else self.rows.to(device, non_blocking=non_blocking)
        return Batch(self.step, x, y, rows, self.build_seconds)

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (faster, asynchronous host-to-GPU copies)."""
        pin = [t.pin_memory() for t in (self.x, self.y)]
        rows = None if self.rows is None else self.rows.pin_memory()
        return Batch(self.step, pin[0], pin[1], rows, self.build_seconds)


@dataclass(frozen=True, eq=False)
class _Producer:
    """Everything the worker needs, and nothing that points back at the loader."""

    split: PackedSplit
    batch_size: int
    seq_len: int
    seed: int
    indexer: NgramIndexer | None
    pin_memory: bool
    rank: int = 0
    world_size: int = 1

    def make_batch(self, step: int) -> Batch:
        start = time.perf_counter()
        starts = self.split.train_starts(
            step, self.batch_size, self.seq_len, self.seed, self.rank, self.world_size
        )
        x, y = self.split.windows(starts, self.seq_len)
        positions = None
        if getattr(self.indexer, "needs_positions", False):
            positions = starts[:, None] + np.arange(self.seq_len, dtype=np.int64)
        batch = Batch.from_numpy(step, x, y, self.indexer, positions)
        if self.pin_memory:
            batch = batch.pin_memory()
        batch.build_seconds = time.perf_counter() - start
        return batch


@dataclass(frozen=True, eq=False)
class _Failure:
    step: int
    exc: BaseException


def _worker(producer: _Producer, start_step: int, out: queue.Queue, stop: threading.Event) -> None:
    step = start_step
    while not stop.is_set():
        try:
            item: Batch | _Failure = producer.make_batch(step)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            item = _Failure(step, exc)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return
        step += 1


def _shutdown(stop: threading.Event, out: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    while True:  # drop prefetched batches so their memory goes now
        try:
            out.get_nowait()
        except queue.Empty:
            break
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=5.0)


class BatchLoader:
    """Iterator of training ``Batch``es for steps ``start_step, start_step + 1, ...``.

    A background thread makes them (random windows, then ``indexer.rows``) ``prefetch`` ahead.
    Batch contents equal ``make_batch(step)``, whatever the timing. With ``world_size`` > 1 each
    batch is this ``rank``'s block of the global batch (see ``PackedSplit.train_batch``). Use as a context manager or
    call ``close()``; dropping the last reference also stops the thread.
    """

    def __init__(
        self,
        data: PackedSplit | DataSplits,
        data_cfg: DataConfig,
        indexer: NgramIndexer | None,
        start_step: int = 0,
        prefetch: int = 2,
        seed: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        split = data.train if isinstance(data, DataSplits) else data
        if not isinstance(split, PackedSplit):
            raise TypeError(f"data must be a PackedSplit or DataSplits, got {type(data).__name__}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if start_step < 0 or seed < 0:
            raise ValueError(f"start_step and seed must be >= 0, got {start_step}, {seed}")
        split.check_seq_len(data_cfg.seq_len)
        if indexer is not None:
            expected = indexer.compressor.compress_id(split.sep_id)
            if indexer.sep_id != expected:
                raise DataError(
                    f"the indexer's separator (compressed id {indexer.sep_id}) is not the "
                    f"corpus separator {split.sep_id} (compressed {expected}); build the "
                    f"NgramIndexer with sep_id={split.sep_id} so n-grams do not cross documents"
                )
        self._producer = _Producer(
            split,
            data_cfg.batch_size,
            data_cfg.seq_len,
            seed,
            indexer,
            pin_memory and torch.cuda.is_available(),
            rank,
            world_size,
        )
        check_shard(data_cfg.batch_size, rank, world_size)
        self._next_step = start_step
        self._failure: _Failure | None = None
        self._closed = False
        self.wait_seconds = 0.0  # total time next() spent blocked on the worker
        self.build_seconds = 0.0  # total worker time of the batches served
        self.n_batches = 0  # batches served
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_worker,
            args=(self._producer, start_step, self._queue, self._stop),
            name=f"engram-batch-loader-{start_step}",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)

    def make_batch(self, step: int) -> Batch:
        """The batch of ``step``, computed synchronously in the caller's thread."""
        return self._producer.make_batch(step)

    @property
    def next_step(self) -> int:
        """The step of the batch the next ``next()`` returns."""
        return self._next_step

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        if self._failure is not None:
            raise self._failure.exc
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        start = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    try:  # it may have put its last item just before exiting
                        item = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        raise RuntimeError("the BatchLoader worker stopped unexpectedly") from None
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failure):
            self._failure = item
            item.exc.add_note(f"(raised in the BatchLoader worker making step {item.step})")
            self.close()
            raise item.exc
        if item.step != self._next_step:
            raise RuntimeError(f"BatchLoader got step {item.step}, expected {self._next_step}")
        self._next_step += 1
        self.n_batches += 1
        self.build_seconds += item.build_seconds
        return item

    def close(self) -> None:
        """Stop and join the worker (idempotent); later ``next()`` calls raise."""
        self._closed = True
        self._finalizer()

    @property
    def is_alive(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
