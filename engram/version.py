"""The package version: one place, read by `engram.__version__`, the token cache key and pyproject."""

__version__ = "0.2.0"
