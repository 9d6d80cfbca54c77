"""Training checkpoints: how they are written, read, checked, and which one a stage resumes from.

A checkpoint is a folder ``storage_path/<stage>-<fingerprint>/checkpoint_*/`` (Ray Train
names it) holding ``state.pt`` (model, optimizer, scheduler) and ``meta.json`` (the epoch it
closes, the model config, the epoch's metrics, where the workers ran).

``newest()`` is the one authority on what to resume from: the driver asks it what the
plan and the run will do, each worker asks it where to start, and the stage asks it for
the final state. It lists the folder through pyarrow's filesystems (a local or mounted path,
``file://``, ``s3://``, ``gs://``) and takes the newest *complete* checkpoint (meta readable,
state a whole zip archive): Ray Train's own snapshot can lag the storage by an epoch or more
after a killed driver. A remote checkpoint is downloaded to a temporary folder to be read.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .data import join, open_location

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


def _epoch_if_complete(filesystem, folder: str) -> int | None:
    """The epoch a checkpoint folder closes, or None when it was cut while being written (or
    is not ours). Reads only the meta file and the state archive's central directory."""
    try:
        with filesystem.open_input_stream(posixpath.join(folder, META_FILE)) as f:
            epoch = int(json.loads(f.read())["epoch"])
        with filesystem.open_input_file(posixpath.join(folder, STATE_FILE)) as f, zipfile.ZipFile(f):
            pass
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile):
        return None
    return epoch


@dataclass
class Checkpoint:
    """A complete checkpoint: the epoch it closes, and where it lies (a path or a URI)."""

    epoch: int
    path: str

    @contextmanager
    def folder(self) -> Iterator[Path]:
        """The checkpoint as a local folder (remote storage: downloaded to a temporary one)."""
        from pyarrow import fs

        filesystem, path = open_location(self.path)
        if isinstance(filesystem, fs.LocalFileSystem):
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="hvae-checkpoint-") as tmp:
            fs.copy_files(path, tmp, source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
            yield Path(tmp)

    def load(self) -> tuple[dict, dict]:
        with self.folder() as folder:
            return load(folder)


def newest(storage_path: str, name: str) -> Checkpoint | None:
    """The checkpoint to resume ``storage_path/name`` from (None: start afresh): the newest
    complete one, on a local path or any storage pyarrow opens (``s3://``, ``gs://``, ``file://``)."""
    from pyarrow import fs

    filesystem, base = open_location(join(storage_path, name))
    found = []
    for info in filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True)):
        if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            epoch = _epoch_if_complete(filesystem, info.path)
            if epoch is not None:
                found.append(Checkpoint(epoch, join(storage_path, name, info.base_name)))
    return max(found, key=lambda c: c.epoch) if found else None


def resume_epoch(storage_path: str, name: str) -> int | None:
    """The epoch a resume of ``storage_path/name`` continues after (None: nothing to resume)."""
    found = newest(storage_path, name)
    return found.epoch if found else None


def clear(storage_path: str, name: str) -> str | None:
    """--force: move ``storage_path/name`` aside (renamed ``<name>.forced-<time>-<pid>``) so the
    stage trains afresh; on storage that cannot rename a folder (a bucket), delete it.
    -> what was done, for the log (None: there was nothing)."""
    from pyarrow import fs

    filesystem, path = open_location(join(storage_path, name))
    if filesystem.get_file_info(path).type != fs.FileType.Directory:
        return None
    aside = f"{path}.forced-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    try:
        filesystem.move(path, aside)
        return f"moved its checkpoints aside to {posixpath.basename(aside)}"
    except (OSError, NotImplementedError):
        filesystem.delete_dir(path)
        return f"deleted its checkpoints at {join(storage_path, name)}"
