"""The plain Gaussian VAE of the lecture: one latent group at one scale, prior N(0, I),
posterior N(mu_q(x), sigma_q(x)) from the encoder alone. It is the NVAE code with the
hierarchy switched off, so it trains, samples and evaluates as the NVAE family does
(the importance-weighted NLL with K = ``evaluate.iw_samples``).
"""
from __future__ import annotations

from pydantic import Field

from pipeline.schema import Section

from .nvae import NVAEFamily


class VAEConfig(Section):
    """The ``vae:`` section (stage1.model: vae); training keys (epochs, lr, ...) stay in stage1."""

    hidden: int = Field(32, ge=4)  # channels of encoder and decoder
    latent_channels: int = Field(8, ge=1)  # channels of the latent map (at image/2)
    cells_per_group: int = Field(1, ge=1)  # residual cells in encoder and decoder
    kl_warmup: float = Field(0.3, ge=0, le=1)  # fraction of training over which the KL weight rises to 1
    kl_min: float = Field(1e-2, ge=0, le=1)  # the KL weight at the start of warm-up
    spectral_weight: float = Field(1e-2, ge=0)  # spectral regularisation of the conv weights


class VAEFamily(NVAEFamily):
    name = "vae"
    title = "Gaussian VAE (one latent group, N(0, I) prior)"
    Config = VAEConfig
    epoch_metrics = r"recon_bpd|kl_bpd|kl_nats_group0"

    def downsampling(self, cfg):
        return 2, "stage1.model=vae (one latent scale at image/2)"

    def model_config(self, cfg, channels):
        v = self.section(cfg)
        return {"in_channels": channels, "image_size": cfg.data.image_size, "hidden": v.hidden,
                "latent_channels": v.latent_channels, "scales": 1, "groups_per_scale": 1,
                "cells_per_group": v.cells_per_group, "residual_posterior": False,
                "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures,
                "coeff_warmup_steps": cfg.stage1.coeff_warmup(channels)}

    def describe(self, model):
        return "VAE (Gaussian, one latent group)", "1 group over 1 scale"


FAMILY = VAEFamily()
