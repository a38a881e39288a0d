"""Build the optional C kernels; everything else is declared in pyproject.toml.

The extensions are `optional`: without a C compiler the package installs, hashes with the
vectorized numpy path, reads table rows with a Python loop and probes the row cache with numpy
(same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engram._hashkernel",
            sources=["engram/_hashkernel.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
            optional=True,
        ),
        Extension(
            "engram._preadkernel",
            sources=["engram/_preadkernel.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "engram._cachekernel",
            sources=["engram/_cachekernel.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
