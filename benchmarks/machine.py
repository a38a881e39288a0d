"""What machine a benchmark ran on, and the AVX2-only emulation the benchmarks share.

    from machine import cpu_model_and_flags, cpu_summary, numpy_simd, rerun_as_avx2_only

Every benchmark prints the CPU model and its SIMD flags (these machines differ: some have
AVX-512, some only AVX2). `--avx2-only` re-executes the script with numpy, PyTorch and
oneDNN/MKL limited to AVX2 and the hashing kernel on its AVX2 path, marking the re-run with
`EMULATED` in the environment so it does not re-execute again.
"""

from __future__ import annotations

import os
import platform
import sys

EMULATED = "ENGRAM_BENCH_AVX2_ONLY"  # set in the re-run of --avx2-only
SUMMARY_FLAGS = ("avx2", "fma", "avx512f", "avx512bw")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and its flags as /proc/cpuinfo lists them (x86 "flags", ARM
    "Features"); the platform's names where there is no /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def cpu_summary() -> str:
    """One line: model, logical CPUs and which of avx2/fma/avx512f/avx512bw it has."""
    model, flags = cpu_model_and_flags()
    have = " ".join(f for f in SUMMARY_FLAGS if f in set(flags))
    return f"{model}, {os.cpu_count()} CPUs, flags: {have or '?'}"


def emulated() -> bool:
    """Whether this process is the AVX2-only re-run."""
    return os.environ.get(EMULATED) == "1"


def numpy_simd() -> tuple[list[str], list[str]]:
    """numpy's dispatch targets: (all it was built with, those active in this process)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    targets = list(getattr(umath, "__cpu_dispatch__", []))
    feats = getattr(umath, "__cpu_features__", {})
    return targets, [t for t in targets if feats.get(t)]


def rerun_as_avx2_only(hash_path: str, *, force: bool = False) -> None:
    """Re-execute this script with numpy, PyTorch, oneDNN/MKL limited to AVX2 and
    ENGRAM_HASH_PATH=`hash_path` (unless the environment already sets one and not `force`)."""
    targets, _ = numpy_simd()
    env = dict(os.environ)
    env.update(
        NPY_DISABLE_CPU_FEATURES=" ".join(t for t in targets if "512" in t or t == "X86_V4"),
        ATEN_CPU_CAPABILITY="avx2",
        ONEDNN_MAX_CPU_ISA="AVX2",
        MKL_ENABLE_INSTRUCTIONS="AVX2",
        **{EMULATED: "1"},
    )
    if force or "ENGRAM_HASH_PATH" not in env:
        env["ENGRAM_HASH_PATH"] = hash_path
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
