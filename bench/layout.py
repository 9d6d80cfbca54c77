"""Two DDP workers of one CPU each against one worker of two CPUs, on this machine; writes
bench/results/layout.md.

    .venv/bin/python bench/layout.py [--rounds N]      (default 1 round; make bench-full: 2)

Stage 1 of ``configs/default.yaml`` (3 epochs) in each layout, alternating, each in a fresh
folder: items/s of epochs 2-3 (epoch 1 holds the start-up), the stage's wall seconds and its
validation bits/dim, read back from MLflow. ``cluster.num_workers=auto`` picks one worker per
node holding all of its CPUs (``pipeline.raycluster.resolve_layout``): this is its evidence.

Then the scoring stage's actors: ``configs/pixelvae.yaml`` trained 1 epoch, its test split
scored (importance-weighted, K = 4, 10 batches of 50) by one Ray Data actor of one CPU (``evaluate.num_actors=1``,
the old default) and by ``auto`` (one actor per CPU, ``stages.data.actor_pool``), each with
``--force evaluate`` in the same folder: the evaluate stage's wall seconds, and its NLL (the same).
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
        proc = subprocess.run([sys.executable, "-m", "hvae", "run", str(ROOT / "configs" / "default.yaml"),
                               "stage1.epochs=3", *overrides, "--until", "stage1"], cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench: stage 1 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        client = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
        exp = client.get_experiment_by_name("hvae")
        run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hvae.stage") == "stage1")
        speed = curve(client, run, "images_per_s")
        return {"speed": statistics.mean(speed[1:]), "seconds": metrics(run)["stage1_seconds"],
                "val_bpd": metrics(run)["val_bpd"]}


def _scoring() -> dict:
    """evaluate stage seconds and NLL of one actor and of auto, in one trained PixelVAE's folder."""
    from mlflow.tracking import MlflowClient

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, actors in (("1 actor × 1 CPU (the old default)", "1"), ("auto: one actor per CPU", "auto")):
            proc = subprocess.run([sys.executable, "-m", "hvae", "run", str(ROOT / "configs" / "pixelvae.yaml"),
                                   "stage1.epochs=1", "evaluate.iw_samples=4", "evaluate.batch_size=50",
                                   f"evaluate.num_actors={actors}",
                                   "--force", "evaluate"], cwd=tmp, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"bench: the PixelVAE run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            client = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
            exp = client.get_experiment_by_name("hvae")
            run = client.search_runs([exp.experiment_id], "tags.`hvae.stage` = 'evaluate'",
                                     order_by=["attributes.start_time DESC"], max_results=1)[0]
            got = metrics(run)
            out[name] = {"seconds": got["evaluate_seconds"], "nll": got["test_nll_nats"],
                         "se": got["test_nll_nats_se"], "actors": run.data.tags.get("hvae.actors", "?")}
            print(name, out[name], flush=True)
    return out


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
    scoring = _scoring()
    base = next(iter(scoring.values()))["seconds"]
    score_rows = [f"| {name} | {g['actors']} | {g['seconds']:.1f} | **{base / g['seconds']:.2f}×** | "
                  f"{g['nll']:.2f} ± {g['se']:.2f} |" for name, g in scoring.items()]
    record("layout", "python bench/layout.py" + (f" --rounds {args.rounds}" if args.rounds != 1 else ""), "\n".join([
        f"Stage 1 of configs/default.yaml, 3 epochs, the two layouts alternating ({args.rounds} round(s)); "
        "items/s: the mean of epochs 2-3.", "",
        "| layout | items/s | per round | ratio | stage 1 wall s | val bits/dim |", "|---|---|---|---|---|---|", *rows,
        "", "The evaluate stage of configs/pixelvae.yaml (1 epoch of training; the test split's 500 images, "
        "importance-weighted with K = 4, in batches of 50), its actors as the row says, one after the other in one folder:", "",
        "| actors | pool | evaluate wall s | speed-up | test NLL, nats ± s.e. |", "|---|---|---|---|---|",
        *score_rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
