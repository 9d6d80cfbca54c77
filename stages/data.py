"""How every stage reads images: a ``DataSpec`` (a small, picklable description of a prepared
dataset, made by ``pipeline.datasets.prepare``) opened as a Ray Data dataset, streamed.

A prepared dataset is a folder (local or any URI pyarrow's filesystems open) holding, per
split, Parquet files whose rows are in the split's seeded random order. A row is one image:
    pixels kind  image (the uint8 [C, H, W] pixels as bytes), label, index
    files kind   path (relative to the image root), label, index
``index`` is the image's position in the source dataset. Decoding (and, for files, reading
and resizing) happens in ``map_batches`` on the Ray workers; nothing here loads a whole split.
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")
FILES_PER_SPLIT = 16  # many files: blocks to share out over workers and to shuffle among
FILE_BYTES = 64 << 20  # at most this many (uncompressed) bytes of rows per file
IN_MEMORY_BYTES = 1 << 30  # training keeps a decoded split this small in the object store


def rows_per_file(rows: int, row_bytes: int) -> int:
    """How many rows a prepared or written Parquet file holds: FILES_PER_SPLIT files per split,
    none above FILE_BYTES."""
    return max(1, min(-(-rows // FILES_PER_SPLIT), FILE_BYTES // max(1, row_bytes)))


def open_location(location: str):
    """A local path or a URI (``s3://``, ``gs://``, ``file://``) -> (pyarrow filesystem, path in it)."""
    from pyarrow import fs

    if "://" in location:
        return fs.FileSystem.from_uri(location)
    import os

    return fs.LocalFileSystem(), os.path.abspath(location)


def join(location: str, *parts: str) -> str:
    """``location``/parts, for a local path or a URI alike (a URI's query, e.g.
    ``?endpoint_override=...``, stays at its end)."""
    base, mark, query = location.partition("?") if "://" in location else (location, "", "")
    return posixpath.join(base, *parts) + mark + query


def on_this_node(num_cpus: float = 0.25) -> dict:
    """Ray remote args that run a task on this (the driver's) node: for Ray Data reads and
    writes of the driver's own folders, which another node of the cluster cannot see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": num_cpus, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def read_here(num_cpus: float = 0.25) -> dict:
    """``on_this_node`` for Ray Data's readers, which take it as named arguments (a node's
    default label ``ray.io/node-id`` in place of the scheduling strategy)."""
    import ray

    return {"num_cpus": num_cpus, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


# an auto pool grows only where each actor gets at least this many batches: an actor's start (a
# process importing torch, a copy of the model) costs seconds that a split of a few batches does
# not win back (the embedded default's extract: three pools of two, 15.4 s around 1.7 s of work)
BATCHES_PER_ACTOR = 4


def actor_pool(num_actors, use_gpu: bool, rows: int, batch_size: int):
    """The Ray Data actor pool of a stage's ``map_batches``: ``num_actors`` actors as the config
    gives it, or for ``auto`` one per CPU of the Ray cluster (one per GPU with ``use_gpu``),
    each reserving one and running torch on one thread, with at least ``BATCHES_PER_ACTOR``
    batches (``rows`` / ``batch_size``) each. (One actor of one CPU left every other core of a
    machine idle while a test split was scored: the binarized-MNIST PixelVAE's 23 minutes on
    two cores.) A pool of several takes one batch per actor at a time: otherwise the first
    actor up is handed every batch while the others still start."""
    import ray
    import ray.data

    if num_actors == "auto":
        have = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
        num_actors = max(1, min(have, -(-rows // batch_size) // BATCHES_PER_ACTOR))
    return ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=1 if num_actors > 1 else None)


@dataclass(frozen=True)
class DataSpec:
    dataset: str  # the config's data.dataset
    kind: str  # "pixels" | "files"
    location: str  # the prepared folder (path or URI)
    root: str  # files kind: the image root the paths are relative to
    shape: tuple  # (C, H, W) of every image a stage sees
    rows: dict  # split -> number of images
    files: dict  # split -> Parquet files, relative to location
    num_classes: int
    fingerprint: str
    cpus: float = 0.0  # CPUs each read-and-decode task reserves (data.decode_cpus)
    in_memory: bool | None = None  # data.in_memory: training decodes once (True) or every epoch
    skipped: int = 0  # images left out when prepared because they cannot be read (data.on_bad_image)
    # [top, left, height, width] of the real pixels in ``shape`` (None: all of it): the digits of
    # MNIST are 28x28, zero-padded to 32x32 for the models' strides; the padding is no data, so
    # the likelihood and its bits/dim leave it out (as NVAE's code does)
    content: tuple | None = None

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def dims(self) -> int:
        return int(np.prod(self.shape))

    @property
    def likelihood_dims(self) -> int:
        """The dimensions the likelihood and bits/dim count: the real pixels' (``content``)."""
        return self.dims if self.content is None else self.channels * int(self.content[2]) * int(self.content[3])

    def describe_pixels(self) -> str:
        """The image shape, and which of its pixels are real: "1×28×28 real pixels in 1×32×32"."""
        full = "×".join(str(s) for s in self.shape)
        if self.content is None:
            return full
        return f"{self.channels}×{self.content[2]}×{self.content[3]} real pixels in {full}"

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {self.rows[s]}" for s in SPLITS)
        bad = f" ({self.skipped} unreadable left out)" if self.skipped else ""
        real = f" (the real {self.content[2]}x{self.content[3]} in the middle)" if self.content is not None else ""
        return f"{sizes} images of {'x'.join(str(s) for s in self.shape)}{real}{bad}"

    def paths(self, split: str) -> list[str]:
        return [join(self.location, f) for f in self.files[split]]

    def stream(self, *splits: str):
        """The split as a lazy Ray Data dataset of {"image": uint8 [B, C, H, W], "label", "index"},
        rows in the split's order (several splits: one after another, each row's split name in a
        column "split"): one task per file reads and decodes it (``read_file``),
        reserving ``cpus`` CPUs. (Not ``read_parquet``: its file-listing task always takes a
        whole CPU, and a machine whose CPUs all train has none to give.)"""
        import ray.data

        files = [{"file": p, **({"split": s} if len(splits) > 1 else {})} for s in splits for p in self.paths(s)]
        ds = ray.data.from_items(files, override_num_blocks=len(files))
        return ds.map_batches(read_file, fn_kwargs={"spec": self}, batch_size=1, batch_format="numpy",
                              num_cpus=self.cpus, compute=ray.data.TaskPoolStrategy(size=self.read_tasks()))

    def read_tasks(self) -> int:
        """How many read tasks run at once: as many as the cluster has CPUs (reading image files,
        which waits on storage: four times that). A read task that reserves no CPU is not held
        back by the scheduler, and every one running at once needs its own worker process: an
        uncapped split of many files starts a process per file, each importing its libraries."""
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return cpus * (4 if self.kind == "files" else 1)

    def kept(self, split: str) -> bool:
        """Whether training decodes the split once and keeps it: ``in_memory`` when set, else
        whether it is at most IN_MEMORY_BYTES."""
        return self.in_memory if self.in_memory is not None else self.rows[split] * self.dims <= IN_MEMORY_BYTES

    def held_by_workers(self, split: str) -> bool:
        """Whether each training worker holds its shard of the split after the first pass
        (``stages/shards.py``): a kept split of at most IN_MEMORY_BYTES in all."""
        return self.kept(split) and self.rows[split] * self.dims <= IN_MEMORY_BYTES

    def for_training(self, split: str):
        """The split for a training stage: decoded once and kept in the object store (one copy in
        the cluster, blocks shared out to the workers) when ``kept``; otherwise streamed,
        decoded every epoch."""
        ds = self.stream(split)
        return ds.materialize() if self.kept(split) else ds

    def read_all(self, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
        """A small split (or its first ``limit`` rows) decoded in this process, no Ray: for tests
        and for the few images a figure shows."""
        parts, n = [], 0
        for p in self.paths(split):
            parts.append(read_file({"file": [p]}, self))
            n += len(parts[-1]["label"])
            if limit is not None and n >= limit:
                break
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label", "index")}
        return {k: v[:limit] for k, v in out.items()} if limit is not None else out


def read_file(batch: dict, spec: DataSpec) -> dict[str, np.ndarray]:
    """{"file": [one prepared Parquet file]} -> its rows, decoded (``decode``); with "split"
    (the file's split) beside the file, a column of it beside the rows."""
    import pyarrow.parquet as pq

    (location,) = batch["file"]
    filesystem, path = open_location(str(location))
    table = pq.read_table(path, filesystem=filesystem)
    rows = decode({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, spec)
    if "split" in batch:
        rows["split"] = np.full(len(rows["index"]), str(batch["split"][0]))
    return rows


def decode(batch: dict, spec: DataSpec) -> dict[str, np.ndarray]:
    """One batch of rows -> {"image": uint8 [B, C, H, W], "label": int64 [B], "index": int64 [B]}."""
    if spec.kind == "pixels":
        images = np.stack([np.frombuffer(b, dtype=np.uint8) for b in batch["image"]]).reshape(-1, *spec.shape)
    else:
        filesystem, root = open_location(spec.root)
        try:
            images = np.stack([read_image(filesystem, posixpath.join(root, p), spec.shape) for p in batch["path"]])
        except ValueError as exc:
            raise ValueError(f"{exc} (data.on_bad_image=skip leaves unreadable images out)") from None
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64),
            "index": np.asarray(batch["index"], dtype=np.int64)}


def read_image(filesystem, path: str, shape) -> np.ndarray:
    """One image file -> uint8 [C, H, W]: converted to the channels and resized to the size."""
    from PIL import Image

    c, h, w = shape
    try:
        with filesystem.open_input_file(path) as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.UnidentifiedImageError:  # (PIL's message names a BytesIO at a memory address)
        raise ValueError(f"cannot read image {path}: "
                         f"{'an empty file' if not data else 'not an image format PIL can decode'}") from None
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
