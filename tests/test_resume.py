"""Reuse, resume and survive: real processes, real signals, one MLflow store per scenario."""
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SMOKE, hvae, hvae_background, kill_group, runs, stage_runs, wait_for

STAGES = ["stage1", "extract", "priors", "sample", "evaluate"]


def _nll(stdout: str) -> str:
    return re.search(r"\| ≤ ([0-9.]+) ± [0-9.]+ \| ≤ ([0-9.]+) ± [0-9.]+ \|", stdout).group(0)


def _actions(stdout: str) -> dict[str, str]:
    """stage -> 'reuse' | 'run' | 'resume' from the runner's '[hvae] <stage>: ...' lines."""
    out = {}
    for stage, how in re.findall(r"^\[hvae\] (\w+): (reuse|run|resume)", stdout, re.M):
        out[stage] = how
    return out


@pytest.fixture(scope="module")
def finished(smoke_store):
    cwd, proc, _ = smoke_store
    return cwd, proc


def test_a_second_run_reuses_every_stage_and_reports_the_same_nll(finished):
    cwd, first = finished
    t0 = time.perf_counter()
    second = hvae(cwd, "run", SMOKE, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert second.returncode == 0, second.stdout[-3000:]
    assert _actions(second.stdout) == {s: "reuse" for s in STAGES}
    # nothing heavy is imported when nothing runs (the config sizes its maps without torch)
    assert not re.findall(r"\|\s*(torch|ray|torchvision)$", second.stderr, re.M)
    assert "epoch" not in second.stdout  # nothing trained
    assert _nll(second.stdout) == _nll(first.stdout)
    client, all_runs = runs(cwd)
    assert all(len(stage_runs(all_runs, s)) == 1 for s in STAGES)  # no new child runs
    parent = max((r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline"), key=lambda r: r.info.start_time)
    for s in STAGES:
        assert parent.data.tags[f"hvae.reused_from.{s}"] == stage_runs(all_runs, s)[0].info.run_id
    # the artifacts it downloaded (and the first run's, for the stages it ran) are gone with it
    first_parent = re.search(r"MLflow parent run ([0-9a-f]{32})", first.stdout).group(1)
    for run_id in (first_parent, parent.info.run_id):
        assert (cwd / "ray_results" / "outputs" / run_id).is_dir()
        assert not (cwd / "ray_results" / "outputs" / run_id / "inputs").exists()
    print(f"re-run with every stage reused: {time.perf_counter() - t0:.1f} s")


def test_dry_run_shows_reuse(finished):
    cwd, _ = finished
    proc = hvae(cwd, "run", SMOKE, "--dry-run", "priors.lr=0.002")
    plan = dict(re.findall(r"^#   (\w+)\s+(\w+)", proc.stdout, re.M))
    assert plan == {"stage1": "reuse", "extract": "reuse", "priors": "run", "sample": "run", "evaluate": "run"}


@pytest.mark.slow
def test_changing_a_prior_setting_reruns_only_priors_sample_evaluate(finished):
    cwd, _ = finished
    proc = hvae(cwd, "run", SMOKE, "priors.lr=0.002")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _actions(proc.stdout) == {"stage1": "reuse", "extract": "reuse", "priors": "run",
                                     "sample": "run", "evaluate": "run"}
    _, all_runs = runs(cwd)
    new_priors = max(stage_runs(all_runs, "priors"), key=lambda r: r.info.start_time)
    assert new_priors.data.tags["hvae.upstream.extract"] == stage_runs(all_runs, "extract")[0].info.run_id


def test_force_reruns_a_stage_and_everything_after_it(finished):
    cwd, _ = finished
    proc = hvae(cwd, "run", SMOKE, "--dry-run", "--force", "sample")
    plan = dict(re.findall(r"^#   (\w+)\s+(\w+)", proc.stdout, re.M))
    assert plan == {"stage1": "reuse", "extract": "reuse", "priors": "reuse", "sample": "run", "evaluate": "run"}
    bad = hvae(cwd, "run", SMOKE, "--force", "nope")
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


@pytest.mark.slow
def test_a_corrupted_artifact_is_named_and_its_stage_runs_again_and_every_stage_after_it(finished):
    """Stage 1's weights with one byte flipped. A run that reuses every stage reads no weights
    (it checks them by size) and goes on. One that reads them (evaluate forced) finds the flip
    when it downloads them: that run is tagged corrupt, and stage 1 is made again. So is every
    stage after it, from the new run: what they made before came from the old one (a
    fingerprint names the settings, not the run), and the priors do not resume from
    checkpoints trained on the old codes. (The shared store is put back afterwards: the file,
    the tag, and the runs this test made deleted.)"""
    from hvae.settings import graph

    cwd, _ = finished
    client, all_runs = runs(cwd)
    old = stage_runs(all_runs, "stage1")[0]
    weights = Path(client.get_run(old.info.run_id).info.artifact_uri.removeprefix("file://")) / "model" / "vqvae2.pt"
    kept, since = weights.read_bytes(), int(time.time() * 1000)
    data = bytearray(kept)
    data[len(data) // 2] ^= 0xFF  # one byte
    try:
        weights.write_bytes(bytes(data))
        proc = hvae(cwd, "run", SMOKE)
        assert proc.returncode == 0 and _actions(proc.stdout) == {s: "reuse" for s in STAGES}, proc.stdout[-3000:]
        proc = hvae(cwd, "run", SMOKE, "--force", "evaluate")
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert f"not reusing run {old.info.run_id}: artifact model/vqvae2.pt does not match" in proc.stdout
        actions = _actions(proc.stdout)
        assert actions["stage1"] in ("run", "resume") and [actions[s] for s in STAGES[1:]] == ["run"] * 4, actions
        assert "[hvae] priors: made from new runs of stage1 and extract: moved its checkpoints aside" in proc.stdout, \
            [line for line in proc.stdout.splitlines() if line.startswith("[hvae]")]
        client, all_runs = runs(cwd)
        assert client.get_run(old.info.run_id).data.tags["hvae.corrupt"].startswith("model/vqvae2.pt")
        made = {s: max(stage_runs(all_runs, s), key=lambda r: r.info.start_time) for s in STAGES}
        assert all(r.info.start_time >= since and r.info.status == "FINISHED" for r in made.values())
        for s in STAGES:
            for u in graph.get(s).upstream:
                assert made[s].data.tags[f"hvae.upstream.{u}"] == made[u].info.run_id, (s, u)
        parent = max((r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline"), key=lambda r: r.info.start_time)
        assert {k: v for k, v in parent.data.tags.items() if k.startswith(("hvae.run.", "hvae.reused_from."))} == \
            {f"hvae.run.{s}": made[s].info.run_id for s in STAGES}  # (the first decisions' reuse tags gone)
    finally:
        weights.write_bytes(kept)
        if "hvae.corrupt" in client.get_run(old.info.run_id).data.tags:
            client.delete_tag(old.info.run_id, "hvae.corrupt")
        for run in runs(cwd)[1]:
            if run.info.start_time >= since:
                client.delete_run(run.info.run_id)


def _straight_then_cut(tmp_path: Path, args: list[str]):
    """Run ``args`` to the end in straight/, then start the same in cut/ -> (straight/, cut/, process)."""
    straight_dir, cut_dir = tmp_path / "straight", tmp_path / "cut"
    straight_dir.mkdir()
    cut_dir.mkdir()
    straight = hvae(straight_dir, *args)
    assert straight.returncode == 0, straight.stdout[-3000:]
    return straight_dir, cut_dir, hvae_background(cut_dir, *args)


def _stage1_result(folder: Path, run_id: str):
    """The stage-1 run's final weights and its logged curves {metric: [(step, value)]}."""
    import torch

    client, _ = runs(folder)
    weights = torch.load(next(folder.glob(f"mlartifacts/{run_id}/artifacts/model/vqvae2.pt")), weights_only=True)
    curves = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"stage1/{k}"))
              for k in ("train_loss", "val_loss", "val_bpd", "lr")}
    return weights, curves


@pytest.mark.slow
def test_a_killed_and_resumed_stage1_equals_an_uninterrupted_one(tmp_path):
    """Train 4 epochs straight; elsewhere train the same, kill the driver after epoch 2, resume:
    the final weights agree to 1e-6 and the logged curve is the same."""
    import torch

    args = ["run", SMOKE, "data.limit=2048", "stage1.epochs=4", "--until", "stage1"]
    straight_dir, cut_dir, proc = _straight_then_cut(tmp_path, args)
    metas = lambda: list(cut_dir.glob("ray_results/stage1-*/checkpoint_*/meta.json"))  # noqa: E731
    try:
        wait_for(lambda: len(metas()) >= 2 or proc.poll() is not None, 300, "two stage-1 checkpoints")
    finally:
        _crash(proc)
    # (a crashed machine: nothing of the run goes on; the resume below starts once it is all gone)
    wait_for(lambda: not _train_worker_pids(proc), 60, "the killed run's training workers to end")
    assert proc.returncode != 0, "the driver finished before it could be killed"
    _, all_runs = runs(cut_dir)
    cut_parent = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    assert cut_parent.info.status == "RUNNING"  # its driver died without a word
    t0 = time.perf_counter()
    again = hvae(cut_dir, "resume", cut_parent.info.run_id, "--until", "stage1")  # the recorded config, again
    assert again.returncode == 0, again.stdout[-3000:]
    m = re.search(r"\[hvae\] stage1: resume after epoch (\d+)", again.stdout)
    assert m and int(m.group(1)) < 4, "nothing was left to train after the kill"  # (of 4 epochs, counted from 1)
    restored = re.search(r"\[stage1\] resuming from the checkpoint of epoch (\d+)", again.stdout)
    assert restored and restored.group(1) == m.group(1)  # the newest checkpoint on disk, even if Ray never registered it
    client, all_runs = runs(cut_dir)
    s1 = sorted(stage_runs(all_runs, "stage1"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in s1] == ["KILLED", "FINISHED"]
    parents = [r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    assert next(r for r in parents if r.info.status == "FINISHED").data.tags["hvae.resumes"] == cut_parent.info.run_id
    assert s1[1].data.tags["hvae.resumed_from_run"] == s1[0].info.run_id

    _, straight_runs = runs(straight_dir)
    want_weights, want_curves = _stage1_result(straight_dir, stage_runs(straight_runs, "stage1")[0].info.run_id)
    got_weights, got_curves = _stage1_result(cut_dir, s1[1].info.run_id)
    assert set(got_weights) == set(want_weights)
    for key, value in want_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=0, atol=1e-6, msg=f"weights differ at {key}")
    for key, curve in want_curves.items():  # every epoch 0..3, the cut run's part copied in
        assert [step for step, _ in got_curves[key]] == [0, 1, 2, 3] == [step for step, _ in curve], key
        assert [v for _, v in got_curves[key]] == pytest.approx([v for _, v in curve], rel=1e-6, abs=1e-9), key
    print(f"resumed after epoch {m.group(1)}; resume to the end of stage 1: {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_a_driver_killed_mid_epoch_resumes_at_the_next_batch_and_equals_an_uninterrupted_run(tmp_path):
    """Step checkpoints every 4 batches (16 batches an epoch on each worker); the driver and
    the training workers are killed (SIGKILL: its process group, and the workers, which Ray
    started outside it and which would otherwise train on for a moment, long enough to end
    this short epoch) as soon as a step checkpoint of the second epoch exists; the resume
    continues after that batch, and the final weights and the logged curves equal those of
    the same run done straight."""
    import torch

    args = ["run", SMOKE, "data.limit=1024", "stage1.epochs=2", "train.checkpoint_every_steps=4", "--until", "stage1"]
    straight_dir, cut_dir, proc = _straight_then_cut(tmp_path, args)
    steps = lambda: list(cut_dir.glob("ray_results/stage1-*/checkpoint_step_000001_*/meta.json"))  # noqa: E731
    try:
        end = time.time() + 300
        while not steps() and proc.poll() is None and time.time() < end:
            time.sleep(0.02)
    finally:
        _crash(proc)
    assert steps(), "no step checkpoint of the second epoch before the driver ended"
    _, all_runs = runs(cut_dir)
    cut_parent = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    plan = hvae(cut_dir, *args, "--dry-run")
    assert re.search(r"#   stage1\s+resume in epoch 2 at batch \d+", plan.stdout), plan.stdout[-2000:]
    again = hvae(cut_dir, "resume", cut_parent.info.run_id, "--until", "stage1")
    assert again.returncode == 0, again.stdout[-3000:]
    m = re.search(r"\[hvae\] stage1: resume in epoch 2 after batch (\d+)", again.stdout)
    assert m and 0 < int(m.group(1)) < 16, again.stdout[-3000:]
    assert f"[stage1] resuming from the checkpoint of epoch 2 after batch {m.group(1)}" in again.stdout
    assert "epoch 1/2" not in again.stdout and "epoch 2/2" in again.stdout  # only the cut epoch was finished
    # the step checkpoints are gone once the epoch's end supersedes them
    assert not list(cut_dir.glob("ray_results/stage1-*/checkpoint_step_*"))

    _, straight_runs = runs(straight_dir)
    client, all_runs = runs(cut_dir)
    s1 = sorted(stage_runs(all_runs, "stage1"), key=lambda r: r.info.start_time)
    want_weights, want_curves = _stage1_result(straight_dir, stage_runs(straight_runs, "stage1")[0].info.run_id)
    got_weights, got_curves = _stage1_result(cut_dir, s1[-1].info.run_id)
    for key, value in want_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=0, atol=1e-6, msg=f"weights differ at {key}")
    for key, curve in want_curves.items():  # epoch 0 copied from the cut run, epoch 1 finished by the resume
        assert [step for step, _ in got_curves[key]] == [0, 1] == [step for step, _ in curve], key
        assert [v for _, v in got_curves[key]] == pytest.approx([v for _, v in curve], rel=1e-6, abs=1e-9), key


def _crash(proc) -> None:
    """SIGKILL the run as a crashed machine would end it: the training workers (Ray starts them
    outside the driver's process group: left alive, they would train on, even to the end of the
    stage, while the test waits for them) and the driver's group with its local Ray."""
    import os
    import signal

    for pid in _train_worker_pids(proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_group(proc)


def _train_worker_pids(proc):
    """The Ray Train workers of the run ``proc`` started (in its own session: Ray gives each
    worker a process group of its own, but they keep the session), not those of any other
    run on the machine (a user's, another test's)."""
    ps = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    rows = (line.split(None, 2) for line in ps.splitlines()[1:])
    return [int(pid) for pid, sid, *args in rows if int(sid) == proc.pid and args and "RayTrainWorker" in args[0]]


def _newest_checkpoint_epoch(root) -> int:
    """The highest epoch among the stage-1 checkpoints on disk under ``root`` (-1 if none yet);
    a meta.json still being copied in counts as absent."""
    import json

    epochs = [-1]
    for meta in root.glob("ray_results/stage1-*/checkpoint_*/meta.json"):
        try:
            epochs.append(json.loads(meta.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            pass
    return max(epochs)


@pytest.mark.slow
def test_a_lost_worker_restarts_from_the_last_checkpoint(tmp_path):
    import os
    import signal

    args = ["run", SMOKE, "data.limit=2048", "stage1.epochs=10", "cluster.max_failures=2", "--until", "stage1"]
    proc = hvae_background(tmp_path, *args)
    try:
        # Ray Train registers a reported checkpoint when its controller next polls the workers
        # (every 2 s), and rank 0 cannot write checkpoint k+2 before report k was taken: once
        # the checkpoint of epoch 2 is on disk, that of epoch 0 is registered and a restart must
        # restore from one. (Count epochs, not folders: with num_to_keep=2 a third folder lives
        # for a fraction of a second, and a poll can miss every such moment of a run.)
        def ready():
            assert proc.poll() is None, "the run ended before a worker was killed:\n" + (
                tmp_path / "driver.log").read_text()[-3000:]
            return _newest_checkpoint_epoch(tmp_path) >= 2 and _train_worker_pids(proc)

        pids = wait_for(ready, 300, "the stage-1 checkpoint of epoch 2 and a live Ray Train worker", every=0.1)
        os.kill(pids[-1], signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    client, all_runs = runs(tmp_path)
    s1 = stage_runs(all_runs, "stage1")
    assert len(s1) == 1 and s1[0].info.status == "FINISHED"
    assert s1[0].data.metrics["stage1/worker_restarts"] == 1
    restores = client.get_metric_history(s1[0].info.run_id, "stage1/restored_from_epoch")
    assert restores and restores[0].value >= 0, "the restart from a checkpoint is not recorded"
    assert "resuming from the checkpoint of epoch" in log
    steps = sorted({p.step for p in client.get_metric_history(s1[0].info.run_id, "stage1/val_loss")})
    assert steps == list(range(10))


@pytest.mark.slow
def test_two_pipelines_at_once_keep_their_own_runs(tmp_path):
    a = hvae_background(tmp_path, "run", SMOKE, log=tmp_path / "a.log")
    b = hvae_background(tmp_path, "run", SMOKE, "priors.lr=0.002", log=tmp_path / "b.log")
    try:
        a.wait(timeout=600)
        b.wait(timeout=600)
    finally:
        for p in (a, b):
            if p.poll() is None:
                kill_group(p)
    logs = [(tmp_path / n).read_text() for n in ("a.log", "b.log")]
    assert a.returncode == 0, logs[0][-3000:]
    assert b.returncode == 0, logs[1][-3000:]
    client, all_runs = runs(tmp_path)
    parents = [r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    # stage1 and extract were trained once (the lock made the other pipeline wait, then reuse)
    assert len(stage_runs(all_runs, "stage1")) == 1 and len(stage_runs(all_runs, "extract")) == 1
    assert len(stage_runs(all_runs, "priors")) == 2  # different prior settings: one each
    for p in parents:
        tags = p.data.tags
        for s in STAGES:
            run_id = tags.get(f"hvae.run.{s}") or tags.get(f"hvae.reused_from.{s}")
            assert run_id and client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,to_group", [("SIGINT", 130, True), ("SIGTERM", 143, False)])
def test_a_signal_during_training_stops_it_marks_the_runs_killed_and_says_how_to_resume(tmp_path, sig, code,
                                                                                          to_group):
    """Ctrl-C reaches the terminal's whole process group (the driver and the local Ray it started);
    SIGTERM (`hvae stop`, a scheduler) the driver alone. Either way: out within seconds, the
    runs KILLED, no training worker left, the checkpoints kept, one line naming the resume."""
    import os
    import signal

    args = ["run", SMOKE, "data.limit=2048", "stage1.epochs=20", "--until", "stage1"]
    proc = hvae_background(tmp_path, *args)
    try:
        wait_for(lambda: list(tmp_path.glob("ray_results/stage1-*/checkpoint_*/meta.json")) or proc.poll() is not None,
                 300, "the first stage-1 checkpoint")
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        sent = time.perf_counter()
        (os.killpg if to_group else os.kill)(proc.pid, getattr(signal, sig))
        proc.wait(timeout=30)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == code, log[-3000:]
    client, all_runs = runs(tmp_path)
    parent = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    assert log.rstrip().splitlines()[-1].endswith(f"during stage1: runs marked KILLED, checkpoints kept; "
                                                  f"resume with: hvae resume {parent.info.run_id}"), log[-2000:]
    assert parent.info.status == "KILLED" and stage_runs(all_runs, "stage1")[0].info.status == "KILLED"
    wait_for(lambda: not _train_worker_pids(proc), 10, "the training workers to end")
    assert list(tmp_path.glob("ray_results/stage1-*/checkpoint_*/meta.json"))
    plan = hvae(tmp_path, *args, "--dry-run")
    assert re.search(r"#   stage1\s+resume after epoch \d+", plan.stdout), plan.stdout[-2000:]
    print(f"{sig}: the driver exited {took:.1f} s after the signal")


class _RunsCode:
    """What a crafted pickle holds: loading it calls a function of the file's choosing."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_an_artifact_that_will_not_load_is_named_with_its_run_and_that_run_tagged_corrupt(smoke_store):
    """A priors artifact replaced by a pickle that runs code, its manifest rewritten to match (so
    only loading it can tell): the stage that loads it stops with one line naming the file and
    the run, nothing in the pickle runs, and the run is tagged corrupt so the next run trains
    the priors again. (The shared store is put back as it was afterwards: the file, its manifest,
    the tag, and the runs this test made deleted.)"""
    import hashlib
    import json

    import torch

    cwd, _, parent_id = smoke_store
    client, _ = runs(cwd)
    priors_id = client.get_run(parent_id).data.tags["hvae.run.priors"]
    root = Path(client.get_run(priors_id).info.artifact_uri.removeprefix("file://"))
    weights, manifest = root / "model" / "prior_level0.pt", root / "manifest.json"
    planted = cwd / "planted"
    kept, since = (weights.read_bytes(), manifest.read_text()), int(time.time() * 1000)
    try:
        torch.save({"weight": _RunsCode(planted)}, weights)
        listed = json.loads(manifest.read_text())
        listed["files"]["model/prior_level0.pt"] = {"size": weights.stat().st_size,
                                                    "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
        manifest.write_text(json.dumps(listed, indent=1, sort_keys=True))
        _check_the_bad_artifact_is_named(cwd, client, priors_id, planted)
    finally:
        weights.write_bytes(kept[0])
        manifest.write_text(kept[1])
        client.delete_tag(priors_id, "hvae.corrupt")
        for run in runs(cwd)[1]:
            if run.info.start_time >= since:
                client.delete_run(run.info.run_id)


def _check_the_bad_artifact_is_named(cwd, client, priors_id, planted):
    proc = hvae(cwd, "run", SMOKE, "--force", "sample")
    assert proc.returncode == 1, proc.stdout[-3000:]
    line = proc.stdout.rstrip().splitlines()[-1]
    assert line.startswith("error: stage sample failed: ArtifactError: artifact ") and \
        line.endswith(f"/model/prior_level0.pt cannot be loaded: it holds more than tensors (refused: loading it "
                      f"could run code) (of run {priors_id}, now tagged hvae.corrupt: the next run makes it again)"), line
    assert not planted.exists()
    assert client.get_run(priors_id).data.tags["hvae.corrupt"].startswith("artifact ")
    plan = hvae(cwd, "run", SMOKE, "--dry-run")
    # made again (from its last checkpoint, which the artifact's damage did not touch)
    assert re.search(r"^#   priors\s+(run|resume after epoch)", plan.stdout, re.M), plan.stdout[-2000:]
