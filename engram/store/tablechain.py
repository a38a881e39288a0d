"""Incremental checkpoints of a table trained on disk: one full base plus row deltas.

A checkpoint of a `DiskTrainedStore` (weight + Adam's two moments, each (num_rows, dim) float32)
is a *chain*: one base (three complete `.engt` table files) followed by zero or more deltas
(`.engd` files, each holding the rows written between two checkpoints: their ids and their
three parts). The table at the checkpoint = the base with every delta applied in order. The
chain is listed, with each file's size and crc32, in ``L<id>.chain.json`` beside the files and
in the checkpoint's ``state.json``.

Delta file layout (integers little-endian; offsets in bytes)::

    [0, 4096)                          header: the fixed part below, zero padded
    [4096, +align(8 * count, 64))      row ids, int64, strictly increasing, zero padded
    then three blocks of (count, dim) float32 rows: weight, exp_avg, exp_avg_sq

    header  off  size  field
              0     8  magic b"ENGRAMDL"
              8     4  uint32 format version (= 1)
             12     4  uint32 header_crc: zlib.crc32 of the 4096 header bytes, this field zeroed
             16     4  uint32 layer_id
             20     4  uint32 dim
             24     8  uint64 num_rows of the table
             32     8  uint64 count: rows in this delta
             40     8  uint64 step: the store's Adam step count when it was written
             48     4  uint32 data_crc: zlib.crc32 of everything after the header
             52    64  ascii  hash-configuration fingerprint (sha256 hex), NUL padded

Design choices:
- Every file of a chain is immutable once written (atomically, via `engram.atomic`), so a chain
  can be shared: a checkpoint directory hard-links its predecessors' base and deltas instead of
  copying them. Each checkpoint directory stays self-contained (deleting an older checkpoint
  removes names, not data), and a crash at any point leaves earlier checkpoints untouched.
- The base keeps the ordinary table-file names (``L<id>.weight.engt``...) in the checkpoint that
  wrote it, so a checkpoint without deltas is exactly the old full-copy format; later
  checkpoints link it as ``L<id>.base.<part>.engt`` and their canonical names stay free for
  `materialise` (the table with the deltas applied, written on first use by a reader).
- Integrity: each file carries its own crc (the `.engt` header's data crc, the delta header's),
  and the chain record repeats it, so a file swapped for another valid one is refused too.
  A missing, truncated or corrupt file is a `TableChainError` naming it.
- Deltas are written in three streaming passes over the sorted row ids (one per part), memory
  bounded by `chunk_rows` rows, whatever the number of rows touched.
- A copy-on-write clone (Linux FICLONE) is tried where a whole file is copied (a base written
  from the working files, a restore's base copy); filesystems without it (ext4, tmpfs) fall back
  to an ordinary copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engram.atomic import atomic_open, atomic_write_text
from engram.store.tablefile import (
    _IO_CHUNK,
    FINGERPRINT_NBYTES,
    PAGE,
    TableFileError,
    TableHeader,
    _align,
    _crc_range,
    read_header,
    verify_table,
    write_table,
)

PARTS = ("weight", "exp_avg", "exp_avg_sq")
DELTA_MAGIC = b"ENGRAMDL"
DELTA_VERSION = 1
DELTA_HEADER_NBYTES = PAGE
DELTA_SUFFIX = ".engd"
_ROW_ALIGN = 64
_DFIXED = struct.Struct("<8sIIIIQQQI64s")  # magic ... fingerprint (see the module docstring)
_DCRC_OFFSET = 12
_FICLONE = 0x40049409  # _IOW(0x94, 9, int)


class TableChainError(TableFileError):
    """A checkpoint's base or delta file that is missing, damaged, or not the one recorded."""


# ------------------------------------------------------------------------------------ names
def part_file(layer_id: int, part: str) -> str:
    """File name of one part of layer `layer_id`'s trained table (a complete `.engt` file)."""
    if part not in PARTS:
        raise ValueError(f"unknown table part {part!r}; expected one of {PARTS}")
    return f"L{layer_id}.{part}.engt"


def linked_base_file(layer_id: int, part: str) -> str:
    """The name a later checkpoint links its chain's base under (keeps `part_file` free)."""
    return f"L{layer_id}.base.{part}.engt"


def delta_file(layer_id: int, index: int) -> str:
    """The name of the chain's `index`-th delta (1-based position in the chain)."""
    return f"L{layer_id}.delta-{index:04d}{DELTA_SUFFIX}"


def manifest_file(layer_id: int) -> str:
    return f"L{layer_id}.chain.json"


# ------------------------------------------------------------------------------ delta files
@dataclass(frozen=True)
class DeltaHeader:
    """What a delta file's header says."""

    layer_id: int
    dim: int
    num_rows: int
    count: int
    step: int
    fingerprint: str
    data_crc: int = 0

    @property
    def rows_offset(self) -> int:
        return DELTA_HEADER_NBYTES

    def part_offset(self, part: str) -> int:
        """Byte offset of `part`'s (count, dim) float32 block."""
        first = DELTA_HEADER_NBYTES + _align(8 * self.count, _ROW_ALIGN)
        return first + PARTS.index(part) * self.count * self.dim * 4

    @property
    def file_nbytes(self) -> int:
        return delta_nbytes(self.count, self.dim)


def delta_nbytes(count: int, dim: int) -> int:
    """Size of a delta file of `count` rows: header + ids (64-byte aligned) + 3 float32 parts."""
    return DELTA_HEADER_NBYTES + _align(8 * count, _ROW_ALIGN) + 3 * count * dim * 4


def _pack_delta_header(h: DeltaHeader) -> bytes:
    fp = h.fingerprint.encode("ascii")
    if len(fp) > FINGERPRINT_NBYTES:
        raise ValueError(
            f"fingerprint longer than {FINGERPRINT_NBYTES} characters: {h.fingerprint}"
        )
    fixed = _DFIXED.pack(
        DELTA_MAGIC, DELTA_VERSION, 0, h.layer_id, h.dim, h.num_rows, h.count, h.step,
        h.data_crc, fp.ljust(FINGERPRINT_NBYTES, b"\0"),
    )  # fmt: skip
    buf = bytearray(DELTA_HEADER_NBYTES)
    buf[: len(fixed)] = fixed
    struct.pack_into("<I", buf, _DCRC_OFFSET, zlib.crc32(buf))
    return bytes(buf)


def write_delta(
    path: str | os.PathLike[str],
    rows: Tensor,
    read: Callable[[str, Tensor], Tensor],
    *,
    layer_id: int,
    num_rows: int,
    dim: int,
    step: int,
    fingerprint: str,
    chunk_rows: int = 65536,
) -> DeltaHeader:
    """Write a delta file atomically: `rows` (U,) strictly increasing ids, and for each part
    `read(part, ids)` -> (len(ids), dim) float32, called chunk by chunk. Returns its header."""
    rows = rows.reshape(-1).to(torch.int64).contiguous()  # (U,)
    count = int(rows.numel())
    if count and (int(rows[0]) < 0 or int(rows[-1]) >= num_rows):
        raise ValueError(f"delta row ids must lie in [0, {num_rows}), got [{rows[0]}, {rows[-1]}]")
    if count > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("delta row ids must be strictly increasing")
    h = DeltaHeader(layer_id, dim, num_rows, count, step, fingerprint)
    with atomic_open(path, "w+b") as f:
        f.write(bytes(DELTA_HEADER_NBYTES))  # placeholder; the real header goes in last
        ids = rows.numpy().astype("<i8", copy=False).tobytes()
        pad = bytes(_align(len(ids), _ROW_ALIGN) - len(ids))
        f.write(ids)
        f.write(pad)
        crc = zlib.crc32(pad, zlib.crc32(ids))
        for part in PARTS:
            for a in range(0, count, chunk_rows):
                idx = rows[a : a + chunk_rows]
                values = read(part, idx)
                if tuple(values.shape) != (len(idx), dim) or values.dtype != torch.float32:
                    raise ValueError(
                        f"delta source returned {values.dtype} {tuple(values.shape)} for {part}; "
                        f"expected float32 ({len(idx)}, {dim})"
                    )
                buf = values.contiguous().numpy().tobytes()
                f.write(buf)
                crc = zlib.crc32(buf, crc)
        h = replace(h, data_crc=crc)
        f.flush()
        os.pwrite(f.fileno(), _pack_delta_header(h), 0)
    return h


def read_delta_header(
    path: str | os.PathLike[str], *, expected_fingerprint: str | None = None
) -> DeltaHeader:
    """Check a delta file's magic, version, header crc, size and fingerprint; its header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            buf = bytearray(f.read(DELTA_HEADER_NBYTES))
    except FileNotFoundError as e:
        raise TableChainError(f"delta file {path} is missing") from e
    if len(buf) < DELTA_HEADER_NBYTES or bytes(buf[:8]) != DELTA_MAGIC:
        raise TableChainError(f"{path} is not an Engram delta file (bad magic or too short)")
    (stored,) = struct.unpack_from("<I", buf, _DCRC_OFFSET)
    struct.pack_into("<I", buf, _DCRC_OFFSET, 0)
    if zlib.crc32(buf) != stored:
        raise TableChainError(f"delta file {path} has a corrupt header (crc mismatch)")
    _, version, _, layer_id, dim, num_rows, count, step, data_crc, fp = _DFIXED.unpack_from(buf)
    if version != DELTA_VERSION:
        raise TableChainError(f"delta file {path} has version {version}; expected {DELTA_VERSION}")
    h = DeltaHeader(layer_id, dim, num_rows, count, step, fp.rstrip(b"\0").decode(), data_crc)
    if size != h.file_nbytes:
        state = "truncated" if size < h.file_nbytes else "longer than its header says"
        raise TableChainError(
            f"delta file {path} is {state}: {size} bytes, expected {h.file_nbytes}"
        )
    if expected_fingerprint is not None and h.fingerprint != expected_fingerprint:
        raise TableChainError(
            f"delta file {path} was written for hash configuration {h.fingerprint[:16]}, "
            f"expected {expected_fingerprint[:16]}"
        )
    return h


def verify_delta(
    path: str | os.PathLike[str], *, expected_fingerprint: str | None = None
) -> DeltaHeader:
    """`read_delta_header`, then recompute the data crc (a full read in bounded chunks)."""
    path = Path(path)
    h = read_delta_header(path, expected_fingerprint=expected_fingerprint)
    with open(path, "rb") as f:
        crc = _crc_range(f, DELTA_HEADER_NBYTES, os.fstat(f.fileno()).st_size - DELTA_HEADER_NBYTES)
    if crc != h.data_crc:
        raise TableChainError(
            f"delta file {path} is corrupt: data crc32 {crc:08x}, expected {h.data_crc:08x}"
        )
    return h


class DeltaReader:
    """Read-only views of a delta file: its row ids (count,) and each part (count, dim)."""

    def __init__(self, path: str | os.PathLike[str], header: DeltaHeader | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_delta_header(self.path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def rows(self) -> np.ndarray:
        h = self.header
        return self._mm[h.rows_offset : h.rows_offset + 8 * h.count].view("<i8")  # (count,)

    def part(self, part: str) -> np.ndarray:
        h = self.header
        a = h.part_offset(part)
        return self._mm[a : a + h.count * h.dim * 4].view("<f4").reshape(h.count, h.dim)

    def close(self) -> None:
        mm = getattr(self._mm, "_mmap", None)
        self._mm = None  # type: ignore[assignment]
        if mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC closes it
                mm.close()

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------- chains
def base_entry(step: int, files: Mapping[str, str], headers: Mapping[str, TableHeader]) -> dict:
    """The chain record of a base: {kind, step, files {part: name}, crc {part}, nbytes}."""
    return {
        "kind": "base",
        "step": int(step),
        "files": dict(files),
        "crc": {p: f"{headers[p].data_crc:08x}" for p in PARTS},
        "nbytes": sum(headers[p].file_nbytes for p in PARTS),
    }


def delta_entry(step: int, file: str, h: DeltaHeader) -> dict:
    """The chain record of a delta: {kind, step, file, rows, crc, nbytes}."""
    return {
        "kind": "delta", "step": int(step), "file": file, "rows": h.count,
        "crc": f"{h.data_crc:08x}", "nbytes": h.file_nbytes,
    }  # fmt: skip


def chain_files(chain: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every file name a chain record lists, base first."""
    out: list[str] = []
    for e in chain:
        out.extend(e["files"][p] for p in PARTS) if e["kind"] == "base" else out.append(e["file"])
    return out


def write_manifest(directory: Path, layer_id: int, record: Mapping[str, Any]) -> Path:
    """``L<id>.chain.json`` (atomic): what `restore` reads without the checkpoint's state.json."""
    path = directory / manifest_file(layer_id)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def read_chain(directory: Path, layer_id: int) -> list[dict[str, Any]]:
    """The chain saved in `directory`; a directory of the full-copy format is a lone base."""
    path = directory / manifest_file(layer_id)
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            chain = record["chain"]
        except (OSError, ValueError, KeyError) as e:
            raise TableChainError(f"{path} is unreadable or corrupt: {e}") from e
        return list(chain)
    files = {p: part_file(layer_id, p) for p in PARTS}
    missing = [str(directory / f) for f in files.values() if not (directory / f).is_file()]
    if missing:
        raise TableChainError(f"trained-table files missing: {missing}")
    headers = {p: read_header(directory / f) for p, f in files.items()}
    return [base_entry(0, files, headers)]


def check_chain(
    directory: Path,
    chain: Sequence[Mapping[str, Any]],
    *,
    expected_fingerprint: str | None = None,
    full: bool = True,
) -> tuple[dict[str, TableHeader], list[DeltaHeader]]:
    """Check every file of `chain` in `directory` against the chain record: present, intact
    header, the recorded crc and (with `full`) data matching it. Returns the base's headers and
    the deltas' headers in order."""
    if not chain or chain[0].get("kind") != "base" or any(e["kind"] != "delta" for e in chain[1:]):
        raise TableChainError(f"{directory}: a chain must be one base then deltas, got {chain}")
    base = chain[0]
    headers: dict[str, TableHeader] = {}
    for p in PARTS:
        path = directory / base["files"][p]
        if not path.is_file():
            raise TableChainError(f"checkpoint table file {path} is missing")
        check = verify_table if full else read_header
        try:
            h = check(path, expected_fingerprint=expected_fingerprint)
        except TableFileError as e:
            raise TableChainError(str(e)) from e
        if f"{h.data_crc:08x}" != base["crc"][p]:
            raise TableChainError(
                f"checkpoint table file {path} is not the one its chain records (crc "
                f"{h.data_crc:08x}, recorded {base['crc'][p]})"
            )
        headers[p] = h
    w = headers["weight"]
    deltas = []
    for e in chain[1:]:
        path = directory / e["file"]
        check_d = verify_delta if full else read_delta_header
        d = check_d(path, expected_fingerprint=expected_fingerprint)
        if f"{d.data_crc:08x}" != e["crc"]:
            raise TableChainError(
                f"delta file {path} is not the one its chain records (crc {d.data_crc:08x}, "
                f"recorded {e['crc']})"
            )
        if (d.num_rows, d.dim, d.layer_id) != (w.num_rows, w.dim, w.layer_id):
            raise TableChainError(
                f"delta file {path} is for a {d.num_rows} x {d.dim} table of layer {d.layer_id}, "
                f"but the base is {w.num_rows} x {w.dim} of layer {w.layer_id}"
            )
        deltas.append(d)
    return headers, deltas


def apply_deltas(
    directory: Path,
    chain: Sequence[Mapping[str, Any]],
    deltas: Sequence[DeltaHeader],
    write: Callable[[str, Tensor, Tensor], None],
    chunk_rows: int = 65536,
) -> None:
    """Replay the chain's deltas in order: `write(part, ids (n,), values (n, dim))` per chunk."""
    for e, h in zip(chain[1:], deltas, strict=True):
        with DeltaReader(directory / e["file"], h) as d:
            ids = torch.from_numpy(np.array(d.rows))  # (count,)
            for part in PARTS:
                block = d.part(part)
                for a in range(0, h.count, chunk_rows):
                    b = min(a + chunk_rows, h.count)
                    write(part, ids[a:b], torch.from_numpy(np.array(block[a:b])))


class ChainReader:
    """Rows [a, b) of one part of the table a chain describes (base overlaid with its deltas)."""

    def __init__(
        self,
        directory: Path,
        chain: Sequence[Mapping[str, Any]],
        part: str,
        *,
        expected_fingerprint: str | None = None,
        verify: bool = True,
    ) -> None:
        if part not in PARTS:
            raise ValueError(f"unknown table part {part!r}; expected one of {PARTS}")
        headers, deltas = check_chain(
            directory, chain, expected_fingerprint=expected_fingerprint, full=verify
        )
        self.part, self.header = part, headers[part]
        self._base = directory / chain[0]["files"][part]
        self._deltas = [
            DeltaReader(directory / e["file"], h) for e, h in zip(chain[1:], deltas, strict=True)
        ]

    @property
    def num_rows(self) -> int:
        return self.header.num_rows

    @property
    def dim(self) -> int:
        return self.header.dim

    def read_range(self, start: int, stop: int) -> Tensor:
        """(stop - start, dim) float32: the base's rows, then each delta's rows in the range."""
        h = self.header
        out = np.fromfile(
            self._base, dtype="<f4", count=(stop - start) * h.dim,
            offset=h.data_offset + start * h.dim * 4,
        ).reshape(stop - start, h.dim)  # fmt: skip
        for d in self._deltas:
            ids = d.rows
            lo, hi = np.searchsorted(ids, [start, stop])
            if hi > lo:
                out[ids[lo:hi] - start] = d.part(self.part)[lo:hi]
        return torch.from_numpy(out)

    def close(self) -> None:
        for d in self._deltas:
            d.close()
        self._deltas = []


def materialise(
    directory: Path,
    chain: Sequence[Mapping[str, Any]],
    part: str,
    dest: Path,
    *,
    expected_fingerprint: str | None = None,
    chunk_rows: int = 65536,
) -> TableHeader:
    """Write the complete `part` table the chain describes to `dest` (an ordinary `.engt`)."""
    reader = ChainReader(directory, chain, part, expected_fingerprint=expected_fingerprint)
    try:
        h = reader.header
        return write_table(
            dest, reader.read_range, fingerprint=h.fingerprint, layer_id=h.layer_id,
            meta=h.meta, num_rows=h.num_rows, dim=h.dim, chunk_rows=chunk_rows,
        )  # fmt: skip
    finally:
        reader.close()


# ------------------------------------------------------------------------------ whole files
def clone_file(src: Path, dst_fd: int) -> bool:
    """Copy-on-write clone of `src` into the open file `dst_fd` (FICLONE); False where the
    filesystem cannot (ext4, tmpfs, across filesystems), leaving `dst_fd` untouched."""
    try:
        with open(src, "rb") as fin:
            fcntl.ioctl(dst_fd, _FICLONE, fin.fileno())
    except OSError as e:
        if e.errno in (
            errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM,
        ):  # fmt: skip
            return False
        raise
    return True


class _NoClone(Exception):
    """Internal: the filesystem refused a clone (the temp file is discarded)."""


def clone_to(src: Path, dst: Path) -> bool:
    """Atomic copy-on-write clone of `src` at `dst`; False (nothing written) where unsupported."""
    try:
        with atomic_open(dst, "wb") as fout:
            if not clone_file(src, fout.fileno()):
                raise _NoClone
    except _NoClone:
        return False
    return True


def can_clone(src_dir: Path, dst_dir: Path) -> bool:
    """Whether files in `src_dir` can be cloned into `dst_dir` (a probe with a 4 KiB file), so
    a caller does not pay for preparing a big clone (sealing its source) that cannot happen."""
    fd, probe = tempfile.mkstemp(dir=src_dir, prefix=".clone-probe.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(4096))
        fd2, target = tempfile.mkstemp(dir=dst_dir, prefix=".clone-probe.")
        try:
            return clone_file(Path(probe), fd2)
        finally:
            os.close(fd2)
            os.unlink(target)
    finally:
        os.unlink(probe)


def copy_file(src: Path, dst: Path) -> tuple[int, bool]:
    """Atomic copy of `src` to `dst`, a CoW clone where possible; (bytes copied, cloned)."""
    with atomic_open(dst, "wb") as fout:
        if clone_file(src, fout.fileno()):
            return 0, True
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, fout, _IO_CHUNK)
    return dst.stat().st_size, False
