"""hvae: two-stage hierarchical generative models trained as a Ray pipeline tracked in MLflow.

The repository's top-level folders are this package's subpackages (``hvae.models``,
``hvae.stages``, ``hvae.pipeline``): ``pyproject.toml`` maps the package ``hvae`` to the
repository root, so no module named ``models``, ``stages`` or ``pipeline`` is installed and a
user's own folders of those names never shadow hvae's, on the driver or on a Ray worker.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# the folder this package's subpackages stand in: the repository root in a checkout, the
# installed ``hvae/`` folder in a wheel; the stage code hash and the job staging read files here
PACKAGE_DIR = Path(__file__).resolve().parent
