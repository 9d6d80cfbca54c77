"""Helpers for the end-to-end tests: run the real CLI in a folder, read its MLflow store."""
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def hvae(cwd, *args, timeout=600):
    """Run ``python -m pipeline ARGS`` in ``cwd`` to completion."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def hvae_background(cwd, *args, log=None):
    """Start ``python -m pipeline ARGS`` in its own process group (so a test can kill all of it)."""
    out = open(log or Path(cwd) / "driver.log", "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc) -> None:
    """SIGKILL a background run and every process of its group (its local Ray included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def runs(cwd, experiment="hvae"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def stage_runs(all_runs, stage):
    return [r for r in all_runs if r.data.tags.get("hvae.stage") == stage]
