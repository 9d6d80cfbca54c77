"""What a sweep's Tune trials are made of: the trial function, what it reports, where it runs,
how many run at once, and the ASHA rungs that outlive an interrupted sweep.

Placement under Ray Train V2: a trial is a Tune function trainable whose TorchTrainer builds
its *own* placement group for its workers (``ray/train/v2/.../worker_group.py``,
``_create_placement_group``), outside the trial's; a Tune bundle for the workers would reserve
them twice. So a trial declares two things: its driver bundle to Tune (memory only, no CPU:
every CPU is left to workers, and any node can host it, not just one holding a custom
resource) and its worker bundles (CPUs, GPUs) in the trainer's ScalingConfig. How many trials
run at once is decided from the cluster as it is whenever Tune asks for the next trial
(``ClusterPacedVariants``): a cluster that grows (an autoscaler answering the first trial's
pending worker placement group) runs more.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.train.v2.api.callback import UserCallback

from hvae.settings.config import PipelineConfig, set_key

TAG_TRIAL = "hvae.trial_id"
TAG_SWEEP = "hvae.sweep"
# a trial driver's process: Tune's trial actor, the Train controller's handle and, when the fit
# ends, the stage's model on CPU for its figures
DRIVER_MEMORY = 1 << 30
TIME_ATTR = "epochs_done"  # ASHA's clock: epochs the trial's model has trained, resumed or not
CHECKPOINT_FILE = "trial_checkpoint.json"


@dataclass
class TrialContext:
    """What every trial needs from the sweep driver (shipped once through the object store)."""

    base: dict  # the resolved config, without its sweep section
    stage: str
    sweep_run: str
    data: object  # the prepared dataset (stages.data.DataSpec: names and counts)
    upstream: dict  # upstream stage -> (run id, output folder on shared storage)
    work: str
    datasets: dict  # the swept stage's training datasets, built once by the sweep driver for every trial


def trial_config(base: dict, params: dict) -> PipelineConfig:
    raw = base
    for key, value in params.items():
        raw = set_key(raw, key.split("."), value)
    return PipelineConfig.model_validate(raw)


def driver_bundle() -> dict:
    return {"memory": DRIVER_MEMORY}


def worker_bundle(cluster_cfg) -> dict:
    return {"CPU": cluster_cfg.cpus_per_worker, **({"GPU": 1.0} if cluster_cfg.use_gpu else {})}


def trials_that_fit(cluster_cfg, nodes: list[dict] | None = None) -> int:
    """Trials whose workers the cluster's alive nodes can hold at once, bundle by bundle on each
    node (each worker of a trial on its own node under STRICT_SPREAD), each with its driver's
    memory somewhere."""
    import ray

    nodes = [n["Resources"] for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive")]
    bundle, n = worker_bundle(cluster_cfg), cluster_cfg.num_workers
    per_node = [min(math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for res in nodes]
    by_workers = sum(per_node) // n
    if cluster_cfg.placement_strategy == "STRICT_SPREAD":  # t trials: a node gives each at most one worker
        by_workers = max([t for t in range(by_workers + 1) if sum(min(w, t) for w in per_node) >= t * n])
    by_memory = sum(int(res.get("memory", 0.0) // DRIVER_MEMORY) for res in nodes)
    return min(by_workers, by_memory)


class ClusterPacedVariants(BasicVariantGenerator):
    """Tune's grid/random generator, with the number of live trials capped by what the cluster
    holds *now* (looked up at most every ``every`` seconds) and by ``cap`` (the config's
    ``sweep.max_concurrent_trials``). At least one trial always runs: on a cluster that scales
    from zero, its pending worker placement group is what asks the autoscaler for nodes."""

    def __init__(self, cluster_cfg, cap: int | None, every: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self._cluster, self._cap, self._every = cluster_cfg, cap, every
        self._checked = -math.inf

    def next_trial(self):
        now = time.monotonic()
        if now - self._checked >= self._every:
            self._checked = now
            fits = max(1, trials_that_fit(self._cluster))
            self.max_concurrent = min(fits, self._cap) if self._cap else fits
        return super().next_trial()


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive ``Tuner.restore``: Tune's experiment snapshot keeps the trials
    and the search state but not the scheduler's, so a restored sweep would otherwise judge its
    next trials against empty rungs. The rungs are written to ``state_file`` (JSON) after every
    result and read back the first time the scheduler meets a trial."""

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file = state_file
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_file)
        if path.is_file():
            saved = json.loads(path.read_text())
            for bracket, rungs in zip(self._brackets, saved["brackets"]):
                for (_, recorded), (_, values) in zip(bracket._rungs, rungs):
                    recorded.update(values)

    def _save(self) -> None:
        state = {"brackets": [[[m, dict(r)] for m, r in b._rungs] for b in self._brackets]}
        path = Path(self._state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


class EpochReporter(UserCallback):
    """Ray Train callback (in the trial's Train controller): rank 0's epoch metrics and the
    path of the checkpoint reported with them go to the trial's function through a Ray queue,
    which reports them to Tune with a checkpoint of its own (``report_epochs``)."""

    def __init__(self, queue):
        self._queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self._queue.put((dict(metrics[0]), checkpoint.path if checkpoint else None))


def report_epochs(work, queue, reported: int) -> None:
    """Run ``work()`` (the stage's fit -> its final metrics) in a thread and report every epoch
    it sends through ``queue`` to Tune, each with a Tune checkpoint naming the Train checkpoint
    it reached: a restored sweep hands it back to the trial (``tune.get_checkpoint``) and Tune's
    clock goes on from there. ``reported``: the last epoch Tune has (-1: none). A stage that
    ends past it without a report (a restored trial whose fit had ended before the cut, or
    ended while Tune was being told) reports its final metrics. Re-raises what ``work`` raised."""
    from ray import tune

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["final"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the trial's thread below
            outcome["error"] = exc
        finally:
            queue.put(None)

    def report(metrics: dict, train_checkpoint: str | None) -> int:
        epoch = int(metrics["epoch"])
        metrics = {**metrics, TIME_ATTR: epoch + 1}
        if train_checkpoint is None:
            tune.report(metrics)
            return epoch
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, CHECKPOINT_FILE).write_text(json.dumps({"epoch": epoch, "train_checkpoint": train_checkpoint}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        return epoch

    thread = threading.Thread(target=target, name="hvae-trial-fit", daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        reported = report(*item)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    final = outcome.get("final") or {}
    if "epoch" in final and int(final["epoch"]) > reported:
        report(final, final.get("checkpoint"))


def resumed_from() -> dict | None:
    """In a trial restored from a checkpoint: what that checkpoint recorded, else None."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads(Path(folder, CHECKPOINT_FILE).read_text())


def run_trial(params: dict, ctx: TrialContext) -> None:
    """One trial (in a Tune trial actor): the swept stage exactly as the pipeline runs it, as an
    MLflow child run of the sweep run; settings trained before are replayed, not retrained."""
    from filelock import FileLock
    from ray import tune
    from ray.util.queue import Queue

    from .liveness import TAG_DRIVER, this_driver
    from .plan import plan
    from .runner import StageFailed, execute_stage, local_area
    from .tracking import Tracker

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # (not a line per persisted Tune checkpoint)
    cfg = trial_config(ctx.base, params)
    trial_id = tune.get_context().get_trial_id()
    planned = plan(cfg, ctx.data.fingerprint, until=ctx.stage)[-1]
    tracker = Tracker(cfg.tracking)
    locks = local_area(cfg.cluster.storage_path) / "locks"
    with FileLock(str(locks / f"{planned.checkpoint_name}.lock")):
        found = tracker.find_finished(ctx.stage, planned.fingerprint, {u: run for u, (run, _) in ctx.upstream.items()})
        if found is not None:  # the same settings were trained before: replay its curve to Tune
            _replay(tracker, found)
            tracker.set_tags(found.info.run_id, {f"{TAG_TRIAL}.{ctx.sweep_run}": trial_id})
            return
        earlier = resumed_from()
        if earlier is not None:
            print(f"[hvae] trial {trial_id}: restored after epoch {earlier['epoch'] + 1} "
                  f"(Train checkpoint {earlier['train_checkpoint']})", flush=True)
        queue = Queue(actor_options={"num_cpus": 0})

        def work() -> dict:
            try:
                executed = execute_stage(
                    tracker, cfg, planned, parent_id=ctx.sweep_run, data=ctx.data, upstream=ctx.upstream,
                    out_dir=Path(ctx.work) / trial_id / ctx.stage, callbacks=[EpochReporter(queue)],
                    datasets=ctx.datasets,
                    tags={TAG_DRIVER: this_driver(), TAG_TRIAL: trial_id, TAG_SWEEP: ctx.sweep_run,
                          "hvae.trial_params": json.dumps(params, sort_keys=True)})
            except StageFailed as exc:
                raise RuntimeError(str(exc)) from None
            return {**executed.result.metrics, "checkpoint": executed.result.tags.get("hvae.checkpoint")}

        report_epochs(work, queue, earlier["epoch"] if earlier else -1)


def _replay(tracker, run) -> None:
    from ray import tune

    from .tracking import plain

    steps: dict[int, dict] = {}
    for key in (k for k in plain(run.data.metrics) if k.startswith(("val_", "train_"))):
        for m in tracker.metric_history(run.info.run_id, key):
            steps.setdefault(m.step, {})[key] = m.value
    for step in sorted(steps):
        tune.report({**steps[step], "epoch": step, TIME_ATTR: step + 1})
