"""Does the default VQ-VAE-2 learn RGB images? Reconstruction MSE, bits/dim and code use at
equal optimiser steps, against the same network trained on MSE; writes bench/results/rgb.md.

    .venv/bin/python bench/rgb.py [--steps 1100] [--seeds 1]

The images: 32x32 crops of the two colour photographs scikit-learn ships (china.jpg,
flower.jpg; offline), training crops from the top three quarters of each photograph,
validation crops from the bottom quarter. The network: configs/default.yaml's VQ-VAE-2
(64 / 128 codes, a 5-component discretized logistic mixture), trained in this process (no
Ray: the model and its loss are what is measured) as stage 1 trains it: AdamW at the
config's lr, its cosine decay to lr/10 at the last step, gradients clipped at 1, batch 64.
Variants, each from the same initial weights and batches:
  before   the settings before the fix: channel coefficients on from step 0, k-means on the
           first batch only, restarts below an EMA count of 0.5
  now      the defaults: coefficients held off for stage1.coeff_warmup_steps (500 for RGB),
           k-means again at vqvae2.kmeans_at_step, restarts below vqvae2.dead_code_fraction of
           the mean count
  mse      the same network and quantizer, trained on the squared error of the decoder's mean
           (coefficients off): the reconstruction a likelihood-trained model should approach
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402

from hvae.models.likelihoods import to_bits_per_dim  # noqa: E402
from hvae.models.quantize import perplexity  # noqa: E402
from hvae.models.vqvae2 import VQVAE2  # noqa: E402
from hvae.settings.config import load_config  # noqa: E402
from hvae.stages.families import get  # noqa: E402
from hvae.stages.train_loop import Schedule  # noqa: E402

VARIANTS = {
    "before": {"coeff_warmup_steps": 0, "kmeans_at_step": 0, "dead_code_fraction": 0.0},
    "now": {},
    "mse": {"coeff_warmup_steps": 10**9},  # (the squared error of the per-channel means)
}


def crops(n: int, part: str, seed: int) -> torch.Tensor:
    """n random 32x32 crops (uint8 [n, 3, 32, 32]) of the photographs' ``part`` (top / bottom)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = []
    for img in load_sample_images().images:  # [427, 640, 3] uint8
        cut = img.shape[0] * 3 // 4
        photos.append(img[:cut] if part == "top" else img[cut:])
    out = np.empty((n, 3, 32, 32), np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 32), rng.integers(0, p.shape[1] - 32)
        out[i] = p[y : y + 32, x : x + 32].transpose(2, 0, 1)
    return torch.from_numpy(out)


def model_config(**changes) -> dict:
    cfg = load_config(ROOT / "configs" / "default.yaml", ["data.dataset=imagefolder"])
    return {**get("vqvae2").model_config(cfg, channels=3), **changes}


@torch.no_grad()
def evaluate(model, val: torch.Tensor) -> dict:
    model.eval()
    nll, sq = 0.0, 0.0
    for i in range(0, len(val), 250):
        x = val[i : i + 250]
        out = model(x)
        nll += float(out["nll"].sum())
        sq += float(((model.likelihood.mean(out["params"]) / 255.0 - x.float() / 255.0) ** 2).mean((1, 2, 3)).sum())
    model.train()
    return {"mse": sq / len(val), "bpd": to_bits_per_dim(nll / len(val), 3 * 32 * 32)}


def train(variant: str, train_x, val_x, steps: int, seed: int, lr: float, every: int) -> dict:
    torch.manual_seed(seed)
    model = VQVAE2(**model_config(**VARIANTS[variant])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(0, steps))
    order = torch.Generator().manual_seed(seed)
    per_epoch = len(train_x) // 64
    first_epoch = [[] for _ in range(model.levels)]
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(train_x), generator=order)
        x = train_x[perm[(step % per_epoch) * 64 : (step % per_epoch + 1) * 64]]
        out = model(x)
        if variant == "mse":
            recon = ((model.likelihood.mean(out["params"]) / 255.0 - x.float() / 255.0) ** 2).flatten(1).sum(1)
            loss = (recon + out["commit"]).mean() / x[0].numel()
        else:
            loss = (out["nll"] + out["commit"]).mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step < per_epoch:
            for l, st in enumerate(out["stats"]):
                first_epoch[l].append(float(st["perplexity"]))
        if (step + 1) % every == 0 or (step + 1 == steps and steps % every > every // 2):
            curve.append((step + 1, evaluate(model, val_x)))
    usage = [torch.zeros(k) for k in model.codebook_sizes]
    with torch.no_grad():
        model.eval()
        for i in range(0, len(val_x), 250):
            for l, c in enumerate(model.encode(val_x[i : i + 250])):
                usage[l] += torch.bincount(c.flatten(), minlength=len(usage[l])).float()
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            "epoch1_perplexity": [(min(p), float(np.mean(p))) for p in first_epoch],
            "val_perplexity": [float(perplexity(u)) for u in usage], "codes": model.codebook_sizes}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--every", type=int, default=0, help="validate every this many steps (default: steps / 6)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_x, val_x = crops(args.train, "top", 0), crops(500, "bottom", 1)
    lr = float(load_config(ROOT / "configs" / "default.yaml").stage1.lr)
    every = args.every or max(1, args.steps // 6)
    results = {v: [train(v, train_x, val_x, args.steps, seed, lr, every) for seed in range(args.seeds)] for v in VARIANTS}

    def at(v, i, key):  # mean over seeds of the i-th validation point
        return float(np.mean([r["curve"][i][1][key] for r in results[v]]))

    points = [s for s, _ in results["now"][0]["curve"]]
    likelihood = [v for v in VARIANTS if v != "mse"]  # (the MSE-trained network's scales are untrained)
    lines = ["| step | " + " | ".join(f"{v} MSE" for v in VARIANTS) + " | " + " | ".join(f"{v} bits/dim" for v in likelihood)
             + " | now MSE / mse MSE |", "|" + "---|" * (len(VARIANTS) + len(likelihood) + 2)]
    for i, s in enumerate(points):
        lines.append(f"| {s} | " + " | ".join(f"{at(v, i, 'mse'):.4f}" for v in VARIANTS) + " | "
                     + " | ".join(f"{at(v, i, 'bpd'):.3f}" for v in likelihood) + f" | {at('now', i, 'mse') / at('mse', i, 'mse'):.2f} |")
    codes = ["", "| variant | epoch-1 train perplexity per level (min / mean over its steps) | validation perplexity per level at the end | seconds |",
             "|---|---|---|---|"]
    for v in VARIANTS:
        r = results[v][0]
        e1 = ", ".join(f"{lo:.1f} / {m:.1f} of {k}" for (lo, m), k in zip(r["epoch1_perplexity"], r["codes"]))
        codes.append(f"| {v} | {e1} | {', '.join(f'{p:.1f}' for p in r['val_perplexity'])} | {r['seconds']:.0f} |")
    last = len(points) - 1
    verdict = (f"At step {points[-1]} the default reaches {at('now', last, 'mse') / at('mse', last, 'mse'):.2f}× the MSE "
               f"of the MSE-trained network (before the fix: {at('before', last, 'mse') / at('mse', last, 'mse'):.2f}×), "
               f"at {at('now', last, 'bpd'):.3f} bits/dim (before: {at('before', last, 'bpd'):.3f}).")
    body = "\n".join([
        f"{args.train} training and 500 validation crops (32×32 RGB, scikit-learn's china.jpg and flower.jpg), "
        f"batch 64, {len(train_x) // 64} steps per epoch, AdamW lr {lr:g} with its cosine decay to a tenth, {args.seeds} seed(s) (the mean is shown); "
        f"validation MSE on [0, 1] pixels of the decoder's mean and bits/dim of the likelihood:", "",
        *lines, *codes, "", verdict])
    cmd = "python bench/rgb.py " + " ".join(argv) if argv else "python bench/rgb.py"
    record("rgb", cmd.strip(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
