"""Hierarchical VQ-VAE (VQ-VAE-2, Razavi et al. 2019), single-device torch.

Levels are numbered top-down: level 0 is the coarsest map, level L-1 the finest.
The bottom encoder downsamples the image by 4, each level above by 2 more (32x32 input:
8x8 bottom, 4x4 top, 2x2 for a third level). ``levels=1`` is the plain VQ-VAE.

Algorithm 1 of the notes, generalised to L levels:
    h_{L-1} = E_bottom(x);  h_l = E_l(h_{l+1})                  (bottom-up features)
    e_0 = Quantize(h_0)                                         (top quantized first)
    e_l = Quantize(h_l, Up_l(e_{l-1}))  for l = 1..L-1           (conditioned on the level above)
    x_hat = D(e_0, ..., e_{L-1})
The decoder sees only code vectors, so ``decode_codes`` reproduces the reconstruction
from the integer code maps alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .likelihoods import make_likelihood, to_model_range
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


def _upsampler(in_ch: int, out_ch: int, factor: int) -> nn.Module:
    """Transposed convolutions that multiply the resolution by ``factor`` (a power of two)."""
    layers: list[nn.Module] = []
    ch = in_ch
    while factor > 1:
        layers += [nn.ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1)]
        factor //= 2
        if factor > 1:
            layers.append(nn.ReLU())
        ch = out_ch
    return nn.Sequential(*layers) if layers else nn.Identity()


class VQVAE2(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        levels: int = 2,
        hidden: int = 64,
        res_hidden: int = 32,
        res_blocks: int = 2,
        embed_dim: int = 64,
        codebook_size: int | list[int] = 512,
        beta: float = 0.25,
        decay: float = 0.99,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        likelihood: str = "dlogistic",
        num_mixtures: int = 5,
        sync_codebooks: bool = True,
    ):
        super().__init__()
        if levels < 1:
            raise ValueError("levels must be >= 1")
        sizes = codebook_size if isinstance(codebook_size, list) else [codebook_size] * levels
        if len(sizes) != levels:
            raise ValueError(f"codebook_size has {len(sizes)} entries for {levels} levels")
        self.levels = levels
        self.codebook_sizes = list(sizes)
        self.likelihood = make_likelihood(likelihood, in_channels, num_mixtures)
        h, d = hidden, embed_dim

        # bottom-up encoders, stored top-first to match level numbering
        bottom = nn.Sequential(
            nn.Conv2d(in_channels, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
        )
        uppers = [
            nn.Sequential(
                nn.Conv2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(h // 2, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
            )
            for _ in range(levels - 1)
        ]
        self.encoders = nn.ModuleList(uppers + [bottom])
        # level l > 0 quantizes its features together with the decoded level above
        self.pre_quant = nn.ModuleList(
            [nn.Conv2d(h if l == 0 else h + d, d, 1) for l in range(levels)]
        )
        self.cond_up = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(d, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
                              nn.ConvTranspose2d(h, d, 4, stride=2, padding=1))
                for _ in range(levels - 1)
            ]
        )
        self.quantizers = nn.ModuleList(
            [
                VectorQuantizerEMA(k, d, beta=beta, decay=decay, kmeans_init=kmeans_init,
                                   dead_code_threshold=dead_code_threshold, sync=sync_codebooks)
                for k in sizes
            ]
        )
        # decoder: every level's codes brought to the bottom resolution, then stride-4 up
        self.dec_up = nn.ModuleList(
            [_upsampler(d, d, 2 ** (levels - 1 - l)) for l in range(levels - 1)]
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d * levels, h, 3, padding=1), *_res_stack(h, res_hidden, res_blocks),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, self.likelihood.num_params(), 4, stride=2, padding=1),
        )

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
        quants, codes, commit, stats = self.quantize(to_model_range(x_uint8))
        params = self.decode(quants)
        nll = -self.likelihood.log_prob(params, x_uint8)
        return {"nll": nll, "commit": commit, "params": params, "codes": codes, "stats": stats}
