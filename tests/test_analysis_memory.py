"""The memory explorer: corpus n-gram counts, collision structure, n-gram and row queries."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
import torch

from engram.analysis.memory import MemoryIndex, analyze_memory, explore_ngram, explore_row
from engram.analysis.ngram_counts import COUNTS_FILE, NgramCounts, corpus_counts, valid_starts
from engram.analysis.runs import NoEngramError
from engram.compress import TokenizerCompressor
from engram.data import prepare_data
from engram.tokenizer import EOT_ID
from engram.train import load_trained

MAX_TOKENS = 60_000  # the first books of the tiny runs' KJV training split: fast to count

# A synthetic compressor with merges: raw ids 1 and 3 share compressed id 1, 2 and 5 share 2,
# 8 and 4 share 3; raw 11 is the separator (compressed 8, shared with no other id).
LOOKUP = np.array([0, 1, 2, 1, 3, 2, 4, 5, 3, 6, 7, 8])
SEP = 11


def _synthetic_stream(seed: int = 0, size: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 6, size=size)  # a small alphabet: many repeated n-grams
    raw[rng.random(size) < 0.06] = SEP
    raw[rng.random(size) < 0.05] = 7
    raw[-1] = SEP
    return raw


def _reference(raw: np.ndarray, n: int) -> tuple[collections.Counter, dict]:
    """Counter of compressed n-grams inside documents (a document ends with its separator),
    plus the raw ids of each n-gram's first occurrence."""
    comp = [int(LOOKUP[t]) for t in raw]
    sep = int(LOOKUP[SEP])
    counter: collections.Counter = collections.Counter()
    first: dict = {}
    doc: list[int] = []  # positions of the current document
    for pos, c in enumerate(comp):
        doc.append(pos)
        if len(doc) >= n:
            window = doc[-n:]
            key = tuple(comp[p] for p in window)
            counter[key] += 1
            first.setdefault(key, tuple(int(raw[p]) for p in window))
        if c == sep:
            doc = []
    return counter, first


@pytest.mark.parametrize("force_lexsort", [False, True])
def test_counts_equal_a_counter_reference(force_lexsort: bool) -> None:
    raw = _synthetic_stream()
    compressor = TokenizerCompressor(LOOKUP, "synthetic")
    counts = NgramCounts.from_tokens(
        raw, compressor, sep_id=SEP, max_order=4, min_count=2, _force_lexsort=force_lexsort
    )
    assert counts.meta["compressed_sep_id"] == 8
    for n in (2, 3, 4):
        ref, first = _reference(raw, n)
        oc = counts.order(n)
        got = {tuple(int(x) for x in g): int(c) for g, c in zip(oc.grams, oc.counts, strict=True)}
        assert got == {k: v for k, v in ref.items() if v >= 2}
        assert oc.total == sum(ref.values()) and oc.n_distinct == len(ref)
        for g, s in zip(oc.grams, oc.surface, strict=True):
            assert tuple(int(x) for x in s) == first[tuple(int(x) for x in g)]
        keys = [tuple(g) for g in oc.grams.tolist()]
        assert keys == sorted(keys)  # lexicographic: both counting paths agree on the order
        for g, c in list(got.items())[:20]:
            assert counts.count_of(g) == c
        for key in [(0,) * n, (5,) * n, (4,) * n]:  # common, rarer, absent (no raw id -> 4)
            expected = ref.get(key, 0)
            assert counts.count_of(key) == (expected if expected >= 2 else 0)


def test_no_ngram_crosses_a_separator() -> None:
    raw = _synthetic_stream(seed=1)
    counts = NgramCounts.from_tokens(
        raw, TokenizerCompressor(LOOKUP, "synthetic"), sep_id=SEP, max_order=3, min_count=1
    )
    for n in (2, 3):
        grams = counts.order(n).grams
        assert not np.any(grams[:, :-1] == 8), "a separator inside an n-gram"
        assert np.any(grams[:, -1] == 8)  # n-grams ending with the separator are read and kept
    # By hand: documents "1 2 SEP" and "1 2 SEP"; nothing spans "SEP 1" or starts with pad.
    tiny = np.array([1, 2, SEP, 1, 2, SEP])
    c = NgramCounts.from_tokens(
        tiny, TokenizerCompressor(LOOKUP, "synthetic"), sep_id=SEP, max_order=3, min_count=1
    )
    bigrams = zip(map(tuple, c.order(2).grams.tolist()), c.order(2).counts.tolist(), strict=True)
    assert dict(bigrams) == {(1, 2): 2, (2, 8): 2}
    assert c.order(3).grams.tolist() == [[1, 2, 8]] and c.order(3).counts.tolist() == [2]
    assert valid_starts(np.array([1, 8, 1, 1]), 3, 8).tolist() == []


def test_counts_save_load_and_reject_damage(tmp_path) -> None:
    raw = _synthetic_stream(seed=2)
    compressor = TokenizerCompressor(LOOKUP, "synthetic")
    counts = NgramCounts.from_tokens(
        raw, compressor, sep_id=SEP, max_order=3, max_tokens=3000, fingerprint="abc"
    )
    assert counts.n_tokens == 3000
    path = counts.save(tmp_path / "c.npz")
    back = NgramCounts.load(path, expected_fingerprint="abc")
    for n in (2, 3):
        for name in ("grams", "counts", "surface"):
            np.testing.assert_array_equal(
                getattr(back.order(n), name), getattr(counts.order(n), name)
            )
    with pytest.raises(ValueError, match="fingerprint"):
        NgramCounts.load(path, expected_fingerprint="other")
    with np.load(path) as z:  # a valid zip whose arrays no longer match their checksum
        arrays = {k: z[k] for k in z.files}
    arrays["counts_2"] = arrays["counts_2"] + 1
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match="checksum"):
        NgramCounts.load(tmp_path / "tampered.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        NgramCounts.load(path)


# ----------------------------------------------------------------------------- on a real run


@pytest.fixture(scope="module")
def run(tiny_runs, analysis_cache):
    """The tiny Engram run, its counts over the first MAX_TOKENS training tokens, its index."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(analysis_cache))
        parts, _ = load_trained(tiny_runs["engram"])
        counts, _ = corpus_counts(parts, max_tokens=MAX_TOKENS)
        index = MemoryIndex.build(parts, counts)
        tokens = prepare_data(parts.cfg.data, parts.tokenizer, EOT_ID).train.tokens[:MAX_TOKENS]
    return parts, counts, index, np.asarray(tokens, dtype=np.int64)


def _py_row(gram: tuple[int, ...], mult: np.ndarray, prime: int) -> int:
    """The hash written out in plain Python ints: XOR of id * multiplier (last id first) mod p."""
    n, mix = len(gram), 0
    for lag in range(n):
        mix ^= gram[n - 1 - lag] * int(mult[lag])
    return mix % prime


def test_frequent_rows_equal_hash_all_of_real_text(analysis_env, run) -> None:
    parts, counts, index, tokens = run
    text = tokens[:6000]  # a prefix of the packed training stream: starts at a document start
    rows = parts.indexer.rows(text[None])  # (L, 1, T, H), document resets at the separator
    comp = np.asarray(parts.compressor.compress(text))
    checked = 0
    for li, layer_id in enumerate(parts.indexer.hasher.layer_ids):
        for hc in index.layers[layer_id].heads:
            n = hc.order
            for s in valid_starts(comp, n, parts.indexer.sep_id):
                i = counts.find(comp[s : s + n])
                if i is not None:
                    assert hc.rows[i] == rows[li, 0, s + n - 1, hc.head]
                    checked += 1
    assert checked > 10_000


def test_explore_ngram_rows_are_the_models_rows(analysis_env, run) -> None:
    parts, counts, index, tokens = run
    sentence = "In the beginning God created the heaven and the earth. And God said"
    model_rows = parts.indexer.rows(parts.indexer.encode(sentence)[None])[:, 0, -1]  # (L, H)
    rep = explore_ngram(parts, counts, "And God said", index=index)
    assert rep.tokenized == " And God said" and rep.tokens == [" And", " God", " said"]
    H = parts.indexer.hasher.n_subtables
    assert len(rep.hits) == H * len(parts.indexer.hasher.layer_ids)
    comp = np.asarray(parts.compressor.compress(tokens))
    for h in rep.hits:
        li = parts.indexer.hasher.layer_ids.index(h.layer_id)
        assert h.local_row == model_rows[li, h.head]
        assert h.ngram_text == (" God said" if h.order == 2 else " And God said")
        assert h.frequent and not h.padded
        # The count is that of the compressed n-gram in the corpus, by a direct scan.
        q = np.asarray(parts.compressor.compress(parts.indexer.encode(h.ngram_text)))
        starts = valid_starts(comp, h.order, parts.indexer.sep_id)
        windows = comp[starts[:, None] + np.arange(h.order)]
        assert h.count == int(np.all(windows == q, axis=1).sum()) >= 2
    # A text shorter than the order: padded, no count, rows still the model's.
    short = explore_ngram(parts, counts, "God", index=index)
    model_short = parts.indexer.rows(parts.indexer.encode(" God")[None])[:, 0, -1]
    for h in short.hits:
        assert h.padded and h.count == 0 and not h.frequent
        assert h.local_row == model_short[0, h.head]


def test_collisions_equal_a_brute_force_reference(analysis_env, run) -> None:
    parts, counts, index, _ = run
    hasher = parts.indexer.hasher
    for layer_id in hasher.layer_ids:
        mult, primes = hasher.multipliers(layer_id), hasher.flat_table_sizes(layer_id)
        for hc in index.layers[layer_id].heads:
            oc = counts.order(hc.order)
            py_rows = np.array(
                [_py_row(tuple(g), mult, primes[hc.head]) for g in oc.grams.tolist()]
            )
            np.testing.assert_array_equal(hc.rows, py_rows)
            for i in range(0, len(oc), max(1, len(oc) // 25)):  # a sample, pairwise
                same = [j for j in range(len(oc)) if py_rows[j] == py_rows[i]]
                assert hc.on_row[i] - 1 == len(same) - 1
                assert hc.mass_on_row[i] == sum(int(oc.counts[j]) for j in same)
                rr = explore_row(parts, counts, layer_id, hc.head, int(py_rows[i]), index=index)
                assert rr.n_ngrams == len(same)
            uniform = (len(oc) - 1) / hc.table_size
            assert hc.stats()["expected_collisions_uniform"] == pytest.approx(uniform)
    rep = explore_ngram(parts, counts, "And God said", index=index)
    for h in rep.hits:
        oc = counts.order(h.order)
        mult = hasher.multipliers(h.layer_id)
        p = hasher.flat_table_sizes(h.layer_id)[h.head]
        others = [
            j for j, g in enumerate(oc.grams.tolist())
            if _py_row(tuple(g), mult, p) == h.local_row
            and tuple(g) != tuple(parts.compressor.compress(parts.indexer.encode(h.ngram_text)))
        ]  # fmt: skip
        assert h.n_colliding == len(others)
        assert h.colliding_mass == int(oc.counts[others].sum())
        tops = [c.count for c in h.top_colliders]
        assert tops == sorted(int(oc.counts[j]) for j in others)[::-1][: len(tops)]


def test_explore_row_inverts_explore_ngram_and_norms(analysis_env, run) -> None:
    parts, counts, index, _ = run
    layers = parts.model.engram_layers()
    rep = explore_ngram(parts, counts, "the children of Israel", index=index)
    for h in rep.hits:
        assert h.frequent
        rr = explore_row(parts, counts, h.layer_id, h.head, h.local_row, limit=10_000, index=index)
        assert (h.ngram_text, h.count) in [(g.text, g.count) for g in rr.ngrams]
        assert rr.n_ngrams == h.n_colliding + 1 and rr.global_row == h.global_row
        counts_listed = [g.count for g in rr.ngrams]
        assert counts_listed == sorted(counts_listed, reverse=True)
        layer = layers[h.layer_id]
        assert h.global_row == int(layer.offsets[h.head]) + h.local_row
        expected = torch.linalg.norm(layer.store.weight.detach()[h.global_row])
        assert h.norm == pytest.approx(float(expected), rel=1e-6) and rr.norm == h.norm
        all_norms = torch.linalg.norm(layer.store.weight.detach(), dim=1)
        pct = 100.0 * float((all_norms <= all_norms[h.global_row]).float().mean())
        assert h.norm_percentile == pytest.approx(pct, abs=1e-3)
    # explore_row builds its own index when none is passed (same answer).
    h = rep.hits[0]
    assert explore_row(parts, counts, h.layer_id, h.head, h.local_row) == explore_row(
        parts, counts, h.layer_id, h.head, h.local_row, index=index
    )


def test_bad_queries_and_a_baseline_give_clear_errors(analysis_env, run, tiny_runs, tmp_path):
    parts, counts, index, _ = run
    H = parts.indexer.hasher.n_subtables
    size = parts.indexer.hasher.flat_table_sizes(1)[H - 1]
    with pytest.raises(ValueError, match=r"layer_id 0 is not an Engram layer.*\[1\]"):
        explore_row(parts, counts, 0, 0, 0, index=index)
    with pytest.raises(ValueError, match=rf"head {H} is out of range \[0, {H}\)"):
        explore_row(parts, counts, 1, H, 0, index=index)
    with pytest.raises(ValueError, match=rf"row {size} is out of range \[0, {size}\)"):
        explore_row(parts, counts, 1, H - 1, size, index=index)
    with pytest.raises(ValueError, match=r"row -1 is out of range"):
        explore_row(parts, counts, 1, 0, -1, index=index)
    with pytest.raises(TypeError, match="head must be an int"):
        explore_row(parts, counts, 1, True, 0, index=index)
    with pytest.raises(ValueError, match="non-empty"):
        explore_ngram(parts, counts, "  ", index=index)
    baseline, _ = load_trained(tiny_runs["moe"])
    with pytest.raises(NoEngramError, match="no Engram layers"):
        explore_ngram(baseline, counts, "And God said")
    with pytest.raises(NoEngramError, match=r"no Engram layers.*memory explorer"):
        analyze_memory(tiny_runs["moe"], tmp_path / "m", ["And God said"])
    assert not (tmp_path / "m").exists()
    other = NgramCounts(counts.orders, dict(counts.meta, compressor_fingerprint="x"))
    with pytest.raises(ValueError, match="another tokenizer compressor"):
        MemoryIndex.build(parts, other)


def test_analyze_memory_writes_outputs_and_reuses_its_cache(
    analysis_env, tiny_runs, tmp_path, caplog
) -> None:
    out = tmp_path / "memory"
    queries = ["And God said", "<b>Tom & Jerry</b>"]
    kwargs = {"max_tokens": MAX_TOKENS, "rows": [(1, 0, 3)]}
    rep = analyze_memory(tiny_runs["engram"], out, queries, **kwargs)
    cache = out / COUNTS_FILE
    assert rep.counts["reused"] is False and cache.is_file()
    data = json.loads((out / "memory.json").read_text())
    assert [q["text"] for q in data["ngrams"]] == queries
    assert data["rows"][0]["local_row"] == 3 and data["layers"][0]["layer_id"] == 1
    layer = data["layers"][0]
    assert 0 < layer["frac_rows_hit"] <= 1 and layer["expected_collisions_uniform"] > 0
    page = (out / "memory.html").read_text()
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in page and "<b>Tom" not in page
    assert "http://" not in page and "https://" not in page and "data:image/png;base64," in page
    assert (out / "row_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamp = cache.stat().st_mtime_ns
    again = analyze_memory(tiny_runs["engram"], out, queries[:1], **kwargs)
    assert again.counts["reused"] is True and cache.stat().st_mtime_ns == stamp
    assert again.ngrams[0].to_dict() == rep.ngrams[0].to_dict()

    cache.write_bytes(cache.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="engram.analysis.ngram_counts"):
        third = analyze_memory(tiny_runs["engram"], out, queries[:1], **kwargs)
    assert third.counts["reused"] is False and "rebuilding" in caplog.text
    assert NgramCounts.load(cache).n_tokens == MAX_TOKENS
    assert third.ngrams[0].to_dict() == rep.ngrams[0].to_dict()

    other = analyze_memory(tiny_runs["engram"], out, (), max_tokens=MAX_TOKENS, min_count=3)
    assert other.counts["reused"] is False and other.counts["min_count"] == 3
