"""Multi-head n-gram hashing: compressed ids -> row ids of every Engram layer.

This reproduces the public demo's scheme bit for bit (SPEC section 3):

- multipliers per layer from ``numpy.random.default_rng(seed + 10007 * layer_id)``, odd, below
  ``int64_max // V'`` so products of valid ids never overflow;
- one prime modulus per (layer, order, head): the next prime strictly above a running start,
  skipping every prime already used by any layer, order or head (one global seen-set);
- ``mix = x'_t*m_0 XOR x'_{t-1}*m_1 XOR ... XOR x'_{t-n+1}*m_{n-1}``, positions before the
  start reading the compressed pad id; ``row = mix mod p`` (non-negative); output orders
  ascending, heads within.

Design choices:
- Index math only: the hasher knows nothing of tables, tiers or the model. Rows are *local* to
  their sub-table; the layer adds offsets.
- All layers are hashed in one pass over the batch (``hash_all``), on numpy or torch, CPU or
  GPU. On CPU a fused C kernel (``_hashkernel.c``, loaded through ctypes, GIL released) does
  every layer, order and head in one sweep; without it a vectorized numpy path gives the same
  bits. On an accelerator the torch path runs on the ids' device: no host round trip.
- CPU paths (``HASH_PATHS``): the kernel's ``avx512`` and ``avx2`` intrinsics, its ``portable``
  C (auto-vectorised; ARM and every other CPU), and ``numpy``. ``auto`` takes the fastest the
  CPU runs (checked at run time, so one build serves every machine); ``ENGRAM_HASH_PATH`` or
  ``NgramHasher(path=...)`` forces one, and a path the machine cannot run is an error, never
  a silent fallback. All paths give the same bits; the tests run on every path available.
- Document boundaries: a separator id (the compressed end-of-document id, which belongs to the
  document it ends) or segment ids mark where a document starts; positions from there on see
  pad before it, exactly as if each document were hashed alone.
- Streaming: ``HashStream`` keeps the last N-1 ids of each sequence (already pad-substituted),
  so decoding hashes one token at a time and equals hashing the whole sequence.
- Negative ids (padding sentinels passed through by the compressor) are hashed like any id,
  with wrap-around int64 products and floor modulo, as the reference does; mask them in the
  layer if they must not contribute.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, NamedTuple

import numpy as np
import torch

from engram._ext import load_extension

# Axes: B batch, T time, L Engram layers, N max n-gram order, K heads per order,
#       H = (N-1)*K sub-tables per layer.

_PRIME_LAYER_STRIDE = 10007
_INT64_MAX = np.iinfo(np.int64).max
# The C kernel's division-free modulo is proven for moduli in [2^13, 2^62) (see _hashkernel.c);
# a configuration with a prime outside takes integer `%` on every path.
_FAST_MOD_MIN = 1 << 13
_FAST_MOD_END = 1 << 62

HASH_PATHS: Final = ("avx512", "avx2", "portable", "numpy")  # fastest first
HASH_PATH_ENV: Final = "ENGRAM_HASH_PATH"
_PATH_CODES: Final = {"portable": 1, "avx2": 2, "avx512": 3}  # PATH_* in _hashkernel.c
_PATH_NEEDS: Final = {"avx512": "AVX-512F and AVX-512DQ", "avx2": "AVX2 and FMA"}
_CPU_FLAGS: Final = ("avx2", "fma", "avx512f", "avx512dq", "bmi2")  # CPU_* bit order

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- primes


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (so for any int64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_next_prime(start: int, seen: set[int]) -> int:
    """Smallest prime strictly above ``start`` that is not in ``seen`` (the reference's rule)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def prime_table_sizes(
    engram_vocab_size: list[int] | tuple[int, ...],
    max_ngram_size: int,
    n_head_per_ngram: int,
    layer_ids: list[int] | tuple[int, ...],
) -> dict[int, list[list[int]]]:
    """Sub-table sizes {layer: [order][head]}: for each layer, order and head, the next prime
    strictly above the running start (the order's target - 1, then the last prime found), never
    one already used anywhere (one seen-set over all layers, orders and heads)."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for n in range(2, max_ngram_size + 1):
            start = int(engram_vocab_size[n - 2]) - 1
            heads = []
            for _ in range(n_head_per_ngram):
                prime = find_next_prime(start, seen)
                seen.add(prime)
                heads.append(prime)
                start = prime
            per_order.append(heads)
        out[int(layer_id)] = per_order
    return out


# ----------------------------------------------------------------------------- kernel


class _Kernel(NamedTuple):
    hash: Any  # ctypes function engram_hash
    paths: tuple[str, ...]  # the kernel paths this CPU runs, fastest first
    cpu_flags: dict[str, bool]  # what the kernel's run-time checks found


@lru_cache(maxsize=1)
def _load_kernel() -> _Kernel | None:
    """The compiled kernel, or None when the extension was not built."""
    lib = load_extension("engram._hashkernel")
    if lib is None:
        return None
    try:
        fn, paths_fn, cpu_fn = lib.engram_hash, lib.engram_hash_paths, lib.engram_cpu_features
    except AttributeError:  # a stale build without the dispatch
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, i64, p, p, i64, i64, i64, i64, p, p, p, c_int, i64, c_int, p]
    fn.restype = c_int
    paths_fn.restype = cpu_fn.restype = c_int
    bits, cpu = paths_fn(), cpu_fn()
    paths = tuple(name for name in HASH_PATHS[:-1] if bits & (1 << _PATH_CODES[name]))
    return _Kernel(fn, paths, {f: bool(cpu & (1 << i)) for i, f in enumerate(_CPU_FLAGS)})


def kernel_available() -> bool:
    """Whether the fused C hashing kernel is loaded (else the numpy path is used on CPU)."""
    return _load_kernel() is not None


def cpu_features() -> dict[str, bool]:
    """The x86 flags the kernel's dispatch looks at (avx2, fma, avx512f, avx512dq, bmi2), as
    its run-time checks see them (CPUID and OS support); all False on other CPUs. Without the
    kernel, read from /proc/cpuinfo where it exists."""
    kernel = _load_kernel()
    if kernel is not None:
        return dict(kernel.cpu_flags)
    found: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    found = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {flag: flag in found for flag in _CPU_FLAGS}


def available_paths() -> tuple[str, ...]:
    """The CPU hashing paths this machine runs, fastest first (``numpy`` always)."""
    kernel = _load_kernel()
    return (*(kernel.paths if kernel is not None else ()), "numpy")


def resolve_path(path: str | None = None) -> str:
    """The CPU hashing path that ``path`` selects: None reads ``ENGRAM_HASH_PATH`` (default
    ``auto``), ``auto`` is the fastest available. A path this machine cannot run is an error."""
    source = "path"
    if path is None:
        path, source = os.environ.get(HASH_PATH_ENV, "").strip() or "auto", HASH_PATH_ENV
    name = str(path).strip().lower()
    available = available_paths()
    if name == "auto":
        return available[0]
    if name not in HASH_PATHS:
        raise ValueError(
            f"{source}={path!r} is not a hashing path; expected one of auto, {', '.join(HASH_PATHS)}"
        )
    if name not in available:
        if not kernel_available():
            why = (
                "the compiled kernel (engram._hashkernel), which is not built or is out of date "
                "(rebuild it: pip install -e . or python setup.py build_ext --inplace)"
            )
        elif name in _PATH_NEEDS:
            why = f"a CPU with {_PATH_NEEDS[name]}, which this one lacks"
        else:
            why = "a platform this build does not support"
        raise ValueError(
            f"{source}={path!r}: the {name} hashing path needs {why}; "
            f"available here: {', '.join(available)}"
        )
    return name


def kernel_path() -> str:
    """The CPU hashing path a new ``NgramHasher`` runs here (``ENGRAM_HASH_PATH`` or ``auto``)."""
    return resolve_path(None)


# ----------------------------------------------------------------------------- hasher


class NgramHasher:
    """Hash compressed token ids into per-layer, per-head sub-table rows.

    Args:
        compressed_vocab_size: V', the compressed vocabulary size (bounds the multipliers).
        engram_vocab_size: target sub-table size per order 2..N.
        max_ngram_size: N, the largest order.
        n_head_per_ngram: K, heads (distinct prime moduli) per order.
        layer_ids: the Engram layers, in the order their tables are laid out.
        pad_id: the *compressed* id read before a sequence or document start.
        seed: base seed of the multipliers.
        path: CPU hashing path (``auto``, ``avx512``, ``avx2``, ``portable`` or ``numpy``);
            None reads ``ENGRAM_HASH_PATH`` (default ``auto``). Ids on an accelerator always
            take the torch path. Same bits on every path; the ``path`` attribute can be set.
    """

    def __init__(
        self,
        compressed_vocab_size: int,
        engram_vocab_size: list[int] | tuple[int, ...],
        max_ngram_size: int,
        n_head_per_ngram: int,
        layer_ids: list[int] | tuple[int, ...],
        pad_id: int,
        seed: int = 0,
        path: str | None = None,
    ) -> None:
        V, N, K = int(compressed_vocab_size), int(max_ngram_size), int(n_head_per_ngram)
        if V < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {V}")
        if N < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {N}")
        if K < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {K}")
        sizes = [int(v) for v in engram_vocab_size]
        if len(sizes) < N - 1:
            raise ValueError(
                f"engram_vocab_size needs a size for each order 2..{N} ({N - 1} values), got {sizes}"
            )
        layers = [int(i) for i in layer_ids]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layer_ids must be non-empty and distinct, got {layers}")
        self.compressed_vocab_size = V
        self.engram_vocab_size = sizes[: N - 1]
        self.max_ngram_size = N
        self.n_head_per_ngram = K
        self.layer_ids = layers
        self.pad_id = int(pad_id)
        self.seed = int(seed)

        half = max(1, (_INT64_MAX // V) // 2)
        self._multipliers: dict[int, np.ndarray] = {}
        for layer_id in layers:
            rng = np.random.default_rng(self.seed + _PRIME_LAYER_STRIDE * layer_id)
            r = rng.integers(low=0, high=half, size=(N,), dtype=np.int64)
            self._multipliers[layer_id] = r * 2 + 1

        self._table_sizes = prime_table_sizes(self.engram_vocab_size, N, K, layers)

        # Stacked constants for the fused paths: (L, N), (L, N-1, K).
        self._mult_all = np.stack([self._multipliers[i] for i in layers])
        self._mods_all = np.array([self._table_sizes[i] for i in layers], dtype=np.int64)
        self._inv_all = 1.0 / self._mods_all.astype(np.float64)
        self._exact = bool(
            self._mods_all.min() < _FAST_MOD_MIN or self._mods_all.max() >= _FAST_MOD_END
        )
        self._path = resolve_path(path)
        self._torch_consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        compressed_vocab_size: int,
        compressed_pad_id: int,
        path: str | None = None,
    ) -> NgramHasher:
        """Build from an :class:`engram.config.EngramConfig` and the compressor's figures."""
        return cls(
            compressed_vocab_size=compressed_vocab_size,
            engram_vocab_size=list(cfg.engram_vocab_size),
            max_ngram_size=cfg.max_ngram_size,
            n_head_per_ngram=cfg.n_head_per_ngram,
            layer_ids=list(cfg.layer_ids),
            pad_id=compressed_pad_id,
            seed=cfg.seed,
            path=path,
        )

    @property
    def path(self) -> str:
        """The CPU hashing path this hasher runs (see ``HASH_PATHS``)."""
        return self._path

    @path.setter
    def path(self, value: str | None) -> None:
        self._path = resolve_path(value)

    # ------------------------------------------------------------------ introspection

    @property
    def n_subtables(self) -> int:
        """H = (N-1) * K sub-tables per layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def _check_layer(self, layer_id: int) -> int:
        if layer_id not in self._multipliers:
            raise ValueError(
                f"layer_id {layer_id} is not an Engram layer; expected one of {self.layer_ids}"
            )
        return self.layer_ids.index(layer_id)

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The layer's N odd int64 multipliers."""
        self._check_layer(layer_id)
        return self._multipliers[layer_id].copy()

    def table_sizes(self, layer_id: int) -> list[list[int]]:
        """Prime sub-table sizes of one layer: a list over orders of lists over heads."""
        self._check_layer(layer_id)
        return [list(h) for h in self._table_sizes[layer_id]]

    def flat_table_sizes(self, layer_id: int) -> list[int]:
        """The layer's H sub-table sizes in output order (orders ascending, heads within)."""
        return [p for heads in self.table_sizes(layer_id) for p in heads]

    def total_rows(self, layer_id: int) -> int:
        """Rows of the layer's flat table (all sub-tables end to end)."""
        return sum(self.flat_table_sizes(layer_id))

    def config_dict(self) -> dict[str, Any]:
        """Everything that determines the rows, as plain JSON types."""
        return {
            "scheme": "engram-ngram-hash-v1",
            "compressed_vocab_size": self.compressed_vocab_size,
            "engram_vocab_size": self.engram_vocab_size,
            "max_ngram_size": self.max_ngram_size,
            "n_head_per_ngram": self.n_head_per_ngram,
            "layer_ids": self.layer_ids,
            "pad_id": self.pad_id,
            "seed": self.seed,
        }

    def fingerprint(self) -> str:
        """sha256 over the configuration, multipliers and primes; stored with tables/checkpoints."""
        payload = dict(self.config_dict())
        payload["multipliers"] = {str(i): self._multipliers[i].tolist() for i in self.layer_ids}
        payload["table_sizes"] = {str(i): self._table_sizes[i] for i in self.layer_ids}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def __repr__(self) -> str:
        c = self.config_dict()
        return "NgramHasher(" + ", ".join(f"{k}={v}" for k, v in c.items() if k != "scheme") + ")"

    # ------------------------------------------------------------------ hashing

    def hash(
        self,
        ids: Array,
        layer_id: int,
        *,
        sep_id: int | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        """Rows of one layer: ids (B, T) -> (B, T, H) int64, same kind and device as ``ids``."""
        index = self._check_layer(layer_id)
        return self.hash_all(ids, sep_id=sep_id, segment_ids=segment_ids, layers=[index])[0]

    def hash_all(
        self,
        ids: Array,
        *,
        sep_id: int | None = None,
        segment_ids: Array | None = None,
        out: Array | None = None,
        layers: list[int] | None = None,
    ) -> Array:
        """Rows of every Engram layer in one pass: ids (B, T) -> (L, B, T, H) int64.

        ``sep_id``: compressed end-of-document id; the position after it starts a new document.
        ``segment_ids``: (B, T) document labels; a new document starts where the label changes.
        ``out``: optional preallocated (L, B, T, H) int64 buffer of the same kind (CPU only).
        ``layers``: indices into ``layer_ids`` to compute (default all, in order).
        """
        if sep_id is not None and segment_ids is None:  # the kernel finds the separators itself
            return self._run(ids, reset=None, window=None, out=out, layers=layers, sep=sep_id)
        reset = self._resets(ids, sep_id, segment_ids)
        return self._run(ids, reset=reset, window=None, out=out, layers=layers)

    def hash_layers(self, ids: Array, **kwargs: Any) -> dict[int, Array]:
        """``hash_all`` as a dict ``{layer_id: (B, T, H)}``."""
        rows = self.hash_all(ids, **kwargs)
        return {layer_id: rows[i] for i, layer_id in enumerate(self.layer_ids)}

    def stream(self, batch_size: int, device: torch.device | str | None = None) -> HashStream:
        """A streaming state for token-by-token (or chunked) hashing of ``batch_size`` sequences.

        ``device=None`` keeps the state in numpy; otherwise in a torch tensor on that device.
        """
        window = np.full((batch_size, self.max_ngram_size - 1), self.pad_id, dtype=np.int64)
        state: Array = window if device is None else torch.from_numpy(window).to(device)
        return HashStream(self, state)

    # ------------------------------------------------------------------ internals

    def _resets(self, ids: Array, sep_id: int | None, segment_ids: Array | None) -> Array | None:
        """(B, T) bool: True where a new document starts (position 0 excluded: it reads the window)."""
        if sep_id is not None and segment_ids is not None:
            raise ValueError("pass either sep_id or segment_ids, not both")
        if sep_id is None and segment_ids is None:
            return None
        if isinstance(ids, torch.Tensor):
            if sep_id is not None:
                starts = torch.zeros_like(ids, dtype=torch.bool)
                starts[:, 1:] = ids[:, :-1] == int(sep_id)
                return starts
            seg = torch.as_tensor(segment_ids, device=ids.device)
            _check_same_shape(ids, seg, "segment_ids")
            starts = torch.zeros_like(ids, dtype=torch.bool)
            starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
            return starts
        ids_np = np.asarray(ids)
        starts = np.zeros(ids_np.shape, dtype=bool)
        if sep_id is not None:
            starts[:, 1:] = ids_np[:, :-1] == int(sep_id)
        else:
            seg = np.asarray(segment_ids)
            _check_same_shape(ids_np, seg, "segment_ids")
            starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        return starts

    def _validate_ids(self, ids: Array) -> None:
        if ids.ndim != 2:
            raise ValueError(f"ids must be 2-D (batch, time), got shape {tuple(ids.shape)}")
        dtype = ids.dtype
        integer = (
            (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool)
            if isinstance(ids, torch.Tensor)
            else np.issubdtype(dtype, np.integer)
        )
        if not integer:
            raise TypeError(f"ids must be an integer array of compressed ids, got dtype {dtype}")

    def _run(
        self,
        ids: Array,
        *,
        reset: Array | None,
        window: Array | None,
        out: Array | None,
        layers: list[int] | None,
        sep: int | None = None,
    ) -> Array:
        """Hash on this hasher's path. ``sep`` (instead of ``reset``) starts a document after
        each separator id; the kernel finds them, the other paths derive ``reset``."""
        self._validate_ids(ids)
        sel = list(range(len(self.layer_ids))) if layers is None else list(layers)
        kernel = None if self._path == "numpy" else _load_kernel()
        on_device = isinstance(ids, torch.Tensor) and ids.device.type != "cpu"
        if sep is not None and (kernel is None or on_device):
            reset, sep = self._resets(ids, sep, None), None
        if on_device:
            return self._run_torch(ids, reset, window, sel)
        is_torch = isinstance(ids, torch.Tensor)
        x = np.ascontiguousarray(ids.numpy() if is_torch else ids, dtype=np.int64)
        r = (
            None
            if reset is None
            else np.ascontiguousarray(
                reset.numpy() if isinstance(reset, torch.Tensor) else reset, dtype=np.uint8
            )
        )
        w = None
        if window is not None:
            w = window.numpy() if isinstance(window, torch.Tensor) else window
        B, T = x.shape
        shape = (len(sel), B, T, self.n_subtables)
        res = self._alloc_out(out, shape, is_torch)
        res_np = res.numpy() if is_torch else res
        if kernel is not None:
            every = layers is None  # the stacked constants as they are, no copies
            mult = self._mult_all if every else np.ascontiguousarray(self._mult_all[sel])
            mods = self._mods_all if every else np.ascontiguousarray(self._mods_all[sel])
            inv = self._inv_all if every else np.ascontiguousarray(self._inv_all[sel])
            status = kernel.hash(
                x.ctypes.data, B, T,
                None if r is None else r.ctypes.data,
                None if w is None else w.ctypes.data,
                self.pad_id, self.max_ngram_size, len(sel), self.n_head_per_ngram,
                mult.ctypes.data, mods.ctypes.data, inv.ctypes.data,
                # bit 0: integer `%` (moduli outside the fast range); bit 1: starts after sep
                int(self._exact) | (0 if sep is None else 2), 0 if sep is None else int(sep),
                _PATH_CODES[self._path], res_np.ctypes.data,
            )  # fmt: skip
            if status != 0:
                raise RuntimeError(
                    f"hash kernel failed (status {status}) on path {self._path!r} "
                    f"for max_ngram_size={self.max_ngram_size}"
                )
        else:
            self._run_numpy(x, r, w, sel, res_np)
        return res

    def _alloc_out(self, out: Array | None, shape: tuple[int, ...], is_torch: bool) -> Array:
        if out is None:
            return (
                torch.empty(shape, dtype=torch.int64)
                if is_torch
                else np.empty(shape, dtype=np.int64)
            )
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape} (L, B, T, H), got {tuple(out.shape)}")
        if is_torch != isinstance(out, torch.Tensor):
            raise TypeError("out must be the same kind (numpy or torch) as ids")
        ok = out.dtype == (torch.int64 if is_torch else np.int64)
        contiguous = out.is_contiguous() if is_torch else out.flags.c_contiguous
        if not ok or not contiguous or (is_torch and out.device.type != "cpu"):
            raise ValueError("out must be a contiguous int64 CPU buffer")
        return out

    def _windowed(
        self, x: Array, reset: Array | None, window: Array | None, xp: Any
    ) -> list[Array]:
        """Shifted views: lag k -> (B, T) ids seen k positions back, pad past a document start."""
        B, T = x.shape
        N = self.max_ngram_size
        is_torch = xp is torch
        if window is None:
            window = (
                torch.full((B, N - 1), self.pad_id, dtype=torch.int64, device=x.device)
                if is_torch
                else np.full((B, N - 1), self.pad_id, dtype=np.int64)
            )
        # window[:, k-1] is the id at lag k before x[:, 0]: put it in time order in front of x.
        ext = xp.concatenate([xp.flip(window, (1,)), x], axis=1)  # (B, N-1+T)
        shifted = [x]
        if reset is None:
            for k in range(1, N):
                shifted.append(ext[:, N - 1 - k : N - 1 - k + T])
            return shifted
        # since[t]: how many positions of the current document precede t (history counts as
        # valid until the first reset, since the window is already pad-substituted).
        if is_torch:
            t_idx = torch.arange(T, device=x.device).expand(B, T)
            start = torch.where(reset.bool(), t_idx, torch.full_like(t_idx, -(N - 1)))
            start = torch.cummax(start, dim=1).values
        else:
            t_idx = np.broadcast_to(np.arange(T), (B, T))
            start = np.maximum.accumulate(np.where(reset.astype(bool), t_idx, -(N - 1)), axis=1)
        since = t_idx - start
        for k in range(1, N):
            lag = ext[:, N - 1 - k : N - 1 - k + T]
            shifted.append(xp.where(since >= k, lag, self.pad_id))
        return shifted

    def _run_numpy(
        self,
        x: np.ndarray,
        reset: np.ndarray | None,
        window: np.ndarray | None,
        sel: list[int],
        out: np.ndarray,
    ) -> None:
        """Vectorized numpy path (no compiled kernel): same bits as the C kernel."""
        shifted = self._windowed(x, reset, window, np)
        K = self.n_head_per_ngram
        with np.errstate(over="ignore"):
            for j, li in enumerate(sel):
                m = self._mult_all[li]
                mix = shifted[0] * m[0]
                for n in range(2, self.max_ngram_size + 1):
                    mix = np.bitwise_xor(mix, shifted[n - 1] * m[n - 1])
                    mods = self._mods_all[li, n - 2]  # (K,)
                    out[j, :, :, (n - 2) * K : (n - 1) * K] = mix[..., None] % mods
        if window is not None:
            self._advance_window(window, shifted)

    def _run_torch(
        self,
        x: torch.Tensor,
        reset: torch.Tensor | None,
        window: torch.Tensor | None,
        sel: list[int],
    ) -> torch.Tensor:
        """Device path: every op stays on the ids' device (CUDA, MPS, ...)."""
        x = x.to(torch.int64)
        mult, mods = self._torch_constants(x.device)
        shifted = self._windowed(x, reset, window, torch)
        outs = []
        for li in sel:
            m = mult[li]
            cols = []
            mix = shifted[0] * m[0]
            for n in range(2, self.max_ngram_size + 1):
                mix = torch.bitwise_xor(mix, shifted[n - 1] * m[n - 1])
                cols.append(torch.remainder(mix.unsqueeze(-1), mods[li, n - 2]))  # (B, T, K)
            outs.append(torch.cat(cols, dim=-1))  # (B, T, H)
        if window is not None:
            self._advance_window(window, shifted)
        return torch.stack(outs)  # (L, B, T, H)

    def _torch_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        consts = self._torch_consts.get(device)
        if consts is None:
            consts = (
                torch.from_numpy(self._mult_all).to(device),
                torch.from_numpy(self._mods_all).to(device),
            )
            self._torch_consts[device] = consts
        return consts

    def _advance_window(self, window: Array, shifted: list[Array]) -> None:
        """window[:, k-1] <- id at lag k after the chunk = shifted[k-1][:, -1] (in place)."""
        for k in range(1, self.max_ngram_size):
            window[:, k - 1] = shifted[k - 1][:, -1]


def _check_same_shape(ids: Array, other: Array, name: str) -> None:
    if tuple(other.shape) != tuple(ids.shape):
        raise ValueError(
            f"{name} must have the shape of ids {tuple(ids.shape)}, got {tuple(other.shape)}"
        )


@dataclass
class HashStream:
    """Streaming hash state: the last N-1 (pad-substituted) ids of each sequence.

    ``stream(ids_chunk)`` hashes a (B, t) chunk that continues the sequences and advances the
    state, so chunks (of any length, one token included) concatenate to ``hash_all`` of the
    whole sequence. ``reset`` (B, t) bool starts a new document at marked positions; ``sep_id``
    derives it, also across chunk edges (a separator ending the previous chunk is remembered).
    """

    hasher: NgramHasher
    window: Array  # (B, N-1): window[:, k-1] is the id at lag k before the next position
    _last_was_sep: Array | None = None

    def __call__(
        self, ids: Array, *, reset: Array | None = None, sep_id: int | None = None
    ) -> Array:
        h = self.hasher
        h._validate_ids(ids)
        if ids.shape[0] != self.window.shape[0]:
            raise ValueError(
                f"stream was made for batch size {self.window.shape[0]}, got ids of shape {tuple(ids.shape)}"
            )
        is_torch = isinstance(ids, torch.Tensor)
        if is_torch != isinstance(self.window, torch.Tensor):
            raise TypeError("ids must be the same kind (numpy or torch) as the stream's state")
        if sep_id is not None and reset is not None:
            raise ValueError("pass either reset or sep_id, not both")
        if sep_id is not None and ids.shape[1] > 0:
            reset = h._resets(ids, sep_id, None)
            prev = self._last_was_sep
            if prev is not None:
                reset[:, 0] = prev
            self._last_was_sep = ids[:, -1] == int(sep_id)
        elif reset is not None:
            _check_same_shape(ids, reset, "reset")
        if is_torch and self.window.device != ids.device:
            raise ValueError(f"stream state is on {self.window.device}, ids on {ids.device}")
        if ids.shape[1] == 0:  # an empty chunk: no rows, the state stays as it is
            shape = (len(h.layer_ids), ids.shape[0], 0, h.n_subtables)
            if is_torch:
                return torch.empty(shape, dtype=torch.int64, device=ids.device)
            return np.empty(shape, dtype=np.int64)
        return h._run(ids, reset=reset, window=self.window, out=None, layers=None)

    def reorder(self, index: Array) -> HashStream:
        """A stream whose sequences are ``index`` of this one's (beam search, batch compaction)."""
        window = self.window[index]
        window = (
            window.contiguous()
            if isinstance(window, torch.Tensor)
            else np.ascontiguousarray(window)
        )
        last = None if self._last_was_sep is None else self._last_was_sep[index]
        return HashStream(self.hasher, window, last)

    def reset(self, rows: Array | None = None) -> None:
        """Start new documents: all sequences, or the selected batch rows."""
        if rows is None:
            self.window[:] = self.hasher.pad_id
        else:
            self.window[rows] = self.hasher.pad_id
        self._last_was_sep = None
