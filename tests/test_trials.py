"""A sweep's trial placement and its ASHA rungs, without starting Ray."""
from types import SimpleNamespace

import pytest

from hvae.settings.config import ClusterConfig
from hvae.pipeline.trials import DRIVER_MEMORY, TIME_ATTR, ResumableASHA, driver_bundle, trials_that_fit, worker_bundle

GiB = 1 << 30


def node(alive=True, **resources):
    return {"Alive": alive, "Resources": {"memory": 64 * GiB, **resources}}


def cluster(**kw):
    return ClusterConfig(**kw)


def test_a_trial_driver_asks_for_memory_only_and_its_workers_for_their_cpus_and_gpus():
    assert driver_bundle() == {"memory": DRIVER_MEMORY}  # no CPU taken from the workers, no head-only resource
    assert worker_bundle(cluster(cpus_per_worker=4, use_gpu=True)) == {"CPU": 4, "GPU": 1.0}
    assert worker_bundle(cluster(cpus_per_worker=1)) == {"CPU": 1}


def test_trials_that_fit_count_whole_worker_bundles_node_by_node():
    gpu_nodes = [node(CPU=2), node(CPU=16, GPU=4), node(CPU=16, GPU=4), node(alive=False, CPU=16, GPU=4)]
    # 2 GPU workers of 4 CPUs: 4 per GPU node (the CPU-only head holds none, a dead node counts nothing)
    assert trials_that_fit(cluster(num_workers=2, cpus_per_worker=4, use_gpu=True), gpu_nodes) == 4
    # CPUs, not GPUs, limit: 16 // 6 = 2 workers per node
    assert trials_that_fit(cluster(num_workers=2, cpus_per_worker=6, use_gpu=True), gpu_nodes) == 2
    # 3 workers: PACK may put a trial's workers on several nodes (8 // 3 trials); STRICT_SPREAD
    # wants 3 nodes for each trial, and two GPU nodes cannot give that
    assert trials_that_fit(cluster(num_workers=3, cpus_per_worker=4, use_gpu=True), gpu_nodes) == 2
    spread = cluster(num_workers=2, cpus_per_worker=4, use_gpu=True, placement_strategy="STRICT_SPREAD")
    assert trials_that_fit(spread, gpu_nodes) == 4
    assert trials_that_fit(spread, [node(CPU=16, GPU=4), node(CPU=4, GPU=1)]) == 1
    assert trials_that_fit(cluster(num_workers=3, use_gpu=True, placement_strategy="STRICT_SPREAD"), gpu_nodes) == 0
    # a GPU pool scaled to zero holds no trial now (the sweep then runs one and lets it wait)
    assert trials_that_fit(cluster(num_workers=1, use_gpu=True), [node(CPU=2)]) == 0
    # this machine: 2 CPUs, 1-CPU workers; and memory for the drivers is counted too
    assert trials_that_fit(cluster(num_workers=2), [node(CPU=2)]) == 1
    assert trials_that_fit(cluster(num_workers=1), [node(CPU=2)]) == 2
    assert trials_that_fit(cluster(num_workers=1), [{"Alive": True, "Resources": {"CPU": 8, "memory": 1.5 * GiB}}]) == 1


def _asha(path):
    asha = ResumableASHA(str(path), time_attr=TIME_ATTR, metric="val_loss", mode="min", max_t=4, grace_period=1,
                         reduction_factor=2)
    return asha


def _trial(name):
    return SimpleNamespace(trial_id=name)


def test_asha_rungs_survive_a_restored_sweep(tmp_path):
    state = tmp_path / "asha_rungs.json"
    first = _asha(state)
    for name, loss in [("a", 2.0), ("b", 1.0)]:  # (each better than the last: both go on)
        first.on_trial_add(None, _trial(name))
        assert first.on_trial_result(None, _trial(name), {TIME_ATTR: 1, "val_loss": loss}) == "CONTINUE"
    # the sweep is cut; Tune restores trials and search, and a scheduler as it was built
    restored = _asha(state)
    restored.on_trial_add(None, _trial("c"))
    assert restored.on_trial_result(None, _trial("c"), {TIME_ATTR: 1, "val_loss": 3.0}) == "STOP"
    # without the saved rungs the same result would have gone on
    fresh = _asha(tmp_path / "none.json")
    fresh.on_trial_add(None, _trial("c"))
    assert fresh.on_trial_result(None, _trial("c"), {TIME_ATTR: 1, "val_loss": 3.0}) == "CONTINUE"


@pytest.mark.parametrize("bad", [{"val_loss": 1.0}, {TIME_ATTR: 1}])
def test_asha_ignores_results_without_its_clock_or_metric(tmp_path, bad):
    asha = _asha(tmp_path / "s.json")
    asha.on_trial_add(None, _trial("a"))
    assert asha.on_trial_result(None, _trial("a"), bad) == "CONTINUE"
