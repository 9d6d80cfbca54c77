"""Helpers for the end-to-end tests: run the real CLI in a folder, read its MLflow store."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def pytest_collection_modifyitems(config, items):
    """HVAE_TEST_SHUFFLE=<seed>: run the files in a shuffled order and each file's tests in a
    shuffled order (`make test-shuffled`), to show that no test depends on another having run
    first. (Files stay whole so that a module's shared pipeline is built once.)"""
    seed = os.environ.get("HVAE_TEST_SHUFFLE")
    if not seed:
        return
    import random

    rng = random.Random(int(seed))
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(str(item.fspath), []).append(item)
    order = list(files)
    rng.shuffle(order)
    items[:] = [item for name in order for item in rng.sample(files[name], len(files[name]))]
    print(f"\ntest order shuffled with seed {seed}: {', '.join(Path(name).name for name in order)}")


def hvae(cwd, *args, timeout=600, env=None):
    """Run ``python -m hvae ARGS`` in ``cwd`` to completion (``env``: extra environment variables)."""
    return subprocess.run([sys.executable, "-m", "hvae", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def hvae_background(cwd, *args, log=None, env: dict | None = None):
    """Start ``python -m hvae ARGS`` in its own process group (so a test can kill all of it),
    with ``env`` added to this process's environment."""
    out = open(log or Path(cwd) / "driver.log", "w")
    return subprocess.Popen([sys.executable, "-m", "hvae", *args], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def kill_group(proc) -> None:
    """SIGKILL a background run and every process of its group (its local Ray included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(predicate, timeout, what, every=0.5):
    """Poll ``predicate`` every ``every`` s until it holds and return what it returned; fail
    naming ``what`` after ``timeout`` s."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url, proc, log, timeout=120):
    """Until ``url`` answers; fail with the end of ``log`` if ``proc`` (the server) exits or
    ``timeout`` s pass first."""
    import time
    import urllib.request

    end = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            assert proc.poll() is None and time.time() < end, f"{url} did not answer:\n" + Path(log).read_text()[-2000:]
            time.sleep(0.5)


def runs(cwd, experiment="hvae"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def stage_runs(all_runs, stage):
    return [r for r in all_runs if r.data.tags.get("hvae.stage") == stage]


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """One finished smoke pipeline, shared: the end-to-end checks read it, the reuse tests build on it.

    Returns (folder, completed process, parent run id)."""
    cwd = tmp_path_factory.mktemp("smoke")
    proc = hvae(cwd, "run", SMOKE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    return cwd, proc, parent


def pipeline_runs(cwd, parent_id):
    """{stage: run} of the child runs that one pipeline (parent run) created."""
    _, all_runs = runs(cwd)
    return {r.data.tags["hvae.stage"]: r for r in all_runs
            if r.data.tags.get("hvae.pipeline_run") == parent_id and "hvae.stage" in r.data.tags}
