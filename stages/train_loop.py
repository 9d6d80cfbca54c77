"""The one Ray Train worker loop shared by every training stage.

A training stage describes *what* to train as a ``TrainTask`` (stages/base.py: model,
batches, the loss of one batch, how to summarise an epoch); this module does the rest the
same way for all of them: DDP through ``ray.train.torch``, seeding, the optimizer and LR
schedule, validation each epoch, metrics summed on the device and over workers on the
training device (no host sync per step; NCCL serves CUDA tensors only), per-epoch checkpoints
through ``ray.train.report`` and exact resume from the checkpoint ``stages.checkpoints``
picks.

Resume is exact because every epoch reseeds from (seed, epoch, rank) and the data order
is a function of (seed, epoch): a run restored at epoch k redoes what epoch k would
have done.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from hvae.settings.config import TrainConfig

from . import checkpoints
from .keep import BestEpoch, kept
from .base import TrainTask


@dataclass
class LoopSpec:
    """Everything a worker needs, picklable: how to build the task and how to optimise."""

    make_task: Callable[..., TrainTask]  # a module-level class or function
    task_args: dict[str, Any]
    model_config: dict[str, Any]  # saved beside the weights so the model can be rebuilt
    epochs: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    stage: str = "train"
    report: Callable[[dict, int], None] | None = None  # called on rank 0 once per epoch
    storage_path: str = ""  # checkpoints live under storage_path/name (set by fit)
    sync_every: int = 50  # steps between the loop's host syncs (the non-finite check)
    # how every training stage runs (precision, compile, accumulation, schedule, checkpoints, which
    # weights it hands on): the config's train: section itself
    train: TrainConfig = field(default_factory=TrainConfig)
    launched_at: float = 0.0  # time.time() when the driver called fit (set by fit): the start-up's clock

    def autocast(self, device: torch.device):
        """The forward pass's autocast context (off for fp32). The models keep their float32
        islands (codebook, likelihoods, KL terms) themselves: ``models/precision.py``."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.train.precision)
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
    name: str = ""


@dataclass
class Trainee:
    """One worker's training state: the model (DDP-wrapped on a worker), its optimizer, LR
    schedule and fp16 GradScaler, the device it trains on and its place in the worker group."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1

    @property
    def core(self):
        """The model without its DDP wrapper."""
        return getattr(self.model, "module", self.model)


@dataclass
class EpochSums:
    """One epoch on one rank: its training and validation sums (tensors on the device) and the
    seconds each took."""

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    seconds: float
    val_seconds: float


# ---- one optimiser step and one epoch's sums: the same code for every stage ------------

def train_step(spec: LoopSpec, task: TrainTask, trainee: Trainee, batch, *, guard: "Guard | None" = None,
               step: int = 0, update: bool = True) -> dict[str, torch.Tensor]:
    """Forward (under the spec's autocast) and backward on one batch, then, when ``update``,
    the optimizer step (``apply_update``); returns the batch's sums for the epoch (on the
    device). With ``spec.train.accumulate_steps`` > 1 the gradients of that many batches add up
    (each loss divided by their number) and DDP all-reduces only at the update. ``guard``
    watches the loss and the task's named terms without a host sync."""
    model, scaler, accumulate = trainee.model, trainee.scaler, spec.train.accumulate_steps
    quiet = not update and accumulate > 1 and hasattr(model, "no_sync")
    with model.no_sync() if quiet else contextlib.nullcontext():
        with spec.autocast(trainee.device):
            loss, sums, *terms = task.train_step(model, batch, trainee.device)
        if guard is not None:
            guard.watch(step, {**(terms[0] if terms else {}), "loss": loss})
        scaled = loss / accumulate if accumulate > 1 else loss
        (scaled if scaler is None else scaler.scale(scaled)).backward()
    if update:
        apply_update(spec, trainee)
    return sums


def apply_update(spec: LoopSpec, trainee: Trainee) -> None:
    """One optimizer step on the gradients gathered since the last: clipped, through fp16's
    scaler (which skips the step when they overflowed), then cleared; the LR schedule moves."""
    model, optimizer, scaler, scheduler = trainee.model, trainee.optimizer, trainee.scaler, trainee.scheduler
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if spec.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


class Guard:
    """Which of the loss and the task's terms first went non-finite, and at which step of the
    epoch: tracked on the device (no host sync per step); ``check`` syncs once and raises
    naming the step and the terms. The loop checks every ``sync_every`` steps and before an
    epoch is reported, so a bad epoch never reaches a checkpoint."""

    def __init__(self):
        self.names: list[str] = []
        self.first: torch.Tensor | None = None  # per name: the first bad step, -1 while none

    def watch(self, step: int, values: dict[str, torch.Tensor]) -> None:
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()])
        if self.first is None:
            self.names = list(values)
            self.first = torch.full((len(values),), -1, dtype=torch.long, device=bad.device)
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def check(self) -> tuple[int, list[str]] | None:
        """(the first bad step, the terms bad at it; the loss only when no term was) or None."""
        if self.first is None:
            return None
        first = self.first.tolist()  # the one host sync
        hit = [s for s in first if s >= 0]
        if not hit:
            return None
        step = min(hit)
        names = [n for n, s in zip(self.names, first) if s == step]
        return step, [n for n in names if n != "loss"] or names


class Schedule:
    """The LR factor at optimizer step ``s``: a linear warm-up over ``warmup`` steps, then a
    cosine decay to ``floor`` at step ``total`` (for ``LambdaLR``; moves every step)."""

    def __init__(self, warmup: int, total: int, floor: float = 0.1):
        self.warmup, self.total, self.floor = warmup, max(total, 1), floor

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, spec: LoopSpec, steps_per_epoch: int = 1):
    """AdamW and its per-step schedule over the run's optimizer steps (``steps_per_epoch``
    batches an epoch, ``spec.train.accumulate_steps`` of them to a step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    updates = math.ceil(steps_per_epoch / spec.train.accumulate_steps)
    schedule = Schedule(spec.train.warmup_steps, spec.epochs * updates)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _accumulate(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    """Add a batch's sums into the epoch's, where they are (the training device): no host sync."""
    for k, v in part.items():
        v = v.detach().double()
        total[k] = total[k] + v if k in total else v.clone()


def _reduce_sums(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Add up every worker's sums in one all-reduce of one buffer on the training ``device``
    (NCCL serves CUDA tensors only); keys in the same order on every rank."""
    keys = sorted(sums)
    flat = [sums[k].detach().to(device=device, dtype=torch.float64).reshape(-1) for k in keys]
    buf = torch.cat(flat)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buf)
    parts = torch.split(buf, [f.numel() for f in flat])
    return {k: p.reshape(sums[k].shape) for k, p in zip(keys, parts)}


CLOCKS = ("first_batch_s", "data_wait_s")  # seconds a training epoch's sums carry beside the task's
# what every rank counts alike (the ranks step in lockstep): shown once, not summed over ranks
PER_RANK = (*CLOCKS, "optimizer_updates")
# how often Ray Train's controller polls its workers (Ray's default: 2 s). Every poll that finds
# the worker group starting or the function returned moves the run on, so the default left
# ~4 s a fit of nothing but waiting (a fit of an empty function on 2 workers: 14.0-14.9 s, one
# cold 21.4 s, against 9.8-11.8 s at 0.5 s and 8.6-11.1 s at 0.2 s); a poll is one small actor
# call per worker. Set by `fit` where unset, in the process that fits: Ray Train hands it on to
# its controller and workers.
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
PROGRESS_EVERY_S = 30.0  # rank 0 says where an epoch is at most this often (a line, not a bar: see Progress)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


class Progress:
    """Rank 0's clock over a fit: inside an epoch, a line every ``PROGRESS_EVERY_S`` seconds
    (step, items/s, time left); on each epoch's line, the time left. The estimate is the
    seconds per step so far in this process (validation and checkpoints included) times the
    steps left. Plain timestamped lines, never a redrawn bar: they reach the driver through
    Ray's log forwarding and often a log file."""

    def __init__(self, spec: "LoopSpec", steps: int, first_epoch: int, items_per_step: int):
        self.spec, self.steps, self.items = spec, steps, items_per_step
        self.left = (spec.epochs - first_epoch) * steps
        self.done, self.t0 = 0, time.perf_counter()
        self.shown = self.t0

    def eta(self) -> str:
        if not self.done:
            return "?"
        return _duration((time.perf_counter() - self.t0) / self.done * (self.left - self.done))

    def step(self, epoch: int, step: int, task: TrainTask, sums: dict) -> None:
        """After a training step; ``sums``: this rank's sums of the epoch so far (its running
        loss is shown: one host sync per line)."""
        self.done += 1
        now = time.perf_counter()
        if now - self.shown >= PROGRESS_EVERY_S and step + 1 < self.steps:
            self.shown = now
            rate = self.done * self.items / (now - self.t0)
            so_far = task.summarize("train", {k: v for k, v in sums.items() if k not in CLOCKS})
            loss = f" train_loss={so_far['train_loss']:.4g}" if "train_loss" in so_far else ""
            log(f"[{self.spec.stage}] epoch {epoch + 1}/{self.spec.epochs} step {step + 1}/{self.steps}{loss} "
                f"{rate:.0f} items/s, {self.eta()} left")


def log(message: str) -> None:
    """One line to the console. Ray Train's print patch would repeat a plain print here."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.__stdout__, flush=True)


# ---- the worker ------------------------------------------------------------------------

def _quiet_ray_train() -> None:
    """Ray Train logs every report (with all its metrics) at INFO, and a failure's traceback at
    ERROR; our epoch line says enough, and the runner keeps the traceback as error.txt. (Some of
    its loggers are named by file path, not by module: find them by the package path.)"""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train/" in name:
            logging.getLogger(name).setLevel(logging.CRITICAL if name.endswith(("util", "util.py")) else logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


@dataclass
class Resume:
    """Where an epoch continues from a step checkpoint, for one rank: the batches it had done,
    the LR the epoch started with, this rank's RNG states, partial sums and data wait."""

    step: int
    lr: float
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    sums: dict
    waited: float


def compile_model(model, **options) -> None:
    """torch.compile in place (the state dict keeps its keys: checkpoints stay interchangeable);
    a module that sets ``not_compiled`` runs eagerly; ``options`` go to ``Module.compile`` (a
    test's counting backend). (torch.compiler is touched only here: importing it costs every
    process that never compiles about a second.)"""
    import torch

    for m in model.modules():
        if getattr(m, "not_compiled", False):
            m.forward = torch.compiler.disable(m.forward)
    model.compile(**options)


def _agreed(found, world: int):
    """Rank 0's choice of checkpoint, on every rank: asked separately, ranks can see different
    newest ones (one written in between, e.g. by a worker of a killed run that has not died
    yet) and would then train different epochs until a collective hangs."""
    if world == 1 or not dist.is_initialized():
        return found
    box = [found]
    nccl = dist.get_backend() == "nccl"
    dist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device()) if nccl else None)
    return box[0]


class StartReports(threading.Thread):
    """Rank 0's reports of a (re)start, sent from a helper thread while the model is wrapped for
    DDP: a worker's first report imports MLflow and opens its store (1.4 s on an idle machine,
    3.6 s measured in a smoke run while the other workers start), time the start-up would
    otherwise spend waiting. ``join`` (before the training thread's own first report: one
    writer at a time) raises what the reports raised."""

    def __init__(self, report: Callable[[dict, int], None]):
        super().__init__(name="hvae-start-reports", daemon=True)
        self.report, self.points, self.error = report, [], None

    def add(self, metrics: dict, step: int) -> None:
        self.points.append((metrics, step))

    def run(self) -> None:
        try:
            for metrics, step in self.points:
                self.report(metrics, step)
        except BaseException as e:  # (raised again in the training thread, by join)
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


@dataclass
class Started:
    """A worker ready to train: its state, the first epoch to train, where inside it to go on
    (a step checkpoint's Resume, or None) and the best epoch so far."""

    trainee: Trainee
    start_epoch: int
    resume: Resume | None
    best: BestEpoch


def _start(spec: LoopSpec, task: TrainTask, rank: int, world: int, reports: StartReports | None) -> Started:
    """Build model, optimizer and schedule, restored from the checkpoint ``checkpoints.newest``
    picks. ``reports`` (rank 0's, when the stage reports): the restart's points, started here."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(spec.seed)
    model = task.build_model()
    found = _agreed(checkpoints.newest(spec.storage_path, spec.name) if rank == 0 else None, world)
    restored, start_epoch, resume = None, 0, None
    if found is not None:
        restored, meta = found.load()
        model.load_state_dict(restored["model"])
        start_epoch = found.epoch + 1 if found.step is None else found.epoch
        ranks = restored.get("ranks") or []
        if found.step is not None and len(ranks) == world:
            resume = Resume(found.step, meta["epoch_lr"], **ranks[rank])
        elif found.step is not None and rank == 0:
            log(f"[{spec.stage}] the step checkpoint was taken by {len(ranks)} workers, this group has {world}: "
                f"epoch {found.epoch + 1} starts again from its first batch (from the weights it had reached)")
        if rank == 0:
            log(f"[{spec.stage}] resuming from {found.describe()}")
            if reports is not None:  # one point per restore: after a crash or a lost worker
                reports.add({"restored_from_epoch": float(found.epoch)}, found.epoch)
    if reports is not None:
        # one point per start of the worker group: more than one means Ray Train restarted it
        reports.add({"worker_group_start_epoch": float(start_epoch)}, start_epoch)
        reports.start()
    if spec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if spec.train.compile:
        compile_model(model)
    # The codebooks keep themselves in sync (all-reduced EMA statistics): DDP must not
    # overwrite every rank's buffers with rank 0's at each forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer, scheduler = make_optimizer(model, spec, task.steps_per_epoch(world))
    scaler = torch.amp.GradScaler(ray.train.torch.get_device().type) if spec.train.precision == "fp16" else None
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if scaler is not None and "scaler" in restored:
            scaler.load_state_dict(restored["scaler"])
    best = BestEpoch(task.select_metric, restored if rank == 0 else None)
    trainee = Trainee(model, optimizer, scheduler, scaler, ray.train.torch.get_device(), rank, world)
    return Started(trainee, start_epoch, resume, best)


def run_epoch(spec: LoopSpec, task: TrainTask, trainee: Trainee, epoch: int, *, resume: Resume | None = None,
              checkpoint: Callable[[int, dict, float], None] | None = None,
              progress: "Progress | None" = None) -> EpochSums:
    """Train one epoch, then validate. An optimizer step every ``spec.train.accumulate_steps`` batches, and one for the epoch's last
    batches (their gradients are then divided by ``accumulate_steps`` all the same).
    ``resume``: continue after the batches a step checkpoint had done (they come again, in the
    same order, and are passed over); ``checkpoint(batches done, sums, data wait)`` is called
    every ``spec.train.checkpoint_every_steps`` batches, at an optimizer step, on every rank."""
    model, device, rank, world = trainee.model, trainee.device, trainee.rank, trainee.world
    torch.manual_seed(spec.seed * 100003 + epoch * 7919 + rank)
    start = 0
    train_sums: dict[str, torch.Tensor] = {}
    waited = 0.0
    if resume is not None:
        start, waited = resume.step, resume.waited
        torch.set_rng_state(resume.rng)
        if resume.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        train_sums = {k: v.to(device) for k, v in resume.sums.items()}
    model.train()
    trainee.optimizer.zero_grad(set_to_none=True)
    every, last = spec.train.checkpoint_every_steps, task.steps_per_epoch(world)
    t0 = time.perf_counter()
    batches, guard, pending = iter(task.train_batches(epoch, rank, world)), Guard(), False
    for step in itertools.count():
        t_wait = time.perf_counter()
        batch = next(batches, None)
        if step < start and batch is not None:
            continue  # done before the step checkpoint
        waited += time.perf_counter() - t_wait
        if batch is None:
            break
        if step == 0:
            train_sums["first_batch_s"] = torch.tensor(time.perf_counter() - t0)
        update = (step + 1) % spec.train.accumulate_steps == 0
        _accumulate(train_sums, train_step(spec, task, trainee, batch, guard=guard, step=step, update=update))
        pending = not update
        if progress is not None:
            progress.step(epoch, step, task, train_sums)
        if (step + 1) % spec.sync_every == 0:
            _stop_if_not_finite(spec, task, guard, epoch, world)
        if checkpoint is not None and every and update and (step + 1) % every == 0 and step + 1 < last:
            _stop_if_not_finite(spec, task, guard, epoch, world)  # a bad step never reaches a checkpoint
            checkpoint(step + 1, train_sums, waited)
    _stop_if_not_finite(spec, task, guard, epoch, world)  # (a host sync: the epoch's time below is real on a GPU)
    if pending:
        apply_update(spec, trainee)
    train_sums["data_wait_s"] = torch.tensor(waited)  # blocked on the input pipeline
    # the epoch's optimizer steps (batches done, those before a resume included), so that the
    # images each step trained on over all workers are counted, not assumed
    train_sums["optimizer_updates"] = torch.tensor(float(math.ceil(step / spec.train.accumulate_steps)))
    seconds = time.perf_counter() - t0
    model.eval()
    val_sums: dict[str, torch.Tensor] = {}
    t_val = time.perf_counter()
    with torch.no_grad(), spec.autocast(device):
        for batch in task.val_batches(rank, world):
            _accumulate(val_sums, task.val_step(model, batch, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # (the validation's time below is real on a GPU)
    return EpochSums(train_sums, val_sums, seconds, time.perf_counter() - t_val)


def _stop_if_not_finite(spec: LoopSpec, task: TrainTask, guard: Guard, epoch: int, world: int = 1) -> None:
    found = guard.check()
    if found is None:
        return
    step, names = found
    what = "loss" if names == ["loss"] else f"{', '.join(names)} term{'s' if len(names) > 1 else ''}"
    at = f"global step {epoch * task.steps_per_epoch(world) + step}; " if hasattr(task, "steps_per_epoch") else ""
    raise FloatingPointError(f"{spec.stage}: non-finite {what} at epoch {epoch + 1} step {step} "
                             f"({at}the checkpoints of earlier epochs are kept)")


def epoch_metrics(spec: LoopSpec, task: TrainTask, sums: EpochSums, epoch: int, lr: float, *, world: int = 1,
                  device: torch.device | None = None, val_out: dict | None = None, timings: dict | None = None) -> dict:
    """The epoch's metrics from every worker's sums (one all-reduce); ``val_out`` receives the
    validation sums added up over the workers, as lists (the checkpoint keeps them: stage 1's
    figures are drawn from them, not from another pass over the data on the driver).
    ``timings``: this rank's seconds spent outside the training steps (validation, the last
    checkpoint and report, the start-up), shown as they are."""
    reduced = _reduce_sums({**{f"train/{k}": v for k, v in sums.train.items()},
                            **{f"val/{k}": v for k, v in sums.val.items()},
                            "seconds": torch.tensor(sums.seconds)}, device or torch.device("cpu"))
    reduced = {k: v.cpu() for k, v in reduced.items()}  # once per epoch

    def split(prefix):
        return {k[len(prefix) + 1:]: v for k, v in reduced.items() if k.startswith(prefix + "/")}

    train = split("train")
    if val_out is not None:
        val_out.update({k: v.tolist() for k, v in split("val").items()})
    waits = {k: float(train.pop(k)) / world for k in PER_RANK if k in train}
    metrics = {**task.summarize("train", train), **task.summarize("val", split("val")), **waits}
    mean_seconds = float(reduced["seconds"]) / world  # workers step in lockstep
    metrics.update(epoch=epoch, lr=lr, epoch_seconds=mean_seconds,
                   images_per_s=float(reduced["train/count"]) / max(mean_seconds, 1e-9), **(timings or {}))
    if waits.get("optimizer_updates"):  # the global batch as trained: every worker's images of one step
        metrics["images_per_update"] = float(reduced["train/count"]) / waits["optimizer_updates"]
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{spec.stage}: metric {k} is not finite at epoch {epoch + 1}")
    return metrics


def _report(spec: LoopSpec, trainee: Trainee, metrics: dict, epoch: int, *, nodes: list[str],
            val_sums: dict | None = None, best: BestEpoch | None = None, left: str = "") -> None:
    """Rank 0: log the epoch, save its checkpoint (with the record of the best epoch so far)
    and report both to Ray Train."""
    import ray.train

    if spec.report is not None:  # (MLflow, from this worker)
        spec.report(metrics, epoch)
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                     if k.startswith(("train_loss", "val_")) and "level" not in k and "group" not in k
                     and not k.endswith("_seconds"))
    done = "done" if epoch + 1 == spec.epochs else f"{left} left"
    log(f"[{spec.stage}] epoch {epoch + 1}/{spec.epochs} {shown} {metrics['images_per_s']:.0f} items/s, {done}")
    with tempfile.TemporaryDirectory() as tmp:
        state = _state(trainee, best, epoch)
        meta = {"epoch": epoch, "model_config": spec.model_config, "metrics": metrics, "nodes": nodes,
                "val_sums": val_sums or {}}
        checkpoints.save(Path(tmp), state, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if spec.train.checkpoint_every_steps:
        checkpoints.prune_steps(spec.storage_path, spec.name)  # the epoch's end supersedes its steps


def _show(spec: LoopSpec, task: TrainTask, core, device, epoch: int) -> None:
    """Rank 0: the task's pictures of this epoch to the tracker, at the epoch's step (when the
    reporter takes pictures: MLflow's does)."""
    show = getattr(spec.report, "images", None)
    if show is not None:
        pictures = task.epoch_images(core, device)
        if pictures:
            show(pictures, epoch)


def train_worker(spec: LoopSpec) -> None:
    """The function every Ray Train worker runs."""
    entered = time.time()
    import ray.train
    import ray.train.torch

    _quiet_ray_train()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = spec.make_task(**spec.task_args)
    reports = StartReports(spec.report) if rank == 0 and spec.report is not None else None
    started = _start(spec, task, rank, world, reports)
    trainee, resume, best = started.trainee, started.resume, started.best
    start_epoch, core, device = started.start_epoch, trainee.core, trainee.device
    nodes = _worker_nodes()
    # where the time outside the training steps goes (rank 0's clocks; reported with each epoch):
    # the start-up (the driver's fit call to a built, restored, wrapped model on every worker;
    # of it, Ray Train's part: the fit call to this function's first line) and the previous
    # epoch's checkpoint and reports
    timings = {"startup_seconds": time.time() - spec.launched_at,
               "entered_seconds": entered - spec.launched_at} if spec.launched_at else {}
    steps = task.steps_per_epoch(world)
    progress = Progress(spec, steps, start_epoch, task.batch_size * world) if rank == 0 else None
    if rank == 0:
        log(f"[{spec.stage}] model: {summary(core)}")
    for epoch in range(start_epoch, spec.epochs):
        lr = resume.lr if resume is not None else trainee.optimizer.param_groups[0]["lr"]  # (at the epoch's start)

        def step_checkpoint(done: int, sums: dict, waited: float, epoch=epoch, lr=lr) -> None:
            mine = {"rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "sums": {k: v.detach().cpu() for k, v in sums.items()}, "waited": waited}
            ranks = _gather(mine)
            if rank == 0:
                state = _state(trainee, best, epoch)
                state["ranks"] = ranks
                meta = {"model_config": spec.model_config, "metrics": {}, "nodes": nodes, "epoch_lr": lr}
                checkpoints.save_step(spec.storage_path, spec.name, epoch, done, state, meta)

        sums = run_epoch(spec, task, trainee, epoch, resume=resume, checkpoint=step_checkpoint, progress=progress)
        timings["val_seconds"] = sums.val_seconds
        resume = None
        val_out: dict = {}
        metrics = epoch_metrics(spec, task, sums, epoch, lr, world=world, device=device, val_out=val_out,
                                timings=timings)
        t_report = time.perf_counter()
        if rank == 0:
            if reports is not None:
                reports.join()
                reports = None
            best.update(epoch, metrics, core.state_dict())
            _report(spec, trainee, metrics, epoch, nodes=nodes, val_sums=val_out, best=best, left=progress.eta())
            _show(spec, task, core, device, epoch)
        else:
            ray.train.report(metrics)
        timings = {"report_seconds": time.perf_counter() - t_report}
    if reports is not None:  # (no epoch left to train: a resumed run that had finished)
        reports.join()


def summary(model) -> str:
    """Parameters in all and per top-level part, e.g. "1,234,567 parameters: encoder 600,000, ..."."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    parts = [(name, count(child)) for name, child in model.named_children() if count(child)]
    while len(parts) == 1:  # (one container, e.g. a list of priors: its parts instead)
        inner = dict(model.named_children())[parts[0][0]]
        named = [(f"{parts[0][0]}.{n}", count(c)) for n, c in inner.named_children() if count(c)]
        if not named:
            break
        model, parts = inner, named
    shown = ", ".join(f"{name} {n:,}" for name, n in parts[:12]) + (", ..." if len(parts) > 12 else "")
    return f"{total:,} parameters" + (f": {shown}" if len(parts) > 1 else "")


def _state(trainee: Trainee, best: BestEpoch | None = None, epoch: int = 0) -> dict:
    state = {"model": trainee.core.state_dict(), "optimizer": trainee.optimizer.state_dict(),
             "scheduler": trainee.scheduler.state_dict()}
    if trainee.scaler is not None:
        state["scaler"] = trainee.scaler.state_dict()
    if best is not None:
        state.update(best.state(epoch))
    return state


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _worker_entry(config: dict) -> None:
    train_worker(config["spec"])


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank)."""
    import ray

    return _gather(ray.get_runtime_context().get_node_id())


# ---- the driver side -------------------------------------------------------------------

@dataclass
class Fitted:
    """What a fit ended with: the final state and meta, the checkpoint they came from, and the
    weights the stage hands on (``train.keep``: the best validation epoch's or the last's)."""

    state: dict
    meta: dict
    checkpoint: str
    metrics: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    kept: str = ""  # which epoch the weights are from, and why

    @property
    def tags(self) -> dict[str, str]:
        nodes = self.meta.get("nodes")
        return {"hvae.checkpoint": self.checkpoint, "hvae.kept": self.kept,
                **({"hvae.worker_nodes": ",".join(nodes)} if nodes else {})}


def _fit_interruptibly(trainer) -> None:
    """``trainer.fit()``, interruptible: called from the main thread, Ray Train installs a SIGINT
    handler that swallows Ctrl-C (it aborts the controller and exits, and the caller never
    hears of it). Run there, in a helper thread, it installs none: the main thread waits and
    receives the KeyboardInterrupt (or the SIGTERM the CLI turns into one) itself, and the
    caller stops Ray's workers. (A sweep's trials already run in Tune's threads.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        trainer.fit()
        return
    outcome: dict = {}

    def target():
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    helper = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.2)
    if "error" in outcome:
        raise outcome["error"]


def planned_steps(spec: LoopSpec, world: int) -> str:
    """The line that says how long a training stage is, in the units that decide what it
    learns: epochs, batches per worker and optimizer steps."""
    task = spec.make_task(**spec.task_args)  # (a task's constructor only keeps its arguments)
    batches = task.steps_per_epoch(world)
    steps = spec.epochs * math.ceil(batches / spec.train.accumulate_steps)
    accumulate = f", {spec.train.accumulate_steps} batches a step" if spec.train.accumulate_steps > 1 else ""
    return (f"{spec.epochs} epoch{'s' if spec.epochs != 1 else ''} x {batches} batches of {task.batch_size} per "
            f"worker on {world} worker{'s' if world != 1 else ''}{accumulate} = {steps:,} optimizer steps")


def fit(spec: LoopSpec, *, name: str, storage_path: str, cluster, datasets: dict | None = None,
        callbacks: list | None = None) -> Fitted:
    """Run ``train_worker`` on a TorchTrainer (``cluster``: the config's cluster section) and
    return the state of the last epoch reached. ``callbacks``: extra Ray Train callbacks, e.g.
    Tune's reporter when the fit is a sweep trial."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault(*HEALTH_CHECK_INTERVAL)
    spec = replace(spec, storage_path=storage_path, name=name, launched_at=time.time())
    print(f"[hvae] {spec.stage}: {planned_steps(spec, cluster.num_workers)}", flush=True)
    resources = {"CPU": cluster.cpus_per_worker, **({"GPU": 1} if cluster.use_gpu else {})}
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"spec": spec},
        datasets=datasets,
        # blocks reach the workers in file order and are shared out by row counts: the same
        # shards every run, so the seeded shuffles (and an exact resume) repeat
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
    )
    t0 = time.perf_counter()
    _fit_interruptibly(trainer)
    seconds = time.perf_counter() - t0
    found = checkpoints.newest(storage_path, name)
    if found is None:
        raise RuntimeError(f"training {name} ended without a checkpoint")
    state, meta = found.load()
    metrics = {k: float(v) for k, v in meta["metrics"].items() if not k.endswith(("startup_seconds", "entered_seconds", "report_seconds"))}
    weights, kept_metrics, line = kept(state, meta, spec.train.keep, getattr(spec.make_task, "select_metric", "val_loss"))
    # the LR schedule moves once per optimizer step: its count is the steps trained, resumes included
    steps = {"optimizer_steps": float(state["scheduler"]["last_epoch"])} if "scheduler" in state else {}
    return Fitted(state, meta, found.path, {**metrics, **kept_metrics, **steps, "fit_seconds": seconds}, weights, line)
