"""The built-in Bible corpus: one document per chapter, verse numbers stripped."""

from __future__ import annotations

import re
import time

import pytest

from engram.corpus import (
    TRANSLATIONS,
    Document,
    iter_builtin_documents,
    load_builtin_corpus,
)

EXPECTED_CHAPTERS = {"kjv": 1189, "web": 1189, "bbe": 1190, "asv": 1189, "ylt": 1189}
# A verse number as the sources write it: "12. Text" (digits, a period, then the verse).
VERSE_NUMBER = re.compile(r"(?:^|\s)\d+\.\s*\S")


@pytest.fixture(scope="module")
def all_docs() -> list[Document]:
    t0 = time.perf_counter()
    docs = list(iter_builtin_documents())
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, f"loading the built-in corpus took {elapsed:.1f}s"
    return docs


def test_documents_per_translation(all_docs: list[Document]) -> None:
    counts: dict[str, int] = {}
    for doc in all_docs:
        counts[doc.translation] = counts.get(doc.translation, 0) + 1
    assert counts == EXPECTED_CHAPTERS
    assert len({doc.ref for doc in all_docs}) == len(all_docs)
    for name in TRANSLATIONS:
        docs = [d for d in all_docs if d.translation == name]
        assert len({d.book for d in docs}) == 66
        assert (docs[0].book, docs[0].chapter) == ("GENESIS", 1)
        assert (docs[-1].book, docs[-1].chapter) == ("REVELATION", 22)
        assert sum(d.book == "PSALMS" for d in docs) == 150


def test_no_verse_numbers_or_markup_remain(all_docs: list[Document]) -> None:
    for doc in all_docs:
        assert doc.text and doc.text == doc.text.strip(), doc.ref
        assert not VERSE_NUMBER.search(doc.text), (doc.ref, VERSE_NUMBER.search(doc.text))
        assert "\\" not in doc.text and "  " not in doc.text and "\t" not in doc.text, doc.ref
    # Only YLT writes numbers as digits: "12 thousand were sealed", "its number [is] 666."
    with_digits = {doc.ref for doc in all_docs if re.search(r"\d", doc.text)}
    assert with_digits == {"ylt/REVELATION/7", "ylt/REVELATION/13"}


def test_known_text(all_docs: list[Document]) -> None:
    by_ref = {doc.ref: doc.text for doc in all_docs}
    genesis = by_ref["kjv/GENESIS/1"]
    assert genesis.startswith(
        "In the beginning God created the heaven and the earth. And the earth was without form"
    )
    assert genesis.endswith("And the evening and the morning were the sixth day.")
    assert "\nAnd God said, Let there be light" in genesis  # KJV paragraph break kept
    assert by_ref["kjv/REVELATION/22"].endswith("[be] with you all. Amen.")
    assert " Jesus wept. " in by_ref["kjv/JOHN/11"]
    # BBE's index drifts after its first backslash (Genesis 42); the realigned text must still
    # end every book where it should.
    assert by_ref["bbe/REVELATION/22"].endswith(
        "The grace of the Lord Jesus be with the saints. So be it."
    )
    assert by_ref["bbe/GENESIS/43"].startswith("And when the grain which they had got in Egypt")
    # WEB's psalm headings are moved off the previous chapter; the superscription opens its psalm.
    assert by_ref["web/JOB/42"].endswith("So Job died, being old and full of days.")
    assert by_ref["web/PSALMS/3"].startswith(
        "A Psalm by David, when he fled from Absalom, his son. "
    )
    assert by_ref["ylt/GENESIS/1"].startswith(
        "In the beginning of God`s preparing the heavens and the earth"
    )


def test_deterministic_order(all_docs: list[Document]) -> None:
    keys = [(TRANSLATIONS.index(d.translation), d.book_number, d.chapter) for d in all_docs]
    assert keys == sorted(keys)
    again = list(iter_builtin_documents(("ylt", "kjv")))
    assert [d.translation for d in again] == ["ylt"] * 1189 + ["kjv"] * 1189
    expected = [d for d in all_docs if d.translation == "ylt"] + [
        d for d in all_docs if d.translation == "kjv"
    ]
    assert again == expected


def test_load_builtin_corpus_and_single_name(all_docs: list[Document]) -> None:
    web = load_builtin_corpus("web")
    assert web == [d.text for d in all_docs if d.translation == "web"]
    assert sum(map(len, web)) > 3_900_000


def test_unknown_translation() -> None:
    with pytest.raises(ValueError, match=r"'niv'.*kjv, web, bbe, asv, ylt"):
        iter_builtin_documents(["kjv", "niv"])  # raised at call time, not on first next()
    with pytest.raises(ValueError, match="distinct"):
        load_builtin_corpus(["kjv", "kjv"])
