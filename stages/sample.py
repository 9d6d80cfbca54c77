"""Sample: draw images from the trained model family (``Family.sample``).

VQ families: top codes from the top prior, each lower level from its prior conditioned on
the level above, then the decoder; the logits are divided by ``sample.temperature``. An
NVAE samples its own top-down prior, each group's sigma multiplied by ``sample.temperature``.
A fixed ``sample.seed`` gives identical samples, on a CPU or a GPU. The driver builds the
family's sampler and a Ray task runs it (one GPU when ``cluster.use_gpu``). Output folder:
    samples/grid.png      the images in a grid
    samples/samples.npz   images (uint8 [N, C, H, W]), codes per level (level0 = top), labels
"""
from __future__ import annotations

import math

import numpy as np

from .base import StageContext, StageResult
from .families import load_model


def _draw(sampler, use_gpu: bool):
    """On a Ray worker: the family's sampler on that worker's device -> CPU tensors."""
    from .families import worker_device

    return sampler.to(worker_device(use_gpu))()  # (it draws from its own seeded generators)


def run(ctx: StageContext) -> StageResult:
    import torch
    from torchvision.utils import save_image

    import ray

    scfg, use_gpu = ctx.config.sample, ctx.config.cluster.use_gpu
    family, model = load_model(ctx.upstream["stage1"] / "model")
    sampler = family.sampler(model, ctx.upstream, scfg)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_draw)
    images, codes, labels = ray.get(task.remote(sampler, use_gpu))
    folder = ctx.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    nrow = 10 if labels is not None else max(1, int(math.sqrt(scfg.num_samples)))
    save_image(images.float() / 255.0, folder / "grid.png", nrow=nrow, padding=2, pad_value=0.5)
    arrays = {"images": images.numpy(), **{f"level{l}": c.numpy().astype(np.int16) for l, c in enumerate(codes)}}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez_compressed(folder / "samples.npz", **arrays)
    return StageResult(metrics={"num_samples": float(scfg.num_samples), "temperature": scfg.temperature},
                       output_dir=ctx.output_dir)
