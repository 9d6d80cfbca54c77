"""The DAG runner: load data once, decide per stage whether to reuse, resume or run it,
start Ray only when something trains, open the MLflow parent run, run each stage inside its
own nested child run, log its output folder with a manifest, turn failures into one line.

Reuse: a FINISHED child run with the same stage and fingerprint anywhere in the experiment
(its artifacts downloaded and checked against their manifest). Resume: a stage whose
checkpoint folder storage_path/<stage>-<fingerprint>/ holds checkpoints continues from the
latest one (Ray Train restores it). Identical stages started by two pipelines at once are
serialised by a file lock next to that folder: the second one then reuses the first's run.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stages.base import StageContext, StageError
from stages.train_loop import latest_checkpoint_epoch

from . import datasets
from .config import ConfigError, PipelineConfig, to_yaml
from .fingerprint import code_hash, stage_fingerprint
from .liveness import TAG_DRIVER, is_dead, this_driver
from .manifest import ManifestError, verify_manifest, write_manifest


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str  # defines run(ctx) and CODE (the source files it runs)
    sections: tuple[str, ...]  # config sections that shape its output
    upstream: tuple[str, ...] = field(default=())
    models: tuple[str, ...] = ("vqvae2", "nvae")  # the stage-1 families it applies to


TRAINING = ("stage1", "priors")  # stages that run a TorchTrainer
ALL_MODELS = ("vqvae2", "nvae")

# The DAG in execution order. Sections: the config that shapes a stage's output (batch
# sizes of inference-only stages do not, so they are left out of the fingerprint). An NVAE
# learns its prior in stage 1: extract and priors do not apply to it.
STAGES = (
    StageDef("stage1", "stages.stage1", ("stage1",)),
    StageDef("extract", "stages.extract", (), ("stage1",), models=("vqvae2",)),
    StageDef("priors", "stages.priors", ("priors",), ("extract",), models=("vqvae2",)),
    StageDef("sample", "stages.sample", ("sample",), ("stage1", "priors")),
    StageDef("evaluate", "stages.evaluate", ("evaluate",), ("stage1", "priors")),
)
MODEL_SECTIONS = {"nvae": ("nvae",)}  # extra sections of stage 1 for a family
NOT_IN_FINGERPRINT = {"evaluate": {"batch_size"}}


@dataclass
class PlannedStage:
    stage: StageDef
    fingerprint: str

    @property
    def checkpoint_name(self) -> str:
        return f"{self.stage.name}-{self.fingerprint}"


def not_applicable(cfg: PipelineConfig) -> list[str]:
    return [st.name for st in STAGES if cfg.stage1.model not in st.models]


def plan(cfg: PipelineConfig, data_fp: str) -> list[PlannedStage]:
    """The stages that apply to this config's model, each with its fingerprint and upstream."""
    data_slice = cfg.data.model_dump(mode="json", exclude={"root", "download"})
    model = cfg.stage1.model
    fps: dict[str, str] = {}
    out = []
    for st in STAGES:
        if model not in st.models:
            continue
        sections = st.sections + (MODEL_SECTIONS.get(model, ()) if st.name == "stage1" else ())
        st = StageDef(st.name, st.module, sections, tuple(u for u in st.upstream if u in fps), st.models)
        module = importlib.import_module(st.module)
        cfg_slice = {s: getattr(cfg, s).model_dump(mode="json", exclude=NOT_IN_FINGERPRINT.get(s)) for s in sections}
        cfg_slice["data"] = data_slice
        fp = stage_fingerprint(st.name, cfg_slice, [fps[u] for u in st.upstream], data_fp, code_hash(module.CODE))
        fps[st.name] = fp
        out.append(PlannedStage(st, fp))
    return out


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Make tracking, storage and data paths absolute: Ray workers run in other working directories."""
    from .tracking import resolve_artifact_location, resolve_uri

    cfg = cfg.model_copy(deep=True)
    # (Tune runs each trial in its own working directory: a relative path would mean another file)
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
    cfg.tracking.artifact_location = resolve_artifact_location(cfg.tracking.artifact_location)
    if "://" not in cfg.cluster.storage_path:
        cfg.cluster.storage_path = str(Path(cfg.cluster.storage_path).resolve())
    cfg.data.root = str(Path(cfg.data.root).resolve())
    return cfg


def describe_error(exc: BaseException) -> str:
    """One readable line for a failure, digging the root cause out of Ray's wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:
            rank = min(failures)
            exc = failures[rank]
            continue
        inner = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if exc.__cause__ is not None and type(exc).__module__.startswith("ray"):
            exc = exc.__cause__
            continue
        break
    text = str(exc).strip().splitlines()
    # Ray task errors carry the remote traceback; its last line is the original error
    line = text[-1] if text and type(exc).__module__.startswith("ray") else (text[0] if text else "")
    name = type(exc).__name__
    return line if line.startswith(name) or type(exc).__module__.startswith("ray") else f"{name}: {line}"


SHOWN = ("val_bpd", "val_bits_per_code", "rows_train", "test_nll_bpd", "test_nll_nats")


def stages_from(name: str) -> list[str]:
    """``name`` and every stage after it (what ``--force name`` re-runs)."""
    names = [st.name for st in STAGES]
    if name not in names:
        raise ConfigError(f"--force {name}: unknown stage (stages: {', '.join(names)})")
    return names[names.index(name):]


def _tracking_exists(uri: str) -> bool:
    """A dry run must not create the tracking database just to look into it."""
    from .tracking import resolve_uri

    uri = resolve_uri(uri)
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def describe_plan(cfg: PipelineConfig, stages: list[PlannedStage], forced: set[str], tracker) -> list[str]:
    lines = []
    for p in stages:
        found = None if (tracker is None or p.stage.name in forced) else tracker.find_finished(p.stage.name, p.fingerprint)
        epoch = latest_checkpoint_epoch(cfg.cluster.storage_path, p.checkpoint_name)
        if found is not None:
            action = f"reuse {found.info.run_id}"
        elif epoch is not None and p.stage.name not in forced:
            action = f"resume from epoch {epoch + 1} (checkpoint of epoch {epoch})"
        else:
            action = "run" + (" (forced)" if p.stage.name in forced else "")
        lines.append(f"{p.stage.name:<9} {action}  (fingerprint {p.fingerprint})")
    return lines


def mark_dead_runs_killed(tracker) -> list[str]:
    """Runs left RUNNING by a driver of this host that is gone are marked KILLED."""
    killed = []
    for run in tracker.running_runs():
        driver = run.data.tags.get(TAG_DRIVER)
        if driver and is_dead(driver):
            tracker.finish(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def _print_summary(rows, tracker, parent_id, outputs):
    print("\n" + "=" * 72)
    for name, status, run_id, secs, metrics in rows:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN if k in metrics)
        timing = f"{secs:6.1f} s" if secs is not None else "       "
        print(f"{name:<9} {status:<9} run {run_id}  {timing}  {shown}")
    table = outputs.get("evaluate", Path("/nonexistent")) / "report" / "nll_table.md"
    if table.is_file():
        print("\n" + table.read_text())
    for name, _, run_id, _, _ in rows:
        if name == "sample":
            print(f"sample grid: {tracker.artifact_uri(run_id)}/samples/grid.png")
    print(f"MLflow parent run: {parent_id} (experiment '{tracker.experiment_name}', {tracker.uri})")
    print(f"artifacts: {tracker.artifact_uri(parent_id).rsplit('/', 2)[0]}/<run id>/artifacts")
    print(f"browse: make ui, then {tracker.ui_url(parent_id)}")


def _log_result(tracker, run_id: str, result) -> None:
    write_manifest(result.output_dir)
    tracker.log_final_metrics(run_id, result.metrics)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.output_dir)
    for context, rel in result.datasets.items():
        tracker.log_dataset(run_id, result.output_dir / rel, rel, context)


class _Fetcher:
    """Downloads a run's artifacts once (through MLflow, by run id) and checks their manifest."""

    def __init__(self, tracker, folder: Path):
        self.tracker, self.folder, self.cache = tracker, folder, {}

    def __call__(self, run_id: str) -> Path:
        if run_id not in self.cache:
            local = self.tracker.download(run_id, self.folder / run_id)
            verify_manifest(local)
            self.cache[run_id] = local
        return self.cache[run_id]


class StageFailed(RuntimeError):
    """A stage failed; its child run is already marked FAILED with the traceback attached."""

    def __init__(self, stage: str, run_id: str, message: str, shown: bool):
        hint = "" if shown else f" (full traceback: the 'error.txt' artifact of run {run_id})"
        super().__init__(f"stage {stage} failed: {message}{hint}")
        self.stage, self.run_id = stage, run_id


def execute_stage(tracker, cfg: PipelineConfig, planned: PlannedStage, *, parent_id: str, splits: dict,
                  upstream: dict[str, tuple[str, Path]], out_dir: Path, tags: dict[str, str],
                  forced: bool = False, callbacks: list | None = None) -> tuple[str, object, float]:
    """Run (or resume from its checkpoints) one stage as a child run of ``parent_id``.

    ``upstream`` maps each upstream stage to (its run id, its verified output folder). Returns
    (run id, StageResult, seconds). A failure marks the run FAILED and raises StageFailed; an
    interrupt marks it KILLED and propagates. Used by the pipeline and by every sweep trial.
    """
    from .raycluster import check_shared_storage, connect

    st = planned.stage
    resume_epoch = None if forced else latest_checkpoint_epoch(cfg.cluster.storage_path, planned.checkpoint_name)
    if forced:
        _clear_checkpoints(cfg.cluster.storage_path, planned.checkpoint_name)
    params = {s: getattr(cfg, s).model_dump(mode="json") for s in st.sections}
    tags = {**tags, **{f"hvae.upstream.{u}": upstream[u][0] for u in st.upstream}}
    run_id = tracker.start_child(parent_id, st.name, planned.fingerprint, params, tags)
    if resume_epoch is not None:
        _continue_curve(tracker, st.name, planned.fingerprint, run_id, resume_epoch)
    out_dir.mkdir(parents=True, exist_ok=True)
    how = f"resume after epoch {resume_epoch}" if resume_epoch is not None else "run"
    print(f"[hvae] {st.name}: {how} as MLflow run {run_id} (fingerprint {planned.fingerprint})", flush=True)
    s0 = time.perf_counter()
    try:
        if st.name in TRAINING or st.name == "extract":
            if connect(cfg.cluster) > 1:  # a multi-node cluster: checkpoints must be on shared storage
                check_shared_storage(cfg.cluster.storage_path)
        ctx = StageContext(
            name=st.name, config=cfg, output_dir=out_dir, storage_path=cfg.cluster.storage_path,
            checkpoint_name=planned.checkpoint_name, data=splits, report=tracker.reporter(run_id),
            upstream={u: upstream[u][1] for u in st.upstream}, train_callbacks=list(callbacks or []),
        )
        result = importlib.import_module(st.module).run(ctx)
        secs = time.perf_counter() - s0
        result.metrics[f"{st.name}_seconds"] = secs
        if st.name in TRAINING:
            starts = tracker.metric_history(run_id, "worker_group_start_epoch")
            result.metrics["worker_restarts"] = float(max(len(starts) - 1, 0))
        _log_result(tracker, run_id, result)
    except KeyboardInterrupt:
        tracker.finish(run_id, "KILLED")
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        message = describe_error(exc)
        tracker.log_text(run_id, traceback.format_exc(), "error.txt")
        tracker.set_tags(run_id, {"hvae.error": message[:5000]})
        tracker.finish(run_id, "FAILED")
        raise StageFailed(st.name, run_id, message, shown=isinstance(exc, StageError)) from exc
    tracker.finish(run_id)
    return run_id, result, secs


@dataclass
class Outcome:
    """What a pipeline run ended with: its exit code, parent run and each stage's run."""

    code: int
    parent_id: str | None = None
    run_ids: dict[str, str] = field(default_factory=dict)


def run_pipeline(cfg: PipelineConfig, *, dry_run: bool = False, config_path: str | None = None,
                 force: list[str] = (), extra_tags: dict[str, str] | None = None,
                 until: str | None = None, parent_of: str | None = None) -> Outcome:
    """Run the DAG (up to and including ``until`` when given) under a new parent run
    (itself nested under ``parent_of`` when given, e.g. a sweep's parent run)."""
    from filelock import FileLock

    from .raycluster import shutdown
    from .tracking import TAG_CORRUPT, TAG_PARENT, Tracker

    cfg = resolve_paths(cfg)
    forced = {name for f in force for name in stages_from(f)}
    t0 = time.perf_counter()
    try:
        splits = datasets.load_splits(cfg.data)
    except datasets.DataError as exc:
        print(f"error: {exc}")
        return Outcome(2)
    data_fp = datasets.fingerprint(splits)
    stages = plan(cfg, data_fp)
    if until is not None:
        order = [st.name for st in STAGES]
        stages = [p for p in stages if order.index(p.stage.name) <= order.index(until)]
    if dry_run:
        tracker = Tracker(cfg.tracking, create=False) if _tracking_exists(cfg.tracking.uri) else None
        print(to_yaml(cfg), end="")
        print(f"# data: {cfg.data.dataset}: {datasets.describe(splits)} (fingerprint {data_fp})")
        print("# stages:")
        for line in describe_plan(cfg, stages, forced, tracker):
            print(f"#   {line}")
        for name in not_applicable(cfg):
            print(f"#   {name:<9} not applicable to {cfg.stage1.model} (it learns its prior in stage 1)")
        return Outcome(0)

    print(f"[hvae] data {cfg.data.dataset}: {datasets.describe(splits)} ({time.perf_counter() - t0:.1f} s)")
    tracker = Tracker(cfg.tracking)
    for run_id in mark_dead_runs_killed(tracker):
        print(f"[hvae] run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    driver = {TAG_DRIVER: this_driver()}
    parent_id = tracker.start_parent(
        f"pipeline-{datetime.now():%Y%m%d-%H%M%S}", cfg.model_dump(mode="json", exclude={"sweep"}),
        tags={"hvae.kind": "pipeline", "hvae.dataset": cfg.data.dataset, "hvae.model": cfg.stage1.model,
              "hvae.data_fingerprint": data_fp, **driver, **(extra_tags or {}),
              **({"hvae.config_file": config_path} if config_path else {}),
              **({TAG_PARENT: parent_of} if parent_of else {})},
    )
    tracker.log_text(parent_id, to_yaml(cfg), "config.yaml")
    print(f"[hvae] MLflow parent run {parent_id} in experiment '{tracker.experiment_name}' ({tracker.uri})")

    work = Path(cfg.cluster.storage_path) / "outputs" / parent_id
    fetch = _Fetcher(tracker, work / "inputs")
    locks = Path(cfg.cluster.storage_path) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    rows, outputs, run_ids = [], {}, {}
    skipped = not_applicable(cfg)
    if skipped:
        print(f"[hvae] {', '.join(skipped)}: not applicable to {cfg.stage1.model} (it learns its prior in stage 1)")
        tracker.set_tags(parent_id, {"hvae.not_applicable": ",".join(skipped)})
    for planned in stages:
        st = planned.stage
        with FileLock(str(locks / f"{planned.checkpoint_name}.lock")):
            # ---- reuse ------------------------------------------------------------------
            found = None if st.name in forced else tracker.find_finished(st.name, planned.fingerprint)
            if found is not None:
                try:
                    outputs[st.name] = fetch(found.info.run_id)
                    run_ids[st.name] = found.info.run_id
                    tracker.set_tags(parent_id, {f"hvae.reused_from.{st.name}": found.info.run_id})
                    print(f"[hvae] {st.name}: reuse MLflow run {found.info.run_id} (fingerprint {planned.fingerprint})")
                    rows.append((st.name, "REUSED", found.info.run_id, None, found.data.metrics))
                    continue
                except ManifestError as exc:
                    tracker.set_tags(found.info.run_id, {TAG_CORRUPT: str(exc)})
                    print(f"[hvae] {st.name}: not reusing run {found.info.run_id}: artifact {exc}; "
                          f"running {st.name} again")

            # ---- run or resume ----------------------------------------------------------
            try:
                run_id, result, secs = execute_stage(
                    tracker, cfg, planned, parent_id=parent_id, splits=splits,
                    # inputs are the upstream runs' artifacts, downloaded by run id and verified
                    upstream={u: (run_ids[u], fetch(run_ids[u])) for u in st.upstream},
                    out_dir=work / st.name, tags=driver, forced=st.name in forced)
            except KeyboardInterrupt:
                tracker.finish(parent_id, "KILLED")
                print(f"\n[hvae] interrupted during {st.name}; runs marked KILLED")
                return Outcome(130, parent_id, run_ids)
            except StageFailed as exc:
                tracker.finish(parent_id, "FAILED")
                shutdown()  # flush the workers' log lines before the error line
                print(f"error: {exc}")
                return Outcome(1, parent_id, run_ids)
        tracker.set_tags(parent_id, {f"hvae.run.{st.name}": run_id})
        outputs[st.name] = work / st.name
        run_ids[st.name] = run_id
        rows.append((st.name, "FINISHED", run_id, secs, result.metrics))

    tracker.log_metrics(parent_id, {"pipeline_seconds": time.perf_counter() - t0})
    tracker.finish(parent_id)
    _print_summary(rows, tracker, parent_id, outputs)
    return Outcome(0, parent_id, run_ids)


def _clear_checkpoints(storage_path: str, name: str) -> None:
    """--force starts the stage's training afresh: move its old checkpoints aside."""
    folder = Path(storage_path) / name
    if folder.exists():
        folder.rename(folder.with_name(f"{name}.forced-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"))


def _continue_curve(tracker, stage: str, fingerprint: str, run_id: str, epoch: int) -> None:
    """A resumed stage's new run starts with the curve of the run that was cut."""
    cut = tracker.find_cut(stage, fingerprint)
    tracker.set_tags(run_id, {"hvae.resumed_from_epoch": str(epoch),
                              **({"hvae.resumed_from_run": cut.info.run_id} if cut else {})})
    if cut is not None:
        tracker.copy_history(cut.info.run_id, run_id, epoch)
