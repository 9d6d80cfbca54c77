"""Evaluate: the NLL upper bound on the test split, its parts, reconstruction quality.

For a one-hot posterior q(z | x) the ELBO is log p(x | z_q(x)) + log p(z_q(x)), so
    -log p(x) <= -log p(x | z_q(x)) - sum_l log p_prior(z_l | z_{l-1})
with the decoder's real likelihood and the PixelCNN priors. Reported in nats per image
and in bits per dimension (nats / (C*H*W*ln 2)). Output: report/nll_table.md.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import StageContext, StageResult
from .priors import load_priors
from .stage1 import load_model

CODE = ["stages/evaluate.py", "stages/priors.py", "stages/stage1.py", "stages/base.py", "models/pixelcnn.py",
        "models/vqvae2.py", "models/quantize.py", "models/likelihoods.py"]


@torch.no_grad()
def nll_bound(vq, priors, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, float]:
    """Test metrics of a stage-1 model and its priors on uint8 images [N, C, H, W]."""
    n, dims = len(images), int(np.prod(images.shape[1:]))
    recon = prior = sq_err = 0.0
    prior_levels = [0.0] * len(priors.levels)
    usage = [torch.zeros(k) for k in vq.codebook_sizes]
    use_labels = priors.levels[0].num_classes > 0
    for i in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        y = torch.from_numpy(labels[i : i + batch_size]).long() if use_labels else None
        out = vq(x)
        recon += float(out["nll"].sum())
        for l, nll in enumerate(priors(out["codes"], y)):
            prior_levels[l] += float(nll.sum())
        mean = vq.likelihood.mean(out["params"]) / 255.0
        sq_err += float(((mean - x.float() / 255.0) ** 2).flatten(1).mean(1).sum())
        for l, c in enumerate(out["codes"]):
            usage[l] += torch.bincount(c.flatten(), minlength=vq.codebook_sizes[l]).float()
    prior = sum(prior_levels)
    to_bpd = 1.0 / (n * dims * math.log(2))
    mse = sq_err / n
    metrics = {
        "test_nll_nats": (recon + prior) / n, "test_nll_bpd": (recon + prior) * to_bpd,
        "test_recon_nats": recon / n, "test_recon_bpd": recon * to_bpd,
        "test_prior_nats": prior / n, "test_prior_bpd": prior * to_bpd,
        "test_mse": mse, "test_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "test_images": float(n),
    }
    for l, u in enumerate(usage):
        p = u / u.sum()
        metrics[f"test_perplexity_level{l}"] = float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))
        metrics[f"test_prior_nats_level{l}"] = prior_levels[l] / n
    return metrics


def model_name(vq) -> str:
    base = {1: "VQ-VAE", 2: "VQ-VAE-2"}.get(vq.levels, f"VQ-VAE-2 ({vq.levels} levels)")
    return f"{base} (K={'/'.join(map(str, vq.codebook_sizes))}) + gated PixelCNN priors"


def nll_table(rows: list[dict]) -> str:
    """Markdown in the style of the lecture's NLL tables; one row per model."""
    lines = ["| Model | Dataset | NLL test (nats/image) | NLL test (bits/dim) | recon (bits/dim) | prior (bits/dim) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dataset']} | ≤ {r['test_nll_nats']:.2f} | ≤ {r['test_nll_bpd']:.4f} "
                     f"| {r['test_recon_bpd']:.4f} | {r['test_prior_bpd']:.4f} |")
    lines.append("")
    lines.append("≤: an upper bound on −log p(x): −log p(x | z_q(x)) − Σ_l log p(z_l | z_{l−1}).")
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> StageResult:
    vq = load_model(ctx.upstream["stage1"] / "model")
    priors = load_priors(ctx.upstream["priors"] / "model")
    test = ctx.data["test"]
    metrics = nll_bound(vq, priors, test.images, test.labels, ctx.config.evaluate.batch_size)
    shape = "×".join(str(s) for s in test.images.shape[1:])
    row = {"model": model_name(vq), "dataset": f"{ctx.config.data.dataset} ({len(test)} test images, {shape})",
           **metrics}
    folder = ctx.output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nll_table.md").write_text(nll_table([row]))
    return StageResult(metrics=metrics, output_dir=ctx.output_dir)
