"""The stage contract: what the runner hands a stage and what the stage hands back.

A stage reads its upstream stages' output folders, writes its own output folder and
returns metrics. It does not know how it is tracked: per-epoch metrics go through
``ctx.report(metrics, step)``, a picklable callable the runner provides (it may be called
inside a Ray Train worker).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


def _no_report(metrics: dict, step: int) -> None:
    return None


@dataclass
class StageContext:
    name: str
    config: Any  # the whole validated PipelineConfig; a stage reads its own slice and data/cluster
    output_dir: Path
    storage_path: str  # Ray Train checkpoints live under storage_path/<checkpoint_name>/
    checkpoint_name: str  # "<stage>-<fingerprint>"
    data: Any = None  # the prepared dataset (stages.data.DataSpec): names and counts, read by streaming
    upstream: dict[str, Path] = field(default_factory=dict)  # stage name -> its downloaded output folder
    report: Callable[[dict, int], None] = _no_report
    train_callbacks: list = field(default_factory=list)  # extra Ray Train callbacks (a sweep's Tune reporter)
    # a training stage's {"train", "val"} Ray Data datasets, built already: a sweep builds them
    # once for all its trials; None: the stage builds its own (``training_datasets``)
    datasets: dict | None = None

    @property
    def cluster(self):
        return self.config.cluster


@dataclass
class StageResult:
    metrics: dict[str, float]
    output_dir: Path
    tags: dict[str, str] = field(default_factory=dict)
    # datasets the stage wrote, to register as run inputs: context (e.g. "train") -> folder
    # relative to output_dir
    datasets: dict[str, str] = field(default_factory=dict)
    # tables to show as such in the tracking UI: artifact file (.json) -> {column: cell} rows
    tables: dict[str, list[dict]] = field(default_factory=dict)


class StageError(RuntimeError):
    """A stage failure whose message is already fit to show the user on one line."""


class ArtifactError(StageError):
    """An upstream run's artifact that cannot be loaded (a bad pickle refused by
    ``weights_only``, a wrong shape, a broken file): the runner tags that run corrupt, so the
    next run makes it again rather than reusing it."""

    def __init__(self, path, why: str):
        self.path = str(path)
        super().__init__(f"artifact {self.path} cannot be loaded: {why}")


def load_weights(module, path) -> None:
    """``module.load_state_dict(torch.load(path, weights_only=True))``; any failure (a pickle
    holding more than tensors, a damaged file, a shape or key that does not fit) -> ArtifactError
    naming the file, in one line (not torch's advice to set ``weights_only=False``)."""
    import pickle

    import torch

    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            first = "it holds more than tensors (refused: loading it could run code)"
        raise ArtifactError(path, first[:300]) from None


def worker_batch(key: str, batch_size: int, workers: int) -> int:
    """Each worker's batch: exactly ``batch_size / workers``, so the global batch is the
    configured one on any worker count; a count that does not divide it is refused (a
    ``cluster.num_workers: auto`` layout is known only once Ray is up)."""
    from hvae.settings.base import ConfigError, uneven_batch

    why = uneven_batch(key, batch_size, workers)
    if why is not None:
        raise ConfigError(f"config error: {why}")
    return batch_size // workers


class TrainTask:
    """What a training stage plugs into the shared loop (stages/train_loop.py); built inside
    each Ray Train worker from a picklable class and its arguments."""

    def build_model(self):
        raise NotImplementedError

    train_rows: int = 0  # rows of the training split (all workers together)
    batch_size: int = 1  # rows per batch on one worker
    # the validation metric (of ``summarize``; lower is better) that picks the epoch whose
    # weights the stage hands on when train.keep is best (stages/keep.py)
    select_metric: str = "val_loss"

    def steps_per_epoch(self, world: int) -> int:
        """Batches each rank trains on per epoch: Ray Train gives every rank an equal shard
        (``train_rows // world`` rows), and the last batch may be short."""
        return max(1, math.ceil((self.train_rows // world) / self.batch_size))

    def train_batches(self, epoch: int, rank: int, world: int) -> Iterable:
        """This rank's training batches for ``epoch``; every rank must yield the same number."""
        raise NotImplementedError

    def val_batches(self, rank: int, world: int) -> Iterable:
        raise NotImplementedError

    def epoch_images(self, model, device) -> dict:
        """Rank 0, after an epoch's validation: pictures of the model as it is then ({name: uint8
        H x W x C array}), logged at the epoch's step. None by default."""
        return {}

    def train_step(self, model, batch, device):
        """(loss to minimise, sums to accumulate over the epoch, e.g. {"count": n, "nll": ...})
        or (loss, sums, terms): named scalar parts of the loss, which the loop watches so that a
        non-finite one is reported by name. Tensors stay on the device (no ``.item()``)."""
        raise NotImplementedError

    def val_step(self, model, batch, device) -> dict:
        raise NotImplementedError

    def summarize(self, split: str, sums: dict) -> dict[str, float]:
        """Epoch sums (already added up over all workers) -> metrics named ``<split>_<name>``."""
        raise NotImplementedError
