"""Stage 1: train the model family's autoencoder on Ray Train workers; leave the model and figures.

The family (``stages.families``, chosen by ``stage1.model``) says what the model is, its
loss and its figures; this stage trains it on the shared loop and writes:
    model/<family>.pt        state dict (torch.load(..., weights_only=True))
    model/config.json        {"family": ..., constructor arguments}
    figures/*.png            reconstructions.png and the family's own (codebook usage, KL per group)
"""
from __future__ import annotations

import time

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
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       tags=fitted.tags)
