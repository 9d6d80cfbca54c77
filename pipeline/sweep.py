"""``hvae sweep``: a Ray Tune search over the settings of one training stage.

The sweep's upstream stages (stage 1 and extract, for a prior sweep) run once through the
normal pipeline, reused when they exist. Each trial is a Tune function trainable that runs
the swept stage exactly as the pipeline would (``runner.execute_stage``): one TorchTrainer
whose Ray Train callback forwards rank 0's epoch metrics to Tune, so ASHA can stop it; its
MLflow child run sits under the sweep's parent run and carries the stage's usual
fingerprint. Because of that fingerprint, ``sweep.then: pipeline`` simply runs the pipeline
on the best trial's config: the runner finds the best trial's finished run and reuses its
model instead of training it again. Trials, their placement and their checkpoints are in
``pipeline/trials.py``.

A sweep that was cut (Ctrl-C, a killed driver) is resumed by the same command: its MLflow
run is reopened and Tune's experiment restored (``Tuner.restore``), so finished trials are
not run again, cut ones go on from their last checkpoint and ASHA keeps its rungs.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
import time
from datetime import datetime
from pathlib import Path

from hvae.stages import families
from hvae.stages.data import join

from hvae.settings import graph

from . import datasets, whole_files
from hvae.settings.config import PipelineConfig, to_yaml
from .masking import mask
from .liveness import TAG_DRIVER, Heartbeat, this_driver
from .manifest import ManifestError
from .runner import _Fetcher, local_area, mark_dead_runs_killed, not_reusing, resolve_paths, run_pipeline
from .tracking import JOB_ENV, TAG_JOB
from .trials import (TAG_SWEEP, TAG_TRIAL, TIME_ATTR, ClusterPacedVariants, ResumableASHA, TrialContext, driver_bundle,
                     run_trial, trial_config, trials_that_fit, worker_bundle)

TAG_EARLY = "hvae.early_stopped"
TAG_KEY = "hvae.sweep_key"  # the sweep's config and data: an interrupted sweep with this key is resumed
SNAPSHOT_SECONDS = "1"  # how often Tune saves its experiment state (env TUNE_GLOBAL_CHECKPOINT_S overrides)


def search_space(sweep) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, spec in sweep.space.items() for kind, values in spec.items()}


def _epochs(cfg: PipelineConfig, stage: str) -> int:
    return int(getattr(cfg, stage).epochs)


def sweep_key(cfg: PipelineConfig, data_fingerprint: str) -> str:
    """What makes two ``hvae sweep`` commands the same sweep: the whole resolved config (its
    sweep section included) and the data."""
    text = json.dumps([cfg.model_dump(mode="json"), data_fingerprint], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _trial_runs(tracker, sweep_run: str) -> dict[str, object]:
    """trial id -> its MLflow run (including earlier runs a trial reused)."""
    found = {}  # (newest first: a trial cut by an interrupted sweep has a KILLED run before its last)
    for run in tracker.search([f"tags.`{TAG_SWEEP}` = '{sweep_run}'", f"tags.`{TAG_TRIAL}` != ''"]):
        found.setdefault(run.data.tags.get(TAG_TRIAL), run)
    for run in tracker.search([f"tags.`{TAG_TRIAL}.{sweep_run}` != ''"]):
        found.setdefault(run.data.tags[f"{TAG_TRIAL}.{sweep_run}"], run)
    return found


def _rows(results, runs: dict, sweep, base: dict, tracker) -> list[dict]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = {k: v for k, v in (result.config or {}).items()}
        epochs = _epochs(trial_config(base, params), sweep.stage)
        run = runs.get(trial_id)
        done = int(metrics.get("epoch", -1)) + 1  # (not Tune's iteration count: a resumed trial reports fewer)
        if result.error is not None:
            status = "ERROR"
        elif run is not None and run.data.tags.get(TAG_SWEEP) is None:
            status = "REUSED"
        elif done < epochs:
            status = "EARLY_STOPPED"
        else:
            status = "FINISHED"
        rows.append({"trial": trial_id, "params": params, "epochs": done, "of": epochs, "status": status,
                     "value": metrics.get(sweep.metric), "run": run.info.run_id if run else None,
                     "error": str(result.error).strip().splitlines()[-1] if result.error else None})
    return rows


def _table(rows: list[dict], sweep) -> str:
    keys = list(sweep.space)
    head = ["trial", *keys, "epochs", sweep.metric, "status", "MLflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], (int, float)) else "-"
        cells = [r["trial"], *(_fmt(r["params"].get(k)) for k in keys), f"{r['epochs']}/{r['of']}",
                 value, r["status"], r["run"] or "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    """A value for the table (short)."""
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v, separators=(",", ":"))


def _override(key: str, v) -> str:
    """key=value exactly as sampled, so `hvae run ... key=value` has the trial's fingerprint."""
    return f"{key}={repr(v) if isinstance(v, float) else json.dumps(v, separators=(',', ':'))}"


def _best(rows: list[dict], mode: str) -> dict | None:
    done = [r for r in rows if r["status"] in ("FINISHED", "REUSED") and isinstance(r["value"], (int, float))]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r["value"])


def _open_sweep(tracker, cfg: PipelineConfig, config_path: str | None, key: str) -> tuple[str, bool]:
    """-> (the sweep's MLflow run, whether it resumes an interrupted one). The newest sweep
    with the same key that was cut (KILLED) and left a Tune experiment to restore is reopened;
    otherwise a new sweep run starts."""
    from ray import tune

    for run in tracker.search([f"tags.`{TAG_KEY}` = '{key}'"])[:1]:
        fs, path = _experiment(cfg, run.info.run_id)
        if run.info.status == "KILLED" and tune.Tuner.can_restore(path, storage_filesystem=fs):
            tracker.reopen(run.info.run_id, {TAG_DRIVER: this_driver()})
            print(f"[hvae] resuming the interrupted sweep {run.info.run_id} in experiment "
                  f"'{tracker.experiment_name}' ({tracker.uri})")
            return run.info.run_id, True
    sweep = cfg.sweep
    job = os.environ.get(JOB_ENV)
    sweep_run = tracker.start_parent(
        f"sweep-{sweep.stage}-{datetime.now():%Y%m%d-%H%M%S}", {"sweep": sweep.model_dump(mode="json")},
        tags={"hvae.kind": "sweep", "hvae.sweep_stage": sweep.stage, "hvae.dataset": cfg.data.dataset,
              "hvae.model": families.of(cfg).name, TAG_DRIVER: this_driver(), TAG_KEY: key,
              **({TAG_JOB: job} if job else {}),
              **({"hvae.config_file": config_path} if config_path else {})})
    tracker.log_text(sweep_run, mask(to_yaml(cfg)), "config.yaml")
    print(f"[hvae] MLflow sweep run {sweep_run} in experiment '{tracker.experiment_name}' ({tracker.shown_uri})")
    return sweep_run, False


def _experiment(cfg: PipelineConfig, sweep_run: str):
    """Where Tune keeps the sweep's experiment state (and each trial's checkpoints) -> (the
    filesystem Tune writes it through, the folder). A local storage path goes through
    ``whole_files``: a driver killed while Tune copies its snapshot there must not leave empty
    state files behind."""
    fs, root = whole_files.storage(cfg.cluster.storage_path)
    return fs, join(root, f"sweep-{sweep_run}")


def _fixed_stages(tracker, cfg: PipelineConfig, sweep_run: str, work: Path) -> tuple[int, dict]:
    """The stages before the swept one run once through the pipeline (reused when they exist)
    -> (exit code, {stage: (run id, output folder)})."""
    order = [st.name for st in graph.for_family(families.of(cfg))]
    stages = order[: order.index(cfg.sweep.stage)]
    if not stages:
        return 0, {}
    print(f"[hvae] sweep: the fixed stages before {cfg.sweep.stage} ({', '.join(stages)})")
    fetch = _Fetcher(tracker, work / "inputs")
    for _ in range(len(stages) + 1):  # (a reused run found corrupt when downloaded whole: tagged, made again)
        fixed = run_pipeline(cfg, until=stages[-1], parent_of=sweep_run, extra_tags={TAG_SWEEP: sweep_run})
        if fixed.code != 0:
            return fixed.code, {}
        try:
            return 0, {name: (fixed.run_ids[name], fetch(fixed.run_ids[name])) for name in stages}
        except ManifestError as exc:
            bad = next(name for name in stages if fixed.run_ids[name] not in fetch.cache)
            not_reusing(tracker, bad, fixed.run_ids[bad], exc)
    print("error: the store keeps giving corrupt artifacts: the sweep did not start")
    return 1, {}


def _tuner(cfg: PipelineConfig, ctx: TrialContext, resume: bool):
    """A new Tuner for the sweep, or the interrupted one restored (``Tuner.restore``): finished
    trials stay finished, cut ones go on from their last checkpoint, the search and the ASHA
    rungs where they were."""
    from ray import tune

    sweep = cfg.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    tune.PlacementGroupFactory([driver_bundle()]))
    fs, path = _experiment(cfg, ctx.sweep_run)
    if resume:
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    swept_epochs = [max(v) for k, s in sweep.space.items() if k == f"{sweep.stage}.epochs" for v in s.values()]
    max_t = max([_epochs(cfg, sweep.stage), *swept_epochs])
    # (max_t one past the last epoch: ASHA stops a trial that reaches max_t, and a finished trial
    # must be left to save its model and close its run)
    scheduler = (ResumableASHA(str(local_area(path) / "asha_rungs.json"), time_attr=TIME_ATTR, max_t=max_t + 1,
                               grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else tune.schedulers.FIFOScheduler())
    search = ClusterPacedVariants(cfg.cluster, sweep.max_concurrent_trials, random_state=sweep.seed)
    return tune.Tuner(
        trainable, param_space=search_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                    scheduler=scheduler, search_alg=search),
        # (every Tune checkpoint is kept, each a few bytes naming a Train checkpoint: with
        # num_to_keep, Tune deletes the older one before its next experiment snapshot names the
        # newer, and a sweep killed in between cannot be restored)
        run_config=tune.RunConfig(name=posixpath.basename(path), storage_path=posixpath.dirname(path),
                                  storage_filesystem=fs, verbose=0),
    )


def _close_trials(tracker, rows: list[dict], runs: dict, sweep) -> None:
    """Every trial's run ends FINISHED, FAILED or KILLED; a trial ASHA stopped is KILLED and tagged."""
    for r in rows:
        run = runs.get(r["trial"])
        if run is None:
            continue
        if r["status"] == "EARLY_STOPPED" and run.info.status in ("RUNNING", "FAILED"):
            # Tune ended the trial: either its actor went before the run could close, or its
            # TrainController went first (removed with the trial's placement group) and the
            # trial saw that as a failure. Either way the run was stopped, not broken.
            tracker.set_tags(run.info.run_id, {TAG_EARLY: f"{sweep.scheduler} after epoch {r['epochs']} of {r['of']}"})
            tracker.delete_tag(run.info.run_id, "hvae.error")
            tracker.finish(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            tracker.finish(run.info.run_id, "KILLED")


def _record_best(tracker, sweep_run: str, rows: list[dict], sweep, config_path, seconds: float) -> dict | None:
    """Log the trials' table and the best trial on the sweep run, print them -> the best row."""
    table = _table(rows, sweep)
    tracker.log_text(sweep_run, table, "sweep_table.md")
    print("\n" + table)
    best = _best(rows, sweep.mode)
    if best is None:
        tracker.finish(sweep_run, "FAILED")
        errors = [r["error"] for r in rows if r["error"]]
        print("error: no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
        return None
    overrides = " ".join(_override(k, v) for k, v in best["params"].items())
    tracker.set_tags(sweep_run, {"hvae.best_trial": best["trial"], "hvae.best_run": best["run"] or "",
                                 "hvae.best_overrides": overrides})
    tracker.log_metrics(sweep_run, {f"best_{sweep.metric}": best["value"], "sweep_seconds": seconds,
                                    "trials": float(len(rows)),
                                    "early_stopped": float(sum(r["status"] == "EARLY_STOPPED" for r in rows))})
    print(f"best trial {best['trial']} ({sweep.metric}={best['value']:.4f}, MLflow run {best['run']}): {overrides}")
    print(f"the same as a pipeline: hvae run {config_path or ''} {overrides}".replace("  ", " "))
    tracker.finish(sweep_run)
    return best


def run_sweep(cfg: PipelineConfig, *, config_path: str | None = None) -> int:
    from .tracking import Tracker

    # Tune's view of the sweep (trials, their latest checkpoints, the search) is saved this often
    # (default 10 s): a killed sweep resumes from at most this far back
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_SECONDS)
    cfg = resolve_paths(cfg)
    base = cfg.model_dump(mode="json", exclude={"sweep"})
    t0 = time.perf_counter()
    try:
        data = datasets.prepare(cfg.data, cfg.cluster.storage_path)
    except datasets.DataError as exc:
        print(f"error: {exc}")
        return 2
    tracker = Tracker(cfg.tracking)
    for run_id in mark_dead_runs_killed(tracker):
        print(f"[hvae] run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    sweep_run, resume = _open_sweep(tracker, cfg, config_path, sweep_key(cfg, data.fingerprint))
    with Heartbeat(tracker.uri, sweep_run):
        return _sweep(tracker, cfg, base, data, sweep_run, resume, config_path=config_path, t0=t0)


def _sweep(tracker, cfg: PipelineConfig, base: dict, data, sweep_run: str, resume: bool, *, config_path: str | None,
           t0: float) -> int:
    """The sweep under its open MLflow run: fixed upstream stages, the trials, the best one."""
    from .raycluster import connect, resolve_layout

    sweep = cfg.sweep
    work = local_area(cfg.cluster.storage_path) / "outputs" / sweep_run
    code, upstream = _fixed_stages(tracker, cfg, sweep_run, work)
    if code != 0:
        tracker.finish(sweep_run, "FAILED")
        return code

    connect(cfg.cluster)
    cfg = cfg.model_copy(update={"cluster": resolve_layout(cfg.cluster)})  # (num_workers=auto: as each trial resolves it)
    fits = trials_that_fit(cfg.cluster)
    if fits < 1 and cfg.cluster.address is None:  # (a cluster we joined may grow; the local Ray cannot)
        tracker.finish(sweep_run, "FAILED")
        print(f"error: one trial needs {cfg.cluster.num_workers} workers of {worker_bundle(cfg.cluster)}, more than "
              f"this machine has: lower cluster.num_workers or cluster.cpus_per_worker")
        return 2
    stage = next(st for st in graph.for_family(families.of(cfg)) if st.name == sweep.stage)
    shared = importlib.import_module(stage.module).training_datasets(data, {u: upstream[u][1] for u in stage.upstream})
    ctx = TrialContext(base=base, stage=sweep.stage, sweep_run=sweep_run, data=data, upstream=upstream,
                       work=str(work), datasets=shared)
    cap = f", at most {sweep.max_concurrent_trials}" if sweep.max_concurrent_trials else ""
    print(f"[hvae] sweep: {sweep.stage} over {', '.join(sweep.space)}; {sweep.scheduler} on {sweep.metric} "
          f"({sweep.mode}); as many trials at once as the cluster holds{cap} (now {max(fits, 1)})")
    try:
        results = _tuner(cfg, ctx, resume).fit()
    except KeyboardInterrupt:
        results = None
    if results is None or len(results) > results.num_terminated + results.num_errors:
        _close_runs(tracker, sweep_run, "KILLED")
        print(f"\n[hvae] sweep interrupted; its trials' runs marked KILLED. The same command resumes it "
              f"(hvae sweep {config_path or 'CONFIG'} ...)")
        return 130

    runs = _trial_runs(tracker, sweep_run)
    rows = _rows(list(results), runs, sweep, base, tracker)
    _close_trials(tracker, rows, runs, sweep)
    best = _record_best(tracker, sweep_run, rows, sweep, config_path, time.perf_counter() - t0)
    if best is None:
        return 1
    if sweep.then == "pipeline":
        print(f"[hvae] sweep.then=pipeline: the rest of the pipeline from the best trial ({best['run']})")
        out = run_pipeline(trial_config(base, best["params"]), config_path=config_path, parent_of=sweep_run,
                           extra_tags={TAG_SWEEP: sweep_run, "hvae.sweep_best_run": best["run"] or ""})
        if out.code == 0 and best["run"] and out.run_ids.get(sweep.stage) != best["run"]:
            print(f"error: the pipeline did not reuse the best trial's {sweep.stage} run {best['run']}")
            return 1
        return out.code
    return 0


def _close_runs(tracker, sweep_run: str, status: str) -> None:
    for run in _trial_runs(tracker, sweep_run).values():
        if run.info.status == "RUNNING":
            tracker.finish(run.info.run_id, status)
    tracker.finish(sweep_run, status)
