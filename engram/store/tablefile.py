"""The Engram table file (``.engt``): one flat table on disk, ready to be memory-mapped.

A file holds ONE flat Engram table of shape (num_rows, dim): one layer's (N-1)*K hash sub-tables
laid end to end, exactly the tensor an in-memory store keeps as its ``weight``.

Layout (all integers little-endian; offsets in bytes)::

    [0, header_nbytes)          header (fixed part + JSON metadata, zero padded; 4096 by default)
    [data_offset, +data_nbytes) rows, row-major, num_rows * dim elements of the storage dtype
    (zero padding up to a multiple of 64)
    [scale_offset, +scale_nbytes)  int8 only: float32 per-row scales, (num_rows,)

Header, fixed part (148 bytes)::

    off  size  type      field
      0     8  bytes     magic b"ENGRAMTB"
      8     4  uint32    format version (= 1)
     12     4  uint32    header_nbytes (a multiple of 4096, so the data is page-aligned)
     16     4  uint32    header_crc: zlib.crc32 of the header_nbytes header bytes, this field zeroed
     20     4  uint32    flags (bit 0 = DIRTY: opened by a writer and not sealed since)
     24     4  uint32    dtype code: 1 float32, 2 bfloat16, 3 float16, 4 int8
     28     4  uint32    dim
     32     8  uint64    num_rows
     40     4  uint32    layer_id (the Engram block index)
     44     4  uint32    data_crc: zlib.crc32 of the data region, then the scale region
     48     8  uint64    data_offset (= header_nbytes)
     56     8  uint64    data_nbytes (= num_rows * dim * itemsize)
     64     8  uint64    scale_offset (0 when there are no scales)
     72     8  uint64    scale_nbytes (num_rows * 4 for int8, else 0)
     80    64  ascii     hash-configuration fingerprint (sha256 hex), NUL padded
    144     4  uint32    meta_nbytes
    148     *  utf-8     metadata: a JSON object (sub-table sizes, source checkpoint, created time...)

Design choices:
- The header is a whole number of 4096-byte pages (4096 unless the metadata needs more), so the
  row data starts page-aligned and a memory map of it is directly usable as a tensor
  (`engram.store.mmap.MmapRowStore`). Rows are stored raw: reading row i is one contiguous read at
  data_offset + i * bytes_per_row, no decoding except int8's one multiply.
- Storage dtypes: float32 (exact), bfloat16/float16 (rounded by `Tensor.to`), int8 with symmetric
  per-row scales: scale = max|row| / 127, q = round(row / scale) clamped to [-127, 127], so the
  error is at most scale / 2 per element; an all-zero row gets scale 0 and reads back as exact 0.
- Integrity is checked in two tiers. `read_header` (cheap, done on every open) checks magic,
  version, header crc, the file size against the header (truncation), the DIRTY flag and,
  optionally, the fingerprint. `verify_table` also recomputes the data crc -- a full read of the
  file in bounded-size chunks, so it is opt-in for huge tables.
- The fingerprint of the hash configuration travels with the rows: a table addressed by another
  hashing (seed, primes, tokenizer compression...) is refused, because its rows would silently
  mean different n-grams.
- Writes are atomic and streamed: `write_table` writes a temp file in the target's directory chunk
  by chunk (memory bounded by chunk_rows * dim, whatever the table size; a source may be a
  callable producing chunks on demand), fsyncs, then `os.replace`s it into place. A failure at any
  point removes the temp file and leaves an existing file untouched.
- The DIRTY flag is for writers that modify a table in place through a memory map: they set it on
  open and clear it (with a fresh data crc) when they seal. A crash in between leaves the flag set,
  and readers refuse such a file unless told otherwise (`allow_dirty=True`).
- The host must be little-endian (every platform torch supports in practice); a big-endian host is
  refused rather than silently reading byte-swapped rows.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engram.atomic import atomic_open

MAGIC = b"ENGRAMTB"
FORMAT_VERSION = 1
PAGE = 4096
HEADER_NBYTES = PAGE
SCALE_ALIGN = 64
FLAG_DIRTY = 1
FINGERPRINT_NBYTES = 64
SUFFIX = ".engt"

# magic, version, header_nbytes, header_crc, flags, dtype code, dim, num_rows, layer_id, data_crc,
# data_offset, data_nbytes, scale_offset, scale_nbytes, fingerprint, meta_nbytes
_FIXED = struct.Struct("<8sIIIIIIQIIQQQQ64sI")
assert _FIXED.size == 148
_CRC_OFFSET = 16
_FLAGS_OFFSET = 20

DTYPE_CODES: dict[str, int] = {"float32": 1, "bfloat16": 2, "float16": 3, "int8": 4}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

_IO_CHUNK = 16 << 20  # bytes per read when checksumming
_INT8_MAX = 127.0


class TableFileError(ValueError):
    """A table file that is damaged, unsealed, of another format, or made for another hashing."""


def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no such torch host in practice
        raise TableFileError("Engram table files are little-endian; this host is big-endian")


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CODES:
        raise ValueError(f"unknown table dtype {dtype!r}; expected one of {sorted(DTYPE_CODES)}")
    return dtype


@dataclass(frozen=True)
class TableHeader:
    """What a table file's header says (see the module docstring for the byte layout)."""

    version: int
    dtype: str  # storage dtype: "float32" | "bfloat16" | "float16" | "int8"
    num_rows: int
    dim: int
    fingerprint: str
    layer_id: int
    meta: dict[str, Any]
    data_offset: int
    data_nbytes: int
    scale_offset: int
    scale_nbytes: int
    flags: int
    data_crc: int
    header_nbytes: int = field(default=HEADER_NBYTES)

    @property
    def dirty(self) -> bool:
        """True while a writer has the file open (or crashed before sealing it)."""
        return bool(self.flags & FLAG_DIRTY)

    @property
    def file_nbytes(self) -> int:
        """The exact size the file must have."""
        if self.scale_nbytes:
            return self.scale_offset + self.scale_nbytes
        return self.data_offset + self.data_nbytes

    @property
    def bytes_per_row(self) -> int:
        """Bytes one row costs on disk (int8: the row plus its float32 scale)."""
        return self.dim * ITEMSIZE[self.dtype] + (4 if self.scale_nbytes else 0)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype as a torch dtype."""
        return TORCH_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (with the derived sizes)."""
        return {
            "version": self.version,
            "dtype": self.dtype,
            "num_rows": self.num_rows,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "layer_id": self.layer_id,
            "meta": self.meta,
            "header_nbytes": self.header_nbytes,
            "data_offset": self.data_offset,
            "data_nbytes": self.data_nbytes,
            "scale_offset": self.scale_offset,
            "scale_nbytes": self.scale_nbytes,
            "flags": self.flags,
            "dirty": self.dirty,
            "data_crc": f"{self.data_crc:08x}",
            "file_nbytes": self.file_nbytes,
            "bytes_per_row": self.bytes_per_row,
        }


def layout(
    num_rows: int,
    dim: int,
    dtype: str,
    *,
    fingerprint: str,
    layer_id: int,
    meta: Mapping[str, Any] | None = None,
) -> TableHeader:
    """The header (data crc 0, not dirty) of a table with these figures; validates them."""
    _check_dtype(dtype)
    num_rows, dim, layer_id = int(num_rows), int(dim), int(layer_id)
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if dim < 1 or dim >= 1 << 32:
        raise ValueError(f"dim must be in [1, 2**32), got {dim}")
    if not 0 <= layer_id < 1 << 32:
        raise ValueError(f"layer_id must be in [0, 2**32), got {layer_id}")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    fp = fingerprint.encode("ascii", errors="strict") if fingerprint.isascii() else None
    if fp is None or len(fp) > FINGERPRINT_NBYTES or b"\0" in fp:
        raise ValueError(
            f"fingerprint must be at most {FINGERPRINT_NBYTES} ASCII characters without NUL "
            f"(a sha256 hex digest), got {fingerprint!r}"
        )
    meta = dict(meta or {})
    meta_bytes = _meta_bytes(meta)
    header_nbytes = _align(_FIXED.size + len(meta_bytes), PAGE)
    data_nbytes = num_rows * dim * ITEMSIZE[dtype]
    scale_nbytes = num_rows * 4 if dtype == "int8" else 0
    scale_offset = _align(header_nbytes + data_nbytes, SCALE_ALIGN) if scale_nbytes else 0
    return TableHeader(
        version=FORMAT_VERSION,
        dtype=dtype,
        num_rows=num_rows,
        dim=dim,
        fingerprint=fingerprint,
        layer_id=layer_id,
        meta=json.loads(meta_bytes),
        data_offset=header_nbytes,
        data_nbytes=data_nbytes,
        scale_offset=scale_offset,
        scale_nbytes=scale_nbytes,
        flags=0,
        data_crc=0,
        header_nbytes=header_nbytes,
    )


def _meta_bytes(meta: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(dict(meta), sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"table metadata must be a JSON-able object: {e}") from e


def pack_header(h: TableHeader) -> bytes:
    """The header's `header_nbytes` bytes, header crc filled in."""
    meta = _meta_bytes(h.meta)
    if _FIXED.size + len(meta) > h.header_nbytes:
        raise ValueError(
            f"metadata of {len(meta)} bytes does not fit a {h.header_nbytes}-byte header"
        )
    fixed = _FIXED.pack(
        MAGIC,
        h.version,
        h.header_nbytes,
        0,  # header crc, filled below
        h.flags,
        DTYPE_CODES[h.dtype],
        h.dim,
        h.num_rows,
        h.layer_id,
        h.data_crc,
        h.data_offset,
        h.data_nbytes,
        h.scale_offset,
        h.scale_nbytes,
        h.fingerprint.encode("ascii"),
        len(meta),
    )
    buf = bytearray(h.header_nbytes)
    buf[: _FIXED.size] = fixed
    buf[_FIXED.size : _FIXED.size + len(meta)] = meta
    struct.pack_into("<I", buf, _CRC_OFFSET, zlib.crc32(buf))
    return bytes(buf)


# ---------------------------------------------------------------------------------- reading
def read_header(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    allow_dirty: bool = False,
) -> TableHeader:
    """Parse and validate a table file's header (no data read).

    Checks magic, version, header crc, that the file size equals what the header says (a cut file
    is reported as truncated), the DIRTY flag (unless `allow_dirty`) and, when given, the
    fingerprint. Raises `TableFileError` naming the path, what was found and what was expected.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_NBYTES)
            return _parse_header(path, f, size, head, expected_fingerprint, allow_dirty)
    except FileNotFoundError:
        raise TableFileError(f"table file {path} does not exist") from None
    except IsADirectoryError:
        raise TableFileError(f"table file {path} is a directory") from None


class _Fixed(NamedTuple):
    """The fixed-size part of a header, as `_FIXED` unpacks it (field order of the format)."""

    magic: bytes
    version: int
    header_nbytes: int
    header_crc: int
    flags: int
    code: int
    dim: int
    num_rows: int
    layer_id: int
    data_crc: int
    data_offset: int
    data_nbytes: int
    scale_offset: int
    scale_nbytes: int
    fp_raw: bytes
    meta_nbytes: int


def _parse_header(
    path: Path,
    f: BinaryIO,
    size: int,
    head: bytes,
    expected_fingerprint: str | None,
    allow_dirty: bool,
) -> TableHeader:
    """Validate a header in the order a reader trusts it: the bytes are ours (magic), whole and
    intact (sizes, crc), then say something consistent (layout, file size), then fit the caller
    (sealed, fingerprint)."""
    _check_magic(path, size, head)
    fixed, buf = _read_fixed(path, f, size, head)
    h = _decode_header(path, fixed, buf)
    _check_layout(path, h, size)
    if h.dirty and not allow_dirty:
        raise TableFileError(
            f"table file {path} is not sealed: a writer crashed or still has it open (DIRTY flag "
            "set); its rows and checksum may disagree. Pass allow_dirty=True to read it anyway, or "
            "reseal it: MmapRowStore(path, writable=True, allow_dirty=True).close()"
        )
    if expected_fingerprint is not None and h.fingerprint != expected_fingerprint:
        raise TableFileError(
            f"table file {path} was built for hash configuration {h.fingerprint[:16]}, but "
            f"{expected_fingerprint[:16]} was expected: its rows address different n-grams"
        )
    return h


def _check_magic(path: Path, size: int, head: bytes) -> None:
    """The file starts with the magic and holds at least the fixed header."""
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        if len(head) < len(MAGIC) and MAGIC.startswith(head):
            raise TableFileError(
                f"table file {path} is truncated: {size} bytes, shorter than the magic"
            )
        raise TableFileError(
            f"{path} is not an Engram table file: magic {head[: len(MAGIC)]!r}, expected {MAGIC!r}"
        )
    if len(head) < _FIXED.size:
        raise TableFileError(
            f"table file {path} is truncated: {size} bytes, shorter than the {_FIXED.size}-byte "
            "fixed header"
        )


def _read_fixed(path: Path, f: BinaryIO, size: int, head: bytes) -> tuple[_Fixed, bytearray]:
    """The fixed fields and the whole header (crc field zeroed), once version, size and header
    crc check out; reads the rest of a header longer than `head` from `f`."""
    fixed = _Fixed._make(_FIXED.unpack_from(head))
    header_nbytes = fixed.header_nbytes
    if fixed.version != FORMAT_VERSION:
        raise TableFileError(
            f"table file {path} has format version {fixed.version}; this engram reads version "
            f"{FORMAT_VERSION}"
        )
    if header_nbytes < _FIXED.size or header_nbytes % PAGE:
        raise TableFileError(
            f"table file {path} has a corrupt header: header_nbytes {header_nbytes} is not a "
            f"positive multiple of {PAGE}"
        )
    if size < header_nbytes:
        raise TableFileError(
            f"table file {path} is truncated: {size} bytes, shorter than its {header_nbytes}-byte "
            "header"
        )
    if header_nbytes > len(head):
        head += f.read(header_nbytes - len(head))
    buf = bytearray(head[:header_nbytes])
    struct.pack_into("<I", buf, _CRC_OFFSET, 0)
    actual_crc = zlib.crc32(buf)
    if actual_crc != fixed.header_crc:
        raise TableFileError(
            f"table file {path} has a corrupt header: header crc32 {actual_crc:08x}, expected "
            f"{fixed.header_crc:08x} as recorded"
        )
    return fixed, buf


def _decode_header(path: Path, fixed: _Fixed, buf: bytearray) -> TableHeader:
    """The `TableHeader` of an intact header: dtype code, metadata and fingerprint decoded.

    From here on the header is what the writer wrote; inconsistencies are format bugs."""
    if fixed.code not in _CODE_DTYPES:
        raise TableFileError(
            f"table file {path} has unknown dtype code {fixed.code}; expected one of "
            f"{sorted(_CODE_DTYPES)}"
        )
    meta_end = _FIXED.size + fixed.meta_nbytes
    if meta_end > fixed.header_nbytes:
        raise TableFileError(f"table file {path}: metadata overruns the header")
    try:
        meta = json.loads(bytes(buf[_FIXED.size : meta_end]).decode("utf-8"))
        fingerprint = fixed.fp_raw.rstrip(b"\0").decode("ascii")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableFileError(f"table file {path}: unreadable metadata or fingerprint: {e}") from e
    return TableHeader(
        version=fixed.version,
        dtype=_CODE_DTYPES[fixed.code],
        num_rows=fixed.num_rows,
        dim=fixed.dim,
        fingerprint=fingerprint,
        layer_id=fixed.layer_id,
        meta=meta,
        data_offset=fixed.data_offset,
        data_nbytes=fixed.data_nbytes,
        scale_offset=fixed.scale_offset,
        scale_nbytes=fixed.scale_nbytes,
        flags=fixed.flags,
        data_crc=fixed.data_crc,
        header_nbytes=fixed.header_nbytes,
    )


def _check_layout(path: Path, h: TableHeader, size: int) -> None:
    """The regions follow from the row count, dim and dtype, and the file has exactly their size."""
    want_scales = h.num_rows * 4 if h.dtype == "int8" else 0
    if (
        h.data_offset != h.header_nbytes
        or h.data_nbytes != h.num_rows * h.dim * ITEMSIZE[h.dtype]
        or h.scale_nbytes != want_scales
        or (want_scales and h.scale_offset != _align(h.data_offset + h.data_nbytes, SCALE_ALIGN))
    ):
        raise TableFileError(
            f"table file {path} has an inconsistent header: {h.num_rows} x {h.dim} {h.dtype} rows "
            f"but data at [{h.data_offset}, +{h.data_nbytes}) and scales at "
            f"[{h.scale_offset}, +{h.scale_nbytes})"
        )
    if size != h.file_nbytes:
        state = "truncated" if size < h.file_nbytes else "longer than its header says"
        raise TableFileError(
            f"table file {path} is {state}: {size} bytes, expected {h.file_nbytes} "
            f"({h.num_rows} x {h.dim} {h.dtype} rows)"
        )


def data_crc(f: BinaryIO, h: TableHeader, *, chunk_nbytes: int = _IO_CHUNK) -> int:
    """zlib.crc32 of the data region then the scale region, read in bounded chunks."""
    crc = 0
    buf = bytearray(min(chunk_nbytes, max(h.data_nbytes, h.scale_nbytes)))
    view = memoryview(buf)
    for offset, nbytes in ((h.data_offset, h.data_nbytes), (h.scale_offset, h.scale_nbytes)):
        f.seek(offset)
        left = nbytes
        while left:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise TableFileError(f"table file {f.name} is truncated while reading its data")
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return crc


def verify_table(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    allow_dirty: bool = False,
) -> TableHeader:
    """`read_header`, then recompute the data crc (a full read in bounded chunks)."""
    path = Path(path)
    h = read_header(path, expected_fingerprint=expected_fingerprint, allow_dirty=allow_dirty)
    with open(path, "rb") as f:
        crc = data_crc(f, h)
    if crc != h.data_crc:
        raise TableFileError(
            f"table file {path} is corrupt: data crc32 {crc:08x}, expected {h.data_crc:08x} as "
            "recorded in its header"
        )
    return h


def read_table(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    expected_fingerprint: str | None = None,
) -> Tensor:
    """The whole table, dequantised to `dtype`: (num_rows, dim). For small tables / round trips."""
    path = Path(path)
    if verify:
        h = verify_table(path, expected_fingerprint=expected_fingerprint)
    else:
        h = read_header(path, expected_fingerprint=expected_fingerprint)
    _check_host()
    raw = np.fromfile(path, dtype=np.uint8, count=h.data_nbytes, offset=h.data_offset)
    rows = torch.from_numpy(raw).view(h.torch_dtype).reshape(h.num_rows, h.dim)
    if h.dtype == "int8":
        scale = np.fromfile(path, dtype="<f4", count=h.num_rows, offset=h.scale_offset)
        return dequantize_int8(rows, torch.from_numpy(scale)).to(dtype)
    return rows.to(dtype)


# ------------------------------------------------------------------------------- int8 codec
def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: x (R, dim) float -> (q (R, dim) int8, scale (R,) float32).

    scale = max|row| / 127; q = round(row / scale) clamped to [-127, 127]; all-zero rows get
    scale 0 (and q 0). Non-finite values are refused: they would poison the row's scale.
    """
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"quantize_int8 needs a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_int8: the rows contain NaN or inf")
    scale = x.abs().amax(dim=1) / _INT8_MAX  # (R,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """q (R, dim) int8, scale (R,) -> float32 (R, dim) = q * scale (zero rows stay exactly 0)."""
    return q.float() * scale.float()[:, None]


# ---------------------------------------------------------------------------------- writing
Source = Tensor | np.ndarray | Callable[[int, int], Tensor]


def _chunk_reader(
    source: Source, num_rows: int | None, dim: int | None
) -> tuple[Callable[[int, int], Tensor], int, int]:
    """(read(start, stop) -> float tensor (stop-start, dim), num_rows, dim) for any source."""
    if isinstance(source, Tensor | np.ndarray):
        if source.ndim != 2:
            raise ValueError(f"a table source must be 2-D (num_rows, dim), got {source.shape}")
        n, d = (int(s) for s in source.shape)
        for name, given, actual in (("num_rows", num_rows, n), ("dim", dim, d)):
            if given is not None and given != actual:
                raise ValueError(f"{name}={given} disagrees with the source's shape {source.shape}")
        if isinstance(source, Tensor):
            src = source.detach()
            return (lambda a, b: src[a:b].cpu()), n, d
        arr = source

        def read_array(a: int, b: int) -> Tensor:
            chunk = np.array(arr[a:b])  # a private copy (an mmap'd source may be read-only)
            if not chunk.dtype.isnative:
                chunk = chunk.astype(chunk.dtype.newbyteorder("="))
            return torch.from_numpy(chunk)

        return read_array, n, d
    if not callable(source):
        raise TypeError(
            f"a table source must be a tensor, an ndarray or a callable, got {type(source).__name__}"
        )
    if num_rows is None or dim is None:
        raise ValueError("a callable table source needs num_rows= and dim=")
    return source, int(num_rows), int(dim)


def _encode(chunk: Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A float chunk (R, dim) -> (row bytes as a uint8 array, float32 scales or None)."""
    if dtype == "int8":
        q, scale = quantize_int8(chunk)
        return q.contiguous().view(torch.uint8).numpy(), scale.contiguous().numpy()
    t = chunk.to(TORCH_DTYPES[dtype]).contiguous()
    return t.view(torch.uint8).numpy(), None


def write_table(
    path: str | os.PathLike[str],
    source: Source,
    *,
    dtype: str = "float32",
    fingerprint: str,
    layer_id: int,
    meta: Mapping[str, Any] | None = None,
    num_rows: int | None = None,
    dim: int | None = None,
    chunk_rows: int = 65536,
) -> TableHeader:
    """Write a table file atomically, streaming `chunk_rows` rows at a time; returns its header.

    `source` is a 2-D float tensor / ndarray (an mmap'd one is read chunk by chunk), or a callable
    `source(start, stop) -> (stop - start, dim)` float tensor together with `num_rows=`/`dim=`, so
    a table larger than RAM can be produced on the fly. Memory is bounded by chunk_rows * dim
    elements (plus, for int8, a chunk of scales), whatever the table size. The file appears at
    `path` only when complete; on any error the temp file is removed and an existing `path` is
    left untouched.
    """
    _check_host()
    _check_dtype(dtype)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    read, n, d = _chunk_reader(source, num_rows, dim)
    h = layout(n, d, dtype, fingerprint=fingerprint, layer_id=layer_id, meta=meta)
    with atomic_open(path, "w+b") as f:
        f.write(bytes(h.header_nbytes))  # placeholder; the real header goes in last
        crc = 0
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            chunk = read(start, stop)
            if not isinstance(chunk, Tensor):
                chunk = torch.as_tensor(chunk)
            if tuple(chunk.shape) != (stop - start, d) or not chunk.dtype.is_floating_point:
                raise ValueError(
                    f"table source returned {chunk.dtype} {tuple(chunk.shape)} for rows "
                    f"[{start}, {stop}); expected a float tensor of shape ({stop - start}, {d})"
                )
            rows, scale = _encode(chunk, dtype)
            f.write(rows)  # type: ignore[arg-type]  # buffer protocol
            crc = zlib.crc32(rows, crc)  # type: ignore[arg-type]
            if scale is not None:  # scales live after the data: write them in place
                os.pwrite(f.fileno(), scale.tobytes(), h.scale_offset + 4 * start)
        if h.scale_nbytes:
            f.write(bytes(h.scale_offset - h.data_offset - h.data_nbytes))  # alignment pad
            f.flush()
            crc = _crc_range(f, h.scale_offset, h.scale_nbytes, crc)
        h = replace(h, data_crc=crc)
        f.flush()
        os.pwrite(f.fileno(), pack_header(h), 0)
    return h


def _crc_range(f: BinaryIO, offset: int, nbytes: int, crc: int = 0) -> int:
    f.seek(offset)
    while nbytes:
        block = f.read(min(nbytes, _IO_CHUNK))
        if not block:
            raise TableFileError(f"table file {f.name} ended early while checksumming")
        crc = zlib.crc32(block, crc)
        nbytes -= len(block)
    f.seek(0, os.SEEK_END)
    return crc
