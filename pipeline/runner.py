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
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hvae.stages import checkpoints, families
from hvae.stages.base import StageContext, StageError, StageResult

from hvae.settings import graph

from . import datasets, results_page, signals
from .results_page import StageRow
from hvae.settings.config import PipelineConfig, to_yaml
from .liveness import TAG_DRIVER, TAG_HEARTBEAT, Heartbeat, is_dead, this_driver
from .manifest import MANIFEST, ManifestError, check_listing, read_manifest, verify_manifest, write_manifest
from .masking import mask
from .plan import PlannedStage, describe, plan, stages_from

def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Make tracking, storage and data paths absolute: Ray workers run in other working directories."""
    from .tracking import resolve_artifact_location, resolve_uri

    cfg = cfg.model_copy(deep=True)
    # (Tune runs each trial in its own working directory: a relative path would mean another file)
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
    cfg.tracking.artifact_location = resolve_artifact_location(cfg.tracking.artifact_location, cfg.tracking.uri)
    if "://" not in cfg.cluster.storage_path:
        cfg.cluster.storage_path = str(Path(cfg.cluster.storage_path).resolve())
    if "://" not in cfg.data.root and cfg.data.dataset != "mnist5k":  # (the embedded digits read no files)
        cfg.data.root = str(Path(cfg.data.root).resolve())
    if cfg.sample.classifier:
        cfg.sample.classifier = str(Path(cfg.sample.classifier).resolve())
    return cfg


_RAISED = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): \S")


def describe_error(exc: BaseException) -> str:
    """One readable line for a failure, digging the root cause out of Ray's wrappers."""
    seen, texts = set(), []
    while id(exc) not in seen:
        seen.add(id(exc))
        texts.append(str(exc))
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
    if type(exc).__module__.startswith("ray"):
        # a Ray task error carries the remote traceback as text (the original exception, once
        # pickled, has lost its own causes): the first error raised there, not Ray's wrapper
        # around it (Ray Data's "UDF failed ... configure retried_map_errors")
        for line in (ln for t in texts for ln in t.splitlines()):
            m = _RAISED.match(line.strip())
            if m and not m["name"].startswith("ray."):
                return line.strip()
    # else the last line of the remote traceback is the original error
    line = text[-1] if text and type(exc).__module__.startswith("ray") else (text[0] if text else "")
    name = type(exc).__name__
    return line if line.startswith(name) or type(exc).__module__.startswith("ray") else f"{name}: {line}"


def mark_dead_runs_killed(tracker) -> list[str]:
    """Runs left RUNNING by a driver that is gone (``liveness.is_dead``: its process on this
    host, or its top run's heartbeat from any host) are marked KILLED."""
    from .tracking import TAG_PARENT

    running = {run.info.run_id: run for run in tracker.running_runs()}
    tags = lambda run_id: (running[run_id] if run_id in running else tracker.client.get_run(run_id)).data.tags  # noqa: E731

    def heartbeat(run_id: str, depth: int = 0):
        """The run's own heartbeat, else its parent's (a stage's run, a sweep's pipelines)."""
        t = tags(run_id)
        if TAG_HEARTBEAT in t or TAG_PARENT not in t or depth > 3:
            return t.get(TAG_HEARTBEAT)
        return heartbeat(t[TAG_PARENT], depth + 1)

    killed = []
    for run_id, run in running.items():
        driver = run.data.tags.get(TAG_DRIVER)
        if driver and is_dead(driver, heartbeat(run_id)):
            tracker.finish(run_id, "KILLED")
            killed.append(run_id)
    return killed


def resume_command(parent_id: str, uri: str) -> str:
    from .masking import mask
    from .tracking import resolve_uri

    return f"hvae resume {parent_id}" + ("" if uri == resolve_uri("sqlite:///mlruns.db") else f" --uri {mask(uri)}")


def _print_summary(rows: list[StageRow], tracker, parent_id, outputs):
    print("\n" + "=" * 72)
    for row in rows:
        shown = " ".join(f"{k}={row.metrics[k]:.4g}" for k in graph.get(row.name).shown if k in row.metrics)
        timing = f"{row.seconds:6.1f} s" if row.seconds is not None else "       "
        print(f"{row.name:<9} {row.status:<9} run {row.run_id}  {timing}  {shown}")
    for row in rows:  # the result a stage's summary shows: its text, or where it is
        st = graph.get(row.name)
        if st.printed and (outputs[row.name] / st.printed).is_file():
            print("\n" + (outputs[row.name] / st.printed).read_text())
    for row in rows:
        if graph.get(row.name).linked:
            print(f"{row.name}: {tracker.artifact_uri(row.run_id)}/{graph.get(row.name).linked}")
    print(f"MLflow parent run: {parent_id} (experiment '{tracker.experiment_name}', {tracker.shown_uri})")
    print(f"artifacts: {tracker.artifact_uri(parent_id).rsplit('/', 2)[0]}/<run id>/artifacts")
    print(f"browse: make ui, then {tracker.ui_url(parent_id)}")


def _log_result(tracker, run_id: str, result) -> None:
    write_manifest(result.output_dir)
    tracker.log_final_metrics(run_id, result.metrics)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.output_dir)
    for context, rel in result.datasets.items():
        tracker.log_dataset(run_id, result.output_dir / rel, rel, context)
    for name, records in result.tables.items():
        tracker.log_table(run_id, records, name)


class _Fetcher:
    """A run's artifacts, checked against its manifest: all of them downloaded (once) for a stage
    that reads the run (``fetch(run_id)``); of a run only reused (``fetch.glance(run_id)``), its
    manifest checked against the store's listing by size, and only the small files the
    pipeline's pages show downloaded (a fully reused pipeline moves no weights or codes)."""

    SHOWN = (".png", ".md")  # the pictures and tables of the parent run's pages and summary

    def __init__(self, tracker, folder: Path):
        self.tracker, self.folder, self.cache = tracker, folder, {}

    def __call__(self, run_id: str) -> Path:
        if run_id not in self.cache:
            local = self.tracker.download(run_id, self.folder / run_id)
            verify_manifest(local)
            self.cache[run_id] = local
        return self.cache[run_id]

    def glance(self, run_id: str) -> Path:
        if run_id in self.cache:
            return self.cache[run_id]
        local = self.tracker.download_files(run_id, [MANIFEST], self.folder / run_id)
        files = read_manifest(local)
        check_listing(files, self.tracker.listing(run_id))
        shown = [rel for rel in files if rel.endswith(self.SHOWN)]
        verify_manifest(self.tracker.download_files(run_id, shown, local), only=shown)
        return local


class _Remake(Exception):
    """A reused run turned out corrupt when a later stage downloaded it whole: it is tagged, and
    the pipeline decides its stages again (that run's stage, and every stage after it, run)."""

class StageFailed(RuntimeError):
    """A stage failed; its child run is already marked FAILED with the traceback attached."""

    def __init__(self, stage: str, run_id: str, message: str, shown: bool):
        hint = "" if shown else f" (full traceback: the 'error.txt' artifact of run {run_id})"
        super().__init__(f"stage {stage} failed: {message}{hint}")
        self.stage, self.run_id = stage, run_id


@dataclass(frozen=True)
class Executed:
    """A stage that ran as a child run: its run, its result, its wall time."""

    run_id: str
    result: StageResult
    seconds: float


def execute_stage(tracker, cfg: PipelineConfig, planned: PlannedStage, *, parent_id: str, data,
                  upstream: dict[str, tuple[str, Path]], out_dir: Path, tags: dict[str, str],
                  fresh: str | None = None, callbacks: list | None = None,
                  datasets: dict | None = None) -> Executed:
    """Run (or resume from its checkpoints) one stage as a child run of ``parent_id``.

    ``upstream`` maps each upstream stage to (its run id, its verified output folder). ``fresh``:
    why the stage must not resume from the checkpoints its fingerprint has (they are moved
    aside), e.g. "--force". Returns
    the run, its StageResult and its seconds. ``callbacks``: extra Ray Train callbacks and ``datasets``:
    the stage's training datasets, built already (a sweep's trials share both). A failure marks the run FAILED and raises StageFailed; an
    interrupt marks it KILLED and propagates. Used by the pipeline and by every sweep trial.
    """
    from .tracking import TAG_UPSTREAM

    st = planned.stage
    if fresh:
        cleared = checkpoints.clear(cfg.cluster.storage_path, planned.checkpoint_name)
        if cleared:
            print(f"[hvae] {st.name}: {fresh}: {cleared}")
    found = checkpoints.newest(cfg.cluster.storage_path, planned.checkpoint_name)
    resume_epoch = found.completed_epoch if found else None
    params = {s: getattr(cfg, s).model_dump(mode="json") for s in st.sections}
    tags = {**tags, **{f"{TAG_UPSTREAM}.{u}": upstream[u][0] for u in st.upstream}}
    run_id = tracker.start_child(parent_id, st.name, planned.fingerprint, params, tags)
    for split in st.reads:  # the data as the run's input (its fingerprint is the dataset's digest)
        if "." in split:  # (a config key naming the split)
            section, key = split.split(".")
            split = getattr(getattr(cfg, section), key)
        tracker.log_data_input(run_id, cfg.data.dataset, data.fingerprint, data.location,
                               {"rows": data.rows[split], "images": data.describe()}, split)
    if resume_epoch is not None:
        _continue_curve(tracker, st.name, planned.fingerprint, run_id, resume_epoch)
    out_dir.mkdir(parents=True, exist_ok=True)
    how = ("run" if found is None else f"resume after epoch {found.epoch + 1}" if found.step is None else
           f"resume in epoch {found.epoch + 1} after batch {found.step}")  # (epochs counted from 1, as the logs do)
    print(f"[hvae] {st.name}: {how} as MLflow run {run_id} (fingerprint {planned.fingerprint})", flush=True)
    s0 = time.perf_counter()
    try:
        result = _run_stage(tracker, cfg, planned, run_id, data, upstream, out_dir=out_dir, callbacks=callbacks,
                            datasets=datasets)
        secs = time.perf_counter() - s0
        result.metrics[f"{st.name}_seconds"] = secs
        _log_result(tracker, run_id, result)
        tracker.log_final_metrics(run_id, {"upload_seconds": time.perf_counter() - s0 - secs})
    except KeyboardInterrupt as exc:
        signals.next_one_exits_at_once(signals.exit_code(exc))  # a second Ctrl-C: out at once
        tracker.finish(run_id, "KILLED")
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        message = describe_error(exc)
        tracker.log_text(run_id, traceback.format_exc(), "error.txt")
        tracker.set_tags(run_id, {"hvae.error": message[:5000]})
        tracker.finish(run_id, "FAILED")
        raise StageFailed(st.name, run_id, message, shown=isinstance(exc, StageError)) from exc
    tracker.finish(run_id)
    return Executed(run_id, result, secs)


def _run_stage(tracker, cfg, planned: PlannedStage, run_id: str, data, upstream, *, out_dir: Path, callbacks,
               datasets):
    """The stage's own work: its module's run(ctx) with Ray up when it needs it."""
    from .raycluster import check_resources, check_shared_storage, connect, resolve_layout

    st = planned.stage
    t0 = time.perf_counter()
    if st.on_ray and connect(cfg.cluster) > 1:  # a multi-node cluster: checkpoints must be on shared storage
        check_shared_storage(cfg.cluster.storage_path)
    ray_seconds = time.perf_counter() - t0  # (starting Ray: the first stage on Ray pays it)
    if st.on_ray and cfg.cluster.num_workers == "auto":
        cfg = cfg.model_copy(update={"cluster": resolve_layout(cfg.cluster)})
        if st.trains:
            c = cfg.cluster
            layout = f"{c.num_workers} worker(s) of {c.cpus_per_worker:g} CPU(s)" + (" and a GPU" if c.use_gpu else "")
            tracker.set_tags(run_id, {"hvae.layout": layout})
            print(f"[hvae] {st.name}: cluster.num_workers=auto: {layout}", flush=True)
    if st.on_ray:  # what Ray would otherwise wait for forever: said in one line, before the stage starts
        c = cfg.cluster
        local = c.address is None and not os.environ.get("RAY_ADDRESS")
        gpu = {"GPU": 1.0} if c.use_gpu else {}
        if st.trains:
            check_resources(c, f"{st.name} (cluster.num_workers={c.num_workers}, cluster.cpus_per_worker="
                               f"{c.cpus_per_worker:g}{', cluster.use_gpu=true' if c.use_gpu else ''})",
                            c.num_workers, {"CPU": c.cpus_per_worker, **gpu}, local)
        else:
            check_resources(c, f"{st.name}{' (cluster.use_gpu=true)' if c.use_gpu else ''}", 1,
                            {"CPU": 1.0, **gpu}, local)
    ctx = StageContext(
        name=st.name, config=cfg, output_dir=out_dir, storage_path=cfg.cluster.storage_path,
        checkpoint_name=planned.checkpoint_name, data=data, report=tracker.reporter(run_id),
        upstream={u: upstream[u][1] for u in st.upstream}, train_callbacks=list(callbacks or []),
        datasets=datasets,
    )
    result = importlib.import_module(st.module).run(ctx)
    if st.on_ray:
        result.metrics["ray_connect_seconds"] = ray_seconds
    if st.trains:
        starts = tracker.metric_history(run_id, "worker_group_start_epoch")
        result.metrics["worker_restarts"] = float(max(len(starts) - 1, 0))
    return result


@dataclass
class Outcome:
    """What a pipeline run ended with: its exit code, parent run and each stage's run."""

    code: int
    parent_id: str | None = None
    run_ids: dict[str, str] = field(default_factory=dict)


def missing_classifier(cfg: PipelineConfig, stages: list[str]) -> str | None:
    """A sample.classifier that is not there, checked before any stage runs -> the line naming it."""
    path = cfg.sample.classifier
    if "sample" in stages and path and not Path(path).is_file():
        return (f"sample.classifier: no file {path} (`make classifier` trains the MNIST classifier once and "
                f"writes data/mnist_classifier.pt)")
    return None


def batches_beyond_data(cfg: PipelineConfig, train_rows: int, stages: list[str]) -> str | None:
    """A training batch larger than the training split (a config that cannot mean what it says)
    -> the line naming the key, else None."""
    for section in ("stage1", "priors"):
        size = getattr(cfg, section).batch_size
        if section in stages and size > train_rows:
            return (f"{section}.batch_size={size} is larger than the training split of data.dataset="
                    f"{cfg.data.dataset} ({train_rows} images): lower it, or give the dataset more images")
    return None


def _dry_run(cfg: PipelineConfig, until: str | None, forced: set[str]) -> Outcome:
    """Print the resolved config, the data, every model's parameter count and what each stage
    would do. Lists the data's files but reads no image and writes nothing: a dataset that is
    not prepared yet (or not on this machine) is said so, and the models are still counted."""
    from .tracking import Tracker, store_exists

    try:
        no_download = cfg.data.model_copy(update={"download": False})
        data_fp, spec, _, listed = datasets.locate(no_download, cfg.cluster.storage_path)
        data_line = f"{spec.describe() if spec is not None else listed} (fingerprint {data_fp})"
    except datasets.DataError as exc:
        data_fp, spec = "unknown", None
        data_line = f"not readable here: {exc} (the stage fingerprints below stand for no data)"
    stages = plan(cfg, data_fp, until)
    wrong = batches_beyond_data(cfg, spec.rows["train"], [p.name for p in stages]) if spec is not None else None
    wrong = wrong or missing_classifier(cfg, [p.name for p in stages])
    if wrong:
        print(f"error: {wrong}")
        return Outcome(2)
    tracker = Tracker(cfg.tracking, create=False) if store_exists(cfg.tracking.uri) else None
    print(mask(to_yaml(cfg)), end="")
    print(f"# data: {cfg.data.dataset}: {data_line}")
    family = families.of(cfg)
    counts = family.param_counts(cfg, datasets.channels(cfg.data, spec), spec.num_classes if spec else 10)
    print("# parameters: " + ", ".join(f"{what} {n:,}" for what, n in counts.items())
          + f" ({sum(counts.values()) / 1e6:.1f} M in all)")
    for line in describe(cfg, stages, forced, tracker):
        print(f"# {line}")
    return Outcome(0)


def _open_parent(tracker, cfg: PipelineConfig, data_fp: str, config_path: str | None, extra_tags: dict,
                 parent_of: str | None) -> str:
    from .tracking import JOB_ENV, TAG_JOB, TAG_PARENT, resolve_uri

    family = families.of(cfg)
    job = os.environ.get(JOB_ENV)
    commit = results_page.git_commit(Path(__file__).resolve().parent.parent)
    parent_id = tracker.start_parent(
        f"{family.name}-{cfg.data.dataset}-{datetime.now():%Y%m%d-%H%M%S}", cfg.model_dump(mode="json", exclude={"sweep"}),
        tags={"hvae.kind": "pipeline", "hvae.dataset": cfg.data.dataset, "hvae.model": family.name,
              "hvae.data_fingerprint": data_fp, TAG_DRIVER: this_driver(), **extra_tags,
              **({results_page.COMMIT: commit[0], "hvae.git_dirty": str(commit[1]).lower()} if commit else {}),
              **({"hvae.config_file": config_path} if config_path else {}),
              **({TAG_JOB: job} if job else {}),
              **({TAG_PARENT: parent_of} if parent_of else {})},
    )
    tracker.log_text(parent_id, mask(to_yaml(cfg)), "config.yaml")  # (a secret in a value: masked, pipeline/masking.py)
    print(f"[hvae] MLflow parent run {parent_id} in experiment '{tracker.experiment_name}' ({tracker.shown_uri})")
    ui = "hvae ui" + ("" if tracker.uri == resolve_uri("sqlite:///mlruns.db") else f" --uri {tracker.shown_uri}")
    print(f"[hvae] follow it in the MLflow UI: {ui}, then {tracker.ui_url(parent_id)}", flush=True)
    skipped = graph.not_applicable(family)
    if skipped:
        print(f"[hvae] {', '.join(skipped)}: not applicable to {family.name} (it learns its prior in stage 1)")
        tracker.set_tags(parent_id, {"hvae.not_applicable": ",".join(skipped)})
    return parent_id


def _reuse(tracker, planned: PlannedStage, fetch, upstream: dict[str, str],
           run_id: str | None = None) -> tuple[str, Path, object] | None:
    """A finished run of the same stage and fingerprint (the run ``run_id`` when given), made
    from the runs ``upstream`` names (the ones this pipeline uses), whose artifacts check out
    -> (run id, folder, run)."""

    found = tracker.find_finished(planned.name, planned.fingerprint, upstream, run_id)
    if found is None:
        return None
    try:
        return found.info.run_id, fetch.glance(found.info.run_id), found
    except ManifestError as exc:
        not_reusing(tracker, planned.name, found.info.run_id, exc)
        return None


def not_reusing(tracker, stage: str, run_id: str, exc: ManifestError) -> None:
    """A run whose artifacts do not match their manifest: tagged corrupt (never reused again), said."""
    from .tracking import TAG_CORRUPT

    tracker.set_tags(run_id, {TAG_CORRUPT: str(exc)})
    print(f"[hvae] {stage}: not reusing run {run_id}: artifact {exc}; running {stage} again")


def run_pipeline(cfg: PipelineConfig, *, dry_run: bool = False, config_path: str | None = None,
                 force: list[str] = (), extra_tags: dict[str, str] | None = None,
                 until: str | None = None, parent_of: str | None = None,
                 pinned: dict[str, tuple[str, str]] | None = None) -> Outcome:
    """Run the DAG (up to and including ``until`` when given) under a new parent run
    (itself nested under ``parent_of`` when given, e.g. a sweep's parent run). ``pinned``:
    {stage: (fingerprint, run id)} of earlier runs that must be reused as they are (`hvae sample`)."""
    from .tracking import Tracker

    from .reach import http, ray_address

    cfg = resolve_paths(cfg)
    forced = {name for f in force for name in stages_from(f)}
    # the services the run needs answer, before anything is computed
    if cfg.tracking.uri.startswith(("http://", "https://")):
        http(cfg.tracking.uri, cfg.tracking.timeout_s, "tracking.uri", "/health")
    if cfg.cluster.address:
        ray_address(cfg.cluster.address, cfg.cluster.connect_timeout_s)
    if dry_run:
        return _dry_run(cfg, until, forced)
    t0 = time.perf_counter()
    try:
        data = datasets.prepare(cfg.data, cfg.cluster.storage_path)
    except datasets.DataError as exc:
        print(f"error: {exc}")
        return Outcome(2)
    data_fp = data.fingerprint
    stages = plan(cfg, data_fp, until, {name: fp for name, (fp, _) in (pinned or {}).items()})
    wrong = batches_beyond_data(cfg, data.rows["train"], [p.name for p in stages])
    wrong = wrong or missing_classifier(cfg, [p.name for p in stages])
    if wrong:
        print(f"error: {wrong}")
        return Outcome(2)

    print(f"[hvae] data {cfg.data.dataset}: {data.describe()}, prepared at {data.location} "
          f"({time.perf_counter() - t0:.1f} s)")
    tracker = Tracker(cfg.tracking)
    for run_id in mark_dead_runs_killed(tracker):
        print(f"[hvae] run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    parent_id = _open_parent(tracker, cfg, data_fp, config_path, extra_tags or {}, parent_of)
    try:
        with Heartbeat(tracker.uri, parent_id):
            for attempt in range(len(stages) + 1):  # (each _Remake tags one more run corrupt)
                try:
                    outcome = _run_stages(tracker, cfg, stages, forced, parent_id, data,
                                          pinned={name: run for name, (_, run) in (pinned or {}).items()})
                    break
                except _Remake as exc:
                    if attempt == len(stages):
                        tracker.finish(parent_id, "FAILED")
                        print(f"error: the store keeps giving corrupt artifacts ({exc.__cause__}): nothing more was run")
                        outcome = _Progress(code=1)
        if outcome.code == 0:
            tracker.log_metrics(parent_id, {"pipeline_seconds": time.perf_counter() - t0,
                                            **results_page.headline(outcome.rows)})
            _publish(tracker, cfg, data, outcome, parent_id)
            tracker.finish(parent_id)
            _print_summary(outcome.rows, tracker, parent_id, outcome.outputs)
    finally:  # (copies of other runs' artifacts, in MLflow already: kept, every re-run would add one)
        import shutil

        shutil.rmtree(_inputs_area(cfg, parent_id), ignore_errors=True)
    return Outcome(outcome.code, parent_id, outcome.run_ids)


def _inputs_area(cfg: PipelineConfig, parent_id: str) -> Path:
    """Where a pipeline downloads the artifacts of the runs it reads (reused, or upstream of a
    stage that runs), for as long as it runs."""
    return local_area(cfg.cluster.storage_path) / "outputs" / parent_id / "inputs"


def _publish(tracker, cfg: PipelineConfig, data, done, parent_id: str) -> None:
    """The parent run's pages: its description (pipeline/results_page.py) and report.html
    (pipeline/html_report.py), from the stages' results, curves and output folders."""
    from . import html_report

    evaluated = done.run_ids.get("evaluate")
    found = done.outputs["evaluate"] / graph.get("evaluate").printed if evaluated else None
    table = found.read_text() if found is not None and found.is_file() else None
    tags = tracker.client.get_run(evaluated).data.tags if evaluated else None
    parent = tracker.client.get_run(parent_id)
    recorded = parent.data.tags.get(results_page.COMMIT)  # (read once, when the run began)
    commit = (recorded, parent.data.tags.get("hvae.git_dirty") == "true") if recorded else None
    link = f"#/experiments/{tracker.experiment_id}/runs/{parent_id}/artifacts/{results_page.REPORT}"
    line, facts = results_page.summary(cfg, data.describe(), done.rows, tags, commit, link)
    tracker.set_tags(parent_id, {results_page.NOTE: results_page.page(line, facts, done.outputs, done.run_ids, table)})
    curves = {row.name: tracker.curves(row.run_id) for row in done.rows if graph.get(row.name).trains}
    # (report.html's facts leave out the last line, which points at report.html itself)
    tracker.log_text(parent_id, html_report.pipeline_report(parent.info.run_name, line, table, curves, done.outputs,
                                                            facts[:-1], cache=local_area(cfg.cluster.storage_path) / "curves"),
                     results_page.REPORT)


def local_area(storage_path: str) -> Path:
    """The driver's own folder for stage outputs (before they go to MLflow), downloaded inputs
    and the locks that serialise pipelines on one stage: under a local ``storage_path``
    (shared with every pipeline that uses it), else (a bucket) under this machine's temp
    folder, which serialises only the pipelines started on this machine."""
    if "://" not in storage_path:
        return Path(storage_path)
    if storage_path.startswith("file://"):
        return Path(storage_path[len("file://"):])
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / "hvae" / hashlib.sha256(storage_path.encode()).hexdigest()[:12]


@dataclass
class _Progress:
    code: int = 0
    run_ids: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    rows: list[StageRow] = field(default_factory=list)
    made: set[str] = field(default_factory=set)  # the stages this pipeline ran (not reused)


def _run_stages(tracker, cfg: PipelineConfig, stages: list[PlannedStage], forced: set[str], parent_id: str,
                data, *, pinned: dict[str, str] | None = None) -> _Progress:
    """Each planned stage in order: reused when a finished run has its fingerprint, else run or resumed."""
    from filelock import FileLock

    from .raycluster import shutdown
    from .tracking import TAG_CORRUPT, plain

    work = local_area(cfg.cluster.storage_path) / "outputs" / parent_id
    fetch = _Fetcher(tracker, _inputs_area(cfg, parent_id))
    locks = local_area(cfg.cluster.storage_path) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    done = _Progress()
    driver = {TAG_DRIVER: this_driver()}
    for planned in stages:
        name = planned.name
        with FileLock(str(locks / f"{planned.checkpoint_name}.lock")):
            made_from = {u: done.run_ids[u] for u in planned.stage.upstream}
            reused = None if name in forced else _reuse(tracker, planned, fetch, made_from, (pinned or {}).get(name))
            if reused is not None:
                run_id, done.outputs[name], found = reused
                done.run_ids[name] = run_id
                tracker.set_tags(parent_id, {f"hvae.reused_from.{name}": run_id})
                print(f"[hvae] {name}: reuse MLflow run {run_id} (fingerprint {planned.fingerprint})")
                done.rows.append(StageRow(name, "REUSED", run_id, None, plain(found.data.metrics)))
                continue
            if name in (pinned or {}):  # (its run is gone or broken: training it anew is not what was asked)
                tracker.finish(parent_id, "FAILED")
                print(f"error: {name}: run {pinned[name]} of the pipeline asked for cannot be reused (deleted, "
                      f"not FINISHED, tagged {TAG_CORRUPT}, or its artifacts gone): nothing was trained")
                done.code = 1
                return done
            try:
                t0 = time.perf_counter()
                # inputs are the upstream runs' artifacts, downloaded by run id and verified
                upstream = {u: (done.run_ids[u], _whole(tracker, fetch, u, done, parent_id))
                            for u in planned.stage.upstream}
                fetched = time.perf_counter() - t0
                executed = execute_stage(tracker, cfg, planned, parent_id=parent_id, data=data,
                                         upstream=upstream, out_dir=work / name, tags=driver,
                                         fresh=_why_fresh(planned, forced, done))
                run_id = executed.run_id
                tracker.log_final_metrics(run_id, {"download_seconds": fetched})
            except KeyboardInterrupt as exc:
                done.code = signals.exit_code(exc)
                signals.next_one_exits_at_once(done.code)
                tracker.finish(parent_id, "KILLED")
                shutdown()  # the workers stop; what they checkpointed stays on storage
                print(f"\n[hvae] {'terminated' if done.code == 143 else 'interrupted'} during {name}: runs marked "
                      f"KILLED, checkpoints kept; resume with: {resume_command(parent_id, tracker.uri)}", flush=True)
                return done
            except StageFailed as exc:
                from .raycluster import ResourceError
                from .reach import Unreachable

                tracker.finish(parent_id, "FAILED")
                shutdown()  # flush the workers' log lines before the error line
                print(f"error: {exc}{_tag_corrupt(tracker, fetch, exc.__cause__)}")
                # asked for what cannot be had, or reached for what does not answer
                done.code = 2 if isinstance(exc.__cause__, (ResourceError, Unreachable)) else 1
                return done
        tracker.set_tags(parent_id, {f"hvae.run.{name}": run_id})
        done.outputs[name], done.run_ids[name] = work / name, run_id
        done.made.add(name)
        done.rows.append(StageRow(name, "FINISHED", run_id, executed.seconds, executed.result.metrics))
    return done


def _whole(tracker, fetch: _Fetcher, stage: str, done: _Progress, parent_id: str) -> Path:
    """All artifacts of the run this pipeline uses of ``stage``; a reused one found corrupt now
    is tagged, and the pipeline's decisions start again (_Remake) without the tags they left."""
    try:
        return fetch(done.run_ids[stage])
    except ManifestError as exc:
        not_reusing(tracker, stage, done.run_ids[stage], exc)
        for row in done.rows:
            if row.status == "REUSED":
                tracker.client.delete_tag(parent_id, f"hvae.reused_from.{row.name}")
        raise _Remake from exc


def _why_fresh(planned: PlannedStage, forced: set[str], done: _Progress) -> str | None:
    """Why a stage that runs must not resume from its fingerprint's checkpoints, or None: it is
    forced, or a stage it reads ran in this pipeline (its checkpoints were made from an earlier
    run of that stage, which may have learned other weights or codes)."""
    if planned.name in forced:
        return "--force"
    renewed = planned.renewed(done.made)
    if not renewed:
        return None
    return f"made from a new run of {renewed[0]}" if len(renewed) == 1 else f"made from new runs of {' and '.join(renewed)}"


def _tag_corrupt(tracker, fetch: _Fetcher, cause) -> str:
    """An upstream artifact that would not load: its run is tagged corrupt (never reused again,
    so the next run makes it anew) -> the words that say so, for the error line."""
    from hvae.stages.base import ArtifactError

    from .tracking import TAG_CORRUPT

    if not isinstance(cause, ArtifactError):
        return ""
    for run_id, local in fetch.cache.items():
        if Path(cause.path).resolve().is_relative_to(Path(local).resolve()):
            tracker.set_tags(run_id, {TAG_CORRUPT: str(cause)[:5000]})
            return f" (of run {run_id}, now tagged {TAG_CORRUPT}: the next run makes it again)"
    return ""


def _continue_curve(tracker, stage: str, fingerprint: str, run_id: str, epoch: int) -> None:
    """A resumed stage's new run starts with the curve of the run that was cut."""
    cut = tracker.find_cut(stage, fingerprint)
    tracker.set_tags(run_id, {"hvae.resumed_from_epoch": str(epoch),
                              **({"hvae.resumed_from_run": cut.info.run_id} if cut else {})})
    if cut is not None:
        tracker.copy_history(cut.info.run_id, run_id, epoch)
