"""The one Ray Train worker loop shared by every training stage.

A training stage describes *what* to train as a ``TrainTask`` (model, batches, the loss
of one batch, how to summarise an epoch); this module does the rest the same way for
all of them: DDP through ``ray.train.torch``, seeding, the optimizer and LR schedule,
validation each epoch, metrics summed over workers, per-epoch checkpoints through
``ray.train.report`` and exact resume from ``ray.train.get_checkpoint()``.

Resume is exact because every epoch reseeds from (seed, epoch, rank) and the data order
is a function of (seed, epoch): a run restored at epoch k redoes what epoch k would
have done.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class TrainTask:
    """What a training stage plugs into the loop. Built inside each worker by ``LoopSpec.make_task``."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_batches(self, epoch: int, rank: int, world: int) -> Iterable:
        """This rank's training batches for ``epoch``; every rank must yield the same number."""
        raise NotImplementedError

    def val_batches(self, rank: int, world: int) -> Iterable:
        raise NotImplementedError

    def train_step(self, model, batch, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, sums to accumulate over the epoch, e.g. {"count": n, "nll": ...})."""
        raise NotImplementedError

    def val_step(self, model, batch, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def summarize(self, split: str, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Epoch sums (already added up over all workers) -> metrics named ``<split>_<name>``."""
        raise NotImplementedError


@dataclass
class LoopSpec:
    """Everything a worker needs, picklable: how to build the task and how to optimise."""

    make_task: Callable[..., TrainTask]  # a module-level function
    task_args: dict[str, Any]
    model_config: dict[str, Any]  # saved beside the weights so the model can be rebuilt
    epochs: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    stage: str = "train"
    report: Callable[[dict, int], None] | None = None  # called on rank 0 once per epoch
    extra_meta: dict[str, Any] = field(default_factory=dict)
    resume_dir: str | None = None  # newest checkpoint on disk when the fit started (set by fit)


def _reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add up every worker's sums in one all-reduce (keys in the same order on every rank)."""
    keys = sorted(sums)
    flat = [sums[k].detach().double().reshape(-1).cpu() for k in keys]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        buf = torch.cat(flat)
        dist.all_reduce(buf)
        flat = list(torch.split(buf, [f.numel() for f in flat]))
    return {k: f.reshape(sums[k].shape) for k, f in zip(keys, flat)}


def _accumulate(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    for k, v in part.items():
        v = v.detach().double().cpu()
        total[k] = total[k] + v if k in total else v.clone()


def save_state(folder: Path, state: dict, meta: dict) -> None:
    torch.save(state, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def newest_checkpoint(storage_path: str, name: str) -> tuple[int, Path] | None:
    """(epoch, folder) of the newest complete checkpoint on disk under storage_path/name.

    Ray Train restores from the latest checkpoint its controller snapshot registered, and
    after a killed driver that snapshot can lag the disk by an epoch or more: the loop
    resumes from whichever of the two is newer. A checkpoint cut while being written (its
    state file unreadable as a zip archive) is skipped.
    """
    if "://" in storage_path:  # remote storage: rely on Ray's snapshot alone
        return None
    found = []
    for meta in Path(storage_path, name).glob(f"checkpoint_*/{META_FILE}"):
        try:
            epoch = int(json.loads(meta.read_text())["epoch"])
            with zipfile.ZipFile(meta.parent / STATE_FILE):
                pass
        except (ValueError, KeyError, OSError, zipfile.BadZipFile):
            continue
        found.append((epoch, meta.parent))
    return max(found, key=lambda f: f[0]) if found else None


def latest_checkpoint_epoch(storage_path: str, name: str) -> int | None:
    """The epoch a resume of storage_path/name continues after (None: nothing to resume)."""
    newest = newest_checkpoint(storage_path, name)
    return newest[0] if newest else None


def load_state(folder: Path) -> tuple[dict, dict]:
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((folder / META_FILE).read_text())
    return state, meta


def log(message: str) -> None:
    """One line to the console. Ray Train's print patch would repeat a plain print here."""
    print(message, file=sys.__stdout__, flush=True)


def _worker_entry(config: dict) -> dict:
    return train_worker(config["spec"])


def _restore(spec: LoopSpec) -> tuple[dict | None, dict | None]:
    """The state to start from: the newer of Ray Train's checkpoint and the newest on disk."""
    import ray.train

    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            candidates.append(load_state(Path(folder)))
    if spec.resume_dir is not None:
        try:  # gone when Ray Train has since kept only newer ones: its own checkpoint is newer then
            candidates.append(load_state(Path(spec.resume_dir)))
        except (OSError, RuntimeError, ValueError):
            pass
    if not candidates:
        return None, None
    return max(candidates, key=lambda c: int(c[1]["epoch"]))


def train_worker(spec: LoopSpec) -> dict:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    # Ray Train logs every report (with all its metrics) at INFO; our own epoch line says enough.
    # (its context module names its logger by file path, not by module name)
    from ray.train.v2._internal.execution import context as _train_context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    # A failure's traceback travels to the driver inside the exception; the runner prints one
    # line and keeps the whole traceback as the run's error.txt artifact, so no console wall here.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    task = spec.make_task(**spec.task_args)

    torch.manual_seed(spec.seed)
    model = task.build_model()
    start_epoch, restored = 0, None
    restored, meta = _restore(spec)
    if restored is not None:
        model.load_state_dict(restored["model"])
        start_epoch = int(meta["epoch"]) + 1
        if rank == 0:
            log(f"[{spec.stage}] resuming from the checkpoint of epoch {meta['epoch']}")
            if spec.report is not None:  # one point per restore: after a crash or a lost worker
                spec.report({"restored_from_epoch": float(meta["epoch"])}, int(meta["epoch"]))
    if rank == 0 and spec.report is not None:
        # one point per start of the worker group: more than one means Ray Train restarted it
        spec.report({"worker_group_start_epoch": float(start_epoch)}, start_epoch)

    # The codebooks keep themselves in sync (all-reduced EMA statistics): DDP must not
    # overwrite every rank's buffers with rank 0's at each forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    core = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(spec.epochs, 1), eta_min=spec.lr * 0.1)
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])

    nodes = _worker_nodes()
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, spec.epochs):
        torch.manual_seed(spec.seed * 100003 + epoch * 7919 + rank)
        model.train()
        train_sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for step, batch in enumerate(task.train_batches(epoch, rank, world)):
            loss, sums = task.train_step(model, batch, device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{spec.stage}: non-finite loss at epoch {epoch} step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            _accumulate(train_sums, sums)
        train_seconds = time.perf_counter() - t0

        model.eval()
        val_sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch in task.val_batches(rank, world):
                _accumulate(val_sums, task.val_step(model, batch, device))
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        reduced = _reduce_sums({**{f"train/{k}": v for k, v in train_sums.items()},
                                **{f"val/{k}": v for k, v in val_sums.items()},
                                "seconds": torch.tensor(train_seconds)})
        split = lambda p: {k[len(p) + 1:]: v for k, v in reduced.items() if k.startswith(p + "/")}  # noqa: E731
        metrics = {**task.summarize("train", split("train")), **task.summarize("val", split("val"))}
        slowest = float(reduced["seconds"]) / world  # mean worker time; workers step in lockstep
        metrics.update(epoch=epoch, lr=lr, epoch_seconds=slowest,
                       images_per_s=float(reduced["train/count"]) / max(slowest, 1e-9))
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"{spec.stage}: metric {k} is not finite at epoch {epoch}")

        if rank == 0:
            if spec.report is not None:
                spec.report(metrics, epoch)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train_loss", "val_")) and "level" not in k and "group" not in k)
            log(f"[{spec.stage}] epoch {epoch + 1}/{spec.epochs} {shown} {metrics['images_per_s']:.0f} items/s")
            with tempfile.TemporaryDirectory() as tmp:
                state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict()}
                meta = {"epoch": epoch, "model_config": spec.model_config, "metrics": metrics, **spec.extra_meta}
                save_state(Path(tmp), state, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    return {"metrics": metrics, "nodes": nodes}


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def placement_tags(result) -> dict[str, str]:
    """Tags saying where a fit's workers ran (from rank 0's return value)."""
    value = getattr(result, "return_value", None) or {}
    nodes = value.get("nodes") if isinstance(value, dict) else None
    return {"hvae.worker_nodes": ",".join(nodes)} if nodes else {}


def fit(spec: LoopSpec, *, name: str, storage_path: str, num_workers: int, use_gpu: bool,
        cpus_per_worker: float, max_failures: int, datasets: dict | None = None,
        placement_strategy: str = "PACK", callbacks: list | None = None):
    """Run ``train_worker`` on a TorchTrainer and return the Ray Train Result.

    ``callbacks``: extra Ray Train callbacks, e.g. Tune's reporter when the fit is a sweep trial.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    newest = newest_checkpoint(storage_path, name)
    spec = replace(spec, resume_dir=str(newest[1]) if newest else None)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"spec": spec},
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources, placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
    )
    return trainer.fit()


def final_state(result, storage_path: str, name: str) -> tuple[dict, dict, str]:
    """(state, meta, checkpoint path) of the last epoch a fit reached: its result's checkpoint, or the newest on
    disk when the fit had nothing left to train (a resume after the last epoch was saved)."""
    candidates = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            candidates.append((*load_state(Path(folder)), str(result.checkpoint.path)))
    newest = newest_checkpoint(storage_path, name)
    if newest is not None:
        candidates.append((*load_state(newest[1]), str(newest[1])))
    if not candidates:
        raise RuntimeError(f"training {name} ended without a checkpoint")
    return max(candidates, key=lambda c: int(c[1]["epoch"]))
