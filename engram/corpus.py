"""The built-in offline corpus: five public-domain English Bibles, one document per chapter.

The text comes from the `pythonbible-<name>` packages (KJV, WEB, BBE, ASV, YLT). Each ships its
whole Bible as one string literal in ``pythonbible_<name>/plain_text_bible.py``, passed to a
``Bible(version, text, verse_start_indices, verse_end_indices, max_verses, short_titles,
long_titles, is_html)`` call, with verses written inline as ``"1. In the beginning ... 2. And the
earth ..."`` and no book or chapter markers.

Design choices:
- The files are located with ``importlib.util.find_spec`` and parsed with ``ast`` - never imported
  (importing would build ``pythonbible`` objects and execute package code for nothing).
- Chapters are cut with the package's own verse index (verse id = book*1_000_000 + chapter*1000 +
  verse), and book names come from the ``max_verses`` keys (``Book.GENESIS`` -> "GENESIS"), which
  are the same across translations. The index is validated: every verse slice must start with its
  own number, or loading fails loudly rather than yielding misaligned chapters.
- BBE's index was computed by its generator on text with every backslash doubled, so it drifts
  from Genesis 42 on; offsets are mapped back (``raw = i + backslashes before i``), which makes
  all 31,172 BBE verse slices line up exactly. BBE's versification notes (``\\43:1\\``) and stray
  backslash separators are removed. BBE has 1190 chapters (its Isaiah has 67), the others 1189.
- Cleaning is minimal: the leading verse number of each verse is stripped and runs of spaces and
  tabs (YLT/WEB line-wrap artifacts) collapse to one space. Everything else is kept as published,
  including KJV's bracketed italics (``[was]``) and WEB/YLT's backtick quotes. Verses are joined by
  a space, or by a newline where the source starts a new paragraph (KJV and ASV mark paragraphs).
  WEB's psalm headings ("BOOK I Psalm 1", "Psalm 3 A Psalm by David, ...") sit at the end of the
  previous chapter in its index; the labels are dropped and the superscription moved to the start
  of its own psalm (where KJV keeps it, in verse 1).
- Order is deterministic: translations in the order requested, then canonical book/chapter order.
  No module-level caches: ``iter_builtin_documents`` parses one translation at a time (~0.5 s
  each, ~3 s for all five; ``ast.parse`` of the 6 MB file dominates) and yields its chapters, so
  memory holds one translation's text at a time.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np

TRANSLATIONS: Final = ("kjv", "web", "bbe", "asv", "ylt")
"""Names of the built-in translations, in default order."""

_VERSE_NUMBER = re.compile(r"\s*(\d+)\.[ \t]*")
_BBE_REFERENCE = re.compile(r"\\\d+:\d+\\")
_SPACES = re.compile(r"[ \t][ \t]+|\t")
_PSALM_HEADING = re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm (\d+)(?:\s+([^\n]*))?\Z")


@dataclass(frozen=True)
class Document:
    """One chapter of one translation."""

    translation: str  # "kjv", "web", "bbe", "asv" or "ylt"
    book: str  # stable book key across translations, e.g. "GENESIS", "SAMUEL_1", "REVELATION"
    book_number: int  # 1..66, canonical (Protestant) order
    chapter: int  # 1-based
    text: str  # the chapter's verses without verse numbers

    @property
    def ref(self) -> str:
        """A unique, readable reference such as ``"kjv/GENESIS/1"``."""
        return f"{self.translation}/{self.book}/{self.chapter}"


def check_translations(translations: str | Iterable[str]) -> tuple[str, ...]:
    """The names as a tuple; ValueError for an unknown or repeated translation."""
    names = (translations,) if isinstance(translations, str) else tuple(translations)
    for name in names:
        if name not in TRANSLATIONS:
            raise ValueError(
                f"unknown translation {name!r}; valid translations are {', '.join(TRANSLATIONS)}"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"translations must be distinct, got {list(names)} ({', '.join(repeated)} repeats)"
        )
    return names


def _source_file(translation: str) -> Path:
    package = f"pythonbible_{translation}"
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(
            f"the built-in corpus needs the '{package}' package for translation {translation!r} "
            f"(pip install pythonbible-{translation})"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots.append(Path(spec.origin).parent)
    for root in roots:
        if (root / "plain_text_bible.py").is_file():
            return root / "plain_text_bible.py"
    raise FileNotFoundError(f"{package} is installed but has no plain_text_bible.py under {roots}")


_BIBLE_ARGS: Final = (
    "version",
    "scripture_content",
    "verse_start_indices",
    "verse_end_indices",
    "max_verses",
    "short_titles",
    "long_titles",
    "is_html",
)


def _bible_call_args(path: Path) -> dict[str, ast.expr]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Bible"
        ):
            args = dict(zip(_BIBLE_ARGS, node.args, strict=False))
            args.update({kw.arg: kw.value for kw in node.keywords if kw.arg})
            missing = [a for a in _BIBLE_ARGS[1:5] if a not in args]
            if missing:
                raise ValueError(f"{path}: Bible(...) call lacks {missing}")
            return args
    raise ValueError(f"{path}: no Bible(...) call found")


def _unescape_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    """Map offsets counted with every backslash doubled back to offsets into ``text``."""
    if "\\" not in text:
        return offsets
    chars = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    raw = np.arange(len(text) + 1, dtype=np.int64)
    raw[1:] += np.cumsum(chars == ord("\\"))
    fixed = np.searchsorted(raw, offsets)
    if np.any(fixed > len(text)) or np.any(raw[np.minimum(fixed, len(text))] != offsets):
        raise ValueError("verse offsets do not map onto the text")
    return fixed


def _clean_verse(verse: str, translation: str) -> str:
    if translation == "bbe":
        verse = _BBE_REFERENCE.sub(" ", verse).replace("\\", " ")
    return _SPACES.sub(" ", verse).strip()


def _translation_documents(translation: str) -> list[Document]:
    path = _source_file(translation)
    args = _bible_call_args(path)
    text = ast.literal_eval(args["scripture_content"])
    starts: dict[int, int] = ast.literal_eval(args["verse_start_indices"])
    ends: dict[int, int] = ast.literal_eval(args["verse_end_indices"])
    max_verses_node = args["max_verses"]
    if not isinstance(text, str) or not isinstance(max_verses_node, ast.Dict):
        raise ValueError(f"{path}: unexpected Bible(...) arguments")
    book_keys = [k.attr if isinstance(k, ast.Attribute) else None for k in max_verses_node.keys]
    max_verses = [ast.literal_eval(v) for v in max_verses_node.values]
    if None in book_keys:
        raise ValueError(f"{path}: max_verses keys must be Book.<NAME> attributes")

    verse_ids = sorted(starts)
    if set(ends) != set(verse_ids):
        raise ValueError(f"{path}: verse start and end indices cover different verses")
    offsets = np.array([starts[v] for v in verse_ids] + [ends[v] for v in verse_ids], np.int64)
    fixed = _unescape_offsets(text, offsets).tolist()
    n = len(verse_ids)
    vstarts, vends = fixed[:n], fixed[n:]

    book_numbers = sorted({v // 1_000_000 for v in verse_ids})
    if len(book_numbers) != len(book_keys):
        raise ValueError(f"{path}: {len(book_numbers)} books in the index, {len(book_keys)} named")
    book_of = dict(zip(book_numbers, zip(book_keys, max_verses, strict=True), strict=True))

    chapters: dict[tuple[int, int], list[str]] = {}
    previous_end = 0
    for vid, start, end in zip(verse_ids, vstarts, vends, strict=True):
        raw = text[start:end]
        m = _VERSE_NUMBER.match(raw)
        if m is None or int(m.group(1)) != vid % 1000:
            raise ValueError(f"{path}: verse {vid} does not start with its number: {raw[:40]!r}")
        # A newline between the previous verse's last word and this one's number marks a
        # paragraph break.
        sep = "\n" if "\n" in text[previous_end : start + m.start(1)] else " "
        previous_end = start + len(raw.rstrip())
        verse = _clean_verse(raw[m.end() :], translation)
        if not verse:
            continue
        chapters.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(sep + verse)

    documents = []
    for (book_number, chapter), verses in chapters.items():
        book, chapter_sizes = book_of[book_number]
        if chapter not in chapter_sizes:
            raise ValueError(f"{path}: {book} {chapter} is in the index but not in max_verses")
        documents.append(
            Document(
                translation=translation,
                book=book,
                book_number=book_number,
                chapter=chapter,
                text="".join(verses)[1:],
            )
        )
    n_chapters = sum(len(sizes) for sizes in max_verses)
    if len(documents) != n_chapters:
        raise ValueError(
            f"{path}: {len(documents)} non-empty chapters, max_verses lists {n_chapters}"
        )
    return _move_psalm_headings(documents)


def _move_psalm_headings(documents: list[Document]) -> list[Document]:
    """Move "[BOOK I] Psalm N <superscription>" from a chapter's end to the start of Psalm N.

    WEB's index puts each psalm's heading at the end of the previous chapter's last verse; the
    "Psalm N"/"BOOK I" labels are dropped and the superscription (if any) opens its psalm, as in
    KJV, where the superscription is part of verse 1.
    """
    out = list(documents)
    for i in range(len(out) - 1):
        doc, nxt = out[i], out[i + 1]
        if nxt.book != "PSALMS":
            continue
        m = _PSALM_HEADING.search(doc.text, max(0, len(doc.text) - 500))
        if m is None or int(m.group(1)) != nxt.chapter:
            continue
        out[i] = replace(doc, text=doc.text[: m.start()])
        superscription = m.group(2)
        if superscription:
            out[i + 1] = replace(nxt, text=f"{superscription} {nxt.text}")
    return out


def iter_builtin_documents(
    translations: str | Iterable[str] = TRANSLATIONS,
) -> Iterator[Document]:
    """Yield every chapter of the given translations, in deterministic order.

    Order: translations as given, then books and chapters in canonical order. Raises
    ``ValueError`` for an unknown (or repeated) translation name at call time, before reading
    anything; translations are parsed lazily, one at a time, as the iterator advances.
    """
    names = check_translations(translations)
    return (doc for name in names for doc in _translation_documents(name))


def load_builtin_corpus(translations: str | Iterable[str] = TRANSLATIONS) -> list[str]:
    """The chapter texts of the given translations, in the order of ``iter_builtin_documents``."""
    return [doc.text for doc in iter_builtin_documents(translations)]
