"""What a model carries between decoding calls: KV caches, Engram conv states, slot liveness.

Axes: B sequences, S slots (cache capacity), nh heads, hd head dim, W conv state width,
C conv channels (M*D).

Design choices:
- One plain dataclass, allocated once per generation by `EngramLM.new_cache` and updated in
  place by `EngramLM.forward(..., cache=...)`: the KV buffers are preallocated for `capacity`
  slots; the Engram short-conv states are replaced call by call (the layer never mutates a
  state it was given).
- All sequences share one slot clock (`length`); sequences of different lengths are LEFT-padded
  and padding slots are dead (`key_live` False). A token's rotary position is the number of live
  tokens before it in its own sequence (`n_live`), so a left-padded prompt sees exactly the
  positions, attention and conv history it would see alone, and incremental decoding equals a
  full recompute of each sequence (proven in the tests).
- The n-gram hash state is NOT here: rows are computed outside the model (`HashStream`), which
  keeps index math out of the model, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from engram.model.attention import KVCache


@dataclass
class DecodeCache:
    """Per-block KV caches and Engram conv states for B sequences of at most `capacity` slots."""

    kv: list[KVCache]  # one per block
    conv: dict[int, Tensor]  # Engram block index -> conv state (B, W, C)
    key_live: Tensor  # (B, S) bool: slot holds a live (non-padding) token
    n_live: Tensor  # (B,) long: live tokens so far = the next token's position
    length: int = 0  # slots filled, shared by all sequences

    @property
    def batch_size(self) -> int:
        return self.key_live.shape[0]

    @property
    def capacity(self) -> int:
        return self.key_live.shape[1]

    def reorder(self, index: Tensor) -> DecodeCache:
        """The cache of sequences `index` (B',) of this one (beam search, batch compaction)."""
        return DecodeCache(
            kv=[c.reorder(index) for c in self.kv],
            conv={i: s[index] for i, s in self.conv.items()},
            key_live=self.key_live[index],
            n_live=self.n_live[index],
            length=self.length,
        )

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = [t for c in self.kv for t in (c.k, c.v)] + list(self.conv.values())
        tensors += [self.key_live, self.n_live]
        return sum(t.numel() * t.element_size() for t in tensors)


def new_positions(cache: DecodeCache, live: Tensor) -> Tensor:
    """Rotary positions (B, T) of a call's tokens, `live` (B, T) bool; advances `cache.n_live`.

    A live token's position is the count of live tokens before it in its sequence; a dead one
    gets its neighbour's (clamped at 0): it is never attended to, so its value does not matter.
    """
    counts = live.long().cumsum(dim=1)  # (B, T)
    positions = (cache.n_live.unsqueeze(1) + counts - 1).clamp_min(0)  # (B, T)
    cache.n_live = cache.n_live + counts[:, -1]
    return positions
