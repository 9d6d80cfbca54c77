"""The training loop's collectives and its non-finite guard, on CPU, without Ray."""
import pytest
import torch
import torch.distributed as dist

from stages.train_loop import Guard, LoopSpec, _reduce_sums, _stop_if_not_finite


def test_the_epoch_reduction_runs_on_the_training_device_as_nccl_requires(monkeypatch):
    """A two-worker group that, like NCCL, serves no CPU tensor: the epoch's sums (accumulated
    on the device, some made on the CPU, e.g. timings) go into one buffer on the training
    device. ("meta" stands in for "cuda" on a CPU-only machine: a device with no CPU backend.)"""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    device = torch.device("meta")
    sums = {"train/count": torch.tensor(64.0, device=device), "train/nll": torch.zeros(3, device=device),
            "seconds": torch.tensor(1.5)}  # a CPU scalar, as the loop makes for timings
    reduced = _reduce_sums(sums, device)
    assert seen == [device]  # one collective, on the training device
    assert {k: (v.device, tuple(v.shape)) for k, v in reduced.items()} == {
        "train/count": (device, ()), "train/nll": (device, (3,)), "seconds": (device, ())}


def test_the_guard_names_the_first_bad_step_and_term_without_a_sync_per_step():
    guard = Guard()
    finite = torch.tensor(1.0)
    for step in range(5):
        bad = torch.tensor(float("nan")) if step == 3 else finite
        guard.watch(step, {"recon": finite, "kl": bad, "loss": torch.tensor(float("inf")) if step >= 3 else finite})
    assert guard.check() == (3, ["kl"])  # the loss went bad at the same step: the term is named

    class Task:
        steps_per_epoch = 4

    with pytest.raises(FloatingPointError, match=r"^stage1: non-finite kl term at epoch 2 step 3 \(global step 7; "):
        _stop_if_not_finite(LoopSpec(make_task=Task, task_args={}, model_config={}, epochs=2, lr=1e-3,
                                     stage="stage1"), Task(), guard, 1)
    only_loss = Guard()
    only_loss.watch(0, {"loss": torch.tensor(float("inf"))})
    assert only_loss.check() == (0, ["loss"])
    assert Guard().check() is None
