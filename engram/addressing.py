"""Control addressings: row ids that carry no n-gram information, for the memory's controls.

An Engram layer reads rows addressed by hashes of the last 2..N tokens (`engram.hashing`). To
tell what the *content* of those rows is worth from what the rest of the pathway (gate, keys,
value, conv) is worth, the same model is trained with addresses that say nothing about the
n-gram (`EngramConfig.addressing`):

- ``"ngram"``: the real scheme (the default).
- ``"constant"``: the no-information control. Every n-gram reads row 0 of each sub-table, so
  the layer still adds a trained vector through its gate, keys, value and conv, but no token
  can be told from another by what it reads.
- ``"position"``: the address control. Each read goes to a fixed pseudo-random row of its
  sub-table chosen by the token's POSITION in the token stream (splitmix64 of position, layer
  and sub-table), never by its content. The whole table is used, and the number of reads is the
  same as with n-gram addressing, spread uniformly over the rows; any gain over "constant" is
  what extra parameters are worth without n-gram identity.

Axes: L Engram layers, B batch, T time, H sub-tables per layer.

Design choices:
- Pure functions of ids, positions and the table sizes, like the hashing itself: the data
  pipeline computes them where it would hash, and the layer never knows which addressing ran.
- Positions are absolute offsets into the packed token stream a window was cut from (training
  and validation), or offsets from the start of a sequence (generation, analysis of a text), so
  a run reads the same rows for the same window every time.
- splitmix64 (Steele et al.) in numpy's wrapping uint64 arithmetic: bit-exact on every machine.
"""

from __future__ import annotations

import numpy as np

ADDRESSINGS = ("ngram", "constant", "position")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values (elementwise, wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def constant_rows(n_layers: int, batch: int, time: int, n_subtables: int) -> np.ndarray:
    """The no-information control: row 0 of every sub-table, (L, B, T, H) int64 zeros."""
    return np.zeros((n_layers, batch, time, n_subtables), dtype=np.int64)


def position_rows(positions: np.ndarray, table_sizes: np.ndarray, seed: int = 0) -> np.ndarray:
    """The address control: positions (B, T) -> rows (L, B, T, H) int64, local to sub-tables.

    `table_sizes` is (L, H): the sub-table sizes of each layer. Row = splitmix64 of a key that
    mixes seed, layer, sub-table and position, modulo the sub-table's size.
    """
    pos = np.asarray(positions)
    sizes = np.asarray(table_sizes, dtype=np.int64)
    if pos.ndim != 2:
        raise ValueError(f"positions must be (B, T), got shape {pos.shape}")
    if not np.issubdtype(pos.dtype, np.integer) or (pos.size and pos.min() < 0):
        raise ValueError("positions must be non-negative integers")
    if sizes.ndim != 2 or sizes.size == 0 or sizes.min() < 1:
        raise ValueError(f"table_sizes must be (L, H) sizes >= 1, got shape {sizes.shape}")
    L, H = sizes.shape
    lane = np.arange(L * H, dtype=np.uint64).reshape(L, 1, 1, H)  # which (layer, sub-table)
    with np.errstate(over="ignore"):
        key = pos.astype(np.uint64)[None, :, :, None] * np.uint64(L * H) + lane  # (L, B, T, H)
        key = key ^ splitmix64(np.uint64(seed))
    rows = splitmix64(key) % sizes.astype(np.uint64).reshape(L, 1, 1, H)
    return rows.astype(np.int64)
