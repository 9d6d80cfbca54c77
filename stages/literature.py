"""Published test NLLs that ``hvae report`` prints beside ours when the benchmark matches.

Only numbers on the same test set in the same unit are comparable: binarized MNIST (the
standard 10,000 test digits, nats per image) and CIFAR-10 (its 10,000 test images, bits per
dimension). Values and bound symbols as the lecture's tables give them (``../shared/seeds/``:
the PixelVAE table marks =, ≤ and ≈; the NVAE table marks none). The compute behind them is
not in those tables and is not guessed here.
Torch-free: a row here is a dict for ``nll_table``.
"""
from __future__ import annotations

BINARIZED_MNIST, CIFAR10 = "binarized MNIST", "CIFAR-10"

_LECTURE_PIXELVAE = "PixelVAE (Gulrajani et al., 2017), Table 1, as in the lecture"
_LECTURE_NVAE = "NVAE (Vahdat & Kautz, 2020), Table 1, as in the lecture"

# (benchmark, model, bound, value, source)
PUBLISHED = [
    (BINARIZED_MNIST, "DRAW", "≤", 80.97, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "Discrete VAE", "=", 81.01, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "IAF VAE", "≈", 79.88, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "PixelCNN", "=", 81.30, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "PixelRNN", "=", 79.20, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "Convolutional VAE", "≤", 87.41, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "PixelVAE", "≤", 80.64, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "Gated PixelCNN", "=", 80.10, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "Gated PixelVAE", "≈", 79.48, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "Gated PixelVAE without upsampling", "≈", 79.02, _LECTURE_PIXELVAE),
    (BINARIZED_MNIST, "NVAE w/o flow", "", 78.01, _LECTURE_NVAE),
    (BINARIZED_MNIST, "NVAE w/ flow", "", 78.19, _LECTURE_NVAE),
    (BINARIZED_MNIST, "BIVA", "", 78.41, _LECTURE_NVAE),
    (BINARIZED_MNIST, "IAF-VAE", "", 79.10, _LECTURE_NVAE),
    (CIFAR10, "NVAE w/o flow", "", 2.93, _LECTURE_NVAE),
    (CIFAR10, "NVAE w/ flow", "", 2.91, _LECTURE_NVAE),
    (CIFAR10, "BIVA", "", 3.08, _LECTURE_NVAE),
    (CIFAR10, "IAF-VAE", "", 3.11, _LECTURE_NVAE),
    (CIFAR10, "PixelCNN++", "", 2.92, _LECTURE_NVAE),
    (CIFAR10, "PixelSNAIL", "", 2.85, _LECTURE_NVAE),
    (CIFAR10, "Gated PixelCNN", "", 3.03, _LECTURE_NVAE),
    (CIFAR10, "PixelRNN", "", 3.00, _LECTURE_NVAE),
    (CIFAR10, "Glow", "", 3.35, _LECTURE_NVAE),
    (CIFAR10, "Real NVP", "", 3.49, _LECTURE_NVAE),
]
UNIT = {BINARIZED_MNIST: "test_nll_nats", CIFAR10: "test_nll_bpd"}


def benchmark(data_cfg) -> str | None:
    """The published benchmark a run's test set and unit match, or None (a subset of the test
    set, the 5,000-digit sample, 8-bit MNIST or another size compares with nothing published)."""
    if data_cfg.limit is not None:
        return None
    if data_cfg.dataset == "mnist" and data_cfg.binarize != "none":
        return BINARIZED_MNIST
    if data_cfg.dataset == "cifar10" and data_cfg.binarize == "none" and data_cfg.image_size == 32:
        return CIFAR10
    return None


def rows(benchmarks) -> list[dict]:
    """The published rows of these benchmarks, as ``nll_table`` rows marked published."""
    return [{"model": model, "dataset": bench, "structure": source, "bound": bound, UNIT[bench]: value,
             "benchmark": bench, "published": True}
            for bench, model, bound, value, source in PUBLISHED if bench in set(benchmarks)]


def ordered(rows_: list[dict]) -> list[dict]:
    """Rows of one benchmark together (ours and the published), best first in its unit; then
    every other dataset's rows by bits/dim."""
    def key(r):
        bench = r.get("benchmark")
        value = r.get(UNIT.get(bench, "test_nll_bpd"), float("inf"))
        return (bench or "~" + str(r.get("dataset", "")), value if value == value else float("inf"))
    return sorted(rows_, key=key)
