"""Two DDP workers of one CPU each against one worker of two CPUs, on this machine; writes
bench/results/layout.md.

    .venv/bin/python bench/layout.py [--rounds N]      (default 1 round; make bench-full: 2)

Stage 1 of ``configs/default.yaml`` (3 epochs) in each layout, alternating, each in a fresh
folder: items/s of epochs 2-3 (epoch 1 holds the start-up), the stage's wall seconds and its
validation bits/dim, read back from MLflow. ``cluster.num_workers=auto`` picks one worker per
node holding all of its CPUs (``pipeline.raycluster.resolve_layout``): this is its evidence.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import curve, metrics, record  # noqa: E402

LAYOUTS = {"2 workers × 1 CPU (DDP, gloo)": ["cluster.num_workers=2", "cluster.cpus_per_worker=1"],
           "1 worker × 2 CPUs (auto)": ["cluster.num_workers=auto"]}


def _stage1(overrides: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(ROOT / "configs" / "default.yaml"),
                               "stage1.epochs=3", *overrides, "--until", "stage1"], cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench: stage 1 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        client = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
        exp = client.get_experiment_by_name("hvae")
        run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hvae.stage") == "stage1")
        speed = curve(client, run, "images_per_s")
        return {"speed": statistics.mean(speed[1:]), "seconds": metrics(run)["stage1_seconds"],
                "val_bpd": metrics(run)["val_bpd"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    got = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name, overrides in LAYOUTS.items():
            got[name].append(_stage1(overrides))
            print(name, got[name][-1], flush=True)
    first = statistics.mean(g["speed"] for g in got[next(iter(LAYOUTS))])
    rows = []
    for name, runs in got.items():
        speed = statistics.mean(g["speed"] for g in runs)
        each = ", ".join(f"{g['speed']:.0f}" for g in runs)
        rows.append(f"| {name} | {speed:.0f} | {each} | **{speed / first:.2f}×** | "
                    f"{statistics.mean(g['seconds'] for g in runs):.0f} | {runs[-1]['val_bpd']:.4f} |")
    record("layout", "python bench/layout.py" + (f" --rounds {args.rounds}" if args.rounds != 1 else ""), "\n".join([
        f"Stage 1 of configs/default.yaml, 3 epochs, the two layouts alternating ({args.rounds} round(s)); "
        "items/s: the mean of epochs 2-3.", "",
        "| layout | items/s | per round | ratio | stage 1 wall s | val bits/dim |", "|---|---|---|---|---|---|", *rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
