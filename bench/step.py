"""Training-step speed and compute efficiency; writes bench/results/step.md (--full) or step_quick.md.

    .venv/bin/python bench/step.py [--full]

1. Stage 1 against the reference VQ-VAE-2 code at the reference's sizes (RGB 32x32, 128
   channels, 2 residual blocks of 32, 512 codes of 64 dimensions per level, batch 128, Adam;
   ``bench/reference_vqvae2.py``): images/s of one training step (forward, backward, Adam),
   the reference (MSE) and hvae's VQ-VAE-2 with its default likelihood (a 5-component
   discretized logistic mixture) and variants: one logistic; ``train.precision=bf16``
   (autocast; the likelihood and the quantizer stay float32); that and ``train.compile=true``
   (compiled in the warm-up steps); ``--full`` adds channels_last and compile alone. In
   interleaved rounds in this one process, on 2 torch threads; the median round of each.
2. Compute efficiency: FLOPs of each step (``torch.utils.flop_counter``: convolutions and
   matrix products, forward and backward) over its time, against this machine's float32
   matrix-product FLOP/s (2048x2048, the same threads); the same for a prior training step
   (``configs/default.yaml``'s priors, the bottom prior on 16x16 maps conditioned on 8x8).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402
from reference_vqvae2 import ReferenceVQVAE2, train_step as reference_step  # noqa: E402

THREADS, BATCH, SIZE = 2, 128, 32


def _ours(**kw):
    from hvae.models.vqvae2 import VQVAE2
    from hvae.stages.families import model_args

    torch.manual_seed(0)
    return VQVAE2(**model_args("vqvae2", in_channels=3, levels=2, hidden=128, res_hidden=32, res_blocks=2,
                               embed_dim=64, codebook_size=512, **kw))


def _compiled():
    from hvae.stages.train_loop import compile_model

    model = _ours()
    compile_model(model)  # (as stage 1 does with train.compile=true)
    return model


def _our_step(model, optimizer, x, autocast=None):
    """What stage 1's VQTask.train_step does: NLL plus commitment per image, over the pixel dimensions."""
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(x)
    loss = (out["nll"] + out["commit"]).mean() / x[0].numel()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _variants(full: bool) -> dict:
    """name -> (model, step function(model, optimizer, x))."""
    torch.manual_seed(0)
    out = {"reference (MSE)": (ReferenceVQVAE2(), reference_step)}
    out["hvae, 5-logistic mixture (default)"] = (_ours(), _our_step)
    out["hvae, 1 logistic"] = (_ours(num_mixtures=1), _our_step)
    bf16 = torch.bfloat16
    out["hvae, default, bf16 autocast"] = (_ours(), lambda m, o, x: _our_step(m, o, x, bf16))
    out["hvae, default, torch.compile + bf16 autocast"] = (_compiled(), lambda m, o, x: _our_step(m, o, x, bf16))
    if full:
        out["hvae, default, channels_last"] = (_ours().to(memory_format=torch.channels_last), _our_step)
        out["hvae, default, torch.compile"] = (_compiled(), _our_step)
    return out


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _matmul_flops_per_s() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def _prior_step():
    from hvae.settings.config import load_config
    from hvae.models.pixelcnn import GatedPixelCNN

    cfg = load_config(str(ROOT / "configs" / "default.yaml"), [])
    p, sizes = cfg.priors, cfg.vqvae2.codebook_size
    torch.manual_seed(0)
    net = GatedPixelCNN(sizes[-1], p.hidden, p.layers, p.kernel, cond_codes=sizes[-2], cond_factor=2)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    codes = torch.randint(0, sizes[-1], (p.batch_size, 16, 16))
    cond = torch.randint(0, sizes[-2], (p.batch_size, 8, 8))

    def step():
        loss = -net.log_prob(codes, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    what = (f"bottom prior of configs/default.yaml (hidden {p.hidden}, {p.layers} layers, kernel {p.kernel}, "
            f"{sizes[-1]} codes on 16x16, conditioned on {sizes[-2]} codes on 8x8), batch {p.batch_size}")
    return step, p.batch_size, what


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="more rounds and steps")
    args = ap.parse_args()
    rounds, steps = (5, 10) if args.full else (3, 4)
    torch.set_num_threads(THREADS)
    x = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    variants = _variants(args.full)
    state = {name: (m, torch.optim.Adam(m.parameters(), lr=3e-4), fn) for name, (m, fn) in variants.items()}
    for name, (m, opt, fn) in state.items():  # warm-up (first-step allocations, the codebooks' start)
        xin = x.contiguous(memory_format=torch.channels_last) if "channels_last" in name else x
        for _ in range(2):
            fn(m, opt, xin)
    speed = {name: [] for name in state}
    for r in range(rounds):
        for name, (m, opt, fn) in state.items():
            xin = x.contiguous(memory_format=torch.channels_last) if "channels_last" in name else x
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(m, opt, xin)
            speed[name].append(BATCH * steps / (time.perf_counter() - t0))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {s[-1]:.0f}" for n, s in speed.items()), flush=True)
    ref = statistics.median(speed["reference (MSE)"])
    peak = _matmul_flops_per_s()
    rows = []
    for name, (m, opt, fn) in state.items():
        med = statistics.median(speed[name])
        flops = _flops(lambda: fn(m, opt, x)) if name.endswith(("(MSE)", "(default)", "logistic")) else None
        eff = (f"{flops / 1e9:.1f} | {flops * med / BATCH / 1e9:.1f} | {100 * flops * med / BATCH / peak:.0f} %"
               if flops else "– | – | –")
        rows.append(f"| {name} | {med:.0f} | {', '.join(f'{s:.0f}' for s in speed[name])} | **{med / ref:.2f}×** | {eff} |")
    prior, prior_batch, prior_what = _prior_step()
    prior()
    t0 = time.perf_counter()
    for _ in range(steps):
        prior()
    prior_s = (time.perf_counter() - t0) / steps
    prior_flops = _flops(prior)
    body = "\n".join([
        f"Stage-1 training steps at the reference's sizes (RGB {SIZE}×{SIZE}, batch {BATCH}, {THREADS} torch threads; "
        f"{rounds} interleaved rounds of {steps} steps each, after 2 warm-up steps; images/s of the median round). "
        f"FLOPs: convolutions and matrix products of one step, forward and backward (`torch.utils.flop_counter`); "
        f"this machine's float32 matrix product: **{peak / 1e9:.1f} GFLOP/s** (2048², best of 5).", "",
        "| step | images/s | per round | vs reference | GFLOP per step | achieved GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Prior training step, {prior_what}: {1000 * prior_s:.0f} ms a step ({prior_batch / prior_s:.0f} maps/s), "
        f"{prior_flops / 1e9:.1f} GFLOP a step, **{prior_flops / prior_s / 1e9:.1f} GFLOP/s, "
        f"{100 * prior_flops / prior_s / peak:.0f} % of the matmul peak**.",
    ])
    record("step" if args.full else "step_quick", "python bench/step.py" + (" --full" if args.full else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
