"""Reading user text into documents: the built-in corpus, ``.txt``, ``.jsonl``, ``.parquet``, dirs.

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
- Sources are checked (existence, file types, translation names) eagerly, when the iterator is
  made; the files themselves are read lazily, one document at a time, so a large file is never
  held in memory whole.
- ``source_fingerprint`` identifies a source's content without reading it (part of the token
  cache key): built-in: translations, the Bible packages' and engram's versions, and the hash of
  ``engram/corpus.py``; files: resolved path, size and mtime_ns of every file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

import engram.corpus
from engram.corpus import TRANSLATIONS, check_translations, iter_builtin_documents
from engram.data.config import BUILTIN, DataError, GroupedDocument, PathLike
from engram.version import __version__

SUPPORTED_SUFFIXES: Final = (".txt", ".jsonl", ".parquet")
"""File types ``iter_documents`` reads (matched case-insensitively)."""

_PARQUET_BATCH: Final = 4096  # rows per pyarrow record batch


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
            f"reading {str(path)!r} needs pyarrow (pip install 'engram-lm[parquet]' or pyarrow)"
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
        # engram's own version under its old key "engram", whatever the distribution is called
        # (it is installed as engram-lm): existing cache keys stay valid.
        versions = {"engram": __version__}
        for dist in (f"pythonbible-{t}" for t in translations):
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


def describe_source(source: str) -> str:
    """A readable name of ``source`` for logs and cache metadata (built-in: its translations)."""
    translations = _builtin_translations(source)
    if translations is not None:
        return f"{BUILTIN}:{','.join(translations)}"
    return str(Path(source).expanduser().resolve())
