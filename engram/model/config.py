"""Configuration of the transformer backbone, as a frozen dataclass.

Design choices:
- One dataclass, one line of reason per field, validated in `__post_init__` so a bad value fails
  at construction with a message naming it, not deep inside a forward pass.
- Block indices are 0-based everywhere (as `EngramConfig.layer_ids`).
- The MoE follows DeepSeek-V3 (sigmoid router, auxiliary-loss-free bias balancing, shared
  experts, the first `n_dense_layers` blocks dense) plus an optional Switch-style balance loss.
- `hc_mult == 1` means a plain residual stream; `> 1` turns on hyper-connections (Zhu et al. 2024).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engram.config import check_known_keys

_FFN_KINDS = ("moe", "dense")
_ROUTER_SCORES = ("softmax", "sigmoid")
_ENGRAM_VALUE_INITS = ("zero", "reference")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the backbone's shapes and its forward computation."""

    # Token vocabulary of the embedding and LM head (GPT-2's by default).
    vocab_size: int = 50257
    # Hidden size D of the residual stream.
    d_model: int = 128
    # Number of transformer blocks.
    n_layers: int = 4
    # Attention heads; d_model must divide evenly into them.
    n_heads: int = 4
    # Length of the precomputed RoPE table: the longest sequence the model accepts.
    max_seq_len: int = 256
    # RoPE base frequency.
    rope_theta: float = 10000.0
    # Epsilon of every RMSNorm.
    norm_eps: float = 1e-5
    # Share the token embedding with the LM head (saves vocab_size * d_model parameters).
    tie_embeddings: bool = True
    # Std of the normal init of every backbone Linear/Embedding weight.
    init_std: float = 0.02
    # Feed-forward kind of each block: "moe" (routed + shared experts) or "dense" (SwiGLU).
    ffn: str = "moe"
    # Hidden size of the dense SwiGLU (dense FFN blocks only).
    d_ff: int = 512
    # The first k blocks use a dense FFN even when ffn="moe" (as DeepSeek does).
    n_dense_layers: int = 0
    # Routed experts E per MoE layer.
    n_routed_experts: int = 16
    # Always-on shared experts per MoE layer (fused into one SwiGLU of n_shared*d_expert).
    n_shared_experts: int = 1
    # Routed experts each token is sent to.
    moe_top_k: int = 2
    # Hidden size of each routed and each shared SwiGLU expert.
    d_expert: int = 128
    # Router score: "sigmoid" (DeepSeek-V3; top-k weights renormalised to 1) or "softmax".
    router_score: str = "sigmoid"
    # Rate of DeepSeek-V3's aux-loss-free balancing: bias += rate*sign(mean-load); 0 disables.
    router_bias_update: float = 1e-3
    # Coefficient of the Switch-style balance loss coef*E*sum_i f_i*P_i; 0 disables.
    aux_loss_coef: float = 1e-3
    # Hyper-connection branches M; 1 = plain residual stream.
    hc_mult: int = 1
    # Dynamic (input-dependent) hyper-connections on top of the static ones (M > 1 only).
    hc_dynamic: bool = True
    # Init of the Engram layers' value projection: "zero" (Engram adds nothing at init) or
    # "reference" (PyTorch's default nn.Linear, the demo's). Measured (docs/numerics.md): with
    # the default N(0, 1) tables at 5x lr "reference" is far worse (+0.9 nats on quick-engram,
    # worse than the MoE); with the demo presets' std-0.1 tables at 100x it is 0.12 nats better.
    engram_value_init: str = "zero"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "d_ff",
            "n_routed_experts",
            "moe_top_k",
            "d_expert",
            "hc_mult",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("n_dense_layers", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE "
                f"(d_model={self.d_model}, n_heads={self.n_heads})"
            )
        if self.ffn not in _FFN_KINDS:
            raise ValueError(f"ffn must be one of {list(_FFN_KINDS)}, got {self.ffn!r}")
        if self.engram_value_init not in _ENGRAM_VALUE_INITS:
            raise ValueError(
                f"engram_value_init must be one of {list(_ENGRAM_VALUE_INITS)}, "
                f"got {self.engram_value_init!r}"
            )
        if self.router_score not in _ROUTER_SCORES:
            raise ValueError(
                f"router_score must be one of {list(_ROUTER_SCORES)}, got {self.router_score!r}"
            )
        if self.moe_top_k > self.n_routed_experts:
            raise ValueError(
                f"moe_top_k ({self.moe_top_k}) must be <= n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        if not self.router_bias_update >= 0:
            raise ValueError(f"router_bias_update must be >= 0, got {self.router_bias_update}")
        if not self.aux_loss_coef >= 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model // n_heads."""
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block `i` (0-based) has an MoE feed-forward (else a dense SwiGLU)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"block index must be in [0, {self.n_layers}) (0-based), got {i}")
        return self.ffn == "moe" and i >= self.n_dense_layers

    @property
    def n_moe_layers(self) -> int:
        """How many blocks have an MoE feed-forward."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        check_known_keys(cls, d)
        return cls(**d)
