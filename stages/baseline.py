"""A trivial model to hold stage 1 against: every pixel drawn on its own from a histogram.

If the autoencoder's reconstruction costs as many bits per dimension as a histogram of pixel
values, its codes or latents carry nothing yet (too few optimizer steps, usually), and its
samples and reconstructions are flat tiles: stage 1 says so in one line. numpy only.
"""
from __future__ import annotations

import numpy as np

LEVELS = 256


def _bits(counts: np.ndarray, pseudo: float, values: np.ndarray) -> np.ndarray:
    """-log2 of each value's smoothed frequency in its row of ``counts`` [rows, LEVELS]."""
    p = (counts + pseudo) / (counts.sum(1, keepdims=True) + pseudo * LEVELS)
    return -np.log2(np.take_along_axis(p, values, axis=1))


def histogram_bpd(images: np.ndarray, content: tuple | None = None) -> float:
    """uint8 images [N, C, H, W] (N >= 2) -> bits per dimension over the real pixels
    (``content``: [top, left, height, width]) of the better of two histogram models, each
    fitted on the first half of the images and scored on the second: one histogram per pixel
    position (smoothed by 1/256 of a count), or one per channel (by one count)."""
    if content is not None:
        top, left, h, w = (int(v) for v in content)
        images = images[:, :, top:top + h, left:left + w]
    n = len(images) // 2
    if n < 1:
        raise ValueError(f"histogram_bpd needs at least 2 images (got {len(images)})")
    fit = images[:n].reshape(n, images.shape[1], -1).astype(np.int64)  # [n, C, P]
    score = images[n:2 * n].reshape(n, images.shape[1], -1).astype(np.int64)
    c, p = fit.shape[1], fit.shape[2]
    # per position: rows = C * P positions
    pos = np.arange(c * p)
    per_pos = np.bincount((pos[None, :] * LEVELS + fit.reshape(n, -1)).ravel(), minlength=c * p * LEVELS)
    per_pos = _bits(per_pos.reshape(c * p, LEVELS).astype(np.float64), 1.0 / LEVELS, score.reshape(n, -1).T).mean()
    # per channel: rows = C
    per_ch = np.stack([np.bincount(fit[:, k].ravel(), minlength=LEVELS) for k in range(c)]).astype(np.float64)
    per_ch = _bits(per_ch, 1.0, score.transpose(1, 0, 2).reshape(c, -1)).mean()
    return float(min(per_pos, per_ch))
