"""Training checkpoints: how they are written, read, checked, and which one a stage resumes from.

A checkpoint is a folder ``storage_path/<stage>-<fingerprint>/checkpoint_*/`` (Ray Train
names it) holding ``state.pt`` (model, optimizer, scheduler) and ``meta.json`` (the epoch it
closes, the model config, the epoch's metrics, where the workers ran).

``newest()`` is the one authority on what to resume from: the driver asks it what the
plan and the run will do, each worker asks it where to start, and the stage asks it for
the final state. On storage this process can list (a local or mounted path) it scans the
folder and takes the newest *complete* checkpoint (meta readable, state a whole zip
archive): Ray Train's own snapshot can lag the disk by an epoch or more after a killed
driver. On remote storage (``s3://``...) it falls back to the checkpoint Ray Train hands
the worker (``ray.train.get_checkpoint()``) or the fit's result.
"""
from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def save(folder: Path, state: dict, meta: dict) -> None:
    import torch

    torch.save(state, Path(folder) / STATE_FILE)
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2))


def load(folder: Path) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint folder; tensors on the CPU, nothing but tensors unpickled."""
    import torch

    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return state, json.loads((Path(folder) / META_FILE).read_text())


def _epoch_if_complete(folder: Path) -> int | None:
    try:
        epoch = int(json.loads((folder / META_FILE).read_text())["epoch"])
        with zipfile.ZipFile(folder / STATE_FILE):
            pass
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile):
        return None  # cut while being written, or not ours
    return epoch


@dataclass
class Checkpoint:
    """A complete checkpoint: the epoch it closes, and where it lies."""

    epoch: int
    path: str
    _ray: Any = None  # a ray.train.Checkpoint when it lies on storage this process cannot list

    @contextmanager
    def folder(self) -> Iterator[Path]:
        if self._ray is None:
            yield Path(self.path)
        else:
            with self._ray.as_directory() as local:
                yield Path(local)

    def load(self) -> tuple[dict, dict]:
        with self.folder() as folder:
            return load(folder)


def listable(storage_path: str) -> bool:
    return "://" not in storage_path or storage_path.startswith("file://")


def _local(storage_path: str) -> Path:
    return Path(storage_path[len("file://"):] if storage_path.startswith("file://") else storage_path)


def newest(storage_path: str, name: str, ray_checkpoint=None) -> Checkpoint | None:
    """The checkpoint to resume ``storage_path/name`` from (None: start afresh).

    ``ray_checkpoint``: what Ray Train offers (a worker's ``get_checkpoint()`` or a fit's
    ``result.checkpoint``); used only where the storage cannot be listed from here.
    """
    if listable(storage_path):
        found = []
        for folder in _local(storage_path).joinpath(name).glob("checkpoint_*"):
            epoch = _epoch_if_complete(folder)
            if epoch is not None:
                found.append(Checkpoint(epoch, str(folder)))
        return max(found, key=lambda c: c.epoch) if found else None
    if ray_checkpoint is None:
        return None
    with ray_checkpoint.as_directory() as local:
        epoch = _epoch_if_complete(Path(local))
    return None if epoch is None else Checkpoint(epoch, str(ray_checkpoint.path), ray_checkpoint)


def resume_epoch(storage_path: str, name: str) -> int | None:
    """The epoch a resume of ``storage_path/name`` continues after (None: nothing to resume)."""
    found = newest(storage_path, name)
    return found.epoch if found else None
