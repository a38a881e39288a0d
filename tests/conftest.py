"""Shared session fixtures: the built-in GPT-2 tokenizer and its compressor (built once)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from engram.compress import TokenizerCompressor
from engram.tokenizer import load_builtin_tokenizer


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Tokenizer:
    return load_builtin_tokenizer()


@pytest.fixture(scope="session")
def gpt2_compressor(
    gpt2_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory
) -> TokenizerCompressor:
    """Built into a private temporary cache, never the user's ~/.cache/engram."""
    return TokenizerCompressor.from_tokenizer(
        gpt2_tokenizer, tmp_path_factory.mktemp("engram-cache")
    )
