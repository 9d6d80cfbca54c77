"""Time the pipeline stage by stage and append the table to BENCHMARKS.md.

    .venv/bin/python bench/pipeline.py [CONFIG] [key=value ...]     (default: configs/default.yaml)

Runs `hvae run` in a fresh temporary folder (nothing reused), then reads each stage's
wall time, training throughput (mean items/s over epochs, from the MLflow curve) and
headline metrics back from MLflow.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402
HEADLINE = ("val_bpd", "val_bits_per_code", "test_nll_bpd", "test_nll_nats")


def main(argv: list[str]) -> int:
    from mlflow.tracking import MlflowClient

    config = os.path.abspath(argv[0]) if argv and "=" not in argv[0] else str(ROOT / "configs" / "default.yaml")
    overrides = [a for a in argv if "=" in a]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", config, *overrides], cwd=tmp)
        total = time.perf_counter() - t0
        if proc.returncode:
            print(f"bench: hvae run failed ({proc.returncode})")
            return proc.returncode
        client = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
        exp = client.get_experiment_by_name("hvae")
        rows = []
        children = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])
                    if "hvae.stage" in r.data.tags}
        for run in sorted(children.values(), key=lambda r: r.info.start_time):
            stage, m = run.data.tags["hvae.stage"], run.data.metrics
            speed = [p.value for p in client.get_metric_history(run.info.run_id, "images_per_s")]
            shown = ", ".join(f"{k} {m[k]:.4g}" for k in HEADLINE if k in m)
            rows.append(f"| {stage} | {m.get(stage + '_seconds', float('nan')):.1f} | "
                        f"{statistics.mean(speed):.0f} | {shown} |" if speed else
                        f"| {stage} | {m.get(stage + '_seconds', float('nan')):.1f} | – | {shown} |")
    cmd = " ".join(["python bench/pipeline.py", os.path.relpath(config, ROOT), *overrides])
    record("pipeline", cmd, "\n".join([
        f"Whole `hvae run` (Ray start, data, MLflow, all stages): **{total:.0f} s**.", "",
        "| stage | wall s | train items/s (mean over epochs) | final metrics |", "|---|---|---|---|", *rows,
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
