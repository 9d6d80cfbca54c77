"""hvae sweep through the CLI: Ray Tune trials over TorchTrainers, ASHA, MLflow nesting, then the pipeline."""
import json
import re

import pytest

from hvae.pipeline.liveness import is_dead
from conftest import ROOT, hvae, hvae_background, kill_group, runs, stage_runs, wait_for

pytestmark = pytest.mark.slow  # real clusters, sweeps or several pipelines: `make test` only

SWEEP = str(ROOT / "configs" / "sweep_smoke.yaml")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """The smoke sweep, killed (SIGKILL, the driver and its local Ray) once Tune's saved state of
    the experiment names its first trial's first checkpoint, then resumed by the same command."""
    cwd = tmp_path_factory.mktemp("sweep")
    # the cut needs a trial slower than Tune's saving of its state: at Ray Train's default poll
    # of its workers (2 s) a smoke epoch took about 2 s; at hvae's 0.25 s all three epochs of the
    # first trial ended within a second, before the snapshot (CI failed so). The resumed run keeps hvae's pace.
    proc = hvae_background(cwd, "sweep", SWEEP, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"})
    try:
        wait_for(lambda: _snapshot_names(cwd, "checkpoint_000000") or proc.poll() is not None, 600,
                 "Tune's snapshot of the first trial's 1st epoch", every=0.05)  # (an epoch takes about 2 s)
    finally:
        kill_group(proc)
    cut = (cwd / "driver.log").read_text()
    assert 0 <= _trial_epochs(cwd) <= 1, cut[-4000:]  # (cut in its second or third and last epoch)
    # the trial's process (a Ray worker, outside the killed group) ends once it sees its raylet gone
    wait_for(lambda: all(is_dead(r.data.tags["hvae.driver"]) for r in runs(cwd)[1] if r.info.status == "RUNNING"),
             120, "the cut trial's process to end")
    again = hvae(cwd, "sweep", SWEEP, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return cwd, again


def _trial_epochs(cwd) -> int:
    """The newest epoch (0-based) the first trial reported to Tune with a checkpoint, else -1."""
    found = [json.loads(p.read_text())["epoch"]
             for p in cwd.glob("ray_results/sweep-*/*_00000_*/checkpoint_*/trial_checkpoint.json")]
    return max(found, default=-1)


def _snapshot_names(cwd, checkpoint: str) -> bool:
    """Whether Tune's saved experiment state names ``checkpoint`` of the first trial (its trial
    state keeps the checkpoints pickled, so the name is looked for as hex-encoded bytes)."""
    for path in cwd.glob("ray_results/sweep-*/experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):  # (being written)
            continue
        for state, run_metadata in trials:
            if json.loads(state)["trial_id"].endswith("_00000") and checkpoint.encode().hex() in run_metadata:
                return True
    return False


def test_an_interrupted_sweep_is_resumed_by_the_same_command(sweep_run):
    cwd, proc = sweep_run
    client, all_runs = runs(cwd)
    sweep = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "sweep")
    assert f"resuming the interrupted sweep {sweep.info.run_id}" in proc.stdout
    trials = [r for r in stage_runs(all_runs, "stage1") if r.data.tags.get("hvae.sweep") == sweep.info.run_id]
    first = [r for r in trials if r.data.params["stage1.lr"] == "0.003"]
    # the cut trial: its run was KILLED (the driver died), a new one went on from its checkpoint
    cut = next(r for r in first if r.info.status == "KILLED")
    went_on = next(r for r in first if r.info.status == "FINISHED")
    assert cut.data.tags["hvae.trial_id"] == went_on.data.tags["hvae.trial_id"]
    # (Train may have finished an epoch more than Tune heard of before the kill: then the trial
    # has nothing left to train and tells Tune its last epoch)
    assert went_on.data.tags["hvae.resumed_from_epoch"] in ("1", "2")
    assert went_on.data.tags["hvae.resumed_from_run"] == cut.info.run_id
    assert re.search(r"restored after epoch [12] ", proc.stdout)  # Tune handed the trial its checkpoint back
    # Tune's experiment was restored, not started again: one experiment folder, the same trials
    assert len(list(cwd.glob("ray_results/sweep-*/"))) == 1
    assert len({r.data.tags["hvae.trial_id"] for r in trials}) == 2


def test_trials_are_nested_under_the_sweep_run_and_asha_stops_the_bad_one(sweep_run):
    cwd, proc = sweep_run
    client, all_runs = runs(cwd)
    sweeps = [r for r in all_runs if r.data.tags.get("hvae.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    sweep = sweeps[0]
    trials = [r for r in stage_runs(all_runs, "stage1") if r.data.tags.get("hvae.sweep") == sweep.info.run_id
              and (r.info.status != "KILLED" or "hvae.early_stopped" in r.data.tags)]  # (not the run the kill cut)
    assert len(trials) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    by_lr = {r.data.params["stage1.lr"]: r for r in trials}
    good, bad = by_lr["0.003"], by_lr["1e-06"]
    assert good.info.status == "FINISHED" and "hvae.early_stopped" not in good.data.tags
    # the hopeless learning rate was stopped by ASHA at its first rung (the good trial's first
    # epoch, from before the cut, is on it); its run says so
    assert bad.info.status == "KILLED" and "hvae.error" not in bad.data.tags
    assert bad.data.tags["hvae.early_stopped"].startswith("asha after epoch 1 of 3")
    assert sorted(m.step for m in client.get_metric_history(good.info.run_id, "stage1/val_loss")) == [0, 1, 2]
    bad_steps = sorted(m.step for m in client.get_metric_history(bad.info.run_id, "stage1/val_loss"))
    assert bad_steps[0] == 0 and len(bad_steps) < 3  # (it may log the epoch it was in when stopped)
    # the table and the best config are printed, and recorded on the sweep run
    table = re.findall(r"^\| (\S+) \| (\S+) \| (\d/3) \| ([\d.]+|-) \| (\w+) \| (\w+|-) \|$", proc.stdout, re.M)
    assert sorted(row[4] for row in table) == ["EARLY_STOPPED", "FINISHED"]
    assert sweep.data.tags["hvae.best_run"] == good.info.run_id
    assert sweep.data.tags["hvae.best_overrides"] == "stage1.lr=0.003"
    assert f"best trial {sweep.data.tags['hvae.best_trial']}" in proc.stdout
    assert {a.path for a in client.list_artifacts(sweep.info.run_id)} >= {"sweep_table.md", "config.yaml"}
    assert sweep.data.metrics["early_stopped"] == 1 and sweep.data.metrics["trials"] == 2


def test_then_pipeline_reuses_the_best_trials_model(sweep_run):
    cwd, proc = sweep_run
    client, all_runs = runs(cwd)
    sweep = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "sweep")
    best = sweep.data.tags["hvae.best_run"]
    pipeline = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    assert pipeline.info.status == "FINISHED"
    assert pipeline.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert pipeline.data.tags["hvae.reused_from.stage1"] == best  # not trained again
    assert len(stage_runs(all_runs, "stage1")) == 3  # the two trials (one cut and resumed), nothing else
    evaluate = stage_runs(all_runs, "evaluate")
    assert len(evaluate) == 1 and evaluate[0].info.status == "FINISHED"
    assert evaluate[0].data.tags["hvae.upstream.stage1"] == best
    assert evaluate[0].data.metrics["evaluate/test_nll_bpd"] > 0


def test_a_prior_sweep_keeps_stage1_fixed_and_continues_from_the_best_prior(sweep_run):
    # in the first sweep's folder, with its best stage-1 settings: stage 1 and extract are reused
    cwd, _ = sweep_run
    proc = hvae(cwd, "sweep", SWEEP, "stage1.lr=0.003", "sweep.stage=priors", "sweep.scheduler=fifo",
                "sweep.space={priors.lr: {grid: [0.003, 0.00001]}}",
                # one 1-CPU worker per trial: the sweep fits two trials at once on this 2-CPU machine
                "cluster.num_workers=1", "cluster.cpus_per_worker=1", "sweep.max_concurrent_trials=null", timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "as many trials at once as the cluster holds (now 2)" in proc.stdout
    client, all_runs = runs(cwd)
    first = next(r for r in all_runs if r.data.tags.get("hvae.sweep_stage") == "stage1")
    sweep = next(r for r in all_runs if r.data.tags.get("hvae.sweep_stage") == "priors")
    in_sweep = [r for r in all_runs if r.data.tags.get("hvae.sweep") == sweep.info.run_id]
    # the fixed stages: a pipeline run nested under the sweep that reused the first sweep's best model
    fixed = next(r for r in in_sweep if r.data.tags.get("hvae.kind") == "pipeline" and "hvae.sweep_best_run" not in r.data.tags)
    assert fixed.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert fixed.data.tags["hvae.reused_from.stage1"] == first.data.tags["hvae.best_run"]
    extract = fixed.data.tags["hvae.reused_from.extract"]
    trials = [r for r in in_sweep if r.data.tags.get("hvae.stage") == "priors"]
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert all(t.data.tags["mlflow.parentRunId"] == sweep.info.run_id for t in trials)
    assert {t.data.tags["hvae.upstream.extract"] for t in trials} == {extract}
    best = min(trials, key=lambda t: t.data.metrics["priors/val_loss"])
    assert sweep.data.tags["hvae.best_run"] == best.info.run_id
    assert best.data.params["priors.lr"] == "0.003"
    # then: the pipeline reused stage1, extract and the best prior, and evaluated them
    then = next(r for r in in_sweep if r.data.tags.get("hvae.sweep_best_run"))
    assert then.data.tags["hvae.reused_from.priors"] == best.info.run_id
    evaluate = next(r for r in stage_runs(all_runs, "evaluate") if r.data.tags["hvae.pipeline_run"] == then.info.run_id)
    assert evaluate.info.status == "FINISHED" and evaluate.data.tags["hvae.upstream.priors"] == best.info.run_id
