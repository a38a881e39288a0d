"""The kernel's C source against a scalar C reference, on this CPU and, cross-compiled, on ARM.

tests/hashkernel_check.c links engram/_hashkernel.c into a standalone program (a few lines of
stub stand in for Python.h) and compares every path the CPU runs with plain `%` arithmetic. The
aarch64 build runs under qemu-user when `aarch64-linux-gnu-gcc` and `qemu-aarch64` are
installed (Debian: gcc-aarch64-linux-gnu, qemu-user): the portable path as an ARM CPU compiles
it (NEON auto-vectorisation, fused multiply-adds), which this machine cannot otherwise run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engram.hashing import is_prime

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # as setup.py builds it
STUB = """typedef struct { int unused; } PyObject;
typedef struct PyModuleDef { int head; const char *name; const char *doc; long size; void *m; } PyModuleDef;
#define PyModuleDef_HEAD_INIT 0
#define PyMODINIT_FUNC PyObject *
static inline PyObject *PyModule_Create(PyModuleDef *d) { (void)d; return 0; }
"""
# (first candidate, heads): the edges of the division-free modulo, as in test_hash_paths
ROWS = [(8192, 8), (2**31 - 105, 7), (2**31 - 61, 5), (2**32 - 5, 5), (2**62 - 300, 6),
        (646403, 9), (10**6, 3), (2**20, 1)]  # fmt: skip


def _primes(start: int, count: int) -> list[int]:
    out, c = [], start
    while len(out) < count:
        if is_prime(c):
            out.append(c)
        c += 1
    return out


def _build(tmp_path: Path, cc: str) -> Path:
    (tmp_path / "Python.h").write_text(STUB)
    rows = [_primes(s, k) for s, k in ROWS]
    body = ",\n".join(
        "  {" + ", ".join(f"{p}LL" for p in r + [0] * (9 - len(r))) + "}" for r in rows
    )
    (tmp_path / "primes.h").write_text(
        f"#define NROWS {len(rows)}\n#define MAXK 9\n"
        f"static const int64_t ROWS[NROWS][MAXK] = {{\n{body}\n}};\n"
        f"static const int ROWK[NROWS] = {{{', '.join(str(len(r)) for r in rows)}}};\n"
    )
    exe = tmp_path / f"check-{Path(cc).name}"
    sources = [str(ROOT / "engram" / "_hashkernel.c"), str(ROOT / "tests" / "hashkernel_check.c")]
    subprocess.run([cc, *FLAGS, f"-I{tmp_path}", *sources, "-o", str(exe)], check=True)
    return exe


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_kernel_source_on_this_cpu(tmp_path):
    run = subprocess.run([str(_build(tmp_path, "cc"))], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "path 1: 0 wrong" in run.stdout  # the portable path runs everywhere


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64",
)
def test_kernel_source_on_aarch64(tmp_path):
    exe = _build(tmp_path, "aarch64-linux-gnu-gcc")
    run = subprocess.run(
        ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "path 1: 0 wrong"  # portable only, all right
    assert "path 2" not in run.stdout and "path 3" not in run.stdout
