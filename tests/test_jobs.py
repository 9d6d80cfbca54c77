"""`hvae submit / status / stop` against a real two-node Ray cluster started here on 127.0.0.1:
a head and a second node as separate `ray start` processes, jobs through the Ray Jobs API."""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import SMOKE, hvae, runs, stage_runs

pytestmark = pytest.mark.slow  # real clusters, sweeps or several pipelines: `make test` only

VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    dash, port = _free_port(), _free_port()
    # the job's `python` is this venv's; nodes joining the token-authenticated head need the mode set
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # every node gets its own agent ports: the defaults may be taken by another Ray on this machine
    own_ports = lambda: [f"--{flag}={_free_port()}" for flag in (  # noqa: E731
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
        yield address
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
    proc = hvae(tmp_path, "submit", SMOKE, "cluster.placement_strategy=SPREAD", "--address", head)
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
    status = hvae(tmp_path, "status", job_id, "--address", head, "--logs")
    assert status.returncode == 0
    assert f"job {job_id}: SUCCEEDED" in status.stdout and "[hvae] evaluate" in status.stdout


def test_stop_ends_a_long_job(head, tmp_path):
    proc = hvae(tmp_path, "submit", SMOKE, "stage1.epochs=1000", "--address", head, "--no-wait")
    assert proc.returncode == 0, proc.stdout[-3000:]
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    stopped = hvae(tmp_path, "stop", job_id, "--address", head)
    assert stopped.returncode == 0 and f"job {job_id}: STOPPED" in stopped.stdout
    # the stopped driver left its runs RUNNING; the next pipeline start on this store sees that
    # their driver is gone and marks them KILLED
    from pipeline.config import TrackingConfig
    from pipeline.runner import mark_dead_runs_killed
    from pipeline.tracking import Tracker

    client, _ = runs(tmp_path)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
    deadline = time.time() + 60  # the job is STOPPED; its driver process may take a moment to go
    while client.get_run(parent_id).info.status == "RUNNING" and time.time() < deadline:
        mark_dead_runs_killed(tracker)
        time.sleep(1)
    assert client.get_run(parent_id).info.status == "KILLED"


def test_submit_checks_the_config_before_it_submits(head, tmp_path):
    proc = hvae(tmp_path, "submit", SMOKE, "stage1.epochz=3", "--address", head)
    assert proc.returncode == 2 and "stage1.epochz: unknown key" in proc.stderr
