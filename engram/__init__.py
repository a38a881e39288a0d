"""engram: conditional memory via scalable hashed n-gram lookup, for PyTorch.

The pieces, one module each: ``compress`` (raw -> compressed ids), ``hashing`` (compressed ids
-> sub-table rows, all layers at once), ``store`` (where rows live), ``layer`` (the Engram
module: gate, value, short conv), and ``indexer`` (tokenizer + compressor + hasher wired).
"""

from engram.compress import TokenizerCompressor
from engram.config import EngramConfig, demo_config, small_config
from engram.corpus import iter_builtin_documents, load_builtin_corpus
from engram.hashing import HashStream, NgramHasher
from engram.indexer import NgramIndexer
from engram.layer import Engram
from engram.store import MemoryRowStore, RowStore
from engram.tokenizer import load_builtin_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Engram",
    "EngramConfig",
    "HashStream",
    "MemoryRowStore",
    "NgramHasher",
    "NgramIndexer",
    "RowStore",
    "TokenizerCompressor",
    "__version__",
    "demo_config",
    "iter_builtin_documents",
    "load_builtin_corpus",
    "load_builtin_tokenizer",
    "small_config",
]
