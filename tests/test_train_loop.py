"""The training loop's collectives and its non-finite guard, on CPU, without Ray."""
import pytest
import torch
import torch.distributed as dist

from hvae.settings.config import TrainConfig

from hvae.stages.train_loop import (Guard, LoopSpec, Schedule, Trainee, _agreed, _reduce_sums, _stop_if_not_finite,
                                    make_optimizer, run_epoch)


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
        def steps_per_epoch(self, world):
            return 4

    with pytest.raises(FloatingPointError, match=r"^stage1: non-finite kl term at epoch 2 step 3 \(global step 7; "):
        _stop_if_not_finite(LoopSpec(make_task=Task, task_args={}, model_config={}, epochs=2, lr=1e-3,
                                     stage="stage1"), Task(), guard, 1)
    only_loss = Guard()
    only_loss.watch(0, {"loss": torch.tensor(float("inf"))})
    assert only_loss.check() == (0, ["loss"])
    assert Guard().check() is None


class Regression:
    """A pure task (no batch statistics): a linear model's mean squared error on fixed rows."""

    def __init__(self, batch_size: int, rows: int = 40):
        g = torch.Generator().manual_seed(0)
        self.x, self.batch_size, self.train_rows = torch.randn(rows, 4, generator=g), batch_size, rows
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def steps_per_epoch(self, world):
        return -(-self.train_rows // self.batch_size)

    def build_model(self):
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    def train_batches(self, epoch, rank, world):
        for i in range(0, self.train_rows, self.batch_size):
            yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]

    def val_batches(self, rank, world):
        return iter(())

    def train_step(self, model, batch, device):
        x, y = batch
        loss = ((model(x).squeeze(1) - y) ** 2).mean()
        return loss, {"count": torch.tensor(float(len(x)))}


def _train(batch_size: int, accumulate: int, epochs: int = 2, warmup: int = 0):
    spec = LoopSpec(make_task=Regression, task_args={}, model_config={}, epochs=epochs, lr=0.05,
                    train=TrainConfig(accumulate_steps=accumulate, warmup_steps=warmup))
    task = Regression(batch_size)
    model = task.build_model()
    optimizer, scheduler = make_optimizer(model, spec, task.steps_per_epoch(1))
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        run_epoch(spec, task, Trainee(model, optimizer, scheduler), epoch)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), scheduler.last_epoch, lrs


def test_accumulated_gradients_make_the_same_steps_as_one_large_batch():
    large, steps_large, _ = _train(batch_size=20, accumulate=1)
    small, steps_small, _ = _train(batch_size=10, accumulate=2)
    assert steps_large == steps_small == 4  # optimizer steps: 2 an epoch, the schedule moves with each
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_train(batch_size=10, accumulate=1)[0], large)  # (the test can tell)
    # 40 rows in batches of 16: 3 batches an epoch, 2 of them to a step: the short tail steps too
    assert _train(batch_size=16, accumulate=2)[1] == 4


def test_the_schedule_warms_up_per_step_then_decays_to_a_tenth():
    schedule = Schedule(warmup=4, total=14)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0 and schedule(9) == pytest.approx(0.55) and schedule(14) == pytest.approx(0.1)
    assert all(schedule(s) > schedule(s + 1) for s in range(4, 14))  # every step, not every epoch
    _, steps, lrs = _train(batch_size=10, accumulate=1, epochs=2, warmup=3)
    assert steps == 8 and lrs == pytest.approx([0.05 / 3, 0.05 * Schedule(3, 8)(4)])


class CountingShard:
    """A worker's Ray Data shard (in the split's order) that counts the passes made over it."""

    def __init__(self, images):
        self.images, self.passes = images, 0

    def iter_torch_batches(self, batch_size=None, **kwargs):
        self.passes += 1
        batch_size = batch_size or len(self.images)
        for i in range(0, len(self.images), batch_size):
            yield {"image": self.images[i : i + batch_size], "label": torch.zeros(len(self.images[i : i + batch_size]))}


@pytest.mark.parametrize("hold", [True, False])
def test_a_held_shard_is_read_once_and_each_epoch_permutes_all_of_it(hold):
    from hvae.stages.images import ImageTask

    images = torch.arange(200, dtype=torch.uint8).reshape(200, 1, 1, 1)
    task = ImageTask(model_config={}, shape=(1, 1, 1), train_rows=200, batch_size=16, world_hint=1, seed=0,
                     family="vqvae2", hold=hold)
    task.sources = {"train": CountingShard(images), "val": CountingShard(images)}
    epochs = [torch.cat(list(task.train_batches(epoch, 0, 1))).flatten().tolist() for epoch in range(3)]
    val = [torch.cat(list(task.val_batches(0, 1))).flatten().tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(200)) for e in epochs)  # every image once an epoch
    assert len({tuple(e) for e in epochs}) == 3  # in a new order each epoch
    assert all(v == list(range(200)) for v in val)  # validation in the split's order
    # held: one pass over each shard for all epochs (no Ray Data work after the first);
    # streamed: a pass an epoch
    assert (task.sources["train"].passes, task.sources["val"].passes) == ((1, 1) if hold else (3, 3))
    again = ImageTask(model_config={}, shape=(1, 1, 1), train_rows=200, batch_size=16, world_hint=1, seed=0,
                      family="vqvae2", hold=hold)
    again.sources = {"train": CountingShard(images), "val": CountingShard(images)}
    assert torch.cat(list(again.train_batches(2, 0, 1))).flatten().tolist() == epochs[2]  # a resume draws the same


def _agree(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from hvae.stages.checkpoints import Checkpoint

    # each rank listed the checkpoints at its own moment: rank 1 after a late one landed
    seen = Checkpoint(epoch=1, path="/s/checkpoint_a") if rank == 0 else Checkpoint(epoch=2, path="/s/checkpoint_b")
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(_agreed(seen if rank == 0 else None, 2)))
    dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    """Ranks that each asked for the newest checkpoint could get different ones (a worker of a
    killed run still writing) and then train different epochs until a collective hangs."""
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(str(tmp_path / "store"), str(tmp_path / "chosen")), nprocs=2, join=True)
    chosen = {(tmp_path / f"chosen.{r}").read_text() for r in (0, 1)}
    assert chosen == {"Checkpoint(epoch=1, path='/s/checkpoint_a', step=None)"}


def test_the_best_validation_epoch_is_kept_across_checkpoints_and_handed_on(tmp_path):
    from hvae.stages import checkpoints
    from hvae.stages.keep import BestEpoch, kept

    weights = lambda v: {"w": torch.full((2,), float(v))}  # noqa: E731
    best = BestEpoch("val_loss")
    assert best.update(0, {"val_loss": 3.0}, weights(0)) and best.state(0) == {"best": {"epoch": 0, "value": 3.0}}
    assert best.update(1, {"val_loss": 2.0}, weights(1))
    assert not best.update(2, {"val_loss": 2.5}, weights(2)) and not best.update(3, {"val_loss": 2.0}, weights(3))
    state = {"model": weights(3), **best.state(3)}  # epoch 3's checkpoint carries epoch 1's weights
    checkpoints.save(tmp_path, state, {"epoch": 3})
    restored, meta = checkpoints.load(tmp_path)
    again = BestEpoch("val_loss", restored)  # a resumed run goes on from the record
    assert (again.epoch, again.value) == (1, 2.0) and float(again.weights["w"][0]) == 1.0
    chosen, metrics, line = kept(restored, meta, "best", "val_loss")
    assert float(chosen["w"][0]) == 1.0 and metrics == {"kept_epoch": 1.0, "kept_val_loss": 2.0}
    assert line.startswith("epoch 2 of 4, the lowest val_loss")
    chosen, metrics, line = kept(restored, meta, "last", "val_loss")
    assert float(chosen["w"][0]) == 3.0 and metrics == {"kept_epoch": 3.0} and "train.keep=last" in line
    # a checkpoint whose own epoch is the best holds its weights once
    now = BestEpoch("val_loss", {"model": weights(5), "best": {"epoch": 5, "value": 1.0}})
    assert float(now.weights["w"][0]) == 5.0 and "model" not in now.state(5)["best"]


def test_the_model_summary_and_the_time_left_read_as_a_person_would_say_them():
    from hvae.stages.train_loop import _duration, summary

    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(3, 4))
    model.add_module("decoder", torch.nn.Linear(4, 3))
    assert summary(model) == "31 parameters: encoder 16, decoder 15"
    nested = torch.nn.Sequential()
    nested.add_module("priors", torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)]))
    assert summary(nested) == "41 parameters: priors.0 16, priors.1 25"  # (one container: its parts)
    assert [_duration(s) for s in (4.6, 65, 3 * 3600 + 125)] == ["5 s", "1 min 05 s", "3 h 02 min"]


def test_progress_inside_an_epoch_says_step_loss_speed_and_time_left(monkeypatch, capfd):
    import re

    from hvae.stages import train_loop

    class Task:
        def summarize(self, split, sums):
            return {f"{split}_loss": float(sums["loss"]) / float(sums["count"])}

    spec = train_loop.LoopSpec(make_task=Task, task_args={}, model_config={}, epochs=2, lr=1e-3, stage="stage1")
    monkeypatch.setattr(train_loop, "PROGRESS_EVERY_S", 0.0)
    progress = train_loop.Progress(spec, steps=4, first_epoch=0, items_per_step=8)
    sums = {"loss": torch.tensor(6.0), "count": torch.tensor(2.0), "first_batch_s": torch.tensor(0.5)}
    progress.step(0, 0, Task(), sums)
    progress.step(0, 3, Task(), sums)  # (the epoch's last step: its own line follows, not this one)
    lines = capfd.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[stage1\] epoch 1/2 step 1/4 train_loss=3 \d+ items/s, \d+ s left", lines[0])
