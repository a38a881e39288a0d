"""engram: conditional memory via scalable hashed n-gram lookup, for PyTorch."""

from engram.config import EngramConfig, demo_config, small_config

__version__ = "0.1.0"

__all__ = ["EngramConfig", "__version__", "demo_config", "small_config"]
