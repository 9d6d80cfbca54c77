"""The DAG runner: load data once, start Ray, open the MLflow parent run, run each stage
inside its own nested child run, log its output folder, and turn failures into one line.
"""
from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stages.base import StageContext, StageError

from . import datasets
from .config import PipelineConfig, to_yaml
from .fingerprint import code_hash, stage_fingerprint


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str  # defines run(ctx) and CODE (the source files it runs)
    sections: tuple[str, ...]  # config sections that shape its output
    upstream: tuple[str, ...] = field(default=())


# The DAG in execution order. Sections: the config that shapes a stage's output (batch
# sizes of inference-only stages do not, so they are left out of the fingerprint).
STAGES = (
    StageDef("stage1", "stages.stage1", ("stage1",)),
    StageDef("extract", "stages.extract", (), ("stage1",)),
    StageDef("priors", "stages.priors", ("priors",), ("extract",)),
    StageDef("sample", "stages.sample", ("sample",), ("stage1", "priors")),
    StageDef("evaluate", "stages.evaluate", (), ("stage1", "priors")),
)


@dataclass
class PlannedStage:
    stage: StageDef
    fingerprint: str
    action: str = "run"


def plan(cfg: PipelineConfig, data_fp: str) -> list[PlannedStage]:
    data_slice = cfg.data.model_dump(mode="json", exclude={"root", "download"})
    fps: dict[str, str] = {}
    out = []
    for st in STAGES:
        module = importlib.import_module(st.module)
        cfg_slice = {s: getattr(cfg, s).model_dump(mode="json") for s in st.sections}
        cfg_slice["data"] = data_slice
        fp = stage_fingerprint(st.name, cfg_slice, [fps[u] for u in st.upstream], data_fp, code_hash(module.CODE))
        fps[st.name] = fp
        out.append(PlannedStage(st, fp))
    return out


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Make storage and data paths absolute: Ray workers run with another working directory."""
    cfg = cfg.model_copy(deep=True)
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


def _print_summary(rows, tracker, parent_id, outputs):
    print("\n" + "=" * 72)
    for name, status, run_id, secs, metrics in rows:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN if k in metrics)
        print(f"{name:<9} {status:<9} run {run_id}  {secs:6.1f} s  {shown}")
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
    tracker.log_final_metrics(run_id, result.metrics)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.output_dir)
    for context, rel in result.datasets.items():
        tracker.log_dataset(run_id, result.output_dir / rel, rel, context)


def run_pipeline(cfg: PipelineConfig, *, dry_run: bool = False, config_path: str | None = None) -> int:
    from .raycluster import connect, shutdown
    from .tracking import Tracker

    cfg = resolve_paths(cfg)
    t0 = time.perf_counter()
    try:
        splits = datasets.load_splits(cfg.data)
    except datasets.DataError as exc:
        print(f"error: {exc}")
        return 2
    data_fp = datasets.fingerprint(splits)
    stages = plan(cfg, data_fp)
    if dry_run:
        print(to_yaml(cfg), end="")
        print(f"# data: {cfg.data.dataset}: {datasets.describe(splits)} (fingerprint {data_fp})")
        print("# stages:")
        for p in stages:
            print(f"#   {p.stage.name:<9} {p.action}  (fingerprint {p.fingerprint})")
        return 0

    print(f"[hvae] data {cfg.data.dataset}: {datasets.describe(splits)} ({time.perf_counter() - t0:.1f} s)")
    tracker = Tracker(cfg.tracking)
    config_dict = cfg.model_dump(mode="json")
    parent_id = tracker.start_parent(
        f"pipeline-{datetime.now():%Y%m%d-%H%M%S}", config_dict,
        tags={"hvae.kind": "pipeline", "hvae.dataset": cfg.data.dataset, "hvae.model": cfg.stage1.model,
              "hvae.data_fingerprint": data_fp, **({"hvae.config_file": config_path} if config_path else {})},
    )
    tracker.log_text(parent_id, to_yaml(cfg), "config.yaml")
    print(f"[hvae] MLflow parent run {parent_id} in experiment '{tracker.experiment_name}' ({tracker.uri})")
    connect(cfg.cluster)

    rows, outputs, run_ids = [], {}, {}
    work = Path(cfg.cluster.storage_path) / "outputs" / parent_id
    for planned in stages:
        st = planned.stage
        params = {s: getattr(cfg, s).model_dump(mode="json") for s in st.sections}
        run_id = tracker.start_child(parent_id, st.name, planned.fingerprint, params)
        tracker.set_tags(run_id, {f"hvae.upstream.{u}": run_ids[u] for u in st.upstream})
        out_dir = work / st.name
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"[hvae] {st.name}: run {run_id} (fingerprint {planned.fingerprint})")
        s0 = time.perf_counter()
        try:
            ctx = StageContext(
                name=st.name, config=cfg, output_dir=out_dir, storage_path=cfg.cluster.storage_path,
                checkpoint_name=f"{st.name}-{planned.fingerprint}", data=splits, report=tracker.reporter(run_id),
                # inputs come from the upstream runs' artifacts, by run id, as any consumer would get them
                upstream={u: tracker.download(run_ids[u], work / "inputs" / st.name / u) for u in st.upstream},
            )
            result = importlib.import_module(st.module).run(ctx)
            secs = time.perf_counter() - s0
            result.metrics[f"{st.name}_seconds"] = secs
            _log_result(tracker, run_id, result)
        except KeyboardInterrupt:
            tracker.finish(run_id, "KILLED")
            tracker.finish(parent_id, "KILLED")
            print(f"\n[hvae] interrupted during {st.name}; runs marked KILLED")
            return 130
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
            message = describe_error(exc)
            tracker.log_text(run_id, traceback.format_exc(), "error.txt")
            tracker.set_tags(run_id, {"hvae.error": message[:5000]})
            tracker.finish(run_id, "FAILED")
            tracker.finish(parent_id, "FAILED")
            shutdown()  # flush the workers' log lines before the error line
            hint = "" if isinstance(exc, StageError) else f" (full traceback: the 'error.txt' artifact of run {run_id})"
            print(f"error: stage {st.name} failed: {message}{hint}")
            return 1
        tracker.finish(run_id)
        tracker.set_tags(parent_id, {f"hvae.run.{st.name}": run_id})
        outputs[st.name] = result.output_dir
        run_ids[st.name] = run_id
        rows.append((st.name, "FINISHED", run_id, secs, result.metrics))

    tracker.log_metrics(parent_id, {"pipeline_seconds": time.perf_counter() - t0})
    tracker.finish(parent_id)
    _print_summary(rows, tracker, parent_id, outputs)
    return 0
