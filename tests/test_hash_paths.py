"""The CPU hashing paths (avx512, avx2, portable C, numpy): same bits on each, forcing, errors.

Every test runs on each path this machine can run (`available_paths()`), checked against the
independent numpy reference of tests/test_hashing.py and, for the modulo itself, against Python's
big-integer floor modulo. The edges are those of the kernel's division-free modulo (see
engram/_hashkernel.c): primes just above 2^13 (the smallest it takes), just below and across
2^31 (32-bit remainders vs 64-bit products), across 2^32 and just below 2^62 (the largest),
mixes at both ends of int64 and next to multiples and half-multiples of p, head counts that are
not a multiple of the vector width, and document starts on the 256-token block edges.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hashing import DEMO, reference_hash, with_path

import engram.hashing as hashing
from engram.hashing import HASH_PATHS, NgramHasher, available_paths, cpu_features

CPU_PATHS = available_paths()
BLOCK = 256  # ENGRAM_BLOCK in _hashkernel.c
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _reference_rows(h: NgramHasher, x: np.ndarray) -> np.ndarray:
    """(L, B, T, H) from the independent reference, with the hasher's multipliers and primes."""
    mult = {i: h.multipliers(i) for i in h.layer_ids}
    primes = {i: h.table_sizes(i) for i in h.layer_ids}
    N, K = h.max_ngram_size, h.n_head_per_ngram
    return np.stack([reference_hash(x, i, mult, primes, N, K, h.pad_id) for i in h.layer_ids])


# ----------------------------------------------------------------------------- dispatch


def test_paths_follow_the_cpu_flags():
    paths, flags = available_paths(), cpu_features()
    assert paths[-1] == "numpy" and set(paths) <= set(HASH_PATHS)
    assert list(paths) == [p for p in HASH_PATHS if p in paths]  # fastest first
    assert ("portable" in paths) == hashing.kernel_available()
    if hashing.kernel_available():
        assert ("avx2" in paths) == (flags["avx2"] and flags["fma"])
        assert ("avx512" in paths) == (flags["avx512f"] and flags["avx512dq"])
    assert hashing.resolve_path("auto") == paths[0]


@pytest.mark.parametrize("path", CPU_PATHS)
def test_environment_variable_forces_the_path(monkeypatch, path):
    monkeypatch.setenv("ENGRAM_HASH_PATH", path)
    assert hashing.kernel_path() == path
    h = NgramHasher(**DEMO)
    assert h.path == path
    x = np.random.default_rng(0).integers(0, 99_092, size=(2, 300))
    assert np.array_equal(h.hash_all(x), _reference_rows(h, x))
    # the argument wins over the environment
    assert NgramHasher(**DEMO, path="numpy").path == "numpy"
    monkeypatch.setenv("ENGRAM_HASH_PATH", " AUTO ")
    assert NgramHasher(**DEMO).path == CPU_PATHS[0]


def test_unknown_path_is_an_error(monkeypatch):
    monkeypatch.setenv("ENGRAM_HASH_PATH", "avx513")
    with pytest.raises(ValueError, match=r"ENGRAM_HASH_PATH='avx513' is not a hashing path"):
        NgramHasher(**DEMO)
    monkeypatch.delenv("ENGRAM_HASH_PATH")
    with pytest.raises(ValueError, match=r"path='neon' is not a hashing path; expected one of"):
        NgramHasher(**DEMO, path="neon")
    h = NgramHasher(**DEMO)
    with pytest.raises(ValueError, match="not a hashing path"):
        h.path = "gpu"
    assert h.path == CPU_PATHS[0]


def test_path_the_cpu_cannot_run_is_an_error(monkeypatch):
    """A CPU with the portable path only (an ARM or pre-AVX2 x86), then a build without kernel."""
    real = hashing._load_kernel()
    if real is None:
        pytest.skip("the kernel is not built")
    no_simd = hashing._Kernel(real.hash, ("portable",), dict.fromkeys(real.cpu_flags, False))
    monkeypatch.setattr(hashing, "_load_kernel", lambda: no_simd)
    assert available_paths() == ("portable", "numpy")
    with pytest.raises(ValueError, match=r"avx2 hashing path needs a CPU with AVX2 and FMA"):
        NgramHasher(**DEMO, path="avx2")
    monkeypatch.setenv("ENGRAM_HASH_PATH", "avx512")
    with pytest.raises(ValueError, match=r"ENGRAM_HASH_PATH='avx512'.*AVX-512F and AVX-512DQ.*"):
        NgramHasher(**DEMO)
    monkeypatch.setenv("ENGRAM_HASH_PATH", "auto")
    assert NgramHasher(**DEMO).path == "portable"
    monkeypatch.setattr(hashing, "_load_kernel", lambda: None)
    assert available_paths() == ("numpy",)
    with pytest.raises(ValueError, match=r"needs the compiled kernel .* not built"):
        NgramHasher(**DEMO, path="portable")
    h = NgramHasher(**DEMO)
    assert h.path == "numpy"
    x = np.random.default_rng(1).integers(0, 99_092, size=(1, 40))
    assert np.array_equal(h.hash_all(x), _reference_rows(h, x))


def test_kernel_refuses_an_unknown_path_code():
    kernel = hashing._load_kernel()
    if kernel is None:
        pytest.skip("the kernel is not built")
    h = NgramHasher(**DEMO)
    x = np.zeros((1, 4), dtype=np.int64)
    out = np.zeros((2, 1, 4, 16), dtype=np.int64)
    args = (x.ctypes.data, 1, 4, None, None, 2, 3, 2, 8, h._mult_all.ctypes.data)
    consts = (h._mods_all.ctypes.data, h._inv_all.ctypes.data, 0, 0)
    assert kernel.hash(*args, *consts, 9, out.ctypes.data) == -3
    assert kernel.hash(*args, *consts, 0, out.ctypes.data) == -3
    assert not out.any()


# ----------------------------------------------------------------------------- the modulo's edges


def _targets(primes: list[int], rng: np.random.Generator) -> list[int]:
    """Mixes where a quotient estimate is most likely off: around 0 and the int64 ends, next to
    multiples and half-multiples of each p at the extreme quotients, and random ones."""
    out = {0, 1, -1, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1}
    for p in primes:
        for q in (INT64_MIN // p, INT64_MAX // p, -1, 0, 1, *rng.integers(-(2**40), 2**40, 3)):
            for base in (int(q) * p, int(q) * p + p // 2):
                out.update(v for v in range(base - 2, base + 3) if INT64_MIN <= v <= INT64_MAX)
    return sorted(out)


# (first target size, heads): the primes are the next ones above size - 1 (the reference's rule)
EDGE_ROWS = {
    "just above 2^13": (8192, 3),  # 8209 8219 8221: the smallest primes on the fast modulo
    "just below 2^31": (2**31 - 105, 7),  # up to 2^31 - 1: the largest all-32-bit row
    "across 2^31": (2**31 - 61, 5),  # 2^31 - 61 .. 2^31 + 11: 64-bit products
    "across 2^32": (2**32 - 5, 5),  # a vector of 4 and one more head
    "just below 2^62": (2**62 - 300, 6),  # the largest primes on the fast modulo
    "demo, 9 heads": (129280 * 5, 9),  # 8 + 1: a head beyond the vector width
    "exact: 8191": (8191, 2),  # 2^13 - 1 takes integer division
    "exact: from 2^62": (2**62, 2),
}


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("row", list(EDGE_ROWS), ids=list(EDGE_ROWS))
def test_modulo_at_its_edges(path, row):
    """Orders 2 only, pad 0: between zero ids the mix is id * m_0, so any mix can be asked for."""
    size, K = EDGE_ROWS[row]
    h = NgramHasher(1, [size], 2, K, [0], pad_id=0, seed=3, path=path)
    primes = h.flat_table_sizes(0)
    fast = size >= 2**13 and max(primes) < 2**62
    assert h._exact == (not fast)
    if row.startswith("just below"):
        assert max(primes) < (2**31 if "31" in row else 2**62)
    if row.startswith("across"):
        edge = 2**31 if "31" in row else 2**32
        assert min(primes) < edge < max(primes)
    targets = _targets(primes, np.random.default_rng(K))
    m0 = int(h.multipliers(0)[0])
    inv = pow(m0, -1, 2**64)
    ids = [((t * inv) % 2**64 + 2**63) % 2**64 - 2**63 for t in targets]  # as int64
    x = np.zeros((1, 2 * len(ids)), dtype=np.int64)
    x[0, 1::2] = ids
    rows = h.hash_all(x)[0, 0, 1::2]  # (targets, K)
    want = np.array([[t % p for p in primes] for t in targets], dtype=np.int64)
    assert np.array_equal(rows, want)
    assert np.array_equal(h.hash_all(x), _reference_rows(h, x))


# ----------------------------------------------------------------------------- properties

_SIZES = st.one_of(
    st.integers(2**13, 2**24),
    st.integers(2**31 - 2**12, 2**32 + 2**12),
    st.integers(2**61, 2**62 - 2**16),
    st.integers(2, 2**13),  # small: the exact path
)


@pytest.mark.parametrize("path", CPU_PATHS)
@settings(max_examples=25, deadline=None)
@given(
    V=st.integers(1, 2**40),
    N=st.integers(2, 4),
    K=st.integers(1, 9),
    sizes=st.lists(_SIZES, min_size=3, max_size=3),
    seed=st.integers(0, 2**20),
    B=st.integers(1, 2),
    T=st.integers(1, 300),
    full_range=st.booleans(),
    data=st.data(),
)
def test_every_path_equals_the_reference(path, V, N, K, sizes, seed, B, T, full_range, data):
    """Hash range, determinism and bit equality with the reference, any configuration."""
    h = NgramHasher(V, sizes[: N - 1], N, K, [0, 5], pad_id=V - 1, seed=seed, path=path)
    lo, hi = (INT64_MIN, INT64_MAX) if full_range else (0, V - 1)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    x = rng.integers(lo, hi, size=(B, T), dtype=np.int64, endpoint=True)
    x[:, : data.draw(st.integers(0, T))] = data.draw(st.sampled_from([lo, hi]))
    got = h.hash_all(x)
    assert np.array_equal(got, _reference_rows(h, x))
    for li, layer_id in enumerate(h.layer_ids):
        assert (got[li] >= 0).all() and (got[li] < np.array(h.flat_table_sizes(layer_id))).all()
    buf = np.full_like(got, -7)
    assert h.hash_all(x, out=buf) is buf and np.array_equal(buf, got)
    fresh = NgramHasher(V, sizes[: N - 1], N, K, [0, 5], pad_id=V - 1, seed=seed, path=path)
    assert np.array_equal(fresh.hash_all(x), got)


@pytest.mark.parametrize("path", CPU_PATHS)
@settings(max_examples=25, deadline=None)
@given(docs=st.lists(st.integers(1, 600), min_size=1, max_size=5), data=st.data())
def test_documents_hash_as_if_alone(path, docs, data):
    """Packed documents with a separator, lengths around the 256-token block."""
    h = NgramHasher(**DEMO, path=path)
    sep = 1
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    parts = [np.append(rng.integers(2, 99_092, size=n - 1), sep) for n in docs]
    packed = np.concatenate(parts)[None]
    got = h.hash_all(packed, sep_id=sep)
    pos = 0
    for d in parts:
        assert np.array_equal(got[:, :, pos : pos + len(d)], _reference_rows(h, d[None]))
        pos += len(d)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_document_starts_on_block_edges_and_streaming(path):
    """Starts at 1, BLOCK-1, BLOCK, BLOCK+1, 2*BLOCK-1, 2*BLOCK and the last position; T is not
    a multiple of the block or of any vector width; streamed in chunks that straddle blocks."""
    h = NgramHasher(**DEMO, path=path)
    sep, T = 1, 2 * BLOCK + 37
    rng = np.random.default_rng(7)
    x = rng.integers(2, 99_092, size=(3, T))
    starts = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, T - 1]
    x[0, [s - 1 for s in starts]] = sep
    x[2, ::BLOCK] = sep  # starts at 1, BLOCK + 1, 2 * BLOCK + 1
    got = h.hash_all(x, sep_id=sep)
    for b in range(3):
        cuts = [0, *[t + 1 for t in np.flatnonzero(x[b, :-1] == sep)], T]
        for a, e in itertools.pairwise(cuts):
            assert np.array_equal(got[:, b, a:e], _reference_rows(h, x[b : b + 1, a:e])[:, 0])
    stream = with_path(h, path).stream(3)
    parts, t = [], 0
    sizes = [BLOCK - 1, 1, 0, 1, BLOCK - 3, 33, 1]  # an empty chunk changes nothing
    for size in [*sizes, T - sum(sizes)]:
        parts.append(stream(x[:, t : t + size], sep_id=sep))
        t += size
    assert np.array_equal(np.concatenate(parts, axis=2), got)
