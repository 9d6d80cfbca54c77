"""The NVAE family (Vahdat & Kautz 2020): a hierarchical VAE whose prior is learned in stage 1.

Stages: stage1 -> sample -> evaluate (no extract, no separate priors).
Loss per image (nats), divided by the number of pixel dimensions:
    -log p(x | z) + beta * sum_l gamma_l KL_l + spectral_weight * sum_conv sigma_max(W)
beta rises from ``kl_min`` to 1 over the first ``kl_warmup`` of training, the gamma_l balance
the groups during warm-up (``kl_balance``). Batch norm is synchronised across workers
(SyncBatchNorm) when they train on GPUs; gloo on CPU has no SyncBatchNorm, so there each
worker keeps its own batch statistics. A non-finite term stops the stage with one line
naming the epoch, the global step and the term (recon, kl or spectral).
Test NLL: the importance-weighted estimate with K = ``evaluate.iw_samples`` samples
(K = 1: the negative ELBO, an upper bound).
"""
from __future__ import annotations

import os
from pathlib import Path

from hvae.settings.families import NVAEConfig
from hvae.stages.families import IMAGE_NATS, Family
from hvae.stages.images import ImageTask, quality, save_bars, save_reconstructions, squared_error

# tests only: make the KL non-finite at this global step (read by the driver, passed to the task)
INJECT_NAN_ENV = "HVAE_TEST_INJECT_NAN_AT_STEP"


class NVAETask(ImageTask):
    def __init__(self, *, loss: dict, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.loss, self.epochs, self.step, self.in_epoch, self.per_epoch = loss, epochs, 0, 0, 1

    def build_model(self):
        import torch
        import torch.distributed as dist

        model = super().build_model()
        if torch.cuda.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def kl_weight(self, step_in_epoch: int) -> float:
        warm = self.loss["kl_warmup"] * self.epochs
        if warm <= 0:
            return 1.0
        progress = self.epoch + step_in_epoch / self.per_epoch
        return min(1.0, self.loss["kl_min"] + (1 - self.loss["kl_min"]) * progress / warm)

    def train_batches(self, epoch, rank, world):
        self.per_epoch = self.steps_per_epoch(world)
        for i, batch in enumerate(super().train_batches(epoch, rank, world)):
            self.in_epoch, self.step = i, epoch * self.per_epoch + i  # step: global, from 0
            yield batch

    def _sums(self, out, x) -> dict:
        import torch

        sums = {"count": torch.tensor(float(x.shape[0])), "nll": out["nll"].sum(), "kl": out["kl"].sum()}
        for g, kl in enumerate(out["kl"]):
            sums[f"kl_group{g}"] = kl.sum()
        return sums

    def train_step(self, model, batch, device):
        import torch

        from hvae.models.nvae import free_nats, kl_balance

        x = batch.to(device, non_blocking=True)  # (pinned when bound for a GPU)
        core = getattr(model, "module", model)
        out = model(x)
        beta = self.kl_weight(self.in_epoch)
        kl = out["kl"]
        if self.loss.get("inject_nan_at_step") == self.step:
            kl = kl * float("nan")
        if self.loss.get("free_nats"):
            kl = free_nats(kl, self.loss["free_nats"])
        kl_term = kl_balance(kl, core.group_sizes(), beta) if self.loss["kl_balance"] else beta * kl.sum(0)
        spectral = core.spectral_loss() if self.loss["spectral_weight"] > 0 else x.new_zeros((), dtype=torch.float32)
        terms = {"recon": out["nll"].mean(), "kl": kl_term.mean(), "spectral": spectral}
        loss = (terms["recon"] + terms["kl"] + self.loss["spectral_weight"] * spectral) / x[0].numel()
        return loss, self._sums(out, x), terms  # the loop names a non-finite term (and its step)

    def val_step(self, model, batch, device):
        x = batch.to(device, non_blocking=True)  # (pinned when bound for a GPU)
        return self._sums(model(x), x)

    def epoch_images(self, model, device) -> dict:
        """The reconstructions, and ``SAMPLED`` samples from the prior (the same draws every
        epoch: the step slider shows the same latents decoded by the model as it learns)."""
        import torch

        from hvae.stages.images import SAMPLED, grid_array

        pictures = super().epoch_images(model, device)
        with torch.no_grad():
            drawn = model.sample(SAMPLED, 1.0, torch.Generator().manual_seed(self.seed))
        return {**pictures, "samples": grid_array(drawn)}

    def summarize(self, split, sums):
        from hvae.models.likelihoods import to_bits_per_dim

        n, dims = float(sums["count"]), self.image_dims()
        nll, kl = float(sums["nll"]) / n, float(sums["kl"]) / n
        out = {f"{split}_loss": (nll + kl) / dims, f"{split}_nll_nats": nll + kl,
               f"{split}_bpd": to_bits_per_dim(nll + kl, dims),
               f"{split}_recon_bpd": to_bits_per_dim(nll, dims), f"{split}_kl_bpd": to_bits_per_dim(kl, dims)}
        for key, v in sums.items():
            if key.startswith("kl_group"):
                out[f"{split}_kl_nats_group{key[len('kl_group'):]}"] = float(v) / n
        return out


def iw_sums(model, x, k: int, seed: int, together: int = 1) -> dict:
    """One test batch -> its sums: the importance-weighted log-likelihood with K samples (drawn
    ``together`` at a time), the reconstruction and KL nats, squared error on [0, 1] pixels, and
    every image's estimate (``image_nats``). ``seed`` fixes the batch's draws (the runner passes
    one from the batch's first source index: the same whoever scores it)."""
    import torch

    from hvae.models.nvae import iw_bound

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(x, generator=gen)
        iw = iw_bound(model.log_weights(x, k, generator=gen, together=together)).double()
        return {"count": float(len(x)), "recon": float(out["nll"].sum()), "kl": float(out["kl"].sum()),
                "iw": float(iw.sum()), "sq_err": float(squared_error(model.likelihood, out["params"], x)),
                IMAGE_NATS: (-iw).cpu().numpy()}


def _score(x, y, first_index, *, model, k, together) -> dict:
    return iw_sums(model, x, k, seed=first_index, together=together)


def _sample(first, count, *, model, temperature, seed, pixels):
    import torch

    from . import chunk_seed

    gen = torch.Generator().manual_seed(chunk_seed(seed, first))
    return model.sample(count, temperature, gen, pixels=pixels).cpu(), [], None


def iw_summary(sums: dict, dims: int, k: int) -> dict[str, float]:
    from hvae.models.likelihoods import to_bits_per_dim

    n = float(sums["count"])
    recon, kl = float(sums["recon"]), float(sums["kl"])
    per_image = {"nll": -float(sums["iw"]) / n, "elbo": (recon + kl) / n, "recon": recon / n, "kl": kl / n}
    metrics = {"test_iw_samples": float(k), "test_images": n}
    if "sq_err" in sums:  # (a decoder whose means see the pixels they predict has no reconstruction error)
        metrics.update(quality(float(sums["sq_err"]) / n))
    for key, nats in per_image.items():
        metrics[f"test_{key}_nats"] = nats
        metrics[f"test_{key}_bpd"] = to_bits_per_dim(nats, dims)
    return metrics


class NVAEFamily(Family):
    title = "NVAE: hierarchical VAE with residual-normal posteriors"
    Config = NVAEConfig
    figures_note = "reconstructions.png, kl_per_group.png (validation KL per latent group)"

    def model_config(self, cfg, channels):
        n = self.section(cfg)
        return {"in_channels": channels, "image_size": cfg.data.image_size, "hidden": n.hidden,
                "latent_channels": n.latent_channels, "scales": n.scales, "groups_per_scale": n.groups_per_scale,
                "cells_per_group": n.cells_per_group, "residual_posterior": True, "flows": n.flows,
                "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures,
                "coeff_warmup_steps": cfg.stage1.coeff_warmup(channels)}

    def build(self, model_config):
        from hvae.models.nvae import NVAE

        return NVAE(**model_config)

    def describe(self, model):
        g, s = model.num_groups, model.scales
        return (f"NVAE ({s} scales × {model.groups_per_scale} groups)",
                f"{g} group{'s' if g > 1 else ''} over {s} scale{'s' if s > 1 else ''}")

    def loss_settings(self, cfg) -> dict:
        n = self.section(cfg)
        inject = os.environ.get(INJECT_NAN_ENV)
        return {"kl_warmup": n.kl_warmup, "kl_min": n.kl_min, "kl_balance": getattr(n, "kl_balance", False),  # (the vae: section has none)
                "spectral_weight": n.spectral_weight, "inject_nan_at_step": int(inject) if inject else None}

    def task(self, cfg):
        return NVAETask, {"loss": self.loss_settings(cfg), "epochs": cfg.stage1.epochs}

    def figures(self, model, data, cfg, folder: Path, val_sums: dict):
        import numpy as np

        save_reconstructions(model, data, cfg.stage1.recon_images, folder)
        # the KL of the last validation pass, summed over the training workers
        per_group = np.array([val_sums[f"kl_group{g}"] for g in range(model.num_groups)]) / val_sums["count"]
        per_dim = per_group / np.array(model.group_sizes())
        save_bars([(per_dim, f"validation KL per group, total {per_group.sum():.1f} nats/image")],
                  folder / "kl_per_group.png", xlabel="latent group (top-down)",
                  ylabel="KL (nats per latent dim)", color="tab:orange", width=6.0)
        # groups whose KL per latent dimension is below 0.01 nats carry almost no information
        return {"val_active_groups": float((per_dim > 0.01).sum())}

    def sampler(self, model, upstream, scfg):
        from . import OnDevice

        return OnDevice(_sample, {"model": model}, temperature=scfg.temperature, seed=scfg.seed, pixels=scfg.pixels)

    def scorer(self, model, upstream, ecfg):
        from . import OnDevice

        return OnDevice(_score, {"model": model}, k=ecfg.iw_samples, together=min(ecfg.iw_together, ecfg.iw_samples))

    def summary(self, sums, dims, ecfg):
        return iw_summary(sums, dims, ecfg.iw_samples)


FAMILY = NVAEFamily()
