"""Cluster submission through the Ray Jobs API: `hvae submit`, `hvae status`, `hvae stop`.

The job runs `python -m hvae run CONFIG key=value ...` on the cluster in a working directory
(runtime_env working_dir) that holds this checkout's package as ``hvae/`` and its configs, so
the cluster runs exactly this code; the cluster's Python environment provides torch, ray and mlflow.

The job's MLflow parent run is found by its tag ``hvae.job_id`` (the driver reads the job id
from ``HVAE_JOB_ID`` in the job's environment), in the tracking store the job's config names,
which the submission records in the job's metadata.
"""
from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from pathlib import Path

from hvae.settings.config import ConfigError, load_config
from .masking import mask_override
from .fingerprint import ROOT
from .tracking import JOB_ENV, TAG_JOB

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


CONNECT_TIMEOUT_S = 10.0  # the job server must answer within this


def client(address: str):
    # Ray 2.60 clusters use token authentication by default; the client finds the token in
    # RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token
    has_token = ("RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
                 or (Path.home() / ".ray" / "auth_token").is_file())
    if "RAY_AUTH_MODE" not in os.environ and has_token:
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    from .reach import http

    http(address, CONNECT_TIMEOUT_S, "--address", "/api/version")
    return JobSubmissionClient(address)


def job_overrides(config_path: str, overrides: list[str], sweep: bool = False,
                  shared_mount: bool = False) -> tuple[list[str], dict]:
    """Validate the config here -> (the overrides the job runs with, {"uri", "experiment"} of the
    store it tracks to). Relative paths (cluster.storage_path, data.root, an artifact folder)
    travel as they are and are resolved on the cluster, in the job's working directory;
    ``shared_mount``: the cluster mounts this machine's filesystem at the same place, so they
    are pinned to this machine's absolute paths instead."""
    cfg = load_config(config_path, overrides)
    if sweep and cfg.sweep is None:
        raise ConfigError(f"config error: sweep: missing: {config_path} has no sweep section (see configs/sweep.yaml)")
    from .tracking import resolve_uri

    extra = []
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        absolute = resolve_uri(uri)
        extra.append(f"tracking.uri={absolute}")
        print(f"[hvae] note: tracking.uri is a local file; the job writes to {absolute}, which only a cluster "
              f"sharing this filesystem can reach (use an MLflow server, http://..., on a real cluster)")
    if shared_mount:
        pinned = {"tracking.artifact_location": cfg.tracking.artifact_location,
                  "cluster.storage_path": cfg.cluster.storage_path,
                  "data.root": cfg.data.root if cfg.data.dataset != "mnist5k" else None}
        for key, path in pinned.items():
            if path is not None and "://" not in path and not Path(path).is_absolute():
                extra.append(f"{key}={(Path.cwd() / path).resolve()}")
    return list(overrides) + extra, {"uri": resolve_uri(uri), "experiment": cfg.tracking.experiment}


# what a job ships: the package's Python files, its configs and pyproject.toml, nothing else of
# the folder (a .env, keys, data or stores lying there stay here)
SHIPPED_PACKAGES = ("settings", "models", "stages", "pipeline")
SHIPPED_MODULES = ("__init__.py", "__main__.py")  # the package hvae's own files (the root's)
SHIPPED_FILES = ("pyproject.toml",)


def shipped_files(config_path: str) -> list[Path]:
    """The files a job uploads, relative to the project: the package's Python files, the YAML
    files of configs/, pyproject.toml, and the config (with what it extends) wherever in the
    project it is."""
    import yaml

    files = {p.relative_to(ROOT) for pkg in SHIPPED_PACKAGES for p in (ROOT / pkg).rglob("*.py")
             if "__pycache__" not in p.parts}
    files |= {Path(m) for m in SHIPPED_MODULES}
    files |= {p.relative_to(ROOT) for p in (ROOT / "configs").glob("*.yaml")}
    files |= {Path(f) for f in SHIPPED_FILES if (ROOT / f).is_file()}
    config = Path(config_path).resolve()
    while config.is_file():
        files.add(config.relative_to(ROOT))
        parent = (yaml.safe_load(config.read_text()) or {}).get("extends")
        if not isinstance(parent, str):
            break
        config = (config.parent / parent).resolve()
    return sorted(files)


def staged_path(rel: Path) -> Path:
    """Where a shipped file lands in the job's working directory: the package's files under
    ``hvae/`` (laid out as installed, so ``python -m hvae`` there imports exactly them, before
    any hvae the cluster's image holds), the configs and pyproject.toml where they are."""
    if rel.parts[0] in SHIPPED_PACKAGES or rel.as_posix() in SHIPPED_MODULES:
        return Path("hvae") / rel
    return rel


def stage(config_path: str, folder: Path) -> str:
    """Copy the shipped files into ``folder`` (the job's working directory) -> one line saying what ships."""
    import shutil

    placed = [(ROOT / rel, folder / staged_path(rel)) for rel in shipped_files(config_path)]
    for source, target in placed:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    size = sum(target.stat().st_size for _, target in placed)
    tops = sorted({rel.parts[0] + ("/" if len(rel.parts) > 1 else "")
                   for rel in (target.relative_to(folder) for _, target in placed)})
    return f"{len(placed)} files, {size / 1e6:.2f} MB: {', '.join(tops)}"


def runtime_env(job_id: str, working_dir: Path | str = ROOT) -> dict:
    """cluster/runtime_env.yaml with ``working_dir`` (the staged files) and the job's id."""
    import yaml

    env = yaml.safe_load(RUNTIME_ENV.read_text()) or {}
    return {**env, "working_dir": str(working_dir), "env_vars": {**env.get("env_vars", {}), JOB_ENV: job_id}}


def parent_run(tracking: dict, job_id: str) -> str | None:
    """The MLflow parent (pipeline or sweep) run the job opened, by its hvae.job_id tag; None until it exists."""
    from hvae.settings.config import TrackingConfig
    from .tracking import Tracker, store_exists

    if not store_exists(tracking["uri"]):
        return None
    from mlflow.exceptions import MlflowException

    try:
        tracker = Tracker(TrackingConfig(uri=tracking["uri"], experiment=tracking["experiment"]), create=False)
        found = [r for r in tracker.search([f"tags.`{TAG_JOB}` = '{job_id}'"])
                 if r.data.tags.get("hvae.kind") in ("pipeline", "sweep")]
    except MlflowException:  # a store the job has not set up yet
        return None
    return found[-1].info.run_id if found else None  # the first one it opened (a sweep's, before its pipelines)


def _tracking_of(jobs, job_id: str) -> dict | None:
    meta = jobs.get_job_info(job_id).metadata or {}
    if "hvae.tracking_uri" not in meta:
        return None
    return {"uri": meta["hvae.tracking_uri"], "experiment": meta.get("hvae.experiment", "hvae")}


def entrypoint(config_path: str, overrides: list[str], command: str = "run") -> str:
    cfg_file = Path(config_path).resolve()
    try:
        rel = cfg_file.relative_to(ROOT)
    except ValueError:
        raise ConfigError(f"config {config_path} must be inside the project folder {ROOT} "
                          f"(the job uploads that folder)") from None
    return " ".join(["python", "-m", "hvae", command, shlex.quote(staged_path(rel).as_posix()),
                     *(shlex.quote(o) for o in overrides)])


def submit(config_path: str, overrides: list[str], address: str, wait: bool = True, sweep: bool = False,
           shared_mount: bool = False) -> int:
    overrides, tracking = job_overrides(config_path, overrides, sweep=sweep, shared_mount=shared_mount)
    command = entrypoint(config_path, overrides, "sweep" if sweep else "run")
    jobs = client(address)
    job_id = f"hvae_{secrets.token_hex(8)}"
    metadata = {"hvae.config": Path(config_path).name, "hvae.tracking_uri": tracking["uri"],
                "hvae.experiment": tracking["experiment"]}
    deadline = time.time() + 300  # a head that has just started may take minutes to start its job agent
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hvae-job-") as folder:
        print(f"[hvae] shipping {stage(config_path, Path(folder))}")
        while True:
            try:
                job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env(job_id, folder),
                                         submission_id=job_id, metadata=metadata)
                break
            except RuntimeError as exc:  # a head that has just started has no job agent yet
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(3)
    print(f"[hvae] submitted job {job_id} to {address}")
    print(f"[hvae] entrypoint: {' '.join(mask_override(w) for w in command.split(' '))}")
    print(f"[hvae] logs: hvae status {job_id} --logs --address {address}   (or the Ray dashboard)")
    return follow(jobs, job_id, tracking, stream=wait)


def follow(jobs, job_id: str, tracking: dict, stream: bool = True, timeout: float | None = None) -> int:
    """Stream the job's logs (or only wait for its MLflow parent run) until it ends."""
    shown, parent, start = 0, None, time.time()
    while True:
        status = str(jobs.get_job_status(job_id).value)
        logs = jobs.get_job_logs(job_id)
        if stream and len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
        shown = len(logs)
        if parent is None and (parent := parent_run(tracking, job_id)) is not None:
            print(f"[hvae] job {job_id}: MLflow parent run {parent}", flush=True)
            if not stream:
                return 0
        if status in TERMINAL:
            print(f"[hvae] job {job_id}: {status}" + (f" (MLflow parent run {parent})" if parent else ""))
            return 0 if status == "SUCCEEDED" else 1
        if timeout is not None and time.time() - start > timeout:
            print(f"[hvae] job {job_id}: still {status} after {timeout:.0f} s")
            return 1
        time.sleep(2)


def status(job_id: str, address: str, logs: bool = False) -> int:
    jobs = client(address)
    info = jobs.get_job_info(job_id)
    text = jobs.get_job_logs(job_id)
    tracking = _tracking_of(jobs, job_id)
    parent = parent_run(tracking, job_id) if tracking else None
    print(f"job {job_id}: {info.status}" + (f"  MLflow parent run {parent}" if parent else ""))
    if info.message:
        print(info.message)
    if logs:
        print(text, end="")
    return 0


def stop(job_id: str, address: str, wait_s: float = 60) -> int:
    jobs = client(address)
    jobs.stop_job(job_id)
    deadline = time.time() + wait_s
    while str(jobs.get_job_status(job_id).value) not in TERMINAL and time.time() < deadline:
        time.sleep(1)
    final = str(jobs.get_job_status(job_id).value)
    print(f"job {job_id}: {final}")
    return 0 if final in TERMINAL else 1
