"""Time the pipeline stage by stage and append the table to BENCHMARKS.md.

    .venv/bin/python bench/pipeline.py [CONFIG] [key=value ...]     (default: configs/default.yaml)

Runs `hvae run` in a fresh temporary folder (nothing reused), then reads each stage's
wall time, training throughput (mean items/s over epochs, from the MLflow curve) and
headline metrics back from MLflow.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import config_and_overrides, curve, fresh_run, metrics, record  # noqa: E402
HEADLINE = ("val_bpd", "val_bits_per_code", "test_nll_bpd", "test_nll_nats")


def main(argv: list[str]) -> int:
    config, overrides = config_and_overrides(argv)
    with fresh_run(config, overrides) as (_, total, client, children):
        rows = []
        for run in sorted(children.values(), key=lambda r: r.info.start_time):
            stage, m = run.data.tags["hvae.stage"], metrics(run)
            speed = curve(client, run, "images_per_s")
            shown = ", ".join(f"{k} {m[k]:.4g}" for k in HEADLINE if k in m)
            rows.append(f"| {stage} | {m.get(stage + '_seconds', float('nan')):.1f} | "
                        f"{statistics.mean(speed):.0f} | {shown} |" if speed else
                        f"| {stage} | {m.get(stage + '_seconds', float('nan')):.1f} | – | {shown} |")
    cmd = " ".join(["python bench/pipeline.py", os.path.relpath(config, ROOT), *overrides])
    stem = Path(config).stem
    record("pipeline" if stem == "default" else f"pipeline_{stem}", cmd, "\n".join([
        f"Whole `hvae run` (Ray start, data, MLflow, all stages): **{total:.0f} s**.", "",
        "| stage | wall s | train items/s (mean over epochs) | final metrics |", "|---|---|---|---|", *rows,
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
