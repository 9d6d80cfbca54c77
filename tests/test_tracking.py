"""pipeline/tracking.py's Tracker: opening a store pauses Python's garbage collector only while
MLflow is imported and the store opened (a reused run's speed, BENCHMARKS.md), and always
gives it back as it was, also when the store cannot be reached: a driver that trains for hours
with the collector left off would keep every reference cycle it ever made."""
import gc
import socket

import pytest

from pipeline.config import TrackingConfig
from pipeline.reach import Unreachable
from pipeline.tracking import Tracker


@pytest.mark.parametrize("enabled", [True, False])
def test_opening_a_store_leaves_the_collector_as_it_was(tmp_path, enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
        assert tracker.experiment_id is not None
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_a_store_that_does_not_answer_leaves_the_collector_on(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert gc.isenabled()
    with pytest.raises(Unreachable, match="tracking.uri"):
        Tracker(TrackingConfig(uri=f"http://127.0.0.1:{port}", timeout_s=0.5))
    assert gc.isenabled()


def test_the_first_store_of_a_process_freezes_what_it_holds_once(tmp_path):
    """What importing MLflow and opening its store made lives as long as the process: frozen
    when the first store opens (no later collection walks it), and not again for the next."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import gc; from pipeline.config import TrackingConfig; import pipeline.tracking as t\n"
        "assert gc.get_freeze_count() == 0\n"
        "freezes = []; freeze = t._freeze_long_lived\n"
        "t._freeze_long_lived = lambda: (freezes.append(1), freeze())\n"
        f"t.Tracker(TrackingConfig(uri='sqlite:///{tmp_path}/mlruns.db')); frozen = gc.get_freeze_count()\n"
        f"t.Tracker(TrackingConfig(uri='sqlite:///{tmp_path}/mlruns.db')); print(frozen, len(freezes))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    frozen, freezes = map(int, out.stdout.split())
    assert frozen > 100_000  # (MLflow's modules, classes and functions: about half a million objects)
    assert freezes == 1


def test_a_stage_is_reused_only_if_made_from_the_runs_the_pipeline_uses(tmp_path):
    """A fingerprint says what a run was made with, not from which run of the stage before.
    When stage 1 is trained again with the same settings (its run found corrupt, or forced and
    cut before extract), the codes extracted with the old model must not be handed on with the
    new one: extract is reused only from the stage-1 run the pipeline uses, and the plan says so."""
    from pipeline import graph
    from pipeline.config import load_config
    from pipeline.plan import PlannedStage, action

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
    parent = tracker.start_run("pipeline", {})

    def finished(stage: str, fingerprint: str, **upstream: str) -> str:
        run = tracker.start_child(parent, stage, fingerprint, {}, {f"hvae.upstream.{u}": r for u, r in upstream.items()})
        tracker.finish(run)
        return run

    old = finished("stage1", "fp1")
    codes = finished("extract", "fp2", stage1=old)
    new = finished("stage1", "fp1")  # trained again, the same settings
    assert tracker.find_finished("stage1", "fp1").info.run_id == new
    assert tracker.find_finished("extract", "fp2", {"stage1": new}) is None
    assert tracker.find_finished("extract", "fp2", {"stage1": old}).info.run_id == codes
    assert tracker.find_finished("stage1", "fp1", run_id=old).info.run_id == old  # (`hvae sample`'s own runs)
    assert tracker.find_finished("stage1", "fp2", run_id=old) is None

    cfg = load_config("configs/smoke.yaml", [f"cluster.storage_path={tmp_path}"])
    chosen: dict = {}
    plans = [action(cfg, PlannedStage(graph.get(stage), fp), set(), tracker, chosen)
             for stage, fp in (("stage1", "fp1"), ("extract", "fp2"), ("priors", "fp3"))]
    assert plans == [f"reuse {new}", "run", "run"]
    assert chosen == {"stage1": new, "extract": None, "priors": None}
