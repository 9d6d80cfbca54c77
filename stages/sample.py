"""Sample: draw images from the trained model family (``Family.sample``).

VQ families: top codes from the top prior, each lower level from its prior conditioned on
the level above, then the decoder; the logits are divided by ``sample.temperature``. An
NVAE samples its own top-down prior, each group's sigma multiplied by ``sample.temperature``.
A fixed ``sample.seed`` gives identical samples, on a CPU or a GPU, whatever the number of
workers: the driver builds the family's sampler, and Ray tasks (one GPU each when
``cluster.use_gpu``) draw ``sample.batch_size`` images each from generators seeded by
(seed, first image). Output folder:
    samples/grid.png      the images in a grid
    samples/grid_t<T>.png 16 more at each of sample.temperatures (the same seeds)
    samples/samples.npz   images (uint8 [N, C, H, W]), codes per level (level0 = top), labels
With ``sample.classifier`` (grayscale digits), the fixed MNIST classifier of models/digits.py
scores them: ``sample_confidence`` and ``sample_label_entropy`` (a digit-space proxy for IS/FID).
"""
from __future__ import annotations

import math

import numpy as np

from .base import StageContext, StageResult
from .families import load_model


AT_T = 16  # samples in each grid of sample.temperatures


def _draw(sampler, use_gpu: bool, first: int, count: int):
    """On a Ray worker: samples ``first`` to ``first + count`` on that worker's device -> CPU tensors."""
    from .families import worker_device

    return sampler.to(worker_device(use_gpu))(first, count)  # (from its own seeded generator)


def run(ctx: StageContext) -> StageResult:
    import torch
    from torchvision.utils import save_image

    import ray

    scfg, use_gpu = ctx.config.sample, ctx.config.cluster.use_gpu
    family, model = load_model(ctx.upstream["stage1"] / "model")
    sampler = ray.put(family.sampler(model, ctx.upstream, scfg))
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_draw)
    n, size = scfg.num_samples, scfg.batch_size
    parts = ray.get([task.remote(sampler, use_gpu, first, min(size, n - first)) for first in range(0, n, size)])
    images = torch.cat([p[0] for p in parts])
    codes = [torch.cat([p[1][l] for p in parts]) for l in range(len(parts[0][1]))]
    labels = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    folder = ctx.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    nrow = 10 if labels is not None else max(1, int(math.sqrt(scfg.num_samples)))
    save_image(images.float() / 255.0, folder / "grid.png", nrow=nrow, padding=2, pad_value=0.5)
    arrays = {"images": images.numpy(), **{f"level{l}": c.numpy().astype(np.int16) for l, c in enumerate(codes)}}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez_compressed(folder / "samples.npz", **arrays)
    for t in (t for t in scfg.temperatures if t != scfg.temperature):  # the same seeds, another temperature
        at, k = ray.put(family.sampler(model, ctx.upstream, scfg.model_copy(update={"temperature": t}))), min(n, AT_T)
        drawn = torch.cat([p[0] for p in ray.get([task.remote(at, use_gpu, first, min(size, k - first))
                                                   for first in range(0, k, size)])])
        save_image(drawn.float() / 255.0, folder / f"grid_t{t:g}.png", nrow=max(1, int(math.sqrt(k))), padding=2,
                   pad_value=0.5)
    metrics = {"num_samples": float(scfg.num_samples), "temperature": scfg.temperature}
    if scfg.classifier:
        metrics.update(classifier_scores(scfg.classifier, images))
    return StageResult(metrics=metrics, output_dir=ctx.output_dir)


def classifier_scores(path: str, images) -> dict[str, float]:
    """The samples scored by the digit classifier whose weights are at ``path``."""
    from hvae.models.digits import DigitClassifier, digit_scores

    from .base import load_weights

    if images.shape[1] != 1:
        raise ValueError(f"sample.classifier scores grayscale digits; these samples have {images.shape[1]} channels")
    classifier = DigitClassifier()
    load_weights(classifier, path)
    scores = digit_scores(classifier, images)
    return {"sample_confidence": scores["confidence"], "sample_label_entropy": scores["label_entropy"],
            "sample_digits_seen": scores["digits_seen"]}
