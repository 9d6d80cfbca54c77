"""The cluster manifests parse, and the commands in them name real configs and valid CLI options."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from hvae.pipeline.cli import parse_args
from hvae.settings.config import load_config
from hvae.pipeline.jobs import runtime_env

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def check_command(command: str) -> None:
    """A `hvae ...` / `python -m hvae ...` command line: the CLI accepts it, its config validates."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "hvae"]:
        words = words[3:]
    else:
        assert words[0] == "hvae", command
        words = words[1:]
    args = parse_args(words)  # argparse exits on an unknown option
    assert args.command in ("run", "submit")
    config, overrides = args.items[0], args.items[1:]
    assert (ROOT / config).is_file(), f"{config} does not exist"
    load_config(ROOT / config, overrides)


def test_rayjob_runs_a_real_config_on_gpu_workers_with_shared_storage():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    check_command(job["spec"]["entrypoint"])
    cluster = job["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    storage = re.search(r"cluster.storage_path=(\S+)", job["spec"]["entrypoint"]).group(1)
    for spec in (cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]):
        mounts = [m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])]
        assert any(storage.startswith(m) for m in mounts), "checkpoints must be on the shared volume"
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert cluster["authOptions"] == {"mode": "token"}  # the cluster refuses anyone without its token


def test_cluster_launcher_yaml_and_its_commands():
    text = (CLUSTER / "launcher.yaml").read_text()
    spec = yaml.safe_load(text)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"):
        assert key in spec
    assert spec["head_node_type"] in spec["available_node_types"]
    assert any("g5" in t["node_config"]["InstanceType"] for t in spec["available_node_types"].values())
    starts = spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in spec["file_mounts"]  # every node holds the token
    commands = re.findall(r"(hvae (?:run|submit) [^'\n]+)", text)
    assert len(commands) >= 2
    for command in commands:
        check_command(command)


def test_runtime_env_keeps_the_venv_and_stores_out_of_the_upload(tmp_path):
    env = runtime_env("hvae_0123", tmp_path)
    assert Path(env["working_dir"]) == tmp_path
    assert {".venv", ".git", "mlartifacts", "ray_results"} <= set(env["excludes"])
    # the job's driver learns its id from the environment and tags its MLflow parent run with it
    assert env["env_vars"]["HVAE_JOB_ID"] == "hvae_0123" and env["env_vars"]["RAY_DEDUP_LOGS"] == "0"


def test_a_job_ships_the_allow_list_only_and_secrets_are_masked_wherever_printed(tmp_path):
    """A .env, a key or a certificate lying in the project folder stays here; the staged folder
    holds the packages, configs/ and pyproject.toml; a credential in a value is never shown."""
    from hvae.pipeline.jobs import stage
    from hvae.pipeline.masking import mask, mask_override

    planted = [ROOT / ".env", ROOT / "id_rsa", ROOT / "configs" / "cert.pem", ROOT / "models" / "notes.txt"]
    try:
        for p in planted:
            p.write_text("SECRET=1\n")
        line = stage(str(ROOT / "configs" / "smoke.yaml"), tmp_path)
    finally:
        for p in planted:
            p.unlink()
    shipped = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"configs/smoke.yaml", "hvae/__init__.py", "hvae/__main__.py", "hvae/pipeline/cli.py",
            "hvae/stages/train_loop.py", "hvae/models/vqvae2.py", "pyproject.toml"} <= shipped
    assert not {".env", "id_rsa", "configs/cert.pem", "hvae/models/notes.txt", "models/notes.txt"} & shipped
    assert {s.split("/")[0] for s in shipped} == {"configs", "hvae", "pyproject.toml"}
    assert {s.split("/")[1] for s in shipped if s.count("/") > 1 and s.startswith("hvae/")} == {"settings", "models", "pipeline", "stages"}
    assert re.fullmatch(r"\d+ files, [0-9.]+ MB: configs/, hvae/, pyproject.toml", line)
    assert mask_override("aws_secret_access_key=abc") == "aws_secret_access_key=***"
    assert mask_override("data.root=s3://b/x?endpoint_override=h:9000&access_key=A&secret_key=s") == \
        "data.root=s3://b/x?endpoint_override=h:9000&access_key=***&secret_key=***"
    assert mask("tracking.uri=http://bob:hunter2@mlflow:5000") == "tracking.uri=http://bob:***@mlflow:5000"
    assert mask_override("stage1.lr=1e-3") == "stage1.lr=1e-3"
    from hvae.pipeline.runner import resume_command
    assert resume_command("abc", "http://bob:hunter2@mlflow:5000") == "hvae resume abc --uri http://bob:***@mlflow:5000"


@pytest.mark.parametrize("name", ["rayjob.yaml", "launcher.yaml", "runtime_env.yaml", "Dockerfile"])
def test_each_manifest_starts_with_the_command_that_uses_it(name):
    first = (CLUSTER / name).read_text().splitlines()[0]
    assert first.startswith("# ") and any(w in first for w in ("kubectl", "ray up", "docker build", "Ray runtime"))


def test_dockerfile_copies_what_the_pipeline_imports():
    text = (CLUSTER / "Dockerfile").read_text()
    for folder in ("settings", "models", "stages", "pipeline", "configs"):
        assert f"COPY --chown=ray:users {folder} {folder}" in text
    assert "__init__.py __main__.py ./" in text  # the package hvae's own files: the root is the package
    # torch pinned to the version the tests run with, from a CUDA build's index
    import torch

    assert f"torch=={torch.__version__.split('+')[0]} " in text and "download.pytorch.org/whl/cu" in text


def test_a_sweep_is_submitted_as_hvae_sweep():
    from hvae.settings.config import ConfigError
    from hvae.pipeline.jobs import entrypoint, job_overrides

    overrides, _ = job_overrides(str(ROOT / "configs" / "sweep.yaml"), ["sweep.num_samples=4"], sweep=True)
    command = entrypoint(str(ROOT / "configs" / "sweep.yaml"), overrides, "sweep")
    assert command.startswith("python -m hvae sweep configs/sweep.yaml sweep.num_samples=4")
    assert parse_args(shlex.split(command)[3:]).command == "sweep"
    with pytest.raises(ConfigError, match="has no sweep section"):
        job_overrides(str(ROOT / "configs" / "smoke.yaml"), [], sweep=True)
    # sweeps' trial drivers ask for memory, which every node has: no head-only custom resource
    assert "tune_driver" not in (CLUSTER / "rayjob.yaml").read_text() + (CLUSTER / "launcher.yaml").read_text()


def test_submit_leaves_relative_paths_to_the_cluster_unless_it_shares_this_filesystem(tmp_path, monkeypatch):
    from hvae.pipeline.jobs import job_overrides

    monkeypatch.chdir(tmp_path)
    args = ["tracking.uri=http://mlflow:5000", "cluster.storage_path=results", "data.dataset=imagefolder",
            "data.root=images"]
    overrides, tracking = job_overrides(str(ROOT / "configs" / "smoke.yaml"), args)
    assert overrides == args and tracking["uri"] == "http://mlflow:5000"
    pinned, _ = job_overrides(str(ROOT / "configs" / "smoke.yaml"), args, shared_mount=True)
    assert pinned[len(args):] == [f"cluster.storage_path={tmp_path / 'results'}", f"data.root={tmp_path / 'images'}"]


def test_artifacts_go_to_the_servers_store_or_beside_the_sqlite_file(tmp_path):
    from hvae.pipeline.tracking import resolve_artifact_location

    assert resolve_artifact_location(None, "http://mlflow:5000") is None  # the server's mlflow-artifacts:
    assert resolve_artifact_location(None, "sqlite:///mlruns.db", base=tmp_path) == (tmp_path / "mlartifacts").as_uri()
    assert resolve_artifact_location("s3://bucket/art", "http://mlflow:5000") == "s3://bucket/art"
    assert resolve_artifact_location("art", "http://mlflow:5000", base=tmp_path) == (tmp_path / "art").as_uri()


def test_a_run_whose_driver_on_another_host_stopped_beating_is_marked_killed(tmp_path):
    """A head pod that died with its node leaves its runs RUNNING; the next start anywhere sees
    that their heartbeat stopped and marks them KILLED (a fresh heartbeat keeps a run alive;
    a run that never beat, from another host, is left alone)."""
    import time

    from hvae.settings.config import TrackingConfig
    from hvae.pipeline.liveness import STALE_S, TAG_DRIVER, TAG_HEARTBEAT, Heartbeat
    from hvae.pipeline.runner import mark_dead_runs_killed
    from hvae.pipeline.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
    elsewhere = {TAG_DRIVER: "head-pod-gone:12345:678"}
    stale = tracker.start_parent("stale", {}, {**elsewhere, TAG_HEARTBEAT: f"{time.time() - STALE_S - 60:.0f}"})
    stale_child = tracker.start_child(stale, "stage1", "f" * 16, {}, elsewhere)
    fresh = tracker.start_parent("fresh", {}, {**elsewhere, TAG_HEARTBEAT: f"{time.time():.0f}"})
    fresh_child = tracker.start_child(fresh, "stage1", "e" * 16, {}, elsewhere)
    silent = tracker.start_parent("silent", {}, elsewhere)
    assert sorted(mark_dead_runs_killed(tracker)) == sorted([stale, stale_child])
    status = {r: tracker.client.get_run(r).info.status for r in (stale, stale_child, fresh, fresh_child, silent)}
    assert status == {stale: "KILLED", stale_child: "KILLED", fresh: "RUNNING", fresh_child: "RUNNING",
                      silent: "RUNNING"}

    # a live driver's heartbeat: written at once, then every `every` seconds
    with Heartbeat(tracker.uri, silent, every=0.2):
        time.sleep(0.5)
    beat = float(tracker.client.get_run(silent).data.tags[TAG_HEARTBEAT])
    assert time.time() - beat < 5
