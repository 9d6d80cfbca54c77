"""A small fixed MNIST classifier, the yardstick of digit samples (``bench/classifier.py`` trains
it once on the full MNIST training split).

It scores samples in digit space, a proxy for the Inception Score and FID of natural images:
how sure it is of each sample's digit (``confidence``: the mean of the largest class
probability) and how evenly the samples cover the ten digits (``label_entropy``: the entropy
of the mean class distribution, ln 10 = 2.303 nats when every digit is as frequent). A prior
that draws clearer and more varied digits scores higher on both; a grid can look fine while
one of them drops.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """uint8 grayscale digits [B, 1, 32, 32] (MNIST in the padded frame the pipeline uses; a
    28x28 digit is padded here) -> logits over the 10 classes."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if x_uint8.shape[-1] == 28:
            x_uint8 = F.pad(x_uint8, (2, 2, 2, 2))
        return self.net(x_uint8.float() / 127.5 - 1.0)


@torch.no_grad()
def digit_scores(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """The samples' digit-space scores: confidence, label_entropy (nats) and the fraction of the
    ten digits drawn at all (``digits_seen``)."""
    classifier.eval()
    probs = torch.cat([F.softmax(classifier(images[i : i + batch_size]), 1) for i in range(0, len(images), batch_size)])
    mean = probs.mean(0)
    seen = torch.bincount(probs.argmax(1), minlength=10)
    return {"confidence": float(probs.max(1).values.mean()),
            "label_entropy": float(-(mean * mean.clamp(min=1e-12).log()).sum()),
            "digits_seen": float((seen > 0).sum()) / 10, "max_label_entropy": math.log(10)}
