"""Cached against naive PixelCNN sampling, side by side; appends a section to BENCHMARKS.md.

    .venv/bin/python bench/sampling.py [--full]

The prior: ``configs/default.yaml``'s priors section (the gated PixelCNN the pipeline
trains), its bottom codebook, batch 16, on this machine's CPU threads. Per code-map size:
the cached sampler (the default) drawing the whole map, and the naive reference (a forward
pass over the whole map per position). The naive sampler's cost is the same at every
position, so beyond 16x16 (quick mode) or 32x32 (``--full``) it is timed over its first
positions and multiplied out to the whole map: that row says so. Where both draw the whole
map, the codes are compared (same seed, same weights). ``--full`` adds the paper-sized
bottom prior of ``configs/vqvae2_imagenet256.yaml`` at 16x16.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402

BATCH = 16


def _prior(config: str, conditional: bool, attention: int = 0) -> tuple[torch.nn.Module, int | None, str]:
    from hvae.settings.config import load_config
    from hvae.models.pixelcnn import GatedPixelCNN

    cfg = load_config(str(ROOT / "configs" / config), [])
    p, sizes = cfg.priors, cfg.vqvae2.codebook_size
    torch.manual_seed(0)
    net = GatedPixelCNN(sizes[-1], p.hidden, p.layers, p.kernel, cond_codes=sizes[-2] if conditional else 0,
                        num_classes=0, attention_every=attention, attention_heads=p.attention_heads,
                        dropout=p.dropout).eval()
    what = (f"{config} priors: hidden {p.hidden}, {p.layers} layers, kernel {p.kernel}, {sizes[-1]} codes"
            + (f", conditioned on a {sizes[-2]}-code map" if conditional else "")
            + (f", attention after every {attention} layers ({p.attention_heads} heads)" if attention else ""))
    return net, sizes[-2] if conditional else None, what


def _naive_positions(net, shape, cond, positions: int) -> float:
    """Seconds for the naive sampler's first ``positions`` steps (each a whole-map forward pass)."""
    b, hgt, wid = shape
    codes = torch.zeros(shape, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        c = net.condition(cond)
        t0 = time.perf_counter()
        for p in range(positions):
            i, j = divmod(p, wid)
            x = net.embed(codes).permute(0, 3, 1, 2).contiguous()
            probs = torch.softmax(net.forward_embedded(x, c)[:, :, i, j].double(), dim=1)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return time.perf_counter() - t0


def _row(net, cond_codes, size: int, whole_naive: bool) -> str:
    shape = (BATCH, size, size)
    cond = None if cond_codes is None else torch.randint(0, cond_codes, (BATCH, size // 2, size // 2),
                                                         generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    cached = net.sample(shape, cond, generator=torch.Generator().manual_seed(2))
    t_cached = time.perf_counter() - t0
    if whole_naive:
        t0 = time.perf_counter()
        naive = net.sample(shape, cond, generator=torch.Generator().manual_seed(2), cached=False)
        t_naive = time.perf_counter() - t0
        how, same = "whole map", "yes" if torch.equal(naive, cached) else f"NO ({(naive != cached).sum()} codes differ)"
    else:
        positions = max(4, 512 // size)
        t_naive = _naive_positions(net, shape, cond, positions) * size * size / positions
        how, same = f"first {positions} positions × {size * size // positions}", "–"
    print(f"{size}x{size}: cached {t_cached:.2f} s, naive {t_naive:.1f} s ({how})", flush=True)
    return (f"| {size}×{size} | {t_cached:.2f} | {1000 * t_cached / size**2:.2f} | {t_naive:.1f} | "
            f"{1000 * t_naive / size**2:.1f} | {how} | **{t_naive / t_cached:.0f}×** | {same} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="naive whole maps to 32x32, and the paper-sized prior")
    args = ap.parse_args()
    header = ("| code map | cached s | cached ms/position | naive s | naive ms/position | naive timed over | "
              "naive / cached | same codes |\n|---|---|---|---|---|---|---|---|")
    sections = []
    runs = [("default.yaml", False, 0, (8, 16, 32, 64)), ("default.yaml", True, 0, (16, 32)),
            ("default.yaml", False, 3, (16, 32))]
    if args.full:
        runs.append(("vqvae2_imagenet256.yaml", True, 0, (16,)))
    for config, conditional, attention, sizes in runs:
        net, cond_codes, what = _prior(config, conditional, attention)
        print(what, flush=True)
        rows = [_row(net, cond_codes, s, s <= (32 if args.full else 16)) for s in sizes]
        sections.append(f"{what}; batch {BATCH}:\n\n{header}\n" + "\n".join(rows))
    cmd = "python bench/sampling.py" + (" --full" if args.full else "")
    record("sampling" if args.full else "sampling_quick", cmd,
           f"{torch.get_num_threads()} torch threads. Cached PixelCNN sampling (the default) "
           "against the naive reference, one after the other in this call.\n\n" + "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
