"""Build the optional C hashing kernel; everything else is declared in pyproject.toml.

The extension is `optional`: without a C compiler the package installs and hashes with the
vectorized numpy path (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engram._hashkernel",
            sources=["engram/_hashkernel.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
