"""The memory explorer's answers as plain data: what ``engram.analysis.memory`` computes and
``engram.analysis.memory_html`` renders.

A module of its own (dataclasses only, no engram imports) so that the explorer and its HTML page
both import it instead of each other; ``engram.analysis.memory`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NgramEntry:
    """A frequent corpus n-gram as shown to a user: representative surface form and count."""

    text: str
    tokens: list[str]
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "count": self.count}


@dataclass(frozen=True)
class HeadHit:
    """What a queried n-gram reads from one sub-table of one Engram layer."""

    layer_id: int
    head: int
    order: int
    head_in_order: int
    ngram_text: str
    ngram_tokens: list[str]
    padded: bool  # the text is shorter than the order: the model reads pad before it
    local_row: int
    global_row: int
    table_size: int
    norm: float
    norm_percentile: float  # among all rows of the layer's table
    norm_percentile_head: float  # among the rows of this sub-table
    count: int  # corpus count of the n-gram (0: below min_count or padded)
    frequent: bool
    n_colliding: int  # OTHER frequent n-grams of this order on the same row
    colliding_mass: int  # their total corpus count
    expected_colliding_uniform: float  # (u - [frequent]) / p
    top_colliders: list[NgramEntry]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top_colliders"] = [c.to_dict() for c in self.top_colliders]
        return d


@dataclass(frozen=True)
class NgramReport:
    """``explore_ngram``'s answer: the text as tokenized and one ``HeadHit`` per (layer, head)."""

    text: str  # as asked
    tokenized: str  # as tokenized (leading space added, see the module docstring)
    tokens: list[str]
    hits: list[HeadHit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokenized": self.tokenized,
            "tokens": self.tokens,
            "hits": [h.to_dict() for h in self.hits],
        }


@dataclass(frozen=True)
class RowReport:
    """``explore_row``'s answer: the frequent n-grams that map to one row, by count."""

    layer_id: int
    head: int
    order: int
    head_in_order: int
    local_row: int
    global_row: int
    table_size: int
    norm: float
    norm_percentile: float
    n_ngrams: int  # frequent n-grams on the row (all, not just those listed)
    mass: int  # their total corpus count
    expected_ngrams_uniform: float  # u / p
    ngrams: list[NgramEntry]  # the top ``limit`` by count (ties: lexicographic compressed ids)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ngrams"] = [g.to_dict() for g in self.ngrams]
        return d


@dataclass
class MemoryReport:
    """What ``analyze_memory`` found and wrote."""

    run_dir: str
    run_name: str
    step: int
    hash_fingerprint: str
    counts: dict[str, Any]  # NgramCounts.summary() plus cache path and reuse flag
    layers: list[dict[str, Any]]  # LayerMemory.stats() per layer
    ngrams: list[NgramReport]
    rows: list[RowReport]
    timings: dict[str, float]
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "run_name": self.run_name,
            "step": self.step,
            "hash_fingerprint": self.hash_fingerprint,
            "counts": self.counts,
            "layers": self.layers,
            "ngrams": [r.to_dict() for r in self.ngrams],
            "rows": [r.to_dict() for r in self.rows],
            "timings": self.timings,
            "paths": {k: str(v) for k, v in self.paths.items()},
        }
