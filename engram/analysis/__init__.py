"""What the memory learned: gates, Engram-off sensitivity, logit lens, CKA, the memory explorer.

Each tool is a pure function over a model (or two) plus an ``analyze_*`` function that loads a
run directory, writes its files (PNG, HTML where interaction helps, JSON) into a directory and
returns a report with ``to_dict()``; ``engram analyze ...`` calls exactly these.

Names are resolved lazily (PEP 562), so importing one tool does not import matplotlib or the
others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "GateReading": "gates",
    "gate_values": "gates",
    "record_gates": "gates",
    "analyze_gates": "gate_report",
    "gates_report": "gate_report",
    "engram_disabled": "sensitivity",
    "per_token_loss": "sensitivity",
    "analyze_sensitivity": "sensitivity",
    "block_outputs": "hidden",
    "logit_lens": "lens",
    "analyze_logit_lens": "lens",
    "linear_cka": "cka",
    "CKAAccumulator": "cka",
    "cka_matrix": "cka",
    "analyze_cka": "cka",
    "NgramCounts": "ngram_counts",
    "corpus_counts": "ngram_counts",
    "explore_ngram": "memory",
    "explore_row": "memory",
    "MemoryIndex": "memory",
    "analyze_memory": "memory",
    "NoEngramError": "runs",
    "access_trace": "access",
    "row_access_counts": "access",
    "ZipfFit": "access",
    "fit_zipf": "access",
    "hit_rate_curve": "access",
    "static_hit_rate": "access",
    "compulsory_bound": "access",
    "plot_access": "access",
    "AccessReport": "access",
    "analyze_access": "access",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'engram.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"engram.analysis.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return __all__
