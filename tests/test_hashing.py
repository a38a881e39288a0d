"""NgramHasher: bit-exact agreement with the reference scheme, every backend, resets, streaming."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.hashing import (
    NgramHasher,
    available_paths,
    find_next_prime,
    is_prime,
    kernel_available,
)

DEMO = dict(
    compressed_vocab_size=99_092,
    engram_vocab_size=[129280 * 5, 129280 * 5],
    max_ngram_size=3,
    n_head_per_ngram=8,
    layer_ids=[1, 15],
    pad_id=2,
    seed=0,
)


# ----------------------------------------------------------------------------- reference
# Written from SPEC section 3 and the demo's NgramHashMapping, independently of engram.hashing
# (trial-division primality, np.pad shifts, per-layer loops).


def _ref_is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def reference_tables(V, sizes, N, K, layer_ids, seed):
    half = max(1, (np.iinfo(np.int64).max // V) // 2)
    mult = {}
    for layer_id in layer_ids:
        g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
        mult[layer_id] = g.integers(low=0, high=half, size=(N,), dtype=np.int64) * 2 + 1
    seen: set[int] = set()
    primes = {}
    for layer_id in layer_ids:
        per = []
        for n in range(2, N + 1):
            start = sizes[n - 2] - 1
            heads = []
            for _ in range(K):
                c = start + 1
                while not (_ref_is_prime(c) and c not in seen):
                    c += 1
                seen.add(c)
                heads.append(c)
                start = c
            per.append(heads)
        primes[layer_id] = per
    return mult, primes


def reference_hash(x, layer_id, mult, primes, N, K, pad):
    x = np.asarray(x, dtype=np.int64)
    _, T = x.shape
    m = mult[layer_id]

    def shift_k(k):
        if k == 0:
            return x
        return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad)[:, :T]

    shifts = [shift_k(k) for k in range(N)]
    out = []
    with np.errstate(over="ignore"):
        for n in range(2, N + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for j in range(K):
                out.append((mix % int(primes[layer_id][n - 2][j])).astype(np.int64))
    return np.stack(out, axis=2)


SMALL = dict(
    compressed_vocab_size=50,
    engram_vocab_size=[11, 13, 17],
    max_ngram_size=4,
    n_head_per_ngram=3,
    layer_ids=[0, 2],
    pad_id=0,
    seed=7,
)


CPU_PATHS = available_paths()  # every CPU path this machine runs: avx512, avx2, portable, numpy


def with_path(h: NgramHasher, path: str) -> NgramHasher:
    """The same hasher (shared constants) forced onto one CPU path."""
    forced = copy.copy(h)
    forced.path = path
    return forced


def backends(h: NgramHasher):
    """Every CPU path this machine runs (compiled kernel paths, numpy), plus the torch ops."""

    def on_path(path):
        hp = with_path(h, path)

        def run(x, reset=None, window=None):
            return hp._run(np.asarray(x), reset=reset, window=window, out=None, layers=None)

        return run

    def torch_path(x, reset=None, window=None):
        r = None if reset is None else torch.from_numpy(np.asarray(reset))
        w = None if window is None else torch.from_numpy(window)
        out = h._run_torch(torch.from_numpy(np.asarray(x)), r, w, list(range(len(h.layer_ids))))
        if w is not None:
            window[:] = w.numpy()
        return out.numpy()

    return {**{path: on_path(path) for path in CPU_PATHS}, "torch": torch_path}


# ----------------------------------------------------------------------------- golden values


@pytest.mark.parametrize("path", CPU_PATHS)
def test_golden_demo_configuration(path):
    h = NgramHasher(**DEMO, path=path)
    assert h.path == path
    assert h.multipliers(1).tolist() == [76632096046245, 4839876093313, 35959672319349]
    assert h.multipliers(15).tolist() == [28919099099511, 56020370062535, 53929037264533]
    assert h.table_sizes(1) == [
        [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523],
        [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619],
    ]
    assert h.table_sizes(15)[0][:3] == [646631, 646637, 646643]
    rows = h.hash(np.array([[100, 200, 300, 99091, 0, 5]]), 1)
    assert rows.shape == (1, 6, 16) and rows.dtype == np.int64
    assert rows[0, 0].tolist()[:4] == [557574, 202348, 146706, 187351]
    assert rows[0, 5].tolist()[-3:] == [573002, 90619, 613053]
    assert h.fingerprint() == "b8f119247bd415898de96a486c4cd6133787fbc92f088c1c569c87641a10caf7"


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("cfg", [DEMO, SMALL], ids=["demo", "small"])
def test_matches_reference_scheme(cfg, path):
    V, N, K = cfg["compressed_vocab_size"], cfg["max_ngram_size"], cfg["n_head_per_ngram"]
    mult, primes = reference_tables(
        V, cfg["engram_vocab_size"], N, K, cfg["layer_ids"], cfg["seed"]
    )
    h = NgramHasher(**cfg, path=path)
    x = np.random.default_rng(0).integers(0, V, size=(3, 257), dtype=np.int64)
    x[0, :5] = V - 1  # largest products
    for layer_id in cfg["layer_ids"]:
        assert h.table_sizes(layer_id) == primes[layer_id]
        assert np.array_equal(h.multipliers(layer_id), mult[layer_id])
        ref = reference_hash(x, layer_id, mult, primes, N, K, cfg["pad_id"])
        assert np.array_equal(h.hash(x, layer_id), ref)
        got_t = h.hash(torch.from_numpy(x), layer_id)
        assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.int64
        assert np.array_equal(got_t.numpy(), ref)


def test_all_primes_distinct_and_above_targets():
    h = NgramHasher(**DEMO)
    allp = [p for layer in h.layer_ids for p in h.flat_table_sizes(layer)]
    assert len(allp) == len(set(allp)) == 32
    assert all(is_prime(p) and p > 129280 * 5 - 1 for p in allp)
    assert h.total_rows(1) == sum(h.flat_table_sizes(1))


def test_primes():
    assert [p for p in range(60) if is_prime(p)] == [p for p in range(60) if _ref_is_prime(p)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
    assert find_next_prime(10, set()) == 11
    assert find_next_prime(10, {11}) == 13
    assert find_next_prime(11, set()) == 13


# ----------------------------------------------------------------------------- backends agree


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    data=st.data(),
)
def test_backends_bit_exact_and_in_range(B, T, data):
    h = NgramHasher(**DEMO)
    x = np.array(
        data.draw(
            st.lists(
                st.lists(st.integers(0, 99_091), min_size=T, max_size=T), min_size=B, max_size=B
            )
        ),
        dtype=np.int64,
    )
    outs = {name: f(x) for name, f in backends(h).items()}
    first = outs["numpy"]
    for name, o in outs.items():
        assert np.array_equal(o, first), name
    for li, layer_id in enumerate(h.layer_ids):
        sizes = np.array(h.flat_table_sizes(layer_id))
        assert (first[li] >= 0).all() and (first[li] < sizes).all()
    # determinism: a fresh hasher gives the same bits
    assert np.array_equal(NgramHasher(**DEMO).hash_all(x), first)


def test_small_moduli_use_exact_path_and_agree():
    h = NgramHasher(**SMALL)
    assert h._exact
    x = np.random.default_rng(1).integers(0, 50, size=(4, 64))
    outs = [f(x) for f in backends(h).values()]
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_negative_ids_hash_like_reference():
    """Padding sentinels (negative ids) are hashed with floor modulo, as the demo does."""
    cfg = DEMO
    mult, primes = reference_tables(99_092, cfg["engram_vocab_size"], 3, 8, [1, 15], 0)
    h = NgramHasher(**cfg)
    x = np.array([[5, -1, -1, 7, -100, 3]], dtype=np.int64)
    ref = reference_hash(x, 1, mult, primes, 3, 8, 2)
    for f in backends(h).values():
        assert np.array_equal(f(x)[0], ref)
    assert (ref >= 0).all()


def test_out_buffer_and_errors():
    h = NgramHasher(**SMALL)
    x = np.random.default_rng(2).integers(0, 50, size=(2, 9))
    buf = np.empty((2, 2, 9, 9), dtype=np.int64)
    res = h.hash_all(x, out=buf)
    assert res is buf and np.array_equal(buf, h.hash_all(x))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2, 9, 9\)"):
        h.hash_all(x, out=np.empty((2, 2, 9, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="layer_id 1 is not an Engram layer"):
        h.hash(x, 1)
    with pytest.raises(ValueError, match=r"2-D \(batch, time\)"):
        h.hash_all(x[0])
    with pytest.raises(TypeError, match="integer"):
        h.hash_all(x.astype(np.float32))
    with pytest.raises(ValueError, match="engram_vocab_size needs a size for each order"):
        NgramHasher(10, [11], 3, 2, [0], 0)
    with pytest.raises(ValueError, match="distinct"):
        NgramHasher(10, [11, 13], 3, 2, [0, 0], 0)


def test_fingerprint_changes_with_configuration():
    base = NgramHasher(**SMALL).fingerprint()
    assert NgramHasher(**SMALL).fingerprint() == base
    for key, value in [
        ("seed", 8),
        ("pad_id", 1),
        ("compressed_vocab_size", 51),
        ("layer_ids", [0, 3]),
    ]:
        assert NgramHasher(**{**SMALL, key: value}).fingerprint() != base, key


def test_hash_layers_dict_matches_per_layer():
    h = NgramHasher(**SMALL)
    x = np.random.default_rng(3).integers(0, 50, size=(2, 30))
    d = h.hash_layers(x)
    assert list(d) == [0, 2]
    for layer_id, rows in d.items():
        assert np.array_equal(rows, h.hash(x, layer_id))


# ----------------------------------------------------------------------------- document resets


def _docs_strategy(max_docs=4, max_len=12):
    return st.lists(
        st.lists(st.integers(1, 49), min_size=1, max_size=max_len), min_size=1, max_size=max_docs
    )


@settings(max_examples=60, deadline=None)
@given(docs=_docs_strategy())
def test_separator_resets_equal_hashing_each_document_alone(docs):
    h = NgramHasher(**SMALL)
    sep = 0 if h.pad_id != 0 else 49  # a separator that is not the pad id
    docs = [[t for t in d if t != sep] + [sep] for d in docs]
    packed = np.array([[t for d in docs for t in d]], dtype=np.int64)
    starts = h._resets(packed, sep, None)
    for name, f in backends(h).items():
        got = f(packed, starts)
        pos = 0
        for d in docs:
            alone = h.hash_all(np.array([d], dtype=np.int64))
            assert np.array_equal(got[:, :, pos : pos + len(d)], alone), name
            pos += len(d)
    assert np.array_equal(h.hash_all(packed, sep_id=sep), backends(h)["numpy"](packed, starts))


@settings(max_examples=40, deadline=None)
@given(docs=_docs_strategy())
def test_segment_ids_equal_hashing_each_document_alone(docs):
    h = NgramHasher(**SMALL)
    packed = np.array([[t for d in docs for t in d]], dtype=np.int64)
    seg = np.array([[i for i, d in enumerate(docs) for _ in d]])
    got = h.hash_all(packed, segment_ids=seg)
    got_t = h.hash_all(torch.from_numpy(packed), segment_ids=torch.from_numpy(seg))
    assert np.array_equal(got_t.numpy(), got)
    pos = 0
    for d in docs:
        assert np.array_equal(got[:, :, pos : pos + len(d)], h.hash_all(np.array([d])))
        pos += len(d)


def test_reset_argument_errors():
    h = NgramHasher(**SMALL)
    x = np.ones((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="either sep_id or segment_ids"):
        h.hash_all(x, sep_id=1, segment_ids=x)
    with pytest.raises(ValueError, match="segment_ids must have the shape of ids"):
        h.hash_all(x, segment_ids=np.ones((2, 4)))


# ----------------------------------------------------------------------------- streaming


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 30),
    cuts=st.lists(st.integers(1, 29), max_size=6),
    use_torch=st.booleans(),
    with_sep=st.booleans(),
)
def test_streaming_equals_whole_sequence(T, cuts, use_torch, with_sep):
    h = NgramHasher(**SMALL)
    x = np.random.default_rng(T).integers(1, 50, size=(2, T))
    sep = 49
    if with_sep:
        x[:, ::5] = sep
    full = h.hash_all(x, sep_id=sep if with_sep else None)
    bounds = sorted({c for c in cuts if c < T} | {0, T})
    stream = h.stream(2, device="cpu" if use_torch else None)
    parts = []
    for a, b in itertools.pairwise(bounds):
        chunk = torch.from_numpy(x[:, a:b].copy()) if use_torch else x[:, a:b]
        out = stream(chunk, sep_id=sep if with_sep else None)
        parts.append(out.numpy() if use_torch else out)
    assert np.array_equal(np.concatenate(parts, axis=2), full)


def test_streaming_token_by_token_demo_config_and_reset():
    h = NgramHasher(**DEMO)
    x = np.random.default_rng(5).integers(0, 99_092, size=(3, 50))
    full = h.hash_all(x)
    stream = h.stream(3)
    steps = np.concatenate([stream(x[:, t : t + 1]) for t in range(50)], axis=2)
    assert np.array_equal(steps, full)
    stream.reset()
    assert np.array_equal(stream(x[:, :10]), full[:, :, :10])
    stream.reset(rows=[1])
    again = stream(x[:, :4])
    assert np.array_equal(again[:, 1], full[:, 1, :4])
    continued = np.concatenate([x[:, :10], x[:, :4]], axis=1)  # row 0 kept its state
    assert np.array_equal(again[:, 0], h.hash_all(continued)[:, 0, 10:14])


def test_stream_reorder_follows_the_selected_sequences():
    h = NgramHasher(**SMALL)
    x = np.random.default_rng(11).integers(1, 50, size=(3, 20))
    stream = h.stream(3)
    stream(x[:, :12])
    picked = stream.reorder(np.array([2, 2, 0]))
    got = picked(x[[2, 2, 0], 12:])
    assert np.array_equal(got, h.hash_all(x[[2, 2, 0]])[:, :, 12:])
    t_stream = h.stream(3, device="cpu")
    t_stream(torch.from_numpy(x[:, :12]))
    got_t = t_stream.reorder(torch.tensor([1]))(torch.from_numpy(x[[1], 12:]))
    assert np.array_equal(got_t.numpy(), h.hash_all(x[[1]])[:, :, 12:])


def test_stream_errors():
    h = NgramHasher(**SMALL)
    s = h.stream(2)
    with pytest.raises(ValueError, match="batch size 2"):
        s(np.ones((3, 1), dtype=np.int64))
    with pytest.raises(TypeError, match="same kind"):
        s(torch.ones((2, 1), dtype=torch.int64))


def test_kernel_is_built():
    """The package build compiles the C kernel on this platform (the numpy path is the fallback)."""
    assert kernel_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_matches_cpu():
    h = NgramHasher(**DEMO)
    x = np.random.default_rng(9).integers(0, 99_092, size=(4, 300))
    seg = np.repeat(np.arange(6), 50)[None].repeat(4, 0)
    cpu = h.hash_all(x, segment_ids=seg)
    gpu = h.hash_all(torch.from_numpy(x).cuda(), segment_ids=torch.from_numpy(seg).cuda())
    assert gpu.device.type == "cuda"
    assert np.array_equal(gpu.cpu().numpy(), cpu)
    s = h.stream(4, device="cuda")
    parts = [s(torch.from_numpy(x[:, t : t + 7]).cuda()) for t in range(0, 300, 7)]
    assert np.array_equal(torch.cat(parts, 2).cpu().numpy(), h.hash_all(x))


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.9])
def test_long_sequences_with_resets_across_kernel_blocks(density):
    """Sequences longer than the kernel's 256-token block, resets anywhere (also at block edges,
    back to back, and at position 0), streamed in chunks that straddle blocks."""
    h = NgramHasher(**{**SMALL, "engram_vocab_size": [9001, 9011, 9013]})  # fast (non-exact) path
    assert not h._exact
    rng = np.random.default_rng(int(density * 100))
    x = rng.integers(0, 50, size=(3, 1300))
    reset = rng.random((3, 1300)) < density
    reset[:, [0, 255, 256, 257, 511, 512, 1023]] = True
    reset[1] = False  # one sequence without any reset
    outs = {name: f(x, reset.copy()) for name, f in backends(h).items()}
    for name, o in outs.items():
        assert np.array_equal(o, outs["numpy"]), name
    seg = np.cumsum(reset, axis=1)
    assert np.array_equal(h.hash_all(x, segment_ids=seg), outs["numpy"])
    stream = h.stream(3)
    parts, t = [], 0
    for size in (1, 254, 3, 300, 1, 1, 500, 240):
        parts.append(stream(x[:, t : t + size], reset=reset[:, t : t + size]))
        t += size
    assert t == 1300
    assert np.array_equal(np.concatenate(parts, axis=2), outs["numpy"])
    # the device (torch) path streams with the same state semantics
    window = torch.full((3, h.max_ngram_size - 1), h.pad_id, dtype=torch.int64)
    parts, t = [], 0
    for size in (7, 600, 1, 692):
        xc, rc = torch.from_numpy(x[:, t : t + size]), torch.from_numpy(reset[:, t : t + size])
        parts.append(h._run_torch(xc, rc, window, [0, 1]).numpy())
        t += size
    assert np.array_equal(np.concatenate(parts, axis=2), outs["numpy"])
