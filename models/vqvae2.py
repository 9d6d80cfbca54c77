"""Hierarchical VQ-VAE (VQ-VAE-2, Razavi et al. 2019), single-device torch.

Levels are numbered top-down: level 0 is the coarsest map, level L-1 the finest.
``downsample`` (top first) says by how much each level's encoder shrinks its input: the
bottom's input is the image, every other level's the map below it. The default is 4 for the
bottom and 2 for each level above (32x32 input: 8x8 bottom, 4x4 top, 2x2 for a third level);
the paper's FFHQ-1024 model is ``[2, 2, 8]`` (128/64/32 maps). Every factor is a power of two.
``levels=1`` is the plain VQ-VAE.

Algorithm 1 of the notes, generalised to L levels:
    h_{L-1} = E_bottom(x);  h_l = E_l(h_{l+1})                  (bottom-up features)
    e_0 = Quantize(h_0)                                         (top quantized first)
    e_l = Quantize(h_l, Up_l(e_{l-1}))  for l = 1..L-1           (conditioned on the level above)
    x_hat = D(e_0, ..., e_{L-1})
The decoder sees only code vectors, so ``decode_codes`` reproduces the reconstruction
from the integer code maps alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from hvae.settings.families import default_downsample
from .likelihoods import CoefficientWarmup, make_likelihood, real_pixels, to_model_range
from .quantize import VectorQuantizerEMA


class ResBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.net(x)


def _res_stack(channels: int, hidden: int, n: int) -> list[nn.Module]:
    return [ResBlock(channels, hidden) for _ in range(n)] + [nn.ReLU()]


def _steps(factor: int) -> int:
    """log2 of a resize factor, which must be a power of two (1 included)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"resize factors must be powers of two, got {factor}")
    return factor.bit_length() - 1


def _downsampler(in_ch: int, hidden: int, factor: int) -> list[nn.Module]:
    """Strided 4x4 convolutions that divide the resolution by ``factor`` (to hidden/2, then
    hidden channels), then a 3x3 convolution to ``hidden``."""
    layers: list[nn.Module] = []
    ch = in_ch
    for i in range(_steps(factor)):
        out = hidden // 2 if i == 0 else hidden
        layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
        ch = out
    return layers + [nn.Conv2d(ch, hidden, 3, padding=1)]


def _upsampler(in_ch: int, out_ch: int, factor: int, mid_ch: int | None = None) -> list[nn.Module]:
    """Transposed 4x4 convolutions that multiply the resolution by ``factor`` (through
    ``mid_ch`` channels, default ``out_ch``)."""
    layers: list[nn.Module] = []
    ch, n = in_ch, _steps(factor)
    for i in range(n):
        out = out_ch if i == n - 1 else (mid_ch or out_ch)
        layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
        if i < n - 1:
            layers.append(nn.ReLU())
        ch = out
    return layers


class VQVAE2(nn.Module):
    # every setting comes from the config (hvae.stages.families.vqvae2: model_config): no
    # defaults here, so the schema's are the only ones
    def __init__(
        self,
        *,
        in_channels: int,
        levels: int,
        hidden: int,
        res_hidden: int,
        res_blocks: int,
        embed_dim: int,
        codebook_size: int | list[int],
        beta: float,
        decay: float,
        kmeans_init: bool,
        dead_code_threshold: float,
        likelihood: str,
        num_mixtures: int,
        downsample: list[int],
        coeff_warmup_steps: int,
        kmeans_at_step: int,
        dead_code_fraction: float,
        likelihood_region: list[int] | None = None,  # from the data (its real pixels), not a setting
        sync_codebooks: bool = True,  # all-reduce the EMA statistics under DDP (off: a test's lone model)
    ):
        super().__init__()
        if levels < 1:
            raise ValueError("levels must be >= 1")
        sizes = codebook_size if isinstance(codebook_size, list) else [codebook_size] * levels
        if len(sizes) != levels:
            raise ValueError(f"codebook_size has {len(sizes)} entries for {levels} levels")
        down = list(downsample) if downsample is not None else default_downsample(levels)
        if len(down) != levels:
            raise ValueError(f"downsample has {len(down)} factors for {levels} levels")
        self.levels = levels
        self.codebook_sizes = list(sizes)
        self.downsample = down
        self.likelihood = make_likelihood(likelihood, in_channels, num_mixtures)
        self.coeff_warmup = CoefficientWarmup(self.likelihood, coeff_warmup_steps)
        self.likelihood_region = likelihood_region  # [top, left, h, w] of the real pixels (likelihoods.real_pixels)
        h, d = hidden, embed_dim

        # bottom-up encoders, stored top-first to match level numbering
        def encoder(l: int) -> nn.Module:
            return nn.Sequential(*_downsampler(in_channels if l == levels - 1 else h, h, down[l]),
                                 *_res_stack(h, res_hidden, res_blocks))

        bottom = encoder(levels - 1)  # (made first: the same initial weights as before per-level factors)
        self.encoders = nn.ModuleList([encoder(l) for l in range(levels - 1)] + [bottom])
        # level l > 0 quantizes its features together with the decoded level above
        self.pre_quant = nn.ModuleList(
            [nn.Conv2d(h if l == 0 else h + d, d, 1) for l in range(levels)]
        )
        self.cond_up = nn.ModuleList(  # level l-1's codes up to level l's resolution
            [
                nn.Sequential(nn.Conv2d(d, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
                              *_upsampler(h, d, down[l - 1]))
                for l in range(1, levels)
            ]
        )
        self.quantizers = nn.ModuleList(
            [
                VectorQuantizerEMA(k, d, beta=beta, decay=decay, kmeans_init=kmeans_init,
                                   dead_code_threshold=dead_code_threshold, sync=sync_codebooks,
                                   kmeans_at_step=kmeans_at_step, dead_code_fraction=dead_code_fraction)
                for k in sizes
            ]
        )
        # decoder: every level's codes brought to the bottom resolution, then up to the image's
        self.dec_up = nn.ModuleList(
            [nn.Sequential(*_upsampler(d, d, math.prod(down[l:-1]))) for l in range(levels - 1)]
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d * levels, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
            *_upsampler(h, self.likelihood.num_params(), down[-1], mid_ch=h // 2),
        )

    def map_shapes(self, image_size: int) -> list[tuple[int, int]]:
        """The code maps' sizes (top first) for square images of ``image_size``."""
        sizes, size = [], image_size
        for factor in reversed(self.downsample):
            size //= factor
            sizes.insert(0, (size, size))
        return sizes

    # ---- encoding ----------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.encoders[-1](x)]
        for enc in reversed(list(self.encoders)[:-1]):
            feats.insert(0, enc(feats[0]))
        return feats  # top first

    def quantize(self, x: torch.Tensor):
        """x in [-1, 1] -> (code vectors per level, code maps per level, commitment loss, stats)."""
        feats = self._features(x)
        quants, codes, stats = [], [], []
        loss = x.new_zeros(x.shape[0])
        for l in range(self.levels):
            inp = feats[l] if l == 0 else torch.cat([feats[l], self.cond_up[l - 1](quants[l - 1])], 1)
            q, c, lq, st = self.quantizers[l](self.pre_quant[l](inp))
            quants.append(q)
            codes.append(c)
            stats.append(st)
            loss = loss + lq
        return quants, codes, loss, stats

    @torch.no_grad()
    def encode(self, x_uint8: torch.Tensor) -> list[torch.Tensor]:
        """uint8 images -> integer code maps, top level first."""
        return self.quantize(to_model_range(x_uint8))[1]

    # ---- decoding ----------------------------------------------------------------
    def decode(self, quants: list[torch.Tensor]) -> torch.Tensor:
        ups = [self.dec_up[l](quants[l]) for l in range(self.levels - 1)] + [quants[-1]]
        return self.decoder(torch.cat(ups, 1))

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Integer code maps (top first) -> likelihood parameters."""
        return self.decode([self.quantizers[l].embed(c) for l, c in enumerate(codes)])

    # ---- training objective ------------------------------------------------------
    def forward(self, x_uint8: torch.Tensor):
        """Returns per-image NLL (nats), per-image commitment loss, decoder params, codes, stats."""
        self.coeff_warmup()
        quants, codes, commit, stats = self.quantize(to_model_range(x_uint8))
        params = self.decode(quants)
        r = self.likelihood_region
        nll = -self.likelihood.log_prob(real_pixels(params, r), real_pixels(x_uint8, r))
        return {"nll": nll, "commit": commit, "params": params, "codes": codes, "stats": stats}


def draw(vq, priors, num_samples: int, temperature: float, seed: int, *, pixels: str = "mean", first: int = 0,
         cached: bool = True):
    """Ancestral sampling through ``priors`` (a HierarchicalPrior), top level first, then the
    decoder of ``vq`` -> (images uint8, codes per level, labels: class ``i % num_classes`` for
    sample ``i``, counting from ``first``). ``pixels``: the likelihood's mean, or a draw ("sample")."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = priors.levels[0].num_classes
    device = next(priors.parameters()).device
    labels = (torch.arange(first, first + num_samples) % num_classes).to(device) if num_classes else None
    with torch.no_grad():
        codes = priors.sample(num_samples, labels, temperature, gen, cached)
        params = vq.decode_codes(codes)
        if pixels == "sample":
            images = vq.likelihood.sample(params, gen)
        else:
            images = vq.likelihood.mean(params).round().clamp(0, 255).to(torch.uint8)
    return images, codes, labels
