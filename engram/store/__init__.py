"""Row stores: where Engram table rows live, behind one small interface (`RowStore`).

The Engram layer only calls `store.gather(global_rows)`; which tier served a row (RAM, mmap file,
cache, prefetch, another rank) is the store's business. Tables persist as `.engt` table files
(`tablefile`), which `MmapRowStore` serves zero-copy and `PreadRowStore` row by row (`engram.export.export_tables` writes them from
a checkpoint: the store package imports nothing above it).
"""

from engram.store.base import PartialGather, RowOutOfRangeError, RowStore, check_row_ids
from engram.store.cache import CachedRowStore, CacheStats
from engram.store.filestore import ReadStats, TableFileStore
from engram.store.memory import MemoryRowStore
from engram.store.mmap import MmapRowStore, create_table_file
from engram.store.pread import PreadRowStore, proc_read_bytes
from engram.store.prefetch import Prefetcher, PrefetchHandle, PrefetchingStore, PrefetchStats
from engram.store.sharded import ExchangeStats, RowSharding, ShardedRowStore
from engram.store.tablefile import (
    TableFileError,
    TableHeader,
    dequantize_int8,
    quantize_int8,
    read_header,
    read_table,
    verify_table,
    write_table,
)
from engram.store.tables import describe_table, read_tables, table_file_name
from engram.store.trainable import DiskTrainedStore

__all__ = [
    "CacheStats",
    "CachedRowStore",
    "DiskTrainedStore",
    "ExchangeStats",
    "MemoryRowStore",
    "MmapRowStore",
    "PartialGather",
    "PreadRowStore",
    "PrefetchHandle",
    "PrefetchStats",
    "Prefetcher",
    "PrefetchingStore",
    "ReadStats",
    "RowOutOfRangeError",
    "RowSharding",
    "RowStore",
    "ShardedRowStore",
    "TableFileError",
    "TableFileStore",
    "TableHeader",
    "check_row_ids",
    "create_table_file",
    "dequantize_int8",
    "describe_table",
    "proc_read_bytes",
    "quantize_int8",
    "read_header",
    "read_table",
    "read_tables",
    "table_file_name",
    "verify_table",
    "write_table",
]
