"""Stage 1: train the model family's autoencoder on Ray Train workers; leave the model and figures.

The family (``stages.families``, chosen by ``stage1.model``) says what the model is, its
loss and its figures; this stage trains it on the shared loop and writes:
    model/<family>.pt        state dict (torch.load(..., weights_only=True))
    model/config.json        {"family": ..., constructor arguments}
    figures/*.png            reconstructions.png and the family's own (codebook usage, KL per group)
"""
from __future__ import annotations

import time

from .baseline import histogram_bpd
from .base import StageContext, StageResult
from .families import of, save_model
from .images import train_stage1, training_datasets

__all__ = ["run", "training_datasets"]  # (a sweep builds the stage's datasets once: training_datasets)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    family = of(cfg)
    # the likelihood counts the real pixels only (DataSpec.content; padding is no data)
    region = list(ctx.data.content) if ctx.data.content is not None else None
    model_config = {**family.model_config(cfg, ctx.data.channels), "likelihood_region": region}
    fitted = train_stage1(ctx, family, model_config)
    model = family.build(model_config)
    model.load_state_dict(fitted.weights)  # (a SyncBatchNorm model saves the same keys)
    model.eval()
    save_model(family, model, model_config, ctx.output_dir / "model")
    metrics = dict(fitted.metrics)
    t0 = time.perf_counter()
    metrics.update(family.figures(model, ctx.data, cfg, ctx.output_dir / "figures", fitted.meta.get("val_sums", {})))
    metrics["figures_seconds"] = time.perf_counter() - t0
    metrics["num_params"] = float(sum(p.numel() for p in model.parameters()))
    warn = _against_histogram(ctx, metrics)
    if warn:
        print(f"[hvae] stage1: warning: {warn}", flush=True)
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       tags=fitted.tags)


def _against_histogram(ctx: StageContext, metrics: dict) -> str | None:
    """Logs ``baseline_histogram_bpd`` (pixels independent, each from a histogram, on up to 1,000
    validation images) -> a line when the reconstruction costs no fewer bits than it."""
    images = ctx.data.read_all("val", limit=1000)["image"]
    if len(images) < 2:
        return None
    metrics["baseline_histogram_bpd"] = base = histogram_bpd(images, ctx.data.content)
    recon = metrics.get("val_recon_bpd", metrics.get("val_bpd"))  # (a VQ model's val_bpd is its reconstruction)
    if recon is None or recon < base:
        return None
    steps = f" after {metrics['optimizer_steps']:.0f} optimizer steps" if "optimizer_steps" in metrics else ""
    return (f"the reconstruction costs {recon:.3f} bits/dim, no fewer than a histogram of pixel values "
            f"({base:.3f}){steps}: the model has learnt nothing of the images yet, and its reconstructions "
            f"and samples will be flat; train longer (stage1.epochs; README: steps per dataset)")
