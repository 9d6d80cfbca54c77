"""PixelVAE through the CLI: stage1 -> sample -> evaluate, interrupted in stage 1 and resumed,
then reused whole."""
import os
import re
import signal

import pytest

from conftest import SMOKE, hvae, hvae_background, kill_group, pipeline_runs, runs, wait_for
from hvae.pipeline.tracking import plain

pytestmark = pytest.mark.slow  # several pipelines: `make test` only

SMALL = ["stage1.model=pixelvae", "pixelvae.hidden=8", "pixelvae.pixel_hidden=8", "pixelvae.pixel_layers=2",
         "pixelvae.levels=2", "sample.pixels=sample", "evaluate.iw_samples=4"]


def test_pixelvae_resumes_after_a_ctrl_c_then_is_reused_and_scores_an_iw_nll(tmp_path):
    args = ["run", SMOKE, *SMALL, "stage1.epochs=3"]
    proc = hvae_background(tmp_path, *args)
    try:
        wait_for(lambda: list(tmp_path.glob("ray_results/stage1-*/checkpoint_*/meta.json")) or proc.poll() is not None,
                 300, "the first stage-1 checkpoint")
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 130, log[-3000:]
    parent = re.search(r"resume with: hvae resume ([0-9a-f]{32})", log).group(1)

    again = hvae(tmp_path, "resume", parent)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert re.search(r"\[hvae\] stage1: resume after epoch [12]\b", again.stdout), again.stdout[-3000:]
    new_parent = re.search(r"MLflow parent run ([0-9a-f]{32})", again.stdout).group(1)
    children = pipeline_runs(tmp_path, new_parent)
    assert sorted(children) == ["evaluate", "sample", "stage1"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    m = plain(children["evaluate"].data.metrics)
    assert m["test_iw_samples"] == 4 and 0 < m["test_nll_bpd"] < 8 and m["test_nll_nats"] <= m["test_elbo_nats"] + 1.0
    assert "test_mse" not in m  # (its PixelCNN's teacher-forced means reconstruct nothing)
    assert children["evaluate"].data.tags["hvae.model_name"] == "Hierarchical PixelVAE"
    client, _ = runs(tmp_path)
    stage1 = children["stage1"].info.run_id
    assert {f.path for f in client.list_artifacts(stage1, "figures")} == {"figures/reconstructions.png",
                                                                          "figures/kl_per_group.png"}
    assert {"kl_nats_group0", "kl_nats_group1"} <= {k.split("val_")[-1] for k in plain(children["stage1"].data.metrics)}
    shown = [f.path.split("/")[-1].split("+step+")[0] for f in client.list_artifacts(stage1, "images")
             if f.path.endswith(".png")]
    assert sorted(set(shown)) == ["reconstructions", "samples"], shown
    assert {f.path for f in client.list_artifacts(children["sample"].info.run_id, "samples")} >= {"samples/grid.png"}

    same = hvae(tmp_path, *args)  # the finished pipeline, asked again: nothing is trained or scored
    assert same.returncode == 0, same.stdout[-3000:]
    assert all(re.search(rf"^{s} +REUSED ", same.stdout, re.M) for s in ("stage1", "sample", "evaluate")), same.stdout
    assert f"test_nll_nats={m['test_nll_nats']:.4g}" in same.stdout
