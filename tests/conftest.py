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


@pytest.fixture(scope="session")
def analysis_cache(tmp_path_factory: pytest.TempPathFactory):
    """One private ENGRAM_CACHE_DIR shared by the analysis tests (tokenized corpus, compressor)."""
    return tmp_path_factory.mktemp("analysis-cache")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, analysis_cache):
    """Two finished tiny runs, trained once per session: {"engram": dir, "moe": dir}.

    The Engram run is `tiny_engram` (one Engram layer at block 1, M=1); the baseline `tiny_moe`.
    Tests that load them must set ENGRAM_CACHE_DIR to `analysis_cache` (see `analysis_env`).
    """
    from engram.presets import tiny_engram, tiny_moe
    from engram.run import train

    root = tmp_path_factory.mktemp("tiny-runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(analysis_cache))
        for key, make in (("engram", tiny_engram), ("moe", tiny_moe)):
            out[key] = root / key
            train(make(), out[key], progress=False)
    return out


@pytest.fixture
def analysis_env(analysis_cache, monkeypatch: pytest.MonkeyPatch):
    """Point the library's caches at the session's private analysis cache."""
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(analysis_cache))
    return analysis_cache


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: as fast, and immune to OpenMP contention
    on a loaded machine (two threads spin-waiting on a busy core run ~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run(tiny_runs, tmp_path):
    """A private copy of the tiny Engram run (serving may export tables into it)."""
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(tiny_runs["engram"], dest)
    return dest
