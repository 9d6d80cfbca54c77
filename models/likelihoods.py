"""Decoder likelihoods over images, each returning a log-likelihood per image.

Images reach the model scaled to [-1, 1] (8-bit value v -> v / 127.5 - 1), so the
256 possible values of a pixel are bins of width 2/255 centred on those points.

- ``DiscretizedLogistic``: a mixture of K discretized logistics per pixel (PixelCNN++),
  with the channel-autoregressive means of that paper for multi-channel images.
- ``Bernoulli``: independent Bernoulli pixels for binarized images (targets in {0, 1}).

Both give log p(x | decoder output) in nats per image; ``to_bits_per_dim`` converts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import noise
from .precision import fp32


def to_bits_per_dim(nll_nats, num_dims: int):
    """Negative log-likelihood in nats (per image, or summed over images) -> bits per dimension
    (per code for a prior over code maps); a float or a tensor."""
    return nll_nats / (num_dims * math.log(2.0))


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images [0, 255] -> float in [-1, 1] (the scale every likelihood here uses)."""
    return x_uint8.float() / 127.5 - 1.0


class Bernoulli:
    """Independent Bernoulli pixels; the decoder outputs one logit per channel."""

    name = "bernoulli"

    def __init__(self, channels: int):
        self.channels = channels

    def num_params(self) -> int:
        return self.channels

    @staticmethod
    def target(x_uint8: torch.Tensor) -> torch.Tensor:
        """Binarize 8-bit images at the midpoint."""
        return (x_uint8 > 127).float()

    @fp32
    def log_prob(self, params: torch.Tensor, x_uint8: torch.Tensor) -> torch.Tensor:
        target = self.target(x_uint8)
        ll = -F.binary_cross_entropy_with_logits(params, target, reduction="none")
        return ll.flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Expected image as uint8-scale floats in [0, 255]."""
        return torch.sigmoid(params) * 255.0

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = noise.uniform(params.shape, generator, params.device)
        return ((u < torch.sigmoid(params)).float() * 255.0).to(torch.uint8)


class DiscretizedLogistic:
    """Mixture of ``num_mixtures`` discretized logistics over 256 values per channel.

    Decoder output layout (channels dimension), for C image channels and K mixtures:
    K mixture logits, then K*C means, K*C log-scales, and K*C*(C-1)/2 coefficients
    that make channel c's mean depend linearly on the values of channels < c.
    """

    name = "dlogistic"

    def __init__(self, channels: int, num_mixtures: int = 5):
        self.channels = channels
        self.num_mixtures = num_mixtures
        self.num_coeffs = channels * (channels - 1) // 2

    def num_params(self) -> int:
        c, k = self.channels, self.num_mixtures
        return k * (1 + 2 * c + self.num_coeffs)

    def _split(self, params: torch.Tensor):
        b, _, h, w = params.shape
        c, k = self.channels, self.num_mixtures
        logit_pi = params[:, :k]
        rest = params[:, k:]
        means = rest[:, : k * c].reshape(b, k, c, h, w)
        log_scales = rest[:, k * c : 2 * k * c].reshape(b, k, c, h, w).clamp(min=-7.0)
        coeffs = torch.tanh(rest[:, 2 * k * c :].reshape(b, k, self.num_coeffs, h, w))
        return logit_pi, means, log_scales, coeffs

    def _conditioned_means(self, means, coeffs, x):
        """Channel c's mean plus sum_{j<c} coeff_{c,j} * x_j (x: [B, C, H, W] or [B, K, C, H, W])."""
        if self.channels == 1:
            return means
        if x.dim() == 4:
            x = x.unsqueeze(1).expand_as(means)
        out = [means[:, :, 0]]
        idx = 0
        for c in range(1, self.channels):
            m = means[:, :, c]
            for j in range(c):
                m = m + coeffs[:, :, idx] * x[:, :, j]
                idx += 1
            out.append(m)
        return torch.stack(out, dim=2)

    @fp32
    def log_prob(self, params: torch.Tensor, x_uint8: torch.Tensor) -> torch.Tensor:
        x = to_model_range(x_uint8)  # [B, C, H, W] in [-1, 1]
        logit_pi, means, log_scales, coeffs = self._split(params)
        means = self._conditioned_means(means, coeffs, x)
        xk = x.unsqueeze(1)  # [B, 1, C, H, W]
        centered = xk - means
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / 255.0
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        cdf_plus = torch.sigmoid(plus_in)
        cdf_min = torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the x = 0 edge
        log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): the x = 255 edge
        cdf_delta = cdf_plus - cdf_min
        # When the bin mass underflows, fall back to the density at the centre times the bin width.
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        log_mass_interior = torch.where(
            cdf_delta > 1e-5,
            torch.log(cdf_delta.clamp(min=1e-12)),
            log_pdf_mid + math.log(2.0 / 255.0),
        )
        log_probs = torch.where(
            xk < -0.999,
            log_cdf_plus,
            torch.where(xk > 0.999, log_one_minus_cdf_min, log_mass_interior),
        )
        log_probs = log_probs.sum(dim=2)  # channels of one pixel share the mixture component
        log_mix = torch.log_softmax(logit_pi, dim=1)
        return torch.logsumexp(log_probs + log_mix, dim=1).flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Expected image (mixture of the component means) as uint8-scale floats in [0, 255]."""
        logit_pi, means, _, coeffs = self._split(params)
        pi = torch.softmax(logit_pi, dim=1).unsqueeze(2)
        out = []
        for c in range(self.channels):
            m = means[:, :, c]
            idx = c * (c - 1) // 2
            for j in range(c):
                m = m + coeffs[:, :, idx + j] * out[j].unsqueeze(1)
            out.append((pi[:, :, 0] * m).sum(1).clamp(-1, 1))
        return (torch.stack(out, dim=1) + 1.0) * 127.5

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logit_pi, means, log_scales, coeffs = self._split(params)
        b, k, c, h, w = means.shape
        gumbel = -torch.log(-torch.log(noise.uniform(logit_pi.shape, generator, params.device).clamp(1e-10, 1 - 1e-10)))
        comp = (logit_pi + gumbel).argmax(dim=1, keepdim=True)  # [B, 1, H, W]
        onehot = F.one_hot(comp.squeeze(1), k).permute(0, 3, 1, 2).float().unsqueeze(2)  # [B, K, 1, H, W]
        mu = (means * onehot).sum(1)
        ls = (log_scales * onehot).sum(1)
        co = (coeffs * onehot).sum(1) if self.num_coeffs else None
        u = noise.uniform(mu.shape, generator, params.device).clamp(1e-5, 1 - 1e-5)
        logistic = torch.log(u) - torch.log1p(-u)
        xs = []
        for ch in range(c):
            m = mu[:, ch]
            idx = ch * (ch - 1) // 2
            for j in range(ch):
                m = m + co[:, idx + j] * xs[j]
            xs.append((m + torch.exp(ls[:, ch]) * logistic[:, ch]).clamp(-1, 1))
        x = torch.stack(xs, dim=1)
        return torch.round((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def make_likelihood(name: str, channels: int, num_mixtures: int = 5):
    if name == "dlogistic":
        return DiscretizedLogistic(channels, num_mixtures)
    if name == "bernoulli":
        return Bernoulli(channels)
    raise ValueError(f"unknown likelihood {name!r} (expected 'dlogistic' or 'bernoulli')")
