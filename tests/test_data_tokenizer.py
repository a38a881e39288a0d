"""Tokenizers a run can name: GPT-2, a BPE trained on the training split (cached), a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engram.data import DataConfig, DataError, prepare_data
from engram.data.tokenize import corpus_bpe, data_tokenizer, training_texts
from engram.tokenizer import EOT_ID, separator_id, train_bpe


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tok-cache"))


def _corpus(tmp_path, n=40):
    lines = []
    for i in range(n):
        lines.append(
            f"In the beginning document {i} spoke of the king of Babylon and his {i} sons."
        )
        lines[-1] += " " + _varied_texts(n)[i]
        lines.append("")
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _varied_texts(n=400):
    words = ["king", "Babylon", "children", "Israel", "went", "up", "against", "city", "LORD"]
    return [
        " ".join(f"{words[(i * 7 + j) % 9]}{(i * j) % 37}" for j in range(12)) for i in range(n)
    ]


def test_trained_bpe_is_deterministic_and_gpt2_shaped():
    texts = _varied_texts()
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert a.to_str() == b.to_str()
    assert separator_id(a) == 0 and a.get_vocab_size(with_added_tokens=True) == 300
    text = "Ünïcode — any bytes encode\n"
    assert a.decode(a.encode(text).ids) == text  # byte-level: nothing is unknown


def test_bpe_vocab_size_is_checked():
    with pytest.raises(ValueError, match="257 <= vocab_size"):
        train_bpe(["x"], 100)
    with pytest.raises(DataError, match="bpe:N"):
        DataConfig(tokenizer="bpe:12x")
    with pytest.raises(DataError, match=r"\[257, 65536\]"):
        DataConfig(tokenizer="bpe:10")


def test_separator_is_found_by_name(gpt2_tokenizer):
    assert separator_id(gpt2_tokenizer) == EOT_ID
    bare = Tokenizer.from_str(train_bpe(_varied_texts(), 260).to_str())
    assert separator_id(bare) == 0


def test_corpus_bpe_trains_on_the_training_split_only_and_is_cached(tmp_path):
    src = _corpus(tmp_path)
    cfg = DataConfig(source=str(src), val_fraction=0.25, tokenizer="bpe:300")
    texts = training_texts(cfg)
    splits = prepare_data(cfg, data_tokenizer(cfg), 0)
    assert len(texts) == splits.n_train_docs
    val_numbers = {
        t.split()[4] for t in (d for d in (src.read_text().split("\n\n")) if d.strip())
    } - {t.split()[4] for t in texts}
    assert len(val_numbers) == splits.n_val_docs  # the held-out documents are not in `texts`
    tok = corpus_bpe(cfg, 300)
    files = list((_cache_root() / "data" / "tokenizers").glob("bpe300-*.json"))
    assert len(files) == 1
    assert Tokenizer.from_file(str(files[0])).to_str() == tok.to_str()
    files[0].write_text("{ truncated", encoding="utf-8")  # a corrupt cache is rebuilt
    assert corpus_bpe(cfg, 300).to_str() == tok.to_str()


def _cache_root():
    return Path(os.environ["ENGRAM_CACHE_DIR"])


def test_tokenizer_file_and_bad_specs(tmp_path):
    tok = train_bpe(_varied_texts(), 280)
    (tmp_path / "model").mkdir()
    tok.save(str(tmp_path / "model" / "tokenizer.json"))
    for spec in (tmp_path / "model", tmp_path / "model" / "tokenizer.json"):
        loaded = data_tokenizer(DataConfig(tokenizer=str(spec)))
        assert loaded.to_str() == tok.to_str()
    with pytest.raises(DataError, match="does not exist"):
        data_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text("not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a tokenizers JSON"):
        data_tokenizer(DataConfig(tokenizer=str(tmp_path / "bad.json")))


def test_too_small_corpus_for_the_vocabulary(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("ab ab\n\nab ba\n\nba ab\n", encoding="utf-8")
    with pytest.raises(DataError, match="too small for a BPE"):
        data_tokenizer(DataConfig(source=str(src), val_fraction=0.3, tokenizer="bpe:5000"))
