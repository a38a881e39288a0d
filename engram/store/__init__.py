"""Row stores: where Engram table rows live, behind one small interface (`RowStore`).

The Engram layer only calls `store.gather(global_rows)`; which tier served a row (RAM, mmap file,
cache, prefetch, another rank) is the store's business.
"""

from engram.store.base import RowOutOfRangeError, RowStore, check_row_ids
from engram.store.memory import MemoryRowStore

__all__ = ["MemoryRowStore", "RowOutOfRangeError", "RowStore", "check_row_ids"]
