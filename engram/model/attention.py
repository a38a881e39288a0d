"""Causal self-attention with rotary position embeddings (RoPE).

Axes used in shape comments: B batch, T time, D d_model, nh heads, hd head dim (D // nh).

Design choices:
- RoPE in the "rotate half" layout (GPT-NeoX / Llama): the first and second halves of each head
  form the rotated pairs. cos/sin tables of length `max_seq_len` are precomputed once as
  NON-persistent buffers (they follow `.to(device)` but stay out of checkpoints; they are a pure
  function of the config).
- `forward` takes `positions`: an int offset (the first position of this call) or an explicit
  position tensor (T,) or (B, T), so a KV-cache can be added later without touching the math.
  Any position >= max_seq_len is an error, never a silent wrap.
- q, k, v, o are four bias-free Linear layers (readable, and the parameter count is plain
  4*D*D); attention itself is `F.scaled_dot_product_attention(is_causal=True)`.
- Decoding: `forward(..., kv=KVCache)` writes this call's keys and values into the cache's
  preallocated slots [start, start+T) and attends over slots [0, start+T) under an explicit mask:
  key j is visible to query i iff the key is live (`key_live`, False at padding) and
  j <= start+i. A query always sees its own slot, so a padding query's softmax is never empty
  (its output is garbage nobody reads: live tokens never see a dead key). Buffers are
  preallocated once per generation, so a step costs no reallocation; `KVCache.reorder` selects
  sequences (beam search, batch compaction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """One attention layer's keys and values for slots [0, capacity) of B sequences."""

    k: Tensor  # (B, nh, S, hd), S = capacity
    v: Tensor  # (B, nh, S, hd)

    @classmethod
    def empty(
        cls,
        B: int,
        n_heads: int,
        capacity: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        shape = (B, n_heads, capacity, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reorder(self, index: Tensor) -> KVCache:
        """The cache of sequences `index` (B',) of this one."""
        return KVCache(self.k[index], self.v[index])


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables; `forward(x, positions)` rotates x (B, nh, T, hd)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float64)
        angles = torch.outer(t, inv_freq)  # (max_seq_len, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def positions(self, T: int, positions: int | Tensor = 0) -> Tensor:
        """Normalise `positions` (an int offset or a (T,)/(B, T) tensor) to a long tensor."""
        if isinstance(positions, int):
            if positions < 0:
                raise ValueError(f"position offset must be >= 0, got {positions}")
            if positions + T > self.max_seq_len:
                raise ValueError(
                    f"positions {positions}..{positions + T - 1} exceed max_seq_len "
                    f"{self.max_seq_len} (sequence length {T}); raise ModelConfig.max_seq_len"
                )
            return torch.arange(positions, positions + T, device=self.cos.device)
        if positions.dim() not in (1, 2) or positions.shape[-1] != T:
            raise ValueError(
                f"positions must have shape (T,) or (B, T) with T={T}, got {tuple(positions.shape)}"
            )
        if positions.numel() and (
            int(positions.min()) < 0 or int(positions.max()) >= self.max_seq_len
        ):
            raise ValueError(
                f"positions must lie in [0, max_seq_len={self.max_seq_len}), got range "
                f"[{int(positions.min())}, {int(positions.max())}]"
            )
        return positions.to(device=self.cos.device, dtype=torch.long)

    def forward(self, x: Tensor, positions: int | Tensor = 0) -> Tensor:
        """x (B, nh, T, hd) -> x rotated by the angle of each position."""
        T = x.shape[2]
        pos = self.positions(T, positions)
        cos = self.cos[pos].to(x.dtype)  # (T, hd/2) or (B, T, hd/2)
        sin = self.sin[pos].to(x.dtype)
        if pos.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd/2)
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hd/2)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k."""

    def __init__(
        self, d_model: int, n_heads: int, max_seq_len: int, rope_theta: float = 10000.0
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def forward(
        self,
        x: Tensor,
        positions: int | Tensor = 0,
        kv: KVCache | None = None,
        start: int = 0,
        key_live: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, D) -> (B, T, D); token t attends to tokens <= t of this call.

        With `kv`, this call's keys/values go to slots [start, start+T) and token t attends to
        the live slots <= start+t; `key_live` (B, start+T) bool marks live slots (None = all).
        """
        B, T, D = x.shape
        nh, hd = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, nh, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, nh, hd).transpose(1, 2)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        else:
            end = start + T
            if end > kv.capacity:
                raise ValueError(
                    f"KV cache holds {kv.capacity} slots; slots [{start}, {end}) do not fit"
                )
            kv.k[:, :, start:end] = k
            kv.v[:, :, start:end] = v
            j = torch.arange(end, device=x.device)  # key slots
            i = torch.arange(start, end, device=x.device)  # query slots
            visible = j[None, :] <= i[:, None]  # (T, S') causal
            if key_live is not None:
                visible = visible & key_live[:, None, :end]  # (B, T, S')
                visible = visible | (j[None, :] == i[:, None])  # a query sees its own slot
            mask = visible.unsqueeze(-3) if visible.dim() == 3 else visible  # (B, 1, T, S')
            y = F.scaled_dot_product_attention(
                q, kv.k[:, :, :end], kv.v[:, :, :end], attn_mask=mask
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.wo(y)
