"""Atomic file writes: a temp file in the target's directory, fsynced, then `os.replace`.

A reader (or a crash) sees either the old file or the new one, never a partial write. Every
file the library writes outside a checkpoint directory goes through here; checkpoint
directories use the same idea one level up (see `engram.checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def default_mode(directory: bool = False) -> int:
    """The permissions a plain `open`/`mkdir` would give under the current umask.

    `tempfile.mkstemp`/`mkdtemp` create 0600/0700 entries; outputs meant for the user (configs,
    metrics, plots, checkpoints) get the ordinary mode instead.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the `with` block ends without an error.

    It is a temp file in the same directory; on success it is flushed, fsynced, given the
    ordinary mode, renamed over `path` and the rename itself is fsynced (best effort). On any
    error, Ctrl-C included, the temp file is removed and an existing `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some filesystems refuse this)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (parent directories are created)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
