"""Engram for Hugging Face `transformers` causal LMs (needs the `engram-lm[hf]` extra).

`add_engram(model, engram_config, tokenizer)` inserts Engram layers into a Llama, Qwen2/3,
Mistral or GPT-2 model in place; see `engram.hf.attach` for the design.
"""

from engram.hf.attach import (
    EngramAttachment,
    EngramDecodeState,
    add_engram,
    get_attachment,
)
from engram.hf.families import FAMILIES, UnsupportedModelError, find_backbone
from engram.hf.io import EngramLoadError, close_engram, load_engram, save_engram
from engram.hf.optim import (
    EngramHFOptimizer,
    build_hf_optimizer,
    hf_optimizers,
    prepare_training,
)

__all__ = [
    "FAMILIES",
    "EngramAttachment",
    "EngramDecodeState",
    "EngramHFOptimizer",
    "EngramLoadError",
    "UnsupportedModelError",
    "add_engram",
    "build_hf_optimizer",
    "close_engram",
    "find_backbone",
    "get_attachment",
    "hf_optimizers",
    "load_engram",
    "prepare_training",
    "save_engram",
]
