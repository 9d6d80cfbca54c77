"""pipeline/tracking.py's Tracker: opening a store pauses Python's garbage collector only while
MLflow is imported and the store opened (a reused run's speed, BENCHMARKS.md), and always
gives it back as it was, also when the store cannot be reached: a driver that trains for hours
with the collector left off would keep every reference cycle it ever made."""
import gc
import socket
from pathlib import Path

import pytest

from hvae.settings.config import TrackingConfig
from hvae.pipeline.reach import Unreachable
from hvae.pipeline.tracking import Tracker


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
        "import gc; from hvae.settings.config import TrackingConfig; import hvae.pipeline.tracking as t\n"
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
    from hvae.settings import graph
    from hvae.settings.config import load_config
    from hvae.pipeline.plan import PlannedStage, action

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


def test_a_run_only_reused_is_checked_without_downloading_its_weights(tmp_path):
    """`fetch.glance` (a run the pipeline reuses and no stage of it reads): its manifest against
    the store's listing by size, and only its pictures and tables downloaded and hashed; a file
    gone or cut short is named. A stage that reads the run gets it whole and every byte checked."""
    from hvae.pipeline.manifest import ManifestError, write_manifest
    from hvae.pipeline.runner import _Fetcher

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db"))
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "figures").mkdir()
    (out / "model" / "weights.pt").write_bytes(bytes(range(256)) * 64)
    (out / "figures" / "grid.png").write_bytes(b"a picture")
    (out / "table.md").write_text("| a | b |\n")
    write_manifest(out)
    run = tracker.start_run("stage", {})
    tracker.log_artifacts(run, out)
    stored = Path(tracker.artifact_uri(run).removeprefix("file://"))
    assert (stored / "model" / "weights.pt").is_file()

    local = _Fetcher(tracker, tmp_path / "glanced").glance(run)
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert got == ["figures/grid.png", "manifest.json", "table.md"]  # no weights moved

    weights = bytearray((stored / "model" / "weights.pt").read_bytes())
    weights[100] ^= 0xFF  # a flipped byte: the same size, so only a whole download finds it
    (stored / "model" / "weights.pt").write_bytes(bytes(weights))
    _Fetcher(tracker, tmp_path / "glanced2").glance(run)
    with pytest.raises(ManifestError, match="model/weights.pt does not match its sha256"):
        _Fetcher(tracker, tmp_path / "whole")(run)

    (stored / "model" / "weights.pt").write_bytes(bytes(weights[:1000]))  # cut short
    with pytest.raises(ManifestError, match=r"model/weights.pt has 1000 bytes, the manifest says 16384"):
        _Fetcher(tracker, tmp_path / "glanced3").glance(run)
    (stored / "model" / "weights.pt").unlink()
    with pytest.raises(ManifestError, match="model/weights.pt is missing"):
        _Fetcher(tracker, tmp_path / "glanced4").glance(run)
    (stored / "model" / "weights.pt").write_bytes(bytes(weights))
    (stored / "figures" / "grid.png").write_bytes(b"A picture")  # the pictures are hashed
    with pytest.raises(ManifestError, match="figures/grid.png does not match its sha256"):
        _Fetcher(tracker, tmp_path / "glanced5").glance(run)
