"""Loading the optional C extensions (engram/_*kernel.c) with ctypes.

Design choices:
- The extensions are built only where a compiler is present (setup.py marks them optional) and
  are loaded through ctypes rather than imported: their Python modules are empty shells, and a
  missing or stale build simply means the pure-Python/numpy path runs. One function finds and
  loads a library so that every binding treats "not built" the same way.
- `keep_gil=True` loads with `ctypes.PyDLL` (the call keeps the GIL: right for calls of a
  microsecond, where releasing it would invite another Python thread to take it for longer);
  the default `ctypes.CDLL` releases the GIL for the call (right for reads and hashing).
"""

from __future__ import annotations

import ctypes
import importlib.util


def load_extension(module: str, *, keep_gil: bool = False) -> ctypes.CDLL | None:
    """The shared library of the extension `module` (e.g. "engram._preadkernel"), or None when
    it was not built or cannot be loaded."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    try:
        return (ctypes.PyDLL if keep_gil else ctypes.CDLL)(spec.origin)
    except OSError:
        return None
