"""The token cache: a source tokenized once into a memory-mapped array, keyed by what made it.

Design choices:
- One flat token array per (source, tokenizer, separator): each document's ids followed by the
  separator (GPT-2's ``<|endoftext|>``), ``uint16`` when the vocabulary fits, else ``uint32``;
  ``doc_offsets`` (int64, n_docs+1) marks document spans, separator included; ``groups`` (int64,
  n_docs) holds each document's group id, dense ``0..G-1`` in first-seen order.
- The cache directory is named by sha256 of a format tag (``FORMAT_VERSION``), the source
  fingerprint (see :func:`engram.data.sources.source_fingerprint`), the tokenizer fingerprint,
  the separator and the text field. Any change makes a new key; nothing is ever updated in place.
- Atomic cache writes: build into a temporary directory next to the target, fsync, then rename.
  If another process published first, its (identical) cache is used and ours discarded. Loading
  verifies the metadata, the file size, the offsets, the group ids (one per document, dense, and
  their sha256) and the sha256 of ``tokens.bin`` (about 1 ms per MB, negligible next to
  tokenizing); a failing cache is moved aside and rebuilt, never used.
- A literal separator inside a document's text (``"<|endoftext|>"`` typed in the text) is kept:
  the tokenizer maps it to the separator id, so hashing treats it as a boundary. It is logged.
- Tokenizing is batched (``_ENCODE_CHARS`` characters or ``_ENCODE_DOCS`` documents per call):
  memory stays bounded and the tokenizer's threads stay busy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from engram.atomic import default_mode
from engram.compress import tokenizer_fingerprint, tokenizer_vocab_size
from engram.data.config import DataError, GroupedDocument, PathLike, resolve_cache_dir
from engram.data.sources import describe_source, iter_grouped_documents, source_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = "engram.data/v2"
"""Version tag of the cache layout and document rules; part of every cache key. Bump on change."""

_ENCODE_CHARS: Final = (
    1 << 22
)  # characters per encode_batch call (bounds memory, keeps threads busy)
_ENCODE_DOCS: Final = 4096  # documents per encode_batch call at most


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
                source=describe_source(source),
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
