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

__all__ = [
    "FAMILIES",
    "EngramAttachment",
    "EngramDecodeState",
    "UnsupportedModelError",
    "add_engram",
    "find_backbone",
    "get_attachment",
]
