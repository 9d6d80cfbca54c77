"""The plain Gaussian VAE of the lecture: one latent group at one scale, prior N(0, I),
posterior N(mu_q(x), sigma_q(x)) from the encoder alone. It is the NVAE code with the
hierarchy switched off, so it trains, samples and evaluates as the NVAE family does
(the importance-weighted NLL with K = ``evaluate.iw_samples``).
"""
from __future__ import annotations

from hvae.settings.families import VAEConfig

from .nvae import NVAEFamily


class VAEFamily(NVAEFamily):
    title = "Gaussian VAE (one latent group, N(0, I) prior)"
    Config = VAEConfig

    def model_config(self, cfg, channels):
        v = self.section(cfg)
        return {"in_channels": channels, "image_size": cfg.data.image_size, "hidden": v.hidden,
                "latent_channels": v.latent_channels, "scales": 1, "groups_per_scale": 1,
                "cells_per_group": v.cells_per_group, "residual_posterior": False, "flows": 0,
                "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures,
                "coeff_warmup_steps": cfg.stage1.coeff_warmup(channels)}

    def describe(self, model):
        return "VAE (Gaussian, one latent group)", "1 group over 1 scale"


FAMILY = VAEFamily()
