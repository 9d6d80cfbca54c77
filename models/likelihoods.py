"""Decoder likelihoods over images, each returning a log-likelihood per image.

Images reach the model scaled to [-1, 1] (8-bit value v -> v / 127.5 - 1), so the
256 possible values of a pixel are bins of width 2/255 centred on those points.

- ``DiscretizedLogistic``: a mixture of K discretized logistics per pixel (PixelCNN++),
  with the channel-autoregressive means of that paper for multi-channel images, which
  ``CoefficientWarmup`` holds off for the first training steps.
- ``Bernoulli``: independent Bernoulli pixels for binarized images (targets in {0, 1}).

Both give log p(x | decoder output) in nats per image; ``to_bits_per_dim`` converts.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
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
        self.coeff_gate = 1.0  # 0 switches the channel coefficients off (CoefficientWarmup)

    def num_params(self) -> int:
        c, k = self.channels, self.num_mixtures
        return k * (1 + 2 * c + self.num_coeffs)

    def _split(self, params: torch.Tensor):
        b, _, h, w = params.shape
        c, k = self.channels, self.num_mixtures
        # (one split, not slices: its gradient is one concatenation, not a zero-filled copy of
        # the whole output per slice)
        logit_pi, means, log_scales, coeffs = torch.split(params, [k, k * c, k * c, k * self.num_coeffs], dim=1)
        return (logit_pi, means.reshape(b, k, c, h, w), log_scales.reshape(b, k, c, h, w).clamp(min=-7.0),
                self.coeff_gate * torch.tanh(coeffs.reshape(b, k, self.num_coeffs, h, w)))

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
        """The mass of each pixel's bin, [x - 1/255, x + 1/255] (the edges reach to -inf at 0
        and to +inf at 255), under each component: with a = (x + 1/255 - mu) / s and
        b = (x - 1/255 - mu) / s, sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^-(a-b)),
        so its log is -softplus(-a) - softplus(b) + log(1 - e^-(a-b)): three terms that stay
        accurate where the bin's mass is tiny (no cancellation, no fallback to the density),
        the first dropped at 255 and the second at 0, and a - b = 2 / (255 s) needs no x."""
        x = to_model_range(x_uint8)  # [B, C, H, W] in [-1, 1]
        logit_pi, means, log_scales, coeffs = self._split(params)
        means = self._conditioned_means(means, coeffs, x)
        inv_s = torch.exp(-log_scales)
        # the bin's edges, (2k +- 1 - 255) / 255, each rounded once: built as x +- 1/255 they carry
        # the rounding of x, and a narrow component centred on an edge (a mean of 0 sits between
        # 127 and 128) then loses up to 2e-5 of its mass
        k = x_uint8.to(x.dtype).unsqueeze(1)  # [B, 1, C, H, W]
        upper = (2.0 * k - 254.0) / 255.0 - means  # [B, K, C, H, W]
        lower = (2.0 * k - 256.0) / 255.0 - means
        below_top = (x_uint8 < 255).unsqueeze(1).to(x.dtype)  # [B, 1, C, H, W]
        above_bottom = (x_uint8 > 0).unsqueeze(1).to(x.dtype)
        log_mass = (below_top * -F.softplus(-inv_s * upper)
                    + above_bottom * -F.softplus(inv_s * lower)
                    + (below_top * above_bottom) * torch.log(-torch.expm1(-(2.0 / 255.0) * inv_s)))
        log_probs = log_mass.sum(dim=2)  # channels of one pixel share the mixture component
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


class CoefficientWarmup(nn.Module):
    """Holds a discretized logistic's channel coefficients at 0 for the first ``steps`` training
    forwards of the model that owns it, then lets them act.

    With them on from the start, a decoder fits G from the true R and B from R and G (cheap bits:
    the channels' spread and correlation) before it learns R from the codes: on RGB crops its
    "reconstructions" stay flat tiles of the mean colour for hundreds of steps while bits/dim
    looks fine, and ``mean()`` builds G and B from a predicted R that barely varies. Off, every
    channel's mean has to come from the codes; switched on once the codes carry the image, they
    take the remaining bits (``bench/rgb.py``). The count of training forwards is in the state
    dict (a resumed run switches at the same step; a trained model samples with them on).

    Called at the start of the owner's forward. Left out of torch.compile (``not_compiled``):
    compiled, the count is a constant of the graph, so every step recompiled it until dynamo's
    recompile limit (8) sent the whole forward back to eager."""

    not_compiled = True

    def __init__(self, likelihood, steps: int = 0):
        super().__init__()
        self.likelihood, self.steps, self.done = likelihood, int(steps), 0
        self._apply_gate()

    def _apply_gate(self) -> None:
        if hasattr(self.likelihood, "coeff_gate"):
            self.likelihood.coeff_gate = 1.0 if self.done >= self.steps else 0.0

    def forward(self) -> None:
        """Before the owner's forward: the gate for this step, then count it when training."""
        self._apply_gate()
        if self.training:
            self.done += 1

    def get_extra_state(self) -> dict:
        return {"done": self.done}

    def set_extra_state(self, state: dict) -> None:
        self.done = int(state["done"])
        self._apply_gate()


def real_pixels(t: torch.Tensor, region) -> torch.Tensor:
    """The part of [..., H, W] that holds real pixels: ``region`` = [top, left, height, width],
    or None for all of it (an image padded for the model's strides: the padding is no data)."""
    if region is None:
        return t
    top, left, h, w = region
    return t[..., top : top + h, left : left + w]


def make_likelihood(name: str, channels: int, num_mixtures: int = 5):
    if name == "dlogistic":
        return DiscretizedLogistic(channels, num_mixtures)
    if name == "bernoulli":
        return Bernoulli(channels)
    raise ValueError(f"unknown likelihood {name!r} (expected 'dlogistic' or 'bernoulli')")
