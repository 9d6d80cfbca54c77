"""Evaluate: the NLL upper bound on the test split, its parts, reconstruction quality.

For a one-hot posterior q(z | x) the ELBO is log p(x | z_q(x)) + log p(z_q(x)), so
    -log p(x) <= -log p(x | z_q(x)) - sum_l log p_prior(z_l | z_{l-1})
with the decoder's real likelihood and the PixelCNN priors. Reported in nats per image
and in bits per dimension (nats / (C*H*W*ln 2)). Output: report/nll_table.md.

An NVAE has a continuous posterior: its test NLL is the importance-weighted estimate
    -log p(x) ≈ -log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x),
with K = ``evaluate.iw_samples`` (an upper bound on -log p(x) in expectation, tighter as K
grows; K = 1 is the negative ELBO, reported as ≤), next to the analytic negative ELBO
and its reconstruction and KL parts.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import StageContext, StageResult
from .priors import load_priors
from .stage1 import load_model

CODE = ["stages/evaluate.py", "stages/priors.py", "stages/stage1.py", "stages/base.py", "models/pixelcnn.py",
        "models/vqvae2.py", "models/quantize.py", "models/nvae.py", "models/likelihoods.py"]


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


@torch.no_grad()
def nvae_bound(model, images: np.ndarray, batch_size: int, k: int, seed: int = 0) -> dict[str, float]:
    from models.nvae import iw_bound

    n, dims = len(images), int(np.prod(images.shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    iw = recon = kl = sq_err = 0.0
    for i in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        out = model(x, generator=gen)
        recon += float(out["nll"].sum())
        kl += float(out["kl"].sum())
        iw += float(iw_bound(model.log_weights(x, k, generator=gen)).sum())
        mean = model.likelihood.mean(out["params"]) / 255.0
        sq_err += float(((mean - x.float() / 255.0) ** 2).flatten(1).mean(1).sum())
    to_bpd = 1.0 / (n * dims * math.log(2))
    mse = sq_err / n
    return {"test_nll_nats": -iw / n, "test_nll_bpd": -iw * to_bpd, "test_iw_samples": float(k),
            "test_elbo_nats": (recon + kl) / n, "test_elbo_bpd": (recon + kl) * to_bpd,
            "test_recon_nats": recon / n, "test_recon_bpd": recon * to_bpd,
            "test_kl_nats": kl / n, "test_kl_bpd": kl * to_bpd,
            "test_mse": mse, "test_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "test_images": float(n)}


def model_name(model) -> str:
    if not hasattr(model, "codebook_sizes"):  # an NVAE
        if not model.residual_posterior:
            return "VAE (Gaussian, one latent group)"
        return f"NVAE ({model.scales} scales × {model.groups_per_scale} groups)"
    vq = model
    base = {1: "VQ-VAE", 2: "VQ-VAE-2"}.get(vq.levels, f"VQ-VAE-2 ({vq.levels} levels)")
    return f"{base} (K={'/'.join(map(str, vq.codebook_sizes))}) + gated PixelCNN priors"


def structure(model) -> str:
    if hasattr(model, "codebook_sizes"):
        return f"{model.levels} level{'s' if model.levels > 1 else ''}, K={'/'.join(map(str, model.codebook_sizes))}"
    return f"{model.num_groups} group{'s' if model.num_groups > 1 else ''} over {model.scales} scale{'s' if model.scales > 1 else ''}"


def bound_symbol(metrics: dict) -> str:
    """≤ for the VQ bound and the ELBO, ≈ for an importance-weighted estimate."""
    return "≈" if metrics.get("test_iw_samples", 1.0) > 1 else "≤"


def nll_table(rows: list[dict]) -> str:
    """Markdown in the style of the lecture's NLL tables; one row per model."""
    lines = ["| Model | Dataset | NLL test (nats/image) | NLL test (bits/dim) | recon (bits/dim) | prior or KL (bits/dim) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        b = bound_symbol(r)
        prior = r.get("test_prior_bpd", r.get("test_kl_bpd"))
        lines.append(f"| {r['model']} | {r['dataset']} | {b} {r['test_nll_nats']:.2f} | {b} {r['test_nll_bpd']:.4f} "
                     f"| {r['test_recon_bpd']:.4f} | {prior:.4f} |")
    lines.append("")
    lines.append("≤: an upper bound on −log p(x): −log p(x | z_q(x)) − Σ_l log p(z_l | z_{l−1}) for the VQ models, "
                 "the negative ELBO for a VAE; ≈: the importance-weighted estimate with K samples.")
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> StageResult:
    model = load_model(ctx.upstream["stage1"] / "model")
    test, ecfg = ctx.data["test"], ctx.config.evaluate
    if "priors" in ctx.upstream:
        priors = load_priors(ctx.upstream["priors"] / "model")
        metrics = nll_bound(model, priors, test.images, test.labels, ecfg.batch_size)
    else:
        metrics = nvae_bound(model, test.images, ecfg.batch_size, ecfg.iw_samples)
    shape = "×".join(str(s) for s in test.images.shape[1:])
    dataset = f"{ctx.config.data.dataset} ({len(test)} test images, {shape})"
    row = {"model": model_name(model), "dataset": dataset, **metrics}
    folder = ctx.output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nll_table.md").write_text(nll_table([row]))
    # what `hvae report` lists, kept on the run
    tags = {"hvae.model": ctx.config.stage1.model, "hvae.model_name": row["model"], "hvae.dataset": ctx.config.data.dataset,
            "hvae.dataset_desc": dataset, "hvae.structure": structure(model), "hvae.bound": bound_symbol(metrics)}
    return StageResult(metrics=metrics, output_dir=ctx.output_dir, tags=tags)
