"""The transformer backbone that hosts Engram layers.

One module each: ``config`` (`ModelConfig`), ``attention`` (RoPE causal self-attention),
``cache`` (`DecodeCache`: KV caches and conv states for decoding),
``ffn`` (dense SwiGLU and the DeepSeek-V3-style MoE), ``hyper`` (hyper-connections) and
``transformer`` (`Block`, `EngramLM`, exact parameter and FLOP accounting).
"""

from engram.model.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from engram.model.cache import DecodeCache
from engram.model.config import ModelConfig
from engram.model.ffn import MoE, Routing, SwiGLU
from engram.model.hyper import HyperConnection
from engram.model.transformer import (
    Block,
    EngramLM,
    LMOutput,
    ParamCounts,
    count_params,
    flops_per_token,
)

__all__ = [
    "Block",
    "CausalSelfAttention",
    "DecodeCache",
    "EngramLM",
    "HyperConnection",
    "KVCache",
    "LMOutput",
    "MoE",
    "ModelConfig",
    "ParamCounts",
    "RotaryEmbedding",
    "Routing",
    "SwiGLU",
    "count_params",
    "flops_per_token",
]
