"""Each dataset kind loads from files generated here in its real on-disk format."""
import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.datasets import DataError, fingerprint, fit_size, load_splits


def _write_idx_images(path, images):
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28))
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels):
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)))
        f.write(labels.astype(np.uint8).tobytes())


def _fake_mnist(root, folder, n_train=40, n_test=10):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def test_mnist5k_splits_are_deterministic_and_disjoint():
    cfg = DataConfig()
    a, b = load_splits(cfg), load_splits(cfg)
    assert [len(a[s]) for s in ("train", "val", "test")] == [4000, 500, 500]
    assert a["train"].images.shape[1:] == (1, 32, 32) and a["train"].images.dtype == np.uint8
    assert fingerprint(a) == fingerprint(b)
    idx = [set(a[s].index.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    other = load_splits(DataConfig(split_seed=1))
    assert fingerprint(other) != fingerprint(a)
    # 28x28 digits are zero-padded to 32x32, not stretched
    assert a["train"].images[:, :, :2].max() == 0 and a["train"].images[:, :, :, -2:].max() == 0


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_layouts(tmp_path, name, folder):
    _fake_mnist(tmp_path, folder)
    s = load_splits(DataConfig(dataset=name, root=str(tmp_path), download=False, val_fraction=0.25))
    assert [len(s[k]) for k in ("train", "val", "test")] == [30, 10, 10]
    assert s["test"].images.shape == (10, 1, 32, 32)


def test_cifar10_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8), "labels": list(rng.integers(0, 10, 8))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    s = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=False, val_fraction=0.1))
    assert [len(s[k]) for k in ("train", "val", "test")] == [36, 4, 8]
    assert s["train"].images.shape[1:] == (3, 32, 32)


def test_imagefolder_resizes_and_converts(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            size = (40, 48) if i % 2 else (20, 20)
            Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    assert [len(s[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert s["train"].images.shape[1:] == (3, 32, 32)
    assert set(np.concatenate([s[k].labels for k in s]).tolist()) == {0, 1}
    gray = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), channels=1, image_size=16))
    assert gray["train"].images.shape[1:] == (1, 16, 16)


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path), download=False))
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_1"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    with pytest.raises(DataError, match=r"not a folder"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))


def test_fit_size_pads_small_and_resizes_large():
    x = np.full((2, 1, 28, 28), 200, np.uint8)
    assert fit_size(x, 32)[0, 0, 2:30, 2:30].min() == 200
    y = fit_size(np.full((1, 3, 64, 64), 100, np.uint8), 32)
    assert y.shape == (1, 3, 32, 32) and np.all(y == 100)


def test_gzip_only_mnist_is_not_enough(tmp_path):
    """torchvision reads the extracted files; a lone .gz without network is a clear error."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0" * 16)
    with pytest.raises(DataError, match="download=false"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path), download=False))
