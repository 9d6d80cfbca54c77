"""``python -m hvae``: the ``hvae`` command line."""
import sys

from hvae.pipeline.cli import entry

sys.exit(entry())
