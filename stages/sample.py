"""Sample: ancestral sampling through the hierarchy, then the stage-1 decoder.

Top codes from the top prior, each lower level from its prior conditioned on the level
above, then the decoder; the logits are divided by ``sample.temperature``. An NVAE samples
its own top-down prior, each group's sigma multiplied by ``sample.temperature``. A fixed
``sample.seed`` gives identical samples. Output folder:
    samples/grid.png      the images in a grid (rows of 8)
    samples/samples.npz   images (uint8 [N, C, H, W]), codes per level (level0 = top), labels
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import StageContext, StageResult
from .priors import load_priors
from .stage1 import load_model

CODE = ["stages/sample.py", "stages/priors.py", "stages/stage1.py", "stages/base.py", "models/pixelcnn.py",
        "models/vqvae2.py", "models/quantize.py", "models/nvae.py", "models/likelihoods.py"]


@torch.no_grad()
def draw(vq, priors, num_samples: int, temperature: float, seed: int, pixels: str = "mean"):
    """-> (images uint8 [N, C, H, W], codes per level, labels or None)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = priors.levels[0].num_classes
    labels = torch.arange(num_samples) % num_classes if num_classes else None
    codes = priors.sample(num_samples, labels, temperature, gen)
    params = vq.decode_codes(codes)
    if pixels == "sample":
        images = vq.likelihood.sample(params, gen)
    else:
        images = vq.likelihood.mean(params).round().clamp(0, 255).to(torch.uint8)
    return images, codes, labels


def run(ctx: StageContext) -> StageResult:
    from torchvision.utils import save_image

    scfg = ctx.config.sample
    model = load_model(ctx.upstream["stage1"] / "model")
    torch.manual_seed(scfg.seed)
    if "priors" in ctx.upstream:
        priors = load_priors(ctx.upstream["priors"] / "model")
        images, codes, labels = draw(model, priors, scfg.num_samples, scfg.temperature, scfg.seed, scfg.pixels)
    else:  # an NVAE: its own prior, sigma_p scaled by the temperature
        gen = torch.Generator().manual_seed(scfg.seed)
        images, codes, labels = model.sample(scfg.num_samples, scfg.temperature, gen, pixels=scfg.pixels), [], None
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
