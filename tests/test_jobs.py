"""`hvae submit / status / stop` against a real two-node Ray cluster started here on 127.0.0.1:
a head and a second node as separate `ray start` processes, jobs through the Ray Jobs API."""
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SMOKE, free_port, hvae, runs, stage_runs, wait_for_http

pytestmark = pytest.mark.slow  # real clusters, sweeps or several pipelines: `make test` only

VENV_BIN = str(Path(sys.executable).parent)


def _start(args, tmp, name, env):
    return subprocess.Popen([f"{VENV_BIN}/ray", "start", *args, "--block", "--num-cpus=2", "--disable-usage-stats"],
                            cwd=tmp, env=env, stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _alive_nodes(gcs: str, env: dict) -> int:
    out = subprocess.run([f"{VENV_BIN}/ray", "status", f"--address={gcs}"], capture_output=True, text=True,
                         env=env).stdout
    return len(re.findall(r"^ 1 node_", out, re.M)) or out.count("node_")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """Two Ray nodes (each in its own process group, `ray start --block`), removed afterwards."""
    tmp = tmp_path_factory.mktemp("cluster")
    dash, port = free_port(), free_port()
    # the cluster's own token (a fresh machine has no ~/.ray/auth_token): every node and every
    # client here reads it through RAY_AUTH_TOKEN_PATH
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # the job's `python` is this venv's
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **auth}
    # every node gets its own agent ports: the defaults may be taken by another Ray on this machine
    own_ports = lambda: [f"--{flag}={free_port()}" for flag in (  # noqa: E731
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    procs = [_start(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     *own_ports()], tmp, "head", env)]
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                assert procs[0].poll() is None, (tmp / "head.log").read_text()[-2000:]
                assert time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)
        # and its own temp dir: two raylets sharing one session folder garbage-collect each other's
        # runtime-env packages (the job's working directory vanishes under its driver)
        node2_tmp = tempfile.mkdtemp(prefix="ray2_", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        procs.append(_start([f"--address=127.0.0.1:{port}", f"--temp-dir={node2_tmp}", *own_ports()],
                            tmp, "node2", env))
        while _alive_nodes(f"127.0.0.1:{port}", env) < 2:
            assert procs[1].poll() is None, (tmp / "node2.log").read_text()[-2000:]
            assert time.time() < deadline + 60, "the second Ray node did not join"
            time.sleep(1)
        yield SimpleNamespace(address=address, env=auth)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:  # (a graceful stop takes half a minute; nothing is left to save)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_submitted_pipeline_succeeds_on_both_nodes_with_logs_and_mlflow_runs(head, tmp_path):
    proc = hvae(tmp_path, "submit", SMOKE, "cluster.placement_strategy=SPREAD", "--address", head.address,
                env=head.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in proc.stdout
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    client, all_runs = runs(tmp_path)  # the job wrote to this folder's store (a shared filesystem)
    assert client.get_run(parent_id).info.status == "FINISHED"
    for stage in ("stage1", "extract", "priors", "sample", "evaluate"):
        assert [r.info.status for r in stage_runs(all_runs, stage)] == ["FINISHED"]
    # stage-1 workers were placed on the two nodes
    nodes = stage_runs(all_runs, "stage1")[0].data.tags["hvae.worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    print(f"stage-1 worker placement (rank 0, rank 1): {nodes}")
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("[hvae]")))
    status = hvae(tmp_path, "status", job_id, "--address", head.address, "--logs", env=head.env)
    assert status.returncode == 0
    assert f"job {job_id}: SUCCEEDED" in status.stdout and "[hvae] evaluate" in status.stdout


def test_stop_ends_a_long_job(head, tmp_path):
    proc = hvae(tmp_path, "submit", SMOKE, "stage1.epochs=1000", "--address", head.address, "--no-wait", env=head.env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    stopped = hvae(tmp_path, "stop", job_id, "--address", head.address, env=head.env)
    assert stopped.returncode == 0 and f"job {job_id}: STOPPED" in stopped.stdout
    # the stopped driver left its runs RUNNING; the next pipeline start on this store sees that
    # their driver is gone and marks them KILLED
    from hvae.settings.config import TrackingConfig
    from hvae.pipeline.runner import mark_dead_runs_killed
    from hvae.pipeline.tracking import Tracker

    client, _ = runs(tmp_path)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
    deadline = time.time() + 60  # the job is STOPPED; its driver process may take a moment to go
    while client.get_run(parent_id).info.status == "RUNNING" and time.time() < deadline:
        mark_dead_runs_killed(tracker)
        time.sleep(1)
    assert client.get_run(parent_id).info.status == "KILLED"


def test_submit_checks_the_config_before_it_submits(head, tmp_path):
    proc = hvae(tmp_path, "submit", SMOKE, "stage1.epochz=3", "--address", head.address, env=head.env)
    assert proc.returncode == 2 and "stage1.epochz: unknown key" in proc.stderr


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on 127.0.0.1 with its own artifact store (proxied over HTTP)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server_artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, tmp_path / "mlflow.log")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_artifacts_outlive_the_jobs_working_folder_through_the_mlflow_server(head, mlflow_server, tmp_path):
    """Submit with an MLflow server as the store and nothing else set: relative paths resolve on
    the cluster, artifacts go to the server. Delete what the job wrote in its working folder (its
    checkpoints, outputs, prepared data): every stage's artifacts still download through the server, and the
    next job reuses every stage from them."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    here = tmp_path / "client"
    here.mkdir()
    proc = hvae(here, "submit", SMOKE, f"tracking.uri={mlflow_server}", "--address", head.address, env=head.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"job \S+: SUCCEEDED", proc.stdout)
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    assert list(here.iterdir()) == []  # no store, no checkpoints, no artifacts on the submitting machine

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("hvae")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    children = {r.data.tags["hvae.stage"]: r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert sorted(children) == sorted(["stage1", "extract", "priors", "sample", "evaluate"])
    checkpoint = Path(children["stage1"].data.tags["hvae.checkpoint"])
    work = Path(str(checkpoint).split("/ray_results/")[0])  # cluster.storage_path=ray_results, resolved there
    assert work.is_dir() and "runtime_resources" in str(work), work
    # everything the job wrote there (the working folder itself is Ray's cached package: a later
    # job with the same code expects it in place on this still-running node)
    shutil.rmtree(work / "ray_results")

    want = {"stage1": ["model/vqvae2.pt", "model/config.json", "figures/reconstructions.png"],
            "extract": ["codes/schema.json"], "priors": ["model/priors.json", "model/prior_level0.pt"],
            "sample": ["samples/grid.png", "samples/samples.npz"], "evaluate": ["report/nll_table.md"]}
    for stage, files in want.items():
        got = Path(mlflow.artifacts.download_artifacts(run_id=children[stage].info.run_id, artifact_path="",
                                                       dst_path=str(tmp_path / "dl" / stage),
                                                       tracking_uri=mlflow_server))
        for f in files:
            assert (got / f).is_file() and (got / f).stat().st_size > 0, f"{stage}: {f} is not downloadable"
    codes = list((tmp_path / "dl" / "extract" / "codes" / "train").glob("*.parquet"))
    assert codes, "extract: no Parquet codes downloadable"
    assert (tmp_path / "server_artifacts").is_dir()  # the server's own store holds them

    # the next job, in a fresh working folder, finds every stage in the server and reuses it
    again = hvae(here, "submit", SMOKE, f"tracking.uri={mlflow_server}", "--address", head.address, env=head.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    for stage in want:
        assert f"[hvae] {stage}: reuse MLflow run {children[stage].info.run_id}" in again.stdout, stage
