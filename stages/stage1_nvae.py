"""Stage 1 for ``stage1.model: nvae``: train the NVAE on the shared Ray Train loop.

Loss per image (nats), divided by the number of pixel dimensions:
    -log p(x | z) + beta * sum_l gamma_l KL_l + spectral_weight * sum_conv sigma_max(W)
beta rises from ``nvae.kl_min`` to 1 over the first ``nvae.kl_warmup`` of training, the
gamma_l balance the groups during warm-up (``nvae.kl_balance``). Batch norm is synchronised
across workers (SyncBatchNorm) when they train on GPUs; gloo on CPU has no SyncBatchNorm,
so there each worker keeps its own batch statistics.

A non-finite loss stops the stage with one line naming the epoch, the global step and the
term (recon, kl or spectral); the checkpoints of the epochs before it stay on disk.

Output folder:
    model/nvae.pt, model/config.json           (``stages.stage1.load_model`` rebuilds it)
    figures/reconstructions.png                validation images over their reconstructions
    figures/kl_per_group.png                   validation KL per latent group (top-down)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from models.nvae import NVAE, kl_balance

from .base import StageContext, StageResult
from .stage1 import CONFIG_FILE, ImageTask, iterate, load_model, save_reconstructions, train
from .train_loop import placement_tags

MODEL_FILE = "nvae.pt"


def model_config(cfg, channels: int) -> dict:
    n = cfg.nvae
    return {"in_channels": channels, "image_size": cfg.data.image_size, "hidden": n.hidden,
            "latent_channels": n.latent_channels, "scales": n.scales, "groups_per_scale": n.groups_per_scale,
            "cells_per_group": n.cells_per_group, "residual_posterior": n.residual_posterior,
            "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures}


class NVAETask(ImageTask):
    def __init__(self, *, loss: dict, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.loss, self.epochs, self.step, self.in_epoch = loss, epochs, 0, 0

    def build_model(self):
        model = NVAE(**self.model_config)
        import torch.distributed as dist

        if torch.cuda.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def kl_weight(self, step_in_epoch: int) -> float:
        warm = self.loss["kl_warmup"] * self.epochs
        if warm <= 0:
            return 1.0
        progress = self.epoch + step_in_epoch / self.steps_per_epoch
        return min(1.0, self.loss["kl_min"] + (1 - self.loss["kl_min"]) * progress / warm)

    def train_batches(self, epoch, rank, world):
        for i, batch in enumerate(super().train_batches(epoch, rank, world)):
            self.in_epoch, self.step = i, epoch * self.steps_per_epoch + i  # step: global, from 0
            yield batch

    def _sums(self, out, x) -> dict:
        sums = {"count": torch.tensor(float(x.shape[0])), "nll": out["nll"].sum(), "kl": out["kl"].sum()}
        for g, kl in enumerate(out["kl"]):
            sums[f"kl_group{g}"] = kl.sum()
        return sums

    def train_step(self, model, batch, device):
        x = batch.to(device)
        core = getattr(model, "module", model)
        out = model(x)
        beta = self.kl_weight(self.in_epoch)
        kl = out["kl"]
        if self.loss["inject_nan_at_step"] == self.step:
            kl = kl * float("nan")
        kl_term = kl_balance(kl, core.group_sizes(), beta) if self.loss["kl_balance"] else beta * kl.sum(0)
        spectral = core.spectral_loss() if self.loss["spectral_weight"] > 0 else x.new_zeros((), dtype=torch.float32)
        terms = {"recon": out["nll"].mean(), "kl": kl_term.mean(), "spectral": spectral}
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"stage1: non-finite {name} term at epoch {self.epoch} step {self.step} "
                    f"(the checkpoints of earlier epochs are kept)")
        dims = x[0].numel()
        loss = (terms["recon"] + terms["kl"] + self.loss["spectral_weight"] * spectral) / dims
        return loss, self._sums(out, x)

    def val_step(self, model, batch, device):
        x = batch.to(device)
        return self._sums(model(x), x)

    def summarize(self, split, sums):
        n, dims = float(sums["count"]), self._image_dims()
        nll, kl = float(sums["nll"]) / n, float(sums["kl"]) / n
        to_bpd = 1.0 / (dims * math.log(2))
        out = {f"{split}_loss": (nll + kl) / dims, f"{split}_nll_nats": nll + kl, f"{split}_bpd": (nll + kl) * to_bpd,
               f"{split}_recon_bpd": nll * to_bpd, f"{split}_kl_bpd": kl * to_bpd}
        for key, v in sums.items():
            if key.startswith("kl_group"):
                out[f"{split}_kl_nats_group{key[len('kl_group'):]}"] = float(v) / n
        return out


@torch.no_grad()
def _kl_figure(model: NVAE, val: np.ndarray, folder: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total, n = None, 0
    for batch in iterate(val, 256):
        kl = model(batch)["kl"].sum(1)
        total = kl if total is None else total + kl
        n += len(batch)
    per_group = (total / n).numpy()
    sizes = np.array(model.group_sizes())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(per_group)), per_group / sizes, color="tab:orange")
    ax.set_xlabel("latent group (top-down)")
    ax.set_ylabel("KL (nats per latent dim)")
    ax.set_title(f"validation KL per group, total {per_group.sum():.1f} nats/image", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "kl_per_group.png", dpi=100)
    plt.close(fig)
    # groups whose KL per latent dimension is below 0.01 nats carry almost no information
    return {"val_active_groups": float((per_group / sizes > 0.01).sum())}


def run(ctx: StageContext) -> StageResult:
    cfg, s1 = ctx.config, ctx.config.stage1
    mc = model_config(cfg, int(ctx.data["train"].images.shape[1]))
    loss = {k: getattr(cfg.nvae, k) for k in ("kl_warmup", "kl_min", "kl_balance", "spectral_weight",
                                               "inject_nan_at_step")}
    result, state, meta, checkpoint = train(ctx, NVAETask, mc, loss=loss, epochs=s1.epochs)

    model_dir = ctx.output_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    # a SyncBatchNorm model saves the same keys as the plain one
    torch.save(state["model"], model_dir / MODEL_FILE)
    (model_dir / CONFIG_FILE).write_text(json.dumps({"family": "nvae", **mc}, indent=2))
    model = load_model(model_dir)
    metrics = {k: float(v) for k, v in meta["metrics"].items()}
    figures = ctx.output_dir / "figures"
    save_reconstructions(model, ctx.data["val"].images, s1.recon_images, figures)
    metrics.update(_kl_figure(model, ctx.data["val"].images, figures))
    metrics["num_params"] = float(sum(p.numel() for p in model.parameters()))
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       tags={"hvae.checkpoint": checkpoint, **placement_tags(result)})
