"""NVAE (Vahdat & Kautz 2020), single-device torch, sized by config.

A bidirectional encoder: a bottom-up tower of residual cells (batch norm, Swish, 3x3
convolutions, squeeze-excitation) produces one feature map per latent group; a top-down
tower, shared with the generator, walks the groups from the coarsest scale to the finest.
At group l the top-down state h gives the prior p(z_l | z_<l) = N(mu_p, sigma_p) and,
with the bottom-up feature of that group, the residual-normal posterior

    q(z_l | z_<l, x) = N(mu_p + d_mu, sigma_p * d_sigma),

whose KL to the prior is the closed form of the notes,

    KL_l = 1/2 sum_i ( d_mu_i^2 / sigma_p,i^2 + d_sigma_i^2 - log d_sigma_i^2 - 1 ).

The sample z_l is merged into h, decoder cells (1x1 expand, depthwise 5x5, 1x1 project,
squeeze-excitation) refine it, and the last state gives the pixel likelihood.

``flows`` > 0 adds that many inverse autoregressive flow cells to every group's posterior
("NVAE with flow" of the lecture; the paper's CIFAR-10 model has them): z_0 is drawn from the
residual normal above, then each cell maps z <- sigma * z + (1 - sigma) * m, with m and
sigma functions of the channels before each channel (a masked network, MADE-style) and of
the group's context; log q(z) = log q(z_0) - sum log sigma. The KL has no closed form then:
each group's KL is the one-sample estimate log q(z) - log p(z).

``residual_posterior=False`` with one scale and one group is the plain Gaussian VAE of
the lecture: prior N(0, I), posterior N(mu_q(x), sigma_q(x)) from the encoder alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import noise
from .likelihoods import CoefficientWarmup, make_likelihood, real_pixels, to_model_range
from .precision import fp32

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """Keeps log-scales in (-bound, bound) smoothly: NVAE's guard against exploding KL terms."""
    return bound * torch.tanh(x / bound)


@fp32
def residual_normal_kl(d_mu: torch.Tensor, d_log_sigma: torch.Tensor, log_sigma_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_p + d_mu, sigma_p d_sigma) || N(mu_p, sigma_p)), elementwise (the notes' closed form)."""
    d_var = torch.exp(2 * d_log_sigma)
    return 0.5 * (d_mu.pow(2) * torch.exp(-2 * log_sigma_p) + d_var - 2 * d_log_sigma - 1.0)


@fp32
def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((z - mu) * torch.exp(-log_sigma)).pow(2) + 2 * log_sigma + LOG_2PI)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class EncoderCell(nn.Module):
    """x + 0.1 f(x), f = BN-Swish-conv3x3-BN-Swish-conv3x3-SE."""

    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm2d(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            SqueezeExcite(channels))

    def forward(self, x):
        return x + 0.1 * self.f(x)


class DecoderCell(nn.Module):
    """x + 0.1 f(x), f = BN-conv1x1(expand)-BN-Swish-depthwise5x5-BN-Swish-conv1x1-BN-SE."""

    def __init__(self, channels: int, expand: int = 3):
        super().__init__()
        wide = channels * expand
        self.f = nn.Sequential(
            nn.BatchNorm2d(channels), nn.Conv2d(channels, wide, 1),
            nn.BatchNorm2d(wide), nn.SiLU(), nn.Conv2d(wide, wide, 5, padding=2, groups=wide),
            nn.BatchNorm2d(wide), nn.SiLU(), nn.Conv2d(wide, channels, 1),
            nn.BatchNorm2d(channels), SqueezeExcite(channels))

    def forward(self, x):
        return x + 0.1 * self.f(x)


class MaskedConv1x1(nn.Conv2d):
    """A 1x1 convolution whose weight is masked (autoregressive connections over channels)."""

    def __init__(self, in_ch: int, out_ch: int, mask: torch.Tensor):
        super().__init__(in_ch, out_ch, 1)
        self.register_buffer("mask", mask[:, :, None, None].float())

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias)


@fp32
def _iaf_update(z, m, s):
    gate = torch.sigmoid(s + 2.0)  # (+2: the IAF paper's forget-gate bias)
    return gate * z + (1 - gate) * m, torch.log(gate).flatten(1).sum(1)


class IAFCell(nn.Module):
    """One inverse autoregressive flow step over a latent map's channels, position by position:
    z' = sigma * z + (1 - sigma) * m, where (m_i, sigma_i) depend on z_1..z_{i-1} (masked 1x1
    convolutions) and on ``context``; returns (z', log|det dz'/dz| per image)."""

    def __init__(self, channels: int, context_channels: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 4 * channels
        d_in = torch.arange(1, channels + 1)
        d_hid = torch.arange(hidden) % max(channels - 1, 1) + 1  # degrees 1..C-1
        d_out = torch.arange(1, channels + 1).repeat(2)  # m and s of channel i: degree i
        self.inp = MaskedConv1x1(channels, hidden, d_hid[:, None] >= d_in[None, :])
        self.context = nn.Conv2d(context_channels, hidden, 3, padding=1)
        self.out = MaskedConv1x1(hidden, 2 * channels, d_out[:, None] > d_hid[None, :])
        nn.init.zeros_(self.out.weight)  # start near the identity: sigma = sigmoid(2) ~ 0.88
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = self.out(F.elu(self.inp(z) + self.context(context))).chunk(2, dim=1)
        return _iaf_update(z, m, s)


class NVAE(nn.Module):
    # every setting comes from the config (hvae.stages.families.nvae and .vae: model_config): no
    # defaults here, so the schema's are the only ones
    def __init__(self, *, in_channels: int, image_size: int, hidden: int, latent_channels: int,
                 scales: int, groups_per_scale: int, cells_per_group: int,
                 residual_posterior: bool, likelihood: str, num_mixtures: int,
                 coeff_warmup_steps: int, flows: int, likelihood_region: list[int] | None = None):
        super().__init__()
        if image_size % (2 ** scales):
            raise ValueError(f"image_size {image_size} must be a multiple of {2 ** scales} for {scales} scales")
        if not residual_posterior and (scales, groups_per_scale) != (1, 1):
            raise ValueError("residual_posterior=False is the plain VAE: it needs scales=1 and groups_per_scale=1")
        self.in_channels, self.image_size = in_channels, image_size
        self.scales, self.groups_per_scale = scales, groups_per_scale
        self.latent_channels, self.residual_posterior = latent_channels, residual_posterior
        self.likelihood = make_likelihood(likelihood, in_channels, num_mixtures)
        self.coeff_warmup = CoefficientWarmup(self.likelihood, coeff_warmup_steps)
        self.likelihood_region = likelihood_region  # [top, left, h, w] of the real pixels (likelihoods.real_pixels)
        self.num_groups = scales * groups_per_scale
        # the finest latent scale is half the image size; each coarser scale halves again
        self.top_size = image_size // (2 ** scales)

        self.stem = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.pre = nn.Sequential(EncoderCell(hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, stride=2, padding=1))
        # bottom-up: groups of the finest scale first
        self.enc_groups = nn.ModuleList(
            nn.Sequential(*[EncoderCell(hidden) for _ in range(cells_per_group)]) for _ in range(self.num_groups))
        self.enc_down = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)) for _ in range(scales - 1))
        # top-down: coarsest group first
        self.h0 = nn.Parameter(torch.zeros(1, hidden, self.top_size, self.top_size))
        self.dec_groups = nn.ModuleList(
            nn.Sequential(*[DecoderCell(hidden) for _ in range(cells_per_group)]) for _ in range(self.num_groups))
        self.dec_up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(hidden, hidden, 1))
            for _ in range(scales - 1))
        # (the plain VAE's prior is a fixed N(0, I): no heads, so DDP sees no unused parameters)
        self.prior_heads = nn.ModuleList(nn.Conv2d(hidden, 2 * latent_channels, 3, padding=1)
                                         for _ in range(self.num_groups if residual_posterior else 0))
        self.posterior_heads = nn.ModuleList(nn.Conv2d(2 * hidden, 2 * latent_channels, 3, padding=1)
                                             for _ in range(self.num_groups))
        self.merge = nn.ModuleList(nn.Conv2d(hidden + latent_channels, hidden, 1) for _ in range(self.num_groups))
        self.flows = nn.ModuleList(nn.ModuleList(IAFCell(latent_channels, 2 * hidden) for _ in range(flows))
                                   for _ in range(self.num_groups if flows else 0))
        self.post = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), DecoderCell(hidden), nn.SiLU(),
                                  nn.Conv2d(hidden, self.likelihood.num_params(), 3, padding=1))
        self._spectral_init()
        for heads in (self.prior_heads, self.posterior_heads):  # start at the prior: KL 0, unit scales
            for conv in heads:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    # ---- spectral regularisation ----------------------------------------------------------
    def _spectral_convs(self) -> list[nn.Conv2d]:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]

    def _spectral_init(self) -> None:
        g = torch.Generator().manual_seed(0)
        for conv in self._spectral_convs():
            rows, cols = conv.weight.shape[0], conv.weight[0].numel()
            conv.register_buffer("sr_u", F.normalize(torch.randn(rows, generator=g), dim=0))
            conv.register_buffer("sr_v", F.normalize(torch.randn(cols, generator=g), dim=0))

    def spectral_loss(self) -> torch.Tensor:
        """Sum over conv weights of their largest singular value, one power iteration per call
        (the vectors are buffers: they persist across steps and in checkpoints)."""
        with torch.autocast(device_type=self.h0.device.type, enabled=False):  # float32, whatever the loop runs
            return self._spectral_sum()

    def _spectral_sum(self) -> torch.Tensor:
        total = self.h0.new_zeros(())
        for conv in self._spectral_convs():
            w = conv.weight.flatten(1)
            if self.training:
                with torch.no_grad():
                    v = F.normalize(w.t() @ conv.sr_u, dim=0)
                    conv.sr_u.copy_(F.normalize(w @ v, dim=0))
                    conv.sr_v.copy_(v)
            total = total + torch.dot(conv.sr_u, w @ conv.sr_v)
        return total

    # ---- shapes ----------------------------------------------------------------------
    def group_sizes(self) -> list[int]:
        """Latent size per group, top-down order."""
        return [self.latent_channels * (self.top_size * 2 ** (g // self.groups_per_scale)) ** 2
                for g in range(self.num_groups)]

    def _scale_ends(self, g: int) -> bool:
        """True when group g (top-down) is the last of its scale (the state is upsampled after it)."""
        return (g + 1) % self.groups_per_scale == 0 and g + 1 < self.num_groups

    # ---- the two towers ----------------------------------------------------------------
    def _bottom_up(self, x_uint8: torch.Tensor) -> list[torch.Tensor]:
        s = self.pre(self.stem(to_model_range(x_uint8)))
        feats = []
        for g in range(self.num_groups):  # finest scale first
            s = self.enc_groups[g](s)
            feats.append(s)
            if (g + 1) % self.groups_per_scale == 0 and g + 1 < self.num_groups:
                s = self.enc_down[g // self.groups_per_scale](s)
        return feats[::-1]  # top-down order

    def _prior(self, g: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.residual_posterior:  # the plain VAE: a fixed standard normal prior
            zeros = torch.zeros(h.shape[0], self.latent_channels, *h.shape[2:], device=h.device, dtype=h.dtype)
            return zeros, zeros
        mu, log_sigma = self.prior_heads[g](h).chunk(2, dim=1)
        return mu, soft_clamp(log_sigma)

    def _top_down(self, batch: int, feats: list[torch.Tensor] | None, temperature: float = 1.0,
                  generator: torch.Generator | None = None, top: torch.Tensor | None = None):
        """Walk the groups; with ``feats`` sample the posterior, else the prior (scaled by temperature).

        Returns the final state and per group (kl [B], log q [B], log p [B], z)."""
        h = self.h0.expand(batch, -1, -1, -1)
        out = []
        for g in range(self.num_groups):
            h = self.dec_groups[g](h)
            mu_p, log_sigma_p = self._prior(g, h)
            if feats is not None:
                context = torch.cat([h, feats[g]], dim=1)
                d_mu, d_log_sigma = self.posterior_heads[g](context).chunk(2, dim=1)
                d_log_sigma = soft_clamp(d_log_sigma)
                mu_q, log_sigma_q = mu_p + d_mu, log_sigma_p + d_log_sigma
                eps = noise.normal(mu_q.shape, generator, h.device, h.dtype)
                z = mu_q + torch.exp(log_sigma_q) * eps
                log_q = normal_log_prob(z, mu_q, log_sigma_q).flatten(1).sum(1)
                if self.flows:
                    for cell in self.flows[g]:
                        z, log_det = cell(z, context)
                        log_q = log_q - log_det
                    kl = log_q - normal_log_prob(z, mu_p, log_sigma_p).flatten(1).sum(1)  # one-sample estimate
                else:
                    kl = residual_normal_kl(d_mu, d_log_sigma, log_sigma_p).flatten(1).sum(1)
            else:
                if g == 0 and top is not None:
                    z = top
                else:
                    eps = noise.normal(mu_p.shape, generator, h.device, h.dtype)
                    z = mu_p + temperature * torch.exp(log_sigma_p) * eps
                kl = log_q = torch.zeros(batch, device=h.device)
            log_p = normal_log_prob(z, mu_p, log_sigma_p).flatten(1).sum(1)
            out.append((kl, log_q, log_p, z))
            h = h + self.merge[g](torch.cat([h, z], dim=1))
            if self._scale_ends(g):
                h = self.dec_up[g // self.groups_per_scale](h)
        return h, out

    # ---- public API --------------------------------------------------------------------
    def forward(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One posterior sample per image: nll [B] (nats), kl [G, B] per group, log weight terms."""
        self.coeff_warmup()
        h, groups = self._top_down(x_uint8.shape[0], self._bottom_up(x_uint8), generator=generator)
        params = self.post(h)
        r = self.likelihood_region
        nll = -self.likelihood.log_prob(real_pixels(params, r), real_pixels(x_uint8, r))
        kl = torch.stack([g[0] for g in groups])
        log_q = torch.stack([g[1] for g in groups]).sum(0)
        log_p = torch.stack([g[2] for g in groups]).sum(0)
        return {"nll": nll, "kl": kl, "log_q": log_q, "log_p": log_p, "params": params}

    @torch.no_grad()
    def log_weights(self, x_uint8: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    together: int = 1) -> torch.Tensor:
        """[K, B] importance log weights log p(x | z_k) + log p(z_k) - log q(z_k | x), z_k ~ q(z | x);
        ``together`` samples are drawn in one forward pass (the batch repeated that many times)."""
        return importance_log_weights(self, x_uint8, k, generator, together)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               top: torch.Tensor | None = None, pixels: str = "mean") -> torch.Tensor:
        """n images (uint8) from the prior, sigma_p scaled by ``temperature``; ``top`` fixes z_1."""
        device = self.h0.device
        h, _ = self._top_down(n, None, temperature=temperature, generator=generator, top=top)
        params = self.post(h)
        if pixels == "mean":
            return self.likelihood.mean(params).round().clamp(0, 255).to(torch.uint8)
        return self.likelihood.sample(params, generator=generator).to(device)


def importance_log_weights(model, x_uint8: torch.Tensor, k: int, generator: torch.Generator | None = None,
                           together: int = 1) -> torch.Tensor:
    """[K, B] log p(x, z_k) - log q(z_k | x) of a model whose forward gives one posterior draw's
    ``nll``, ``log_p`` and ``log_q`` per image, ``together`` draws per forward pass."""
    rows, b = [], x_uint8.shape[0]
    for first in range(0, k, together):
        n = min(together, k - first)
        out = model(x_uint8.repeat(n, *([1] * (x_uint8.dim() - 1))), generator=generator)
        rows.append((-out["nll"] + out["log_p"] - out["log_q"]).view(n, b))
    return torch.cat(rows)


def iw_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k exp(w_k) per image: a lower bound on log p(x), tighter as K grows (K=1: the ELBO)."""
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)


def free_nats(kl: torch.Tensor, floor: float) -> torch.Tensor:
    """Free bits (Kingma et al. 2016), in nats, per latent group: the KL [G, B] unchanged in
    value, but a group whose batch-mean KL is below ``floor`` gets no gradient from it, so the
    encoder may put up to ``floor`` nats into it for free (against a decoder strong enough to
    ignore the latents: posterior collapse). The loss's value stays the true KL."""
    below = (kl.detach().mean(1) < floor)[:, None]
    return torch.where(below, kl.detach(), kl)


def kl_balance(kl: torch.Tensor, sizes: list[int], beta: float) -> torch.Tensor:
    """NVAE's KL balancing during warm-up: weight each group's KL [G, B] by a coefficient
    proportional to its batch-mean KL *per latent dimension* (group KL / group size),
    normalised to mean 1. A group that carries little information per dimension is pushed
    to carry more, whatever its size, so no group is switched off early; once beta reaches
    1 every group counts as it is."""
    if beta >= 1.0:
        return kl.sum(0)
    sizes_t = torch.tensor(sizes, dtype=kl.dtype, device=kl.device)
    gamma = kl.detach().mean(1) / sizes_t + 1e-2
    gamma = gamma / gamma.mean()
    return beta * (gamma[:, None] * kl).sum(0)
