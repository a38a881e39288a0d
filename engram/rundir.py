"""A run directory has one writer, and a refused start leaves it as it was.

Design choices:
- One writer: the process that trains into a run directory holds an exclusive `fcntl.flock`
  on `<run>/.lock` for as long as it runs. The kernel drops the lock when the process exits,
  however it exits (SIGKILL included), so a lock can never outlive its holder on the same host.
  The file's text says who holds it (pid, host, since when) for the refusal message only; the
  flock decides. A second writer is refused at once (`RunDirLocked`), never queued.
- A stale lock (its text names a holder, but nobody holds the flock: the holder died without
  releasing it) is taken over with a warning naming the dead holder.
- The lock file exists only while held: the holder unlinks it on release. Unlinking a locked
  file races with a process that opened it just before; `acquire` therefore checks, after
  locking, that the path still names the inode it locked, and retries otherwise.
- Nothing behind a refused start: a directory this process created is removed again if the
  start fails (only while this process holds its lock, so a concurrent writer's directory is
  never touched); in a directory that existed, the start writes nothing until it has passed
  every check (see `engram.train.Trainer`).
- Standard library only; no module state: a `RunLock` is an object its caller holds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunDirLocked(ValueError):
    """Another live process is writing this run directory."""


class RunDirError(ValueError):
    """The run directory cannot be written (full disk, permissions...); the message names it."""


def os_cause(e: OSError) -> str:
    """`[Errno 28] No space left on device`: the cause of an OSError, without its file name."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else str(e)


def _holder_text() -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid={os.getpid()} host={socket.gethostname()} since={now}\n"


def _parse_holder(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def _describe(holder: Mapping[str, str]) -> str:
    if not holder:
        return "another process (it wrote no pid)"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"since {holder.get('since', '?')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class RunLock:
    """The exclusive writer lock of one run directory (`acquire`, then `release`)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise `RunDirLocked` naming the holder; warn on a stale one."""
        if self._fd is not None:
            return
        for _ in range(10):  # retried only when the holder unlinked the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunDirLocked(self._refusal()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._take_over(fd)
            return
        raise RunDirLocked(f"{self.path} keeps being replaced; is another run starting here?")

    def _refusal(self) -> str:
        try:
            holder = _parse_holder(self.path.read_text(encoding="utf-8"))
        except OSError:
            holder = {}
        return (
            f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path}); "
            "a run directory has one writer: wait for it to finish, stop it, or use another "
            "output directory"
        )

    def _take_over(self, fd: int) -> None:
        with os.fdopen(os.dup(fd), "r+", encoding="utf-8") as f:
            previous = _parse_holder(f.read())
            if previous:
                pid = int(previous.get("pid", "0") or 0)
                here = previous.get("host") == socket.gethostname()
                state = "dead" if here and pid and not _pid_alive(pid) else "no longer holding it"
                logger.warning(
                    "engram: warning: taking over the stale lock %s of %s (%s)",
                    self.path, _describe(previous), state,
                )  # fmt: skip
            f.seek(0)
            f.truncate()
            f.write(_holder_text())
            f.flush()
        self._fd = fd

    def release(self) -> None:
        """Give the lock up and remove its file (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: the next writer finds no stale text
        os.close(fd)


class RunDir:
    """A run directory during a start: who holds it, and whether this start created it."""

    def __init__(self, path: Path, lock: RunLock | None, created: Path | None) -> None:
        self.path = path
        self.lock = lock
        self.created = created  # the topmost directory this process made, if any
        self.started = False  # set by `commit`: from then on a failure keeps the directory

    def commit(self) -> None:
        """The start passed every check: the directory is the run's from now on."""
        self.started = True


def _first_missing(path: Path) -> Path | None:
    path = path.absolute()
    missing = None
    while not path.exists():
        missing = path
        if path.parent == path:
            break
        path = path.parent
    return missing


@contextlib.contextmanager
def open_run_dir(path: str | os.PathLike[str], writer: bool = True) -> Iterator[RunDir]:
    """The run directory `path`, locked for this process while the block runs (`writer`).

    A directory this call created is removed again if the block raises before `commit()`.
    `writer=False` (the non-zero ranks of a distributed run) neither creates nor locks.
    """
    out = Path(path)
    created = None
    lock = None
    if writer:
        created = _first_missing(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {out}: {os_cause(e)}") from e
        lock = RunLock(out)
        try:
            lock.acquire()
        except BaseException:
            if created is not None:
                _remove_if_empty(created)
            raise
    run = RunDir(out, lock, created)
    try:
        yield run
    except BaseException:
        if writer and created is not None and not run.started:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_if_empty(path: Path) -> None:
    """Remove the directories this call made, unless another process has put something there."""
    for p in sorted((q for q in [path, *path.rglob("*")] if q.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            p.rmdir()


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """`key.sub: old -> new` for every dotted key whose value differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
