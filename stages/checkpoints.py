"""Training checkpoints: how they are written, read, checked, and which one a stage resumes from.

A checkpoint is a folder ``storage_path/<stage>-<fingerprint>/checkpoint_*/`` holding
``state.pt`` (model, optimizer, scheduler) and ``meta.json`` (the epoch it closes, the model
config, the epoch's metrics, where the workers ran). Ray Train names and writes the one that
closes an epoch; a *step* checkpoint (``train.checkpoint_every_steps``), written by rank 0
itself as ``checkpoint_step_<epoch>_<batches>``, is taken inside an epoch: its meta's
``step`` says how many of the epoch's batches it has done, and its state also holds every
rank's RNG state and partial epoch sums, so that a resume continues at the next batch.

``newest()`` is the one authority on what to resume from: the driver asks it what the
plan and the run will do, each worker asks it where to start, and the stage asks it for
the final state. It lists the folder through pyarrow's filesystems (a local or mounted path,
``file://``, ``s3://``, ``gs://``) and takes the newest *complete* checkpoint (meta readable,
state a whole zip archive): Ray Train's own snapshot can lag the storage by an epoch or more
after a killed driver. A remote checkpoint is downloaded to a temporary folder to be read.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
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
SHA_KEY = "state_sha256"  # in meta.json: the digest of state.pt as it was written


def save(folder: Path, state: dict, meta: dict) -> None:
    """state.pt, then meta.json holding its sha256 (checked before a resume: ``newest``)."""
    import torch

    torch.save(state, Path(folder) / STATE_FILE)
    digest = _sha256(open_location(str(Path(folder) / STATE_FILE)))
    (Path(folder) / META_FILE).write_text(json.dumps({**meta, SHA_KEY: digest}, indent=2))


def _sha256(located) -> str:
    """The SHA-256 of a file, given as (pyarrow filesystem, path), read in 1 MiB pieces."""
    filesystem, path = located
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def load(folder: Path) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint folder; tensors on the CPU, nothing but tensors unpickled."""
    import torch

    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return state, json.loads((Path(folder) / META_FILE).read_text())


def _position_if_complete(filesystem, folder: str) -> tuple[int, int | None] | None:
    """(epoch, step) of a checkpoint folder (step None: the epoch is complete), or None when
    it was cut while being written (or is not ours). Reads only the meta file and the state
    archive's central directory."""
    try:
        with filesystem.open_input_stream(posixpath.join(folder, META_FILE)) as f:
            meta = json.loads(f.read())
        epoch, step = int(meta["epoch"]), meta.get("step")
        with filesystem.open_input_file(posixpath.join(folder, STATE_FILE)) as f, zipfile.ZipFile(f):
            pass
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile):
        return None
    return epoch, (None if step is None else int(step))


@dataclass
class Checkpoint:
    """A complete checkpoint: the epoch it is in, where it lies (a path or a URI) and, for a
    step checkpoint, how many of that epoch's batches it has done (None: all of them)."""

    epoch: int
    path: str
    step: int | None = None

    @property
    def order(self) -> tuple[int, int, int]:
        """Sorts checkpoints by how far training had got: an epoch's end after its steps."""
        return (self.epoch, 1, 0) if self.step is None else (self.epoch, 0, self.step)

    @property
    def completed_epoch(self) -> int | None:
        """The last whole epoch before this checkpoint (None: none yet)."""
        last = self.epoch if self.step is None else self.epoch - 1
        return last if last >= 0 else None

    def describe(self) -> str:
        """(epochs counted from 1, as the epoch lines count them)"""
        return (f"the checkpoint of epoch {self.epoch + 1}" if self.step is None else
                f"the checkpoint of epoch {self.epoch + 1} after batch {self.step}")

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


def _all(storage_path: str, name: str) -> list[Checkpoint]:
    from pyarrow import fs

    filesystem, base = open_location(join(storage_path, name))
    found = []
    for info in filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True)):
        if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            position = _position_if_complete(filesystem, info.path)
            if position is not None:
                found.append(Checkpoint(position[0], join(storage_path, name, info.base_name), position[1]))
    return found


def damage(checkpoint: Checkpoint) -> str | None:
    """What is wrong with a complete checkpoint's state file (None: it is as written): its
    SHA-256 against the one its meta recorded (checkpoints written before that: trusted)."""
    filesystem, folder = open_location(checkpoint.path)
    with filesystem.open_input_stream(posixpath.join(folder, META_FILE)) as f:
        expected = json.loads(f.read()).get(SHA_KEY)
    if expected is None:
        return None
    actual = _sha256((filesystem, posixpath.join(folder, STATE_FILE)))
    return None if actual == expected else f"its {STATE_FILE} has sha256 {actual[:12]}…, not the {expected[:12]}… it was written with"


_warned: set[str] = set()


def newest(storage_path: str, name: str) -> Checkpoint | None:
    """The checkpoint to resume ``storage_path/name`` from (None: start afresh): the newest
    complete and intact one, epoch or step, on a local path or any storage pyarrow opens
    (``s3://``, ``gs://``, ``file://``). A damaged one is passed over for the one before it,
    with one warning line."""
    for c in sorted(_all(storage_path, name), key=lambda c: c.order, reverse=True):
        why = damage(c)
        if why is None:
            return c
        if c.path not in _warned:
            _warned.add(c.path)
            print(f"[hvae] warning: {c.describe()} ({c.path}) is damaged: {why}; "
                  f"passed over for the one before it", file=sys.stderr, flush=True)
    return None


def resume_epoch(storage_path: str, name: str) -> int | None:
    """The last whole epoch a resume of ``storage_path/name`` continues after (None: none)."""
    found = newest(storage_path, name)
    return found.completed_epoch if found else None


STEP_PREFIX = "checkpoint_step_"


def save_step(storage_path: str, name: str, epoch: int, step: int, state: dict, meta: dict) -> str:
    """Rank 0 writes a step checkpoint straight to the storage (Ray Train keeps only the epoch
    ones it is told of), then removes the step checkpoints it supersedes. -> its location."""
    from pyarrow import fs

    filesystem, base = open_location(join(storage_path, name))
    folder_name = f"{STEP_PREFIX}{epoch:06d}_{step:09d}"
    with tempfile.TemporaryDirectory(prefix="hvae-step-") as tmp:
        save(Path(tmp), state, {**meta, "epoch": epoch, "step": step})
        target = posixpath.join(base, folder_name)
        filesystem.create_dir(target, recursive=True)
        # the state first, the meta last: a folder cut while being written has no readable pair
        for file in (STATE_FILE, META_FILE):
            fs.copy_files(str(Path(tmp) / file), posixpath.join(target, file),
                          source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
    prune_steps(storage_path, name)
    return join(storage_path, name, folder_name)


def prune_steps(storage_path: str, name: str) -> None:
    """Delete every step checkpoint but the newest checkpoint, when that is a step one: an
    epoch's end or a later step supersedes them (Ray Train prunes the epoch ones itself)."""
    found = _all(storage_path, name)
    if not found:
        return
    keep = max(found, key=lambda c: c.order)
    filesystem, _ = open_location(join(storage_path, name))
    for c in found:
        if c.step is not None and c is not keep:
            try:
                filesystem.delete_dir(open_location(c.path)[1])
            except OSError:
                pass  # another rank of a restarted group got there first


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
