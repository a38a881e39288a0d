"""Configuration of the Engram memory, as frozen dataclasses.

Design choices:
- One dataclass, one line of reason per field. Presets are plain functions returning instances,
  so a preset is greppable and a resolved config can always be written out with `asdict`.
- `pad_id` is a *raw* tokenizer id, as in the reference demo; the hasher receives the compressed
  pad id (the compressor maps it), which keeps the hashing module free of tokenizer knowledge.
- Layer ids are 0-based block indices (the paper counts from 1: its "layer 2" is our 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engram.addressing import ADDRESSINGS


def check_known_keys(cls: type, d: dict[str, Any], error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every key of `d` that is not a field of dataclass `cls`."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")


@dataclass(frozen=True)
class EngramConfig:
    """Everything that determines which rows a token hits and the shape of the memory."""

    # Target sub-table size per n-gram order (orders 2..N); each head takes the next unused prime.
    engram_vocab_size: tuple[int, ...] = field(default_factory=lambda: (129280 * 5, 129280 * 5))
    # Largest n-gram order N; orders 2..N are hashed.
    max_ngram_size: int = 3
    # Width of one order's memory (all its heads together); head dim = this // n_head_per_ngram.
    n_embed_per_ngram: int = 512
    # Hash heads K per order: K sub-tables with distinct prime sizes soften collisions.
    n_head_per_ngram: int = 8
    # 0-based indices of the blocks that get an Engram layer (before their attention).
    layer_ids: tuple[int, ...] = (1, 15)
    # Raw tokenizer id read before the sequence start (and after a document boundary).
    pad_id: int = 2
    # Seed of the per-layer hash multipliers: rng = default_rng(seed + 10007 * layer_id).
    seed: int = 0
    # Short-conv kernel size (the conv's dilation is max_ngram_size).
    kernel_size: int = 4
    # Apply sign(s)*sqrt(|s|) to the gate logit before the sigmoid (the demo's and V4.1's choice).
    signed_sqrt_gate: bool = True
    # Use the causal depthwise short conv after the gated value (the paper's ablation: marginal).
    use_short_conv: bool = True
    # "ngram" (the scheme); "constant" or "position" address rows without n-gram information,
    # the controls that measure what the table's content is worth (see engram.addressing).
    addressing: str = "ngram"

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_vocab_size", tuple(int(v) for v in self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", tuple(int(v) for v in self.layer_ids))
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} values), got {len(self.engram_vocab_size)}: "
                f"{list(self.engram_vocab_size)}"
            )
        if any(v < 2 for v in self.engram_vocab_size):
            raise ValueError(
                f"engram_vocab_size values must be >= 2, got {list(self.engram_vocab_size)}"
            )
        if self.n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by "
                f"n_head_per_ngram ({self.n_head_per_ngram})"
            )
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(
                f"layer_ids must be non-empty and distinct, got {list(self.layer_ids)}"
            )
        if any(i < 0 for i in self.layer_ids):
            raise ValueError(
                f"layer_ids are 0-based block indices (>= 0), got {list(self.layer_ids)}"
            )
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if self.addressing not in ADDRESSINGS:
            raise ValueError(
                f"addressing must be one of {list(ADDRESSINGS)}, got {self.addressing!r}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one sub-table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def n_subtables(self) -> int:
        """Sub-tables per layer: (N-1) orders times K heads."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of the concatenated lookup e = (N-1) * K * head_dim."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engram_vocab_size"] = list(self.engram_vocab_size)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngramConfig:
        check_known_keys(cls, d)
        return cls(**d)


def demo_config() -> EngramConfig:
    """The public demo's configuration (DeepSeek-V3 tokenizer, layers [1, 15])."""
    return EngramConfig()


def small_config(pad_id: int = 50256) -> EngramConfig:
    """A laptop-sized memory for the built-in GPT-2 tokenizer (pad = <|endoftext|>)."""
    return EngramConfig(
        engram_vocab_size=(20_000, 20_000),
        max_ngram_size=3,
        n_embed_per_ngram=64,
        n_head_per_ngram=4,
        layer_ids=(1,),
        pad_id=pad_id,
        seed=0,
    )
