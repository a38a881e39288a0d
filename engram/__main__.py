"""`python -m engram ...` is the `engram` command (torchrun starts workers this way)."""

import sys

from engram.cli import main

sys.exit(main())
