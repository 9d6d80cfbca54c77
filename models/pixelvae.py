"""PixelVAE (Gulrajani et al. 2017), single-device torch, sized by config.

A VAE whose decoder is autoregressive over pixels: a gated PixelCNN models
p(x | z) = prod_i p(x_i | x_<i, z), every gate of its layers biased by a conditioning map
computed from the latent map z. The latents then need to carry only what the PixelCNN's
small receptive field cannot see (global structure); the PixelCNN draws the local texture.

Encoder: a convolution, then ``downsample`` stride-2 stages (each a residual block), and a
1x1 head to the posterior N(mu(x), sigma(x)) of z1, a map of ``latent_channels`` at
image / 2^downsample.

Conditioning the PixelCNN on z1, the paper's two rows:
- ``upsample=True``: z1 brought to the image size by nearest upsampling and convolutions
  (the same number of stages), a map added into every gate;
- ``upsample=False`` ("without upsampling"): a linear map of the whole of z1 gives one
  bias per channel for every gate, the same at every pixel.

``levels=2`` is the hierarchical form, with the lecture's Markov factorisation
p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1): z2 is a map at half z1's size with prior
N(0, I); p(z1 | z2) is a Gaussian whose mean and scale are convolutions of z2 (upsampled);
inference is bottom-up, q(z1 | x) q(z2 | z1). Both KL terms are closed forms between
diagonal Gaussians (the first given the drawn z2). The importance-weighted bound uses
log p(x | z1) + log p(z1 | z2) + log p(z2) - log q(z1 | x) - log q(z2 | z1).

The pixel likelihood is the decoder's: Bernoulli for binarized data, the discretized
logistic mixture for 8-bit images (its channel coefficients order the channels of a pixel,
the PixelCNN orders the pixels). Sampling draws pixel by pixel with the PixelCNN's cached
sampler (``models/pixelcnn_cache.py``: one position computed per step); the latents' map is
computed once.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import noise
from .likelihoods import CoefficientWarmup, make_likelihood, real_pixels, to_model_range
from .nvae import importance_log_weights, normal_log_prob, soft_clamp
from .pixelcnn import GatedPixelCNN
from .pixelcnn_cache import sample_values
from .precision import fp32


@fp32
def gaussian_kl(mu_q, ls_q, mu_p, ls_p) -> torch.Tensor:
    """KL(N(mu_q, e^ls_q) || N(mu_p, e^ls_p)), summed per image [B]."""
    kl = ls_p - ls_q + 0.5 * (torch.exp(2 * (ls_q - ls_p)) + ((mu_q - mu_p) * torch.exp(-ls_p)).pow(2)) - 0.5
    return kl.flatten(1).sum(1)


class Block(nn.Module):
    """x + conv(ELU(conv(ELU(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(),
                               nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.f(x)


def _gaussian_head(in_ch: int, latent: int) -> nn.Conv2d:
    """A 1x1 convolution to (mu, log sigma), started at N(0, I)."""
    head = nn.Conv2d(in_ch, 2 * latent, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _split(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, log_sigma = stats.chunk(2, dim=1)
    return mu, soft_clamp(log_sigma)


def _draw(mu, log_sigma, generator, temperature: float = 1.0) -> torch.Tensor:
    return mu + temperature * torch.exp(log_sigma) * noise.normal(mu.shape, generator, mu.device).to(mu.dtype)


class PixelVAE(nn.Module):
    # every setting comes from the config (hvae.stages.families.pixelvae: model_config): no
    # defaults here, so the schema's are the only ones
    def __init__(self, *, in_channels: int, image_size: int, hidden: int, latent_channels: int,
                 downsample: int, upsample: bool, levels: int, pixel_hidden: int,
                 pixel_layers: int, kernel: int, likelihood: str, num_mixtures: int,
                 coeff_warmup_steps: int, likelihood_region: list[int] | None = None):
        super().__init__()
        factor = 2 ** (downsample + levels - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be a multiple of {factor} "
                             f"({downsample} downsampling stages, {levels} latent levels)")
        if levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, not {levels}")
        self.in_channels, self.image_size, self.levels = in_channels, image_size, levels
        self.latent_channels, self.upsample = latent_channels, upsample
        self.likelihood = make_likelihood(likelihood, in_channels, num_mixtures)
        self.coeff_warmup = CoefficientWarmup(self.likelihood, coeff_warmup_steps)
        self.likelihood_region = likelihood_region
        size = image_size // 2 ** downsample
        self.latent_shapes = [[latent_channels, size, size]]
        if levels == 2:
            self.latent_shapes.append([latent_channels, size // 2, size // 2])
        # the NVAE family's names: one KL "group" per latent level
        self.num_groups, self.groups_per_scale, self.scales = levels, 1, levels

        layers = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        for _ in range(downsample):
            layers += [Block(hidden), nn.ELU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*layers, Block(hidden), nn.ELU())
        self.q1 = _gaussian_head(hidden, latent_channels)
        if levels == 2:  # q(z2 | z1) and p(z1 | z2)
            self.q2 = nn.Sequential(nn.Conv2d(latent_channels, hidden, 3, padding=1), nn.ELU(),
                                    nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ELU(),
                                    _gaussian_head(hidden, latent_channels))
            self.p1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(latent_channels, hidden, 3, padding=1), Block(hidden), nn.ELU(),
                                    _gaussian_head(hidden, latent_channels))
        if upsample:
            layers = [nn.Conv2d(latent_channels, hidden, 3, padding=1)]
            for _ in range(downsample):
                layers += [Block(hidden), nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(hidden, hidden, 3, padding=1)]
            self.condition = nn.Sequential(*layers, Block(hidden), nn.ELU())
        else:
            self.condition = nn.Sequential(nn.Flatten(), nn.Linear(latent_channels * size * size, hidden),
                                           nn.Unflatten(1, (hidden, 1, 1)))
        self.pixelcnn = GatedPixelCNN(0, pixel_hidden, pixel_layers, kernel, inputs=in_channels,
                                      outputs=self.likelihood.num_params(), cond_channels=hidden)

    # ---- the parts ------------------------------------------------------------------
    def _pixels(self, x_uint8: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters at every pixel given the pixels before it and ``cond``."""
        return self.pixelcnn.forward_values(to_model_range(x_uint8), cond)

    def _latents(self, x_uint8, generator) -> dict:
        """Posterior draws and their log densities, the prior's and the KLs [levels, B]."""
        mu1, ls1 = _split(self.q1(self.encoder(to_model_range(x_uint8))))
        z1 = _draw(mu1, ls1, generator)
        log_q = normal_log_prob(z1, mu1, ls1).flatten(1).sum(1)
        if self.levels == 1:
            zero = torch.zeros_like(mu1)
            return {"z1": z1, "log_q": log_q, "log_p": normal_log_prob(z1, zero, zero).flatten(1).sum(1),
                    "kl": gaussian_kl(mu1, ls1, zero, zero)[None]}
        mu2, ls2 = _split(self.q2(z1))
        z2 = _draw(mu2, ls2, generator)
        zero = torch.zeros_like(mu2)
        mu_p, ls_p = _split(self.p1(z2))
        log_q = log_q + normal_log_prob(z2, mu2, ls2).flatten(1).sum(1)
        log_p = (normal_log_prob(z1, mu_p, ls_p).flatten(1).sum(1) + normal_log_prob(z2, zero, zero).flatten(1).sum(1))
        # top level first, as the NVAE family lists its groups
        kl = torch.stack([gaussian_kl(mu2, ls2, zero, zero), gaussian_kl(mu1, ls1, mu_p, ls_p)])
        return {"z1": z1, "log_q": log_q, "log_p": log_p, "kl": kl}

    def group_sizes(self) -> list[int]:
        """Latent dimensions per level, top first."""
        return [c * h * w for c, h, w in reversed(self.latent_shapes)]

    # ---- public API (the NVAE family's) ----------------------------------------------
    def forward(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One posterior sample per image: nll [B] (nats), kl [levels, B] (top first), log_q and
        log_p of the drawn latents, the likelihood's parameters (teacher-forced)."""
        self.coeff_warmup()
        lat = self._latents(x_uint8, generator)
        params = self._pixels(x_uint8, self.condition(lat["z1"]))
        r = self.likelihood_region
        nll = -self.likelihood.log_prob(real_pixels(params, r), real_pixels(x_uint8, r))
        return {"nll": nll, "kl": lat["kl"], "log_q": lat["log_q"], "log_p": lat["log_p"], "params": params}

    @torch.no_grad()
    def log_weights(self, x_uint8: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    together: int = 1) -> torch.Tensor:
        """[K, B] importance log weights log p(x, z) - log q(z | x), z ~ q(z | x), ``together``
        draws per forward pass."""
        return importance_log_weights(self, x_uint8, k, generator, together)

    @torch.no_grad()
    def draw_pixels(self, cond: torch.Tensor, n: int, generator=None, pixels: str = "sample",
                    cached: bool = True) -> torch.Tensor:
        """n images (uint8) drawn pixel by pixel in raster order given the conditioning ``cond``
        (every channel of a pixel at once: the likelihood orders them). ``pixels="mean"`` puts
        each pixel's expected value instead of a draw (the PixelCNN still conditions on it).
        ``cached``: each layer's state kept, one position computed at a time
        (``pixelcnn_cache``); else a forward pass over the whole image per pixel (the reference)."""
        c, size = self.in_channels, self.image_size
        r = self.likelihood_region  # (padding, outside it, is no data: it is placed, 0, not drawn)

        def draw(i: int, j: int, params: torch.Tensor) -> torch.Tensor:  # [B, P, 1, 1] -> uint8 [B, C, 1, 1]
            if r and not (r[0] <= i < r[0] + r[2] and r[1] <= j < r[1] + r[3]):
                return torch.zeros(len(params), c, 1, 1, dtype=torch.uint8, device=params.device)
            if pixels == "mean":
                return self.likelihood.mean(params).round().clamp(0, 255).to(torch.uint8)
            return self.likelihood.sample(params, generator).to(params.device)

        if cached:
            values = sample_values(self.pixelcnn, (n, size, size), cond,
                                   lambda i, j, out: to_model_range(draw(i, j, out[:, :, None, None]))[:, :, 0, 0])
            return ((values.permute(0, 3, 1, 2) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        x = torch.zeros(n, c, size, size, dtype=torch.uint8, device=cond.device)
        for i in range(size):
            for j in range(size):
                x[:, :, i:i + 1, j:j + 1] = draw(i, j, self._pixels(x, cond)[:, :, i:i + 1, j:j + 1])
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               pixels: str = "sample") -> torch.Tensor:
        """n images (uint8) from the prior (its scales times ``temperature``), pixels drawn from
        the PixelCNN (``pixels="sample"``; a PixelCNN's per-pixel means are no image)."""
        device = next(self.parameters()).device
        c, h, w = self.latent_shapes[-1]
        zero = torch.zeros(n, c, h, w, device=device)
        z = _draw(zero, zero, generator, temperature)
        if self.levels == 2:
            z = _draw(*_split(self.p1(z)), generator, temperature)
        return self.draw_pixels(self.condition(z), n, generator, pixels)

    @torch.no_grad()
    def reconstruct(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images drawn from p(x | z1) with z1 the posterior mean of each image: what the latents
        kept of it (the teacher-forced means would copy the image through the PixelCNN)."""
        mu1, _ = _split(self.q1(self.encoder(to_model_range(x_uint8))))
        return self.draw_pixels(self.condition(mu1), len(x_uint8), generator)
