"""engram: conditional memory via scalable hashed n-gram lookup, for PyTorch.

The memory, one module each: ``compress`` (raw -> compressed ids), ``hashing`` (compressed ids
-> sub-table rows, all layers at once), ``store`` (where rows live), ``layer`` (the Engram
module: gate, value, short conv), and ``indexer`` (tokenizer + compressor + hasher wired).

Training and comparison: ``model`` (the transformer backbone with MoE, hyper-connections and
Engram layers), ``plan`` (iso-parameter expert/table allocation), ``data`` (corpora, token cache,
background-hashing loader), ``optim``, ``checkpoint``, ``train`` (the loop), ``presets``.

Serving: ``generate`` (KV-cache decoding with streaming hashing), ``serving`` (tables in RAM or in
table files behind a hot-row cache and background prefetch), ``store`` (the tiers themselves).

Scale-out: ``parallel`` (torch.distributed: tables row-sharded over ranks with all-to-all
lookups and gradients, dense weights with DDP, sharded checkpoints, the ``--nproc`` launcher).
"""

from engram.compress import TokenizerCompressor
from engram.config import EngramConfig, demo_config, small_config
from engram.corpus import iter_builtin_documents, load_builtin_corpus
from engram.data import DataConfig
from engram.generate import Decoder, GenerationResult, generate
from engram.hashing import HashStream, NgramHasher
from engram.indexer import NgramIndexer
from engram.layer import Engram
from engram.model import EngramLM, ModelConfig
from engram.optim import OptimConfig
from engram.plan import plan_allocation
from engram.presets import preset
from engram.run import train
from engram.run_config import RunConfig, TrainConfig, apply_overrides
from engram.serving import ServedModel, TierConfig, load_served
from engram.store import CachedRowStore, MemoryRowStore, MmapRowStore, RowStore
from engram.tokenizer import load_builtin_tokenizer
from engram.train import evaluate, load_trained
from engram.version import __version__

__all__ = [
    "CachedRowStore",
    "DataConfig",
    "Decoder",
    "Engram",
    "EngramConfig",
    "EngramLM",
    "GenerationResult",
    "HashStream",
    "MemoryRowStore",
    "MmapRowStore",
    "ModelConfig",
    "NgramHasher",
    "NgramIndexer",
    "OptimConfig",
    "RowStore",
    "RunConfig",
    "ServedModel",
    "TierConfig",
    "TokenizerCompressor",
    "TrainConfig",
    "__version__",
    "apply_overrides",
    "demo_config",
    "evaluate",
    "generate",
    "iter_builtin_documents",
    "load_builtin_corpus",
    "load_builtin_tokenizer",
    "load_served",
    "load_trained",
    "plan_allocation",
    "preset",
    "small_config",
    "train",
]
