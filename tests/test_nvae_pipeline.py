"""NVAE through the CLI: stage1 -> sample -> evaluate, the NaN guard, and `hvae report` next to a VQ-VAE-2."""
import json
import re
import shutil
from pathlib import Path

import torch

import pytest

from conftest import SMOKE, hvae, pipeline_runs, runs
from hvae.pipeline.tracking import plain
from hvae.stages.families.nvae import INJECT_NAN_ENV

pytestmark = pytest.mark.slow  # real clusters, sweeps or several pipelines: `make test` only


def test_nvae_runs_three_stages_and_the_report_compares_it_with_vqvae2(smoke_store, tmp_path):
    # the shared smoke store already holds a finished VQ-VAE-2 pipeline: report across both
    smoke_dir, _, _ = smoke_store
    shutil.copy(smoke_dir / "mlruns.db", tmp_path / "mlruns.db")
    proc = hvae(tmp_path, "run", SMOKE, "stage1.model=nvae", "evaluate.iw_samples=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[hvae] extract, priors: not applicable to nvae" in proc.stdout
    parent = re.search(r"MLflow parent run ([0-9a-f]{32})", proc.stdout).group(1)
    children = pipeline_runs(tmp_path, parent)
    assert sorted(children) == ["evaluate", "sample", "stage1"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    ev = children["evaluate"]
    assert ev.data.tags["hvae.upstream.stage1"] == children["stage1"].info.run_id
    assert "hvae.upstream.priors" not in ev.data.tags
    m = plain(ev.data.metrics)
    assert m["test_iw_samples"] == 4 and 0 < m["test_nll_bpd"] < 8 and m["test_kl_bpd"] >= 0
    # the IW estimate is no worse than the ELBO it improves on (up to Monte-Carlo noise)
    assert m["test_nll_nats"] <= m["test_elbo_nats"] + 1.0
    assert ev.data.tags["hvae.bound"] == "≈"
    client, _ = runs(tmp_path)
    files = {f.path for f in client.list_artifacts(children["stage1"].info.run_id, "figures")}
    assert files == {"figures/reconstructions.png", "figures/kl_per_group.png"}
    # every epoch's reconstructions and samples, as images with a step
    shown = [f.path for f in client.list_artifacts(children["stage1"].info.run_id, "images") if f.path.endswith(".png")]
    assert sorted(re.sub(r"\+\d+\+.*|\+[^+]*$", "", p.split("/")[-1]) for p in shown) == \
        ["reconstructions+step", "reconstructions+step", "samples+step", "samples+step"], shown
    assert {f.path for f in client.list_artifacts(children["sample"].info.run_id, "samples")} >= {"samples/grid.png"}

    report = hvae(tmp_path, "report", "--dataset", "mnist5k")
    assert report.returncode == 0, report.stdout + report.stderr
    table, pairs = report.stdout.split("Paired differences")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Evaluate run" not in line]
    assert any(r.startswith("| VQ-VAE-2") and "≤" in r for r in rows), report.stdout
    nvae = [r for r in rows if r.startswith("| NVAE")]
    assert len(nvae) == 1 and ev.info.run_id in nvae[0] and "≈" in nvae[0]
    for row in rows:  # every NLL in the table is a finite number
        nats = float(row.split("|")[5].split()[1])  # "≤ 2010.93 ± 15.38"
        assert 0 < nats < 1e5
    assert (tmp_path / "report.md").read_text().startswith("| Model |")
    # aligned columns; each row says how long it trained and on what
    head = next(line for line in table.splitlines() if line.startswith("| Model "))
    assert "| Epochs " in head and "| Data " in head and len({len(line) for line in rows}) == 1, table
    vq = next(r for r in rows if r.startswith("| VQ-VAE-2") and "(published)" not in r)
    assert re.search(r"\| 2\+1 +\|", vq) and re.search(r"\| 2 +\|", nvae[0]) and "(embedded)" in nvae[0]
    # both were scored on the same test images: their per-image difference, against the better one
    paired = [line for line in pairs.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert len(paired) == 1 and ev.info.run_id[:8] in paired[0], report.stdout
    delta, se = (float(v) for v in paired[0].split("|")[4].split("±"))
    assert abs(delta) > 0 and 0 < se < abs(delta) * 10
    only = hvae(tmp_path, "report", "--model", "nvae", "--out", "nvae.md")
    assert only.returncode == 0 and "VQ-VAE-2" not in (tmp_path / "nvae.md").read_text()
    # the reports' runs have their own experiment: the pipelines' list holds pipelines alone
    _, listed = runs(tmp_path)
    assert not [r for r in listed if r.data.tags.get("hvae.kind") == "report"]
    _, reports = runs(tmp_path, "hvae-reports")
    assert len(reports) == 2 and all(r.data.tags["hvae.experiment"] == "hvae" for r in reports)
    from mlflow.tracking import MlflowClient

    both = next(r for r in reports if r.data.params["filters.dataset"] == "mnist5k")
    page = Path(MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").download_artifacts(
        both.info.run_id, "report.html", str(tmp_path))).read_text()
    assert page.count("<table>") == 2 and "Paired differences" in page  # the NLL table and the paired one

    # scored again, on the validation split with another K (`hvae evaluate`): the model is
    # reused, not trained again; its val_* metrics stay out of the report's test NLLs
    again = hvae(tmp_path, "evaluate", parent, "--split", "val", "--iw-samples", "2", "--out", "k2.md")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert re.search(r"^stage1 +REUSED ", again.stdout, re.M) and re.search(r"^evaluate +FINISHED ", again.stdout, re.M)
    scored = (tmp_path / "k2.md").read_text()
    assert "≈ IW, K=2" in scored and " val images, " in scored
    again_parent = re.search(r"MLflow parent run ([0-9a-f]{32})", again.stdout).group(1)
    val = pipeline_runs(tmp_path, again_parent)["evaluate"]
    assert "evaluate/val_nll_nats" in val.data.metrics and not any("test_" in k for k in val.data.metrics)
    # its parent's page and run-list columns give the validation NLL, named as such
    shown = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(again_parent).data
    assert shown.tags["mlflow.note.content"].splitlines()[0].startswith("**NVAE"), shown.tags["mlflow.note.content"][:300]
    assert f"validation NLL **≈ {plain(val.data.metrics)['val_nll_nats']:.2f}" in shown.tags["mlflow.note.content"]
    assert shown.metrics["val_nll_nats"] == plain(val.data.metrics)["val_nll_nats"]
    listed = hvae(tmp_path, "report", "--model", "nvae", "--out", "nvae_again.md")
    assert (tmp_path / "nvae_again.md").read_text() == (tmp_path / "nvae.md").read_text(), listed.stdout


def test_a_non_finite_term_stops_stage1_naming_step_and_term_and_keeps_the_checkpoint(tmp_path):
    # 128 training images, global batch 64 over 2 workers: 2 steps per epoch; step 3 is in epoch 1
    proc = hvae(tmp_path, "run", SMOKE, "stage1.model=nvae", "data.limit=128", env={INJECT_NAN_ENV: "3"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "stage stage1 failed: FloatingPointError: stage1: non-finite kl term at epoch 2 step 1 (global step 3;" in errors[0]
    client, all_runs = runs(tmp_path)
    child = next(r for r in all_runs if r.data.tags.get("hvae.stage") == "stage1")
    parent = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert "non-finite kl term" in child.data.tags["hvae.error"]
    assert "error.txt" in {f.path for f in client.list_artifacts(child.info.run_id)}
    # the checkpoint of epoch 0, from before the bad step, is on disk and loads
    from hvae.models.nvae import NVAE
    from hvae.stages import checkpoints

    found = checkpoints.newest(str(tmp_path / "ray_results"), f"stage1-{child.data.tags['hvae.fingerprint']}")
    assert found.epoch == 0
    folder = Path(found.path)
    state, meta = found.load()
    model = NVAE(**{k: v for k, v in meta["model_config"].items()})
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((folder / "meta.json").read_text())["epoch"] == 0
