"""The PixelVAE family (Gulrajani et al. 2017): a VAE whose decoder is a gated PixelCNN over
the pixels, conditioned on the latent map (``models/pixelvae.py``), and its hierarchical form
(``pixelvae.levels: 2``: p(z2) p(z1 | z2) p(x | z1), both latent priors Gaussian).

Stages: stage1 -> sample -> evaluate, as the NVAE family (whose task, figures and
importance-weighted evaluation it shares): the loss per image is -log p(x | z) plus the KL
of each latent level (the KL weight rising from ``kl_min`` to 1 over ``kl_warmup``; with
``free_nats``, a level whose batch-mean KL is below it gets no KL gradient); the test
NLL is the importance-weighted estimate with K = ``evaluate.iw_samples``. Reconstructions and
samples are drawn pixel by pixel through the PixelCNN (its teacher-forced means would copy
the input).
"""
from __future__ import annotations

from hvae.settings.families import PixelVAEConfig

from .nvae import NVAEFamily


class PixelVAEFamily(NVAEFamily):
    title = "PixelVAE: a VAE with a gated PixelCNN decoder"
    Config = PixelVAEConfig
    figures_note = "reconstructions.png (drawn through the PixelCNN from the posterior mean), kl_per_group.png (KL per latent level)"

    def model_config(self, cfg, channels):
        p = self.section(cfg)
        return {"in_channels": channels, "image_size": cfg.data.image_size, "hidden": p.hidden,
                "latent_channels": p.latent_channels, "downsample": p.downsample, "upsample": p.upsample,
                "levels": p.levels, "pixel_hidden": p.pixel_hidden, "pixel_layers": p.pixel_layers,
                "kernel": p.kernel, "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures,
                "coeff_warmup_steps": cfg.stage1.coeff_warmup(channels)}

    def build(self, model_config):
        from hvae.models.pixelvae import PixelVAE

        return PixelVAE(**model_config)

    def describe(self, model):
        name = "Hierarchical PixelVAE" if model.levels == 2 else "Gated PixelVAE"
        name += "" if model.upsample else " without upsampling"
        c, h, w = model.latent_shapes[0]
        return name, f"{model.levels} latent level{'s' if model.levels > 1 else ''}, z1 {c}x{h}x{w}"

    def scorer(self, model, upstream, ecfg):
        from . import OnDevice

        return OnDevice(_score, {"model": model}, k=ecfg.iw_samples, together=min(ecfg.iw_together, ecfg.iw_samples))

    def loss_settings(self, cfg) -> dict:
        p = self.section(cfg)
        return {"kl_warmup": p.kl_warmup, "kl_min": p.kl_min, "kl_balance": False, "spectral_weight": 0.0,
                "free_nats": p.free_nats,
                "inject_nan_at_step": None}


def _score(x, y, first_index, *, model, k, together) -> dict:
    """The NVAE family's sums less the squared error: the PixelCNN's teacher-forced means are
    one-pixel-ahead predictions, not reconstructions (``figures`` draws those)."""
    from .nvae import iw_sums

    sums = iw_sums(model, x, k, seed=first_index, together=together)
    del sums["sq_err"]
    return sums


FAMILY = PixelVAEFamily()
