"""Train the fixed MNIST classifier that scores digit samples (models/digits.py) once; writes
data/mnist_classifier.pt and bench/results/classifier.md.

    .venv/bin/python bench/classifier.py [--epochs 2]      (make classifier)

On the full MNIST training split (data/mnist.npz, `make` fetches it), each digit padded to
the 32x32 frame the pipeline trains on, with a random shift of up to 2 pixels, half the
batches binarized (one Bernoulli draw per pixel, as binarized MNIST is); its accuracy
on the 10,000 test digits, and its digit-space scores of the test digits themselves (what a
perfect generator would reach) and of binarized test digits, are recorded. Then point a
config at it: ``sample.classifier=data/mnist_classifier.pt`` (the bmnist configs do).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402

from hvae.models.digits import DigitClassifier, digit_scores  # noqa: E402

OUT = ROOT / "data" / "mnist_classifier.pt"


def padded(x: np.ndarray) -> torch.Tensor:
    return F.pad(torch.from_numpy(x), (2, 2, 2, 2))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    with np.load(ROOT / "data" / "mnist.npz") as d:
        x, y, xt, yt = padded(d["x_train"]), torch.from_numpy(d["y_train"]), padded(d["x_test"]), torch.from_numpy(d["y_test"])
    torch.manual_seed(0)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(128):
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            if torch.rand(()) < 0.5:  # half the batches binarized: binarized-MNIST samples are scored too
                batch = (batch > torch.randint(0, 256, batch.shape)).to(torch.uint8) * 255
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    xb = (xt > torch.randint(0, 256, xt.shape, generator=torch.Generator().manual_seed(0))).to(torch.uint8) * 255

    def accuracy(images):
        with torch.no_grad():
            return float(torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)]).eq(yt).float().mean())

    OUT.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), OUT)
    real, binary = digit_scores(model, xt), digit_scores(model, xb)
    body = "\n".join([
        f"{args.epochs} epochs on the 50,000 training digits ({seconds:.0f} s): **test accuracy {accuracy(xt):.4f}** on the "
        f"10,000 test digits ({accuracy(xb):.4f} on them binarized). Written to `data/mnist_classifier.pt`; the sample stage scores samples with it when "
        f"`sample.classifier` names it.", "",
        "What real digits score (a perfect generator's numbers):", "",
        "| images | confidence | label entropy (nats; ln 10 = 2.303) | digits seen |", "|---|---|---|---|",
        f"| the 10,000 test digits, 8-bit | {real['confidence']:.4f} | {real['label_entropy']:.4f} | {real['digits_seen']:.1f} |",
        f"| the same, binarized (one Bernoulli draw) | {binary['confidence']:.4f} | {binary['label_entropy']:.4f} | "
        f"{binary['digits_seen']:.1f} |"])
    record("classifier", "python bench/classifier.py" + (" " + " ".join(argv) if argv else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
