"""Tokenizer compression: the surjection P from raw token ids to compressed ids (SPEC section 2).

For every raw id ``t`` in ``range(vocab_size)``: ``text = decode([t])`` with special tokens kept.
If ``text`` contains U+FFFD (a byte-level fragment that does not decode on its own) the key is the
raw token string; otherwise the key is ``normalize(text)``, or ``text`` itself where that
normalizes to "". Compressed ids are assigned in first-seen order of keys, so ``lookup[0] == 0``
and the lookup is onto ``range(V')``. This reproduces DeepSeek's reference ``CompressedTokenizer``
(engram_demo_v1.py) bit for bit; on the built-in GPT-2 tokenizer, 50,257 ids become 32,962.
Reference quirk kept on purpose: a fragment's raw token string can equal a real character's key
(GPT-2's lone byte 0xA3 has raw string "£", as has the decoded "£"), so the two share an id.

Design choices:
- Tokenizers: an HF ``tokenizers.Tokenizer`` (vocab size ``get_vocab_size(with_added_tokens=True)``,
  decoded with ``decode_batch``, which returns the same strings as one ``decode`` per id, only
  faster), or any ``transformers``-style tokenizer, duck-typed on ``convert_ids_to_tokens``,
  ``decode`` and ``__len__`` (vocab size ``len(tok)``), decoded one id at a time exactly like the
  reference. ``transformers`` is never imported here.
- Cache: building takes well under a second for GPT-2 but several seconds for a 129k-id
  ``transformers`` tokenizer, so ``from_tokenizer`` keeps the lookup on disk, keyed by a
  fingerprint (sha256 of the procedure version tag plus the tokenizer's serialized JSON, or of its
  ordered token strings when duck-typed) and the ``tokenizers`` version (whose Unicode tables
  drive the normalizer). Files are safetensors with metadata (fingerprint, sizes, sha256 of the
  table); writes are atomic (temp file in the same directory, then ``os.replace``); a file that
  fails validation is rebuilt and overwritten, never trusted. An explicit ``load`` of a bad file
  raises instead.
- Range policy: ids ``>= vocab_size`` (a model vocabulary padded past the tokenizer) raise
  ``ValueError`` naming the id and the valid range instead of silently reading garbage or
  remapping; negative ids (padding sentinels such as -100 or -1) pass through unchanged,
  exactly like the reference. Outputs are always int64, like the reference.
- Torch inputs are looked up with a per-device copy of the table, created lazily and held by the
  instance (not by the module); it is dropped when the instance is pickled, e.g. into DataLoader
  workers. Checking the range of a CUDA tensor costs one device synchronisation.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import numpy as np
import tokenizers
import torch
from safetensors import safe_open
from safetensors.numpy import save as safetensors_save
from tokenizers import Regex, normalizers

from engram.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

PROCEDURE_VERSION: Final = "engram.compress/v1"
"""Version tag of the compression procedure; part of every fingerprint. Bump it on any change."""

FILE_FORMAT: Final = "engram.TokenizerCompressor/1"
"""Value of the ``format`` metadata key of saved compressor files."""

_SENTINEL: Final = "\ue000"
_REPLACEMENT_CHAR: Final = "\ufffd"


class _Default(enum.Enum):
    TOKEN = 0


DEFAULT_CACHE_DIR: Final = _Default.TOKEN
"""Marker for ``from_tokenizer(cache_dir=...)``: use ``default_cache_dir()``."""


@runtime_checkable
class TransformersLikeTokenizer(Protocol):
    """The part of a ``transformers`` tokenizer the compressor uses."""

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = ...) -> Any: ...

    def decode(self, token_ids: Any, skip_special_tokens: bool = ..., **kwargs: Any) -> str: ...

    def __len__(self) -> int: ...


TokenizerLike = tokenizers.Tokenizer | TransformersLikeTokenizer
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def make_normalizer() -> normalizers.Normalizer:
    """The reference key normalizer; the sentinel keeps a lone-space token alive through Strip."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE_DIR`` if set, else ``~/.cache/engram``."""
    env = os.environ.get("ENGRAM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engram"


def _is_hf_tokenizer(tokenizer: object) -> bool:
    return isinstance(tokenizer, tokenizers.Tokenizer)


def _check_tokenizer(tokenizer: object) -> None:
    if _is_hf_tokenizer(tokenizer):
        return
    missing = [
        a for a in ("convert_ids_to_tokens", "decode", "__len__") if not hasattr(tokenizer, a)
    ]
    if missing:
        raise TypeError(
            "expected a tokenizers.Tokenizer or a transformers-style tokenizer "
            f"(convert_ids_to_tokens, decode, __len__); {type(tokenizer).__name__} lacks {missing}"
        )


def tokenizer_vocab_size(tokenizer: TokenizerLike) -> int:
    """Raw vocabulary size as the reference counts it (added/special tokens included)."""
    _check_tokenizer(tokenizer)
    if _is_hf_tokenizer(tokenizer):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """sha256 hex of the procedure version plus the tokenizer's full definition.

    HF tokenizers: their serialized JSON (``to_str()``); duck-typed ones: the ordered list of token
    strings. The two kinds never share a fingerprint (their ``decode`` may differ, e.g. in
    ``clean_up_tokenization_spaces``).
    """
    _check_tokenizer(tokenizer)
    h = hashlib.sha256()
    h.update(PROCEDURE_VERSION.encode())
    if _is_hf_tokenizer(tokenizer):
        h.update(b"\0hf-tokenizers\0")
        h.update(tokenizer.to_str().encode("utf-8"))
    else:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        h.update(b"\0duck-typed\0")
        h.update(json.dumps([None if t is None else str(t) for t in tokens]).encode("utf-8"))
    return h.hexdigest()


def _decoded_tokens(tokenizer: TokenizerLike, vocab_size: int) -> list[str]:
    if _is_hf_tokenizer(tokenizer):
        return tokenizer.decode_batch([[t] for t in range(vocab_size)], skip_special_tokens=False)
    return [tokenizer.decode([t], skip_special_tokens=False) for t in range(vocab_size)]


def _raw_token(tokenizer: TokenizerLike, token_id: int) -> Any:
    if _is_hf_tokenizer(tokenizer):
        return tokenizer.id_to_token(token_id)
    return tokenizer.convert_ids_to_tokens(token_id)


def build_lookup(tokenizer: TokenizerLike) -> np.ndarray:
    """Build the raw-id -> compressed-id table (int64, shape ``(vocab_size,)``) from scratch."""
    vocab_size = tokenizer_vocab_size(tokenizer)
    if vocab_size < 1:
        raise ValueError("tokenizer has an empty vocabulary")
    normalizer = make_normalizer()
    texts = _decoded_tokens(tokenizer, vocab_size)
    key_to_new: dict[Any, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for tid, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:
            key = _raw_token(tokenizer, tid)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


def _lookup_sha256(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype="<i8").tobytes()).hexdigest()


def _validate_lookup(lookup: np.ndarray) -> int:
    """Check the table is a first-seen-order surjection; return its compressed size V'."""
    if lookup.ndim != 1 or lookup.size == 0:
        raise ValueError(f"lookup must be a non-empty 1-D array, got shape {lookup.shape}")
    if lookup.dtype != np.int64:
        raise ValueError(f"lookup must be int64, got {lookup.dtype}")
    if lookup[0] != 0 or lookup.min() < 0:
        raise ValueError("lookup must start at 0 and hold no negative ids")
    running_max = np.maximum.accumulate(lookup)
    if np.any(lookup[1:] > running_max[:-1] + 1):
        bad = int(np.flatnonzero(lookup[1:] > running_max[:-1] + 1)[0]) + 1
        raise ValueError(
            f"lookup is not in first-seen order: raw id {bad} maps to {int(lookup[bad])}, "
            f"but ids before it reach only {int(running_max[bad - 1])}"
        )
    return int(running_max[-1]) + 1


def cache_file_name(fingerprint: str) -> str:
    """File name of a cached lookup (fingerprint prefix plus the ``tokenizers`` version)."""
    return f"compressor-{fingerprint[:32]}-tokenizers{tokenizers.__version__}.safetensors"


class TokenizerCompressor:
    """Maps raw token ids to compressed ids with a precomputed table (SPEC section 2).

    Negative ids (padding sentinels) pass through unchanged, exactly like the reference; ids
    ``>= vocab_size`` raise ``ValueError``. Build one with ``from_tokenizer`` (cached on disk) or
    ``build`` (no cache); persist with ``save``/``load``.
    """

    def __init__(self, lookup: np.ndarray, fingerprint: str) -> None:
        lookup = np.asarray(lookup)
        if lookup.dtype.kind not in "iu":
            raise ValueError(f"lookup must have an integer dtype, got {lookup.dtype}")
        lookup = np.array(lookup, dtype=np.int64, copy=True)
        self._compressed_vocab_size = _validate_lookup(lookup)
        lookup.setflags(write=False)
        self._lookup = lookup
        self._fingerprint = str(fingerprint)
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, tokenizer: TokenizerLike) -> TokenizerCompressor:
        """Build from scratch, without touching any cache."""
        return cls(build_lookup(tokenizer), tokenizer_fingerprint(tokenizer))

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: TokenizerLike,
        cache_dir: str | os.PathLike[str] | _Default | None = DEFAULT_CACHE_DIR,
    ) -> TokenizerCompressor:
        """Load the compressor of ``tokenizer`` from the cache, or build and cache it.

        ``cache_dir``: a directory, ``DEFAULT_CACHE_DIR`` (``$ENGRAM_CACHE_DIR`` or
        ``~/.cache/engram``), or ``None`` to bypass the cache. A cached file that fails validation
        (corrupt, truncated, wrong fingerprint) is rebuilt and overwritten; an unwritable cache
        directory only costs a warning.
        """
        fingerprint = tokenizer_fingerprint(tokenizer)
        if cache_dir is None:
            return cls(build_lookup(tokenizer), fingerprint)
        directory = default_cache_dir() if cache_dir is DEFAULT_CACHE_DIR else Path(cache_dir)
        path = directory / cache_file_name(fingerprint)
        vocab_size = tokenizer_vocab_size(tokenizer)
        if path.exists():
            try:
                cached = cls.load(path, expected_fingerprint=fingerprint)
                if cached.vocab_size != vocab_size:
                    raise ValueError(
                        f"cached vocab size {cached.vocab_size} != tokenizer's {vocab_size}"
                    )
                return cached
            except (OSError, ValueError) as exc:
                logger.warning("rebuilding invalid compressor cache %s: %s", path, exc)
        compressor = cls(build_lookup(tokenizer), fingerprint)
        try:
            compressor.save(path)
        except OSError as exc:
            logger.warning("could not write compressor cache %s: %s", path, exc)
        return compressor

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (table plus metadata), atomically."""
        metadata = {
            "format": FILE_FORMAT,
            "procedure": PROCEDURE_VERSION,
            "fingerprint": self._fingerprint,
            "vocab_size": str(self.vocab_size),
            "compressed_vocab_size": str(self._compressed_vocab_size),
            "lookup_sha256": _lookup_sha256(self._lookup),
        }
        data = safetensors_save({"lookup": np.ascontiguousarray(self._lookup)}, metadata=metadata)
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], expected_fingerprint: str | None = None
    ) -> TokenizerCompressor:
        """Read a file written by ``save``; validate it fully (raises ``ValueError`` if bad).

        With ``expected_fingerprint`` (e.g. ``tokenizer_fingerprint(tok)``), a file made for
        another tokenizer or procedure version is rejected.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compressor file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = dict(f.metadata() or {})
                keys = list(f.keys())
                lookup = f.get_tensor("lookup") if keys == ["lookup"] else None
        except Exception as exc:  # safetensors raises its own error types on malformed files
            raise ValueError(f"{path} is not a readable compressor file: {exc}") from exc
        if lookup is None:
            raise ValueError(f"{path} must hold exactly one tensor 'lookup', found {keys}")
        if lookup.dtype != np.int64 or lookup.ndim != 1:
            raise ValueError(f"{path}: lookup must be 1-D int64, got {lookup.dtype} {lookup.shape}")
        if metadata.get("format") != FILE_FORMAT:
            raise ValueError(
                f"{path} has format {metadata.get('format')!r}, expected {FILE_FORMAT!r}"
            )
        fingerprint = metadata.get("fingerprint", "")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise ValueError(
                f"{path} fingerprint mismatch: file {fingerprint[:16]}..., expected "
                f"{expected_fingerprint[:16]}... (another tokenizer or procedure version)"
            )
        if metadata.get("lookup_sha256") != _lookup_sha256(lookup):
            raise ValueError(f"{path} is corrupt: lookup checksum mismatch")
        try:
            compressor = cls(lookup, fingerprint)
        except ValueError as exc:
            raise ValueError(f"{path} holds an invalid lookup: {exc}") from exc
        for key, actual in (
            ("vocab_size", compressor.vocab_size),
            ("compressed_vocab_size", compressor.compressed_vocab_size),
        ):
            if metadata.get(key) != str(actual):
                raise ValueError(
                    f"{path}: metadata {key}={metadata.get(key)!r} but table gives {actual}"
                )
        return compressor

    # ------------------------------------------------------------------ properties
    @property
    def lookup(self) -> np.ndarray:
        """Read-only int64 table of shape ``(vocab_size,)``: raw id -> compressed id."""
        return self._lookup

    @property
    def vocab_size(self) -> int:
        """Raw vocabulary size V (valid raw ids are ``[0, V)``)."""
        return int(self._lookup.shape[0])

    @property
    def compressed_vocab_size(self) -> int:
        """Compressed vocabulary size V'."""
        return self._compressed_vocab_size

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the tokenizer and procedure this table was built from."""
        return self._fingerprint

    def __len__(self) -> int:
        return self._compressed_vocab_size

    def __repr__(self) -> str:
        return (
            f"TokenizerCompressor(vocab_size={self.vocab_size}, "
            f"compressed_vocab_size={self.compressed_vocab_size}, "
            f"fingerprint={self._fingerprint[:12]}...)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device_tables"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lookup.setflags(write=False)

    # ------------------------------------------------------------------ mapping
    def _out_of_range(self, first_bad: int, n_bad: int) -> ValueError:
        return ValueError(
            f"token id {first_bad} is out of range: valid ids are [0, {self.vocab_size}) "
            f"(negative ids pass through as padding); {n_bad} offending id(s) in the input"
        )

    def compress_id(self, token_id: int) -> int:
        """Compress one raw id (e.g. the pad id); negative ids pass through unchanged."""
        if isinstance(token_id, bool) or not isinstance(token_id, int | np.integer):
            raise TypeError(f"token id must be an int, got {type(token_id).__name__}")
        token_id = int(token_id)
        if token_id < 0:
            return token_id
        if token_id >= self.vocab_size:
            raise self._out_of_range(token_id, 1)
        return int(self._lookup[token_id])

    def compress(self, ids: ArrayT | Sequence[Any]) -> ArrayT | np.ndarray:
        """Map raw ids of any shape to compressed ids (int64), as numpy or torch like the input.

        Negative ids (padding sentinels) are returned unchanged, exactly like the reference
        ``CompressedTokenizer``; ids ``>= vocab_size`` raise ``ValueError`` naming the first
        offending id and the valid range ``[0, vocab_size)``. Torch tensors stay on their device.
        Other sequences (lists) are converted with ``numpy.asarray`` and give numpy arrays.
        """
        if isinstance(ids, torch.Tensor):
            return self._compress_torch(ids)
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            if arr.size == 0:
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"token ids must have an integer dtype, got {arr.dtype}")
        too_big = arr >= self.vocab_size
        if too_big.any():
            raise self._out_of_range(int(arr.reshape(-1)[np.argmax(too_big)]), int(too_big.sum()))
        arr = arr.astype(np.int64, copy=False)
        return np.where(arr >= 0, self._lookup[np.maximum(arr, 0)], arr)

    __call__ = compress

    def _table_on(self, device: torch.device) -> torch.Tensor:
        table = self._device_tables.get(device)
        if table is None:
            table = torch.from_numpy(self._lookup.copy()).to(device)
            self._device_tables[device] = table
        return table

    def _compress_torch(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must have an integer dtype, got {ids.dtype}")
        if ids.dtype == torch.uint64:
            raise TypeError("torch.uint64 token ids are not supported; cast them to torch.int64")
        ids = ids.long()
        too_big = ids >= self.vocab_size
        if bool(too_big.any()):
            first = int(ids.reshape(-1)[too_big.reshape(-1).nonzero()[0, 0]].item())
            raise self._out_of_range(first, int(too_big.sum().item()))
        table = self._table_on(ids.device)
        return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)
