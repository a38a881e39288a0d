"""NgramIndexer: raw ids -> compressed -> rows, wired exactly like the separate pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import small_config
from engram.hashing import NgramHasher
from engram.indexer import NgramIndexer
from engram.tokenizer import EOT_ID


@pytest.fixture(scope="module")
def indexer(gpt2_tokenizer, gpt2_compressor) -> NgramIndexer:
    return NgramIndexer(small_config(), gpt2_compressor, gpt2_tokenizer, sep_id=EOT_ID)


def test_rows_equal_compress_then_hash(indexer, gpt2_compressor):
    text = "In the beginning God created the heaven and the earth."
    raw = indexer.encode(text)[None]
    cfg = small_config()
    hasher = NgramHasher.from_config(
        cfg, gpt2_compressor.compressed_vocab_size, gpt2_compressor.compress_id(cfg.pad_id)
    )
    expected = hasher.hash_all(gpt2_compressor.compress(raw))
    assert np.array_equal(indexer.rows(raw), expected)
    got_t = indexer.rows(torch.from_numpy(raw))
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), expected)


def test_case_variants_hit_the_same_rows(indexer):
    a = indexer.rows(indexer.encode(" the LORD of hosts")[None])
    b = indexer.rows(indexer.encode(" the Lord of hosts")[None])
    assert a.shape == b.shape
    assert np.array_equal(a, b)


def test_documents_do_not_leak_across_separator(indexer):
    d1, d2 = indexer.encode("And God said"), indexer.encode("Let there be light")
    packed = np.concatenate([d1, [EOT_ID], d2])[None]
    rows = indexer.rows(packed)
    alone = indexer.rows(np.concatenate([d2])[None])
    assert np.array_equal(rows[:, :, len(d1) + 1 :], alone)
    leaked = indexer.rows(packed, reset_at_separator=False)
    assert not np.array_equal(leaked[:, :, len(d1) + 1 :], alone)


def test_explain(indexer):
    hits = indexer.explain("Alexander the Great", 1)
    assert [h.token for h in hits] == ["Alexander", " the", " Great"]
    assert hits[2].ngrams == (" the Great", "Alexander the Great")
    rows = indexer.rows(indexer.encode("Alexander the Great")[None])[0, 0]  # (T, H)
    K = small_config().n_head_per_ngram
    assert list(hits[2].rows[0]) == rows[2, :K].tolist()
    assert list(hits[2].rows[1]) == rows[2, K:].tolist()
    assert hits[0].ngrams[0] == "<pad>Alexander"
    with pytest.raises(ValueError, match="not an Engram layer"):
        indexer.explain("x", 5)
    with pytest.raises(ValueError, match=r"one sequence \(T,\)"):
        indexer.explain(np.zeros((2, 3), dtype=np.int64), 1)
