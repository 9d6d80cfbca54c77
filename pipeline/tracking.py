"""MLflow tracking: one parent run per pipeline, one nested child run per stage.

Only ``pipeline/`` imports MLflow. Stages get a ``MetricsReporter``: a small picklable
callable that logs a dict of metrics to one run, usable inside a Ray Train worker.
Everything goes through ``MlflowClient`` with explicit run and experiment ids (no global
active run, no ``mlflow.set_experiment``, whose exported environment variable would
override experiment names in Ray's integrations).
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TAG_STAGE = "hvae.stage"
TAG_FINGERPRINT = "hvae.fingerprint"
TAG_PIPELINE = "hvae.pipeline_run"
TAG_PARENT = "mlflow.parentRunId"
TAG_CORRUPT = "hvae.corrupt"
TAG_UPSTREAM = "hvae.upstream"  # hvae.upstream.<stage>: the run of that stage a stage run was made from
TAG_JOB = "hvae.job_id"  # the Ray job that ran a pipeline or sweep (`hvae submit`)
JOB_ENV = "HVAE_JOB_ID"  # set by `hvae submit` in the job's environment


def store_exists(uri: str) -> bool:
    """Whether the tracking store is there (a look must not create a SQLite file)."""
    uri = resolve_uri(uri)
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so Ray workers (other cwd) reach the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(((base or Path.cwd()) / uri[len(prefix):]).resolve())
    return uri


def resolve_artifact_location(location: str | None, uri: str, base: Path | None = None) -> str | None:
    """Where a new experiment keeps its artifacts. Set: that place (a relative folder made an
    absolute file URI). Unset: a tracking server's own artifact store (``mlflow-artifacts:``,
    proxied over HTTP, so artifacts outlive the cluster that wrote them), or ``mlartifacts/``
    beside a SQLite store's file; None lets MLflow choose (other stores)."""
    if location is not None:
        return location if "://" in location else ((base or Path.cwd()) / location).resolve().as_uri()
    uri = resolve_uri(uri, base)
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def relocate(uri: str) -> list[str]:
    """A SQLite store copied or moved with its ``mlartifacts/`` folder: the locations it recorded
    (absolute, as MLflow keeps them) are made those beside its file now, so its runs' artifacts are
    found again (by `hvae ui`, reuse, `hvae report`). An experiment whose recorded folder is
    somewhere else on purpose (tracking.artifact_location) keeps it: only a folder ending in
    ``mlartifacts`` is moved, and only when the one beside the file holds that experiment's runs.
    Returns one line per experiment moved."""
    import sqlite3

    uri = resolve_uri(uri)
    if not uri.startswith("sqlite:///") or not store_exists(uri):
        return []
    db = Path(uri[len("sqlite:///"):])
    here = db.parent / "mlartifacts"
    if not here.is_dir():
        return []
    moved = []
    with sqlite3.connect(db, timeout=30) as con:
        for exp_id, location in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
            if not location or not location.startswith("file://") or location.rstrip("/") == here.as_uri():
                continue
            if Path(location.rstrip("/")).name != "mlartifacts":
                continue
            runs = [r for (r,) in con.execute("SELECT run_uuid FROM runs WHERE experiment_id = ?", (exp_id,))]
            if not runs or not any((here / r).is_dir() for r in runs):
                continue
            old = location.rstrip("/")
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (here.as_uri(), exp_id))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                        "AND artifact_uri LIKE ? || '/%'", (here.as_uri(), len(old) + 1, exp_id, old))
            moved.append(f"experiment {exp_id}: artifacts recorded at {old} are read from {here.as_uri()}")
    return moved


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def plain(metrics: dict) -> dict:
    """A run's metrics without their stage's namespace (``stage1/val_bpd`` -> ``val_bpd``), as the
    stages named them; a run logged before the namespaces reads the same."""
    return {k.split("/", 1)[1] if "/" in k else k: v for k, v in metrics.items()}


class MetricsReporter:
    """Logs ``metrics`` at ``step`` to one MLflow run, each name after ``prefix`` (a stage run's
    ``<stage>/``: the UI's charts then fall into one section per stage, and stage 1's ``train_loss``
    is never drawn beside the priors'). Picklable: holds only the URI, run id and prefix."""

    def __init__(self, tracking_uri: str, run_id: str, prefix: str = ""):
        self.tracking_uri, self.run_id, self.prefix = tracking_uri, run_id, prefix

    def __call__(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        ts = int(time.time() * 1000)
        batch = [Metric(self.prefix + k, float(v), ts, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)

    def images(self, images: dict, step: int) -> None:
        """Pictures ({name: uint8 H x W x C array}) at ``step``: the run page's images, with a
        slider over the steps."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        for name, array in images.items():
            client.log_image(self.run_id, array, key=name, step=int(step))


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the duration, then as it was. Importing MLflow
    and opening its store allocate objects that live as long as the process, and the collector,
    set off by those allocations, walks the growing heap again and again and finds no garbage:
    about 0.3 s of a reused run on 2 cores. When MLflow is imported here (the process's first
    store), what the process holds is then frozen (``_freeze_long_lived``): else the first
    collections after, of the young generations where all of it still sits, walk it twice more
    (0.17 s each, in a reused run's next MLflow calls). `python bench/reuse.py` times both."""
    import gc
    import sys

    first = "mlflow" not in sys.modules
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if first:
            _freeze_long_lived()
        if was:
            gc.enable()


def _freeze_long_lived() -> None:
    """Every object the collector tracks moved to its permanent generation (``gc.freeze``), which
    no collection walks: the modules, classes and the store just opened, made once a process."""
    import gc

    gc.freeze()


class Tracker:
    def __init__(self, tracking_cfg, create: bool = True):
        with _collector_paused():  # (MLflow's import and its store's opening: no garbage to find)
            self._open(tracking_cfg, create)
        self._prefixes: dict[str, str] = {}  # run id -> its metrics' namespace ("<stage>/" for a stage run)

    def _open(self, tracking_cfg, create: bool) -> None:
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(tracking_cfg.uri)
        self.experiment_name = tracking_cfg.experiment
        self._cfg = tracking_cfg
        if self.uri.startswith(("http://", "https://")):
            from .reach import http

            http(self.uri, getattr(tracking_cfg, "timeout_s", 10.0), "tracking.uri", "/health")
        # Two pipelines starting at once on a new SQLite file would both create its tables
        # (and the experiment): the first to take the lock does it, the second finds it done.
        sqlite = self.uri.startswith("sqlite:///")
        with FileLock(self.uri[len("sqlite:///"):] + ".lock") if sqlite else contextlib.nullcontext():
            self.client = MlflowClient(self.uri)  # creates and migrates the database
            for line in relocate(self.uri):  # (a store copied or moved with its artifacts)
                print(f"[hvae] the store moved: {line}")
            exp = self.client.get_experiment_by_name(tracking_cfg.experiment)
            if exp is None and create:
                self.client.create_experiment(
                    tracking_cfg.experiment,
                    artifact_location=resolve_artifact_location(tracking_cfg.artifact_location, self.uri),
                )
                exp = self.client.get_experiment_by_name(tracking_cfg.experiment)
        self.experiment_id = exp.experiment_id if exp is not None else None

    def reports(self) -> "Tracker":
        """The tracker of this experiment's reports (``<experiment>-reports``, created when
        missing): `hvae report` runs kept out of the pipelines' run list."""
        return Tracker(self._cfg.model_copy(update={"experiment": f"{self.experiment_name}-reports"}))

    @property
    def shown_uri(self) -> str:
        """The URI as printed: a password in it masked (pipeline/masking.py)."""
        from .masking import mask

        return mask(self.uri)

    # ---- runs ------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, str], params: dict | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_parent(self, name: str, config: dict, tags: dict[str, str]) -> str:
        return self.start_run(name, tags, params=config)

    def start_child(self, parent_id: str, stage: str, fingerprint: str, params: dict,
                    extra_tags: dict[str, str] | None = None) -> str:
        tags = {TAG_PARENT: parent_id, TAG_STAGE: stage, TAG_FINGERPRINT: fingerprint, TAG_PIPELINE: parent_id,
                **(extra_tags or {})}
        run_id = self.start_run(stage, tags, params=params)
        self._prefixes[run_id] = f"{stage}/"
        return run_id

    def _prefix(self, run_id: str) -> str:
        """The namespace of a run's metrics: ``<stage>/`` for a stage run, none for the others."""
        if run_id not in self._prefixes:
            stage = self.client.get_run(run_id).data.tags.get(TAG_STAGE)
            self._prefixes[run_id] = f"{stage}/" if stage else ""
        return self._prefixes[run_id]

    # ---- finding earlier work -------------------------------------------------------
    def _search(self, filters: list[str], order: str = "attributes.start_time DESC", max_results: int = 50):
        if self.experiment_id is None:
            return []
        return self.client.search_runs([self.experiment_id], " AND ".join(filters), order_by=[order],
                                       max_results=max_results)

    def search(self, filters: list[str]):
        """Every run of the experiment matching all ``filters`` (MLflow search syntax), newest first."""
        return self._search(filters, max_results=10000)

    def find_finished(self, stage: str, fingerprint: str, upstream: dict[str, str] | None = None,
                      run_id: str | None = None):
        """The newest FINISHED, uncorrupted child run of ``stage`` with this fingerprint (the run
        ``run_id`` alone when given), or None. ``upstream`` ({stage: run id}): only a run made
        from those very runs, so that what it hands on agrees with them (a fingerprint says what
        a run was made with, not from which run of the stage before: that may have run again since)."""
        made_from = [f"tags.`{TAG_UPSTREAM}.{u}` = '{run}'" for u, run in (upstream or {}).items()]
        which = [f"attributes.run_id = '{run_id}'"] if run_id else []
        for run in self._search([f"tags.`{TAG_STAGE}` = '{stage}'", f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'",
                                 "attributes.status = 'FINISHED'", *made_from, *which]):
            if TAG_CORRUPT not in run.data.tags:
                return run
        return None

    def find_cut(self, stage: str, fingerprint: str):
        """The newest KILLED or FAILED child run of ``stage`` with this fingerprint, or None."""
        runs = [r for status in ("KILLED", "FAILED")
                for r in self._search([f"tags.`{TAG_STAGE}` = '{stage}'", f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'",
                                       f"attributes.status = '{status}'"])]
        return max(runs, key=lambda r: r.info.start_time) if runs else None

    def curves(self, run_id: str, pattern: str = r"(train|val)_(loss|bpd|bits_per_code)") -> dict[str, list]:
        """A stage run's per-epoch curves whose names match ``pattern``: {name: [(step, value)]}."""
        import re

        keys = [k for k in plain(self.client.get_run(run_id).data.metrics) if re.fullmatch(pattern, k)]
        return {k: [(m.step, m.value) for m in self.metric_history(run_id, k)] for k in keys}

    def metric_history(self, run_id: str, key: str) -> list:
        """The curve of a metric as the stage named it (its namespace added here)."""
        return self.client.get_metric_history(run_id, self._prefix(run_id) + key)

    def running_runs(self):
        return self._search(["attributes.status = 'RUNNING'"])

    def copy_history(self, src_run: str, dst_run: str, last_step: int) -> int:
        """Copy the per-epoch curves of ``src_run`` up to ``last_step`` into ``dst_run``."""
        from mlflow.entities import Metric

        keys = [k for k in self.client.get_run(src_run).data.metrics]
        batch = []
        for k in keys:
            batch += [Metric(k, m.value, m.timestamp, m.step) for m in self.client.get_metric_history(src_run, k)
                      if m.step <= last_step]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(dst_run, metrics=batch[i : i + 1000])
        return len(batch)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        from .masking import mask

        flat = [Param(k, mask(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        self.reporter(run_id)(metrics, 0 if step is None else step)

    def log_final_metrics(self, run_id: str, metrics: dict) -> None:
        """Log a stage's result metrics, except those it already logged per epoch (their curve stays)."""
        logged = plain(self.client.get_run(run_id).data.metrics)
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in logged})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def delete_tag(self, run_id: str, key: str) -> None:
        if key in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder))

    def log_table(self, run_id: str, records: list[dict], name: str) -> None:
        """Rows of {column: value} as an MLflow table artifact (the UI shows it as a table)."""
        import pandas as pd

        self.client.log_table(run_id, pd.DataFrame.from_records(records), name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def reopen(self, run_id: str, tags: dict[str, str]) -> None:
        """An ended run RUNNING again (a sweep that goes on where it was cut), with ``tags``."""
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, tags)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def download(self, run_id: str, dst: Path) -> Path:
        """All artifacts of a run into ``dst`` (fresh), through MLflow's artifact store."""
        import shutil

        import mlflow.artifacts

        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst), tracking_uri=self.uri))

    def download_files(self, run_id: str, rels: list[str], dst: Path) -> Path:
        """Some artifacts of a run (paths relative to its root) into ``dst``, at those paths."""
        import mlflow.artifacts

        for rel in rels:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=rel, dst_path=str((dst / rel).parent),
                                                tracking_uri=self.uri)
        return dst

    def listing(self, run_id: str, path: str | None = None) -> dict[str, int]:
        """Every artifact file of a run as the store lists it: {path: size in bytes}."""
        out: dict[str, int] = {}
        for info in self.client.list_artifacts(run_id, path):
            if info.is_dir:
                out.update(self.listing(run_id, info.path))
            else:
                out[info.path] = info.file_size
        return out

    def log_dataset(self, run_id: str, folder: Path, rel: str, context: str) -> None:
        """Register a dataset folder the run wrote (and logged as artifacts) as a run input. Its
        source is the artifact URI as the store gives it (file://, s3://, or mlflow-artifacts:
        behind a tracking server, which MLflow's source resolvers do not take)."""
        import hashlib

        digest = hashlib.sha256()
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                digest.update(f.name.encode())
                digest.update(f.read_bytes())
        self.log_data_input(run_id, rel.replace("/", "-"), digest.hexdigest()[:16],
                            f"{self.artifact_uri(run_id)}/{rel}", None, context)

    def log_data_input(self, run_id: str, name: str, digest: str, location: str, profile: dict | None,
                       context: str) -> None:
        """Data a stage reads (or wrote), as a run input: ``name`` (e.g. data.dataset), a digest
        (the data's fingerprint), where it is as its source, a few facts as its profile."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        scheme = location.split(":", 1)[0] if re.match(r"[a-z][a-z0-9+.-]+:", location) else "local"
        scheme = "local" if scheme == "file" else scheme
        dataset = Dataset(name=name, digest=digest[:36], source_type=scheme, source=json.dumps({"uri": location}),
                          profile=json.dumps(profile) if profile is not None else None)
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=[tag])])

    def reporter(self, run_id: str) -> MetricsReporter:
        return MetricsReporter(self.uri, run_id, self._prefix(run_id))

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def ui_url(self, run_id: str, host: str = "http://127.0.0.1:5000") -> str:
        return f"{host}/#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning"
