"""Reading and closing a tier stack: stores that wrap each other through `.inner`.

A served table is a chain such as `PrefetchingStore -> CachedRowStore -> MmapRowStore`; both
`engram.serving` (built-in checkpoints) and `engram.hf.io` (Hugging Face loads) hold one per
layer and report and close them the same way, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engram.store.base import RowStore
from engram.store.cache import CachedRowStore
from engram.store.mmap import MmapRowStore
from engram.store.pread import PreadRowStore
from engram.store.prefetch import Prefetcher, PrefetchingStore


def stack_stats(stores: Mapping[int, RowStore]) -> dict[str, Any]:
    """Per layer: the hot-row cache's, the prefetcher's and the row reader's statistics
    (JSON-able)."""
    out: dict[str, Any] = {}
    for lid, store in stores.items():
        rec: dict[str, Any] = {}
        s: Any = store
        while s is not None:
            if isinstance(s, PrefetchingStore):
                rec["prefetch"] = s.stats.as_dict()
            elif isinstance(s, CachedRowStore):
                rec["cache"] = s.stats().to_dict()
            elif isinstance(s, MmapRowStore | PreadRowStore):
                rec["reader"] = {"kind": type(s).__name__, **s.stats().to_dict()}
            s = getattr(s, "inner", None)
        out[str(lid)] = rec
    return out


def close_stack(stores: Mapping[int, RowStore], prefetcher: Prefetcher | None) -> None:
    """Stop the prefetch thread and close every table file in the stacks (idempotent)."""
    if prefetcher is not None:
        prefetcher.close()
    for store in stores.values():
        s: Any = store
        while s is not None:
            if isinstance(s, MmapRowStore | PreadRowStore):
                s.close()
            s = getattr(s, "inner", None)
