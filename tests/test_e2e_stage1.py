"""End to end through the CLI: Ray Train workers, MLflow on SQLite, real artifacts."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def hvae(cwd, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def runs(cwd, experiment="hvae"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("smoke")
    proc = hvae(cwd, "run", SMOKE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc


def test_stage1_child_run_is_tracked_with_tags_metrics_and_artifacts(smoke_run):
    cwd, proc = smoke_run
    client, all_runs = runs(cwd)
    parents = [r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline"]
    children = [r for r in all_runs if r.data.tags.get("hvae.stage") == "stage1"]
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["hvae.pipeline_run"] == parent.info.run_id
    assert len(tags["hvae.fingerprint"]) == 16
    assert math.isfinite(child.data.metrics["val_loss"])
    assert child.data.metrics["val_bpd"] > 0
    # per-epoch curves from rank 0 (smoke: 2 epochs)
    history = client.get_metric_history(child.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1]
    files = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert {"model", "figures"} <= files
    figures = {f.path for f in client.list_artifacts(child.info.run_id, "figures")}
    assert figures == {"figures/reconstructions.png", "figures/codebook_usage.png"}
    assert parent.info.run_id in proc.stdout  # the user is told where the run is


def test_checkpoint_loads_with_weights_only(smoke_run):
    import mlflow

    cwd, _ = smoke_run
    client, all_runs = runs(cwd)
    child = next(r for r in all_runs if r.data.tags.get("hvae.stage") == "stage1")
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns.db")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="model",
                                                      dst_path=str(cwd / "dl")))
    state = torch.load(folder / "vqvae2.pt", weights_only=True)
    assert any(k.endswith("quantizers.0.embedding") for k in state)
    from stages.stage1 import load_model

    model = load_model(folder)
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    assert [tuple(c.shape) for c in model.encode(x)] == [(2, 4, 4), (2, 8, 8)]
    # Ray Train's own checkpoint (optimizer, scheduler, epoch) sits under the storage path
    ckpts = list((cwd / "ray_results").glob("stage1-*/checkpoint_*/state.pt"))
    assert ckpts and set(torch.load(ckpts[0], weights_only=True)) == {"model", "optimizer", "scheduler"}


def test_a_failing_stage_is_one_line_and_a_failed_run(tmp_path):
    proc = hvae(tmp_path, "run", SMOKE, "stage1.lr=1e30", "stage1.epochs=1")
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "stage stage1 failed: FloatingPointError: stage1: non-finite loss at epoch 0 step" in errors[0]
    _, all_runs = runs(tmp_path)
    child = next(r for r in all_runs if r.data.tags.get("hvae.stage") == "stage1")
    assert child.info.status == "FAILED"
    assert "non-finite loss" in child.data.tags["hvae.error"]
