"""The GPU and paper-sized configs (the binarized-MNIST GPU variants among them), on this CPU machine: `--dry-run` counts every model's
parameters without the data (none of it is here) and without downloading, and each model the
config trains takes one real training step at batch 1 through the shared loop's train_step."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvae.settings.config import load_config
from hvae.pipeline.datasets import channels
from hvae.stages import families
from hvae.stages.train_loop import LoopSpec, Trainee, train_step

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["vqvae2_imagenet256.yaml", "nvae_cifar10.yaml"]
CONFIGS = ["gpu.yaml", "nvae_gpu.yaml", "bmnist_vqvae2_gpu.yaml", "bmnist_nvae_gpu.yaml", "bmnist_vae_gpu.yaml", "bmnist_pixelvae.yaml", *PAPER]


@pytest.mark.parametrize("name", ["gpu.yaml", *PAPER])
def test_dry_run_counts_the_parameters_without_the_data(name, tmp_path):
    files = [f"data.root={tmp_path / 'absent'}", "data.download=true"] if name != "gpu.yaml" else []  # (mnist5k: none)
    proc = subprocess.run([sys.executable, "-m", "hvae", "run", str(ROOT / "configs" / name), "--dry-run", *files],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = next(line for line in proc.stdout.splitlines() if line.startswith("# parameters: "))
    cfg = load_config(ROOT / "configs" / name)
    want = families.of(cfg).param_counts(cfg, channels(cfg.data, None), 10)
    assert all(f"{what} {n:,}" in counts for what, n in want.items()), counts
    if name != "gpu.yaml":  # (gpu.yaml reads the embedded digits, which are here)
        assert "# data: " in proc.stdout and "not readable here" in proc.stdout
        assert "URLError" not in proc.stdout  # a dry run never downloads
    assert list(tmp_path.iterdir()) == []  # nothing written: no data prepared, no MLflow store


def _spec(cfg, model_config) -> LoopSpec:
    return LoopSpec(make_task=object, task_args={}, model_config=model_config, epochs=1, lr=1e-4, train=cfg.train)


def _one_step(task, model, batch, spec) -> dict:
    if spec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):  # a VAE's encoder moves from the second step: its posterior heads start at zero
        sums = train_step(spec, task, Trainee(model, opt), batch)
        moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if moved > 0.5 * len(before):
            break
    assert moved > 0.5 * len(before), f"{moved} of {len(before)} parameters moved"
    return {k: float(v.sum()) for k, v in sums.items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_model_of_the_config_takes_one_training_step_at_batch_1(name):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / name)
    family = families.of(cfg)
    c, size = channels(cfg.data, None), cfg.data.image_size
    model_config = family.model_config(cfg, c)
    task_cls, extra = family.task(cfg)
    task = task_cls(model_config=model_config, shape=(c, size, size), train_rows=1, batch_size=1, world_hint=1,
                    seed=0, family=family.name, **extra)
    model = task.build_model()
    sums = _one_step(task, model, torch.randint(0, 256, (1, c, size, size), dtype=torch.uint8),
                     _spec(cfg, model_config))
    assert all(map(lambda v: v == v and abs(v) < float("inf"), sums.values())), sums
    if "priors" not in family.stages:
        return
    from hvae.stages.priors import PriorTask, prior_config

    # the priors as configured, on code maps of a 4x smaller image when the top map is large
    # (convolutions and attention take any map size; a step on 32x32 and 64x64 maps of these
    # 250 M-parameter models would take minutes on two cores)
    shapes = model.map_shapes(size // max(1, model.map_shapes(size)[0][0] // 8))
    schema = {"codebook_sizes": model.codebook_sizes, "shapes": [list(s) for s in shapes], "num_classes": 10}
    config = prior_config(schema, cfg.priors)
    task = PriorTask(config=config, batch_size=1, world_hint=1, seed=0, train_rows=1)
    prior = task.build_model()
    batch = {f"level{l}": torch.randint(0, k, (1, *shapes[l])) for l, k in enumerate(model.codebook_sizes)}
    batch["label"] = torch.tensor([3])
    sums = _one_step(task, prior, batch, _spec(cfg, config))
    assert all(map(lambda v: v == v and abs(v) < float("inf"), sums.values())), sums
