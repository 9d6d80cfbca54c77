"""The reference VQ-VAE-2 training step the field uses, rewritten here from its published
sizes (the widely used PyTorch reimplementation of Razavi et al. 2019): RGB 32x32 in this
benchmark, 128 channels, 2 residual blocks of 32 channels, a bottom encoder of stride 4 and a
top one of stride 2, 512 codes of 64 dimensions per level with EMA updates (decay 0.99),
a top decoder of stride 2 whose output joins the bottom features, a bottom decoder of stride 4,
mean squared error plus 0.25 x the commitment loss, Adam at 3e-4. Only its cost matters here:
it is the yardstick for hvae's stage-1 images/s (bench/step.py), not a model hvae trains.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Res(nn.Module):
    def __init__(self, ch: int, res_ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, res_ch, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(res_ch, ch, 1))

    def forward(self, x):
        return x + self.body(x)


def _encoder(cin: int, ch: int, blocks: int, res_ch: int, stride: int) -> nn.Sequential:
    if stride == 4:
        head = [nn.Conv2d(cin, ch // 2, 4, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(ch // 2, ch, 4, 2, 1),
                nn.ReLU(inplace=True), nn.Conv2d(ch, ch, 3, padding=1)]
    else:
        head = [nn.Conv2d(cin, ch // 2, 4, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(ch // 2, ch, 3, padding=1)]
    return nn.Sequential(*head, *[_Res(ch, res_ch) for _ in range(blocks)], nn.ReLU(inplace=True))


def _decoder(cin: int, cout: int, ch: int, blocks: int, res_ch: int, stride: int) -> nn.Sequential:
    body = [nn.Conv2d(cin, ch, 3, padding=1), *[_Res(ch, res_ch) for _ in range(blocks)], nn.ReLU(inplace=True)]
    if stride == 4:
        tail = [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.ReLU(inplace=True), nn.ConvTranspose2d(ch // 2, cout, 4, 2, 1)]
    else:
        tail = [nn.ConvTranspose2d(ch, cout, 4, 2, 1)]
    return nn.Sequential(*body, *tail)


class _Quantize(nn.Module):
    def __init__(self, dim: int, codes: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        embed = torch.randn(dim, codes)
        self.register_buffer("embed", embed)
        self.register_buffer("size", torch.zeros(codes))
        self.register_buffer("embed_sum", embed.clone())

    def forward(self, z):  # z [B, H, W, D]
        flat = z.reshape(-1, z.shape[-1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        index = dist.argmin(1)
        onehot = F.one_hot(index, self.embed.shape[1]).type(flat.dtype)
        quant = F.embedding(index.view(*z.shape[:-1]), self.embed.t())
        if self.training:
            with torch.no_grad():
                self.size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(flat.t() @ onehot, alpha=1 - self.decay)
                n = self.size.sum()
                size = (self.size + self.eps) / (n + self.embed.shape[1] * self.eps) * n
                self.embed.copy_(self.embed_sum / size.unsqueeze(0))
        diff = (quant.detach() - z).pow(2).mean()
        return z + (quant - z).detach(), diff


class ReferenceVQVAE2(nn.Module):
    def __init__(self, cin: int = 3, ch: int = 128, blocks: int = 2, res_ch: int = 32, dim: int = 64, codes: int = 512):
        super().__init__()
        self.enc_b = _encoder(cin, ch, blocks, res_ch, 4)
        self.enc_t = _encoder(ch, ch, blocks, res_ch, 2)
        self.to_t = nn.Conv2d(ch, dim, 1)
        self.quant_t = _Quantize(dim, codes)
        self.dec_t = _decoder(dim, dim, ch, blocks, res_ch, 2)
        self.to_b = nn.Conv2d(dim + ch, dim, 1)
        self.quant_b = _Quantize(dim, codes)
        self.up_t = nn.ConvTranspose2d(dim, dim, 4, 2, 1)
        self.dec = _decoder(2 * dim, cin, ch, blocks, res_ch, 4)

    def forward(self, x):
        b = self.enc_b(x)
        t = self.enc_t(b)
        qt, dt = self.quant_t(self.to_t(t).permute(0, 2, 3, 1))
        qt = qt.permute(0, 3, 1, 2)
        b = torch.cat([self.dec_t(qt), b], 1)
        qb, db = self.quant_b(self.to_b(b).permute(0, 2, 3, 1))
        qb = qb.permute(0, 3, 1, 2)
        return self.dec(torch.cat([self.up_t(qt), qb], 1)), dt + db


def train_step(model, optimizer, x_uint8: torch.Tensor) -> torch.Tensor:
    """One step as the reference trains: images in [-1, 1], MSE plus 0.25 x the latent loss."""
    x = x_uint8.float() / 127.5 - 1.0
    recon, latent = model(x)
    loss = F.mse_loss(recon, x) + 0.25 * latent
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
