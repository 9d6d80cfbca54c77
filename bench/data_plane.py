"""Memory and speed of the data plane; appends a section to BENCHMARKS.md.

    .venv/bin/python bench/data_plane.py [--images 200000] [--baseline REF] [--skip-folder] [--skip-throughput]

1. Memory does not grow with the data: a synthetic ImageFolder of ``--images`` PNG images at
   64x64 (10 classes, written once under bench/.cache/), then one stage-1 epoch on it (a tiny
   VQ-VAE-2, ``data.in_memory=false``: every image read and decoded by Ray Data tasks), and
   the same on the 5,000-image default. Peaks of the driver, of the largest Ray Train worker
   and of the largest other Ray worker (data tasks), sampled every 0.2 s: RSS, and its parts
   heap (RssAnon) and object-store pages (RssShmem); time to the first batch and items/s
   from the run's MLflow metrics.
2. Throughput on the default set: this tree's stage 1 against the tree at ``--baseline`` (the
   in-memory path it replaced), 3 epochs each, run one after the other in this one call;
   mean items/s of epochs 2-3 (epoch 1 includes start-up).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import curve, record  # noqa: E402

TINY = ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "vqvae2.hidden=16", "vqvae2.res_hidden=8", "vqvae2.res_blocks=1", "vqvae2.embed_dim=8",
        "vqvae2.codebook_size=[16,32]", "stage1.num_mixtures=2", "stage1.batch_size=128", "stage1.epochs=1",
        "stage1.recon_images=16", "--until", "stage1"]


# ---- the synthetic image folder ---------------------------------------------------------

def _write_chunk(args):
    from PIL import Image

    root, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        cls = i % 10
        yy, xx = np.mgrid[0:64, 0:64]
        base = (np.sin(xx / (3 + cls)) + np.cos(yy / (4 + rng.random() * 4))) * 60 + 128
        img = np.stack([base * rng.uniform(0.5, 1.0) for _ in range(3)], -1)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(Path(root) / f"c{cls}" / f"{i:07d}.png",
                                                                  compress_level=1)


def image_folder(n: int) -> Path:
    root = ROOT / "bench" / ".cache" / f"imagefolder_{n}"
    done = root / ".complete"
    if done.exists():
        return root
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 2000
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_chunk, [(str(root), s, min(s + step, n)) for s in range(0, n, step)])
    done.write_text(str(n))
    print(f"bench: wrote {n} PNG images at 64x64 under {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


# ---- one run, its memory sampled ----------------------------------------------------------

def _processes() -> dict[int, tuple[int, dict, str]]:
    """pid -> (parent pid, {"rss", "anon", "shmem"} bytes, command line), read from /proc (Linux).
    RSS = anon (the process's own heap: Python objects, tensors, Arrow buffers) + file (mapped
    code) + shmem (shared memory it has touched: for a Ray worker, pages of the node's object
    store, which count toward the store's fixed size, not toward the process)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024
                      for line in Path(f"/proc/{entry.name}/status").read_text().splitlines()
                      if line.startswith(("VmRSS:", "RssAnon:", "RssShmem:"))}
            mem = {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "shmem": fields["RssShmem"]}
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, KeyError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, mem, cmd)
    return out


def _rss_peaks(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peaks of the driver (``pid``), of its Ray Train workers and of its other Ray workers:
    ``<role>`` RSS, ``<role>_anon`` heap, ``<role>_shmem`` object-store pages, each its own peak."""
    while not stop.is_set():
        procs = _processes()
        tree, grew = {pid}, True
        while grew:
            new = {p for p, (ppid, _, _) in procs.items() if ppid in tree} - tree
            tree |= new
            grew = bool(new)
        for p in tree & procs.keys():
            _, mem, cmd = procs[p]
            role = ("driver" if p == pid else "train_worker" if "RayTrainWorker" in cmd
                    else "ray_worker" if cmd.startswith("ray::") else None)
            if role:
                for key, suffix in (("rss", ""), ("anon", "_anon"), ("shmem", "_shmem")):
                    peaks[role + suffix] = max(peaks.get(role + suffix, 0), mem[key])
        time.sleep(0.2)


def run(cwd: Path, args: list[str], pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hvae", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_rss_peaks, args=(proc.pid, stop, peaks), daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    stop.set()
    sampler.join()
    if proc.returncode:
        print(out[-4000:])
        raise SystemExit(f"bench: hvae run {' '.join(args)} failed ({proc.returncode})")
    return {"peaks": peaks, "seconds": time.perf_counter() - t0, **_metrics(cwd)}


def _metrics(cwd: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns.db")
    exp = client.get_experiment_by_name("hvae")
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hvae.stage") == "stage1")
    return {k: curve(client, run, key) for k, key in (("items_per_s", "images_per_s"), ("first_batch_s", "first_batch_s"),
                                                      ("data_wait_s", "data_wait_s"), ("epoch_s", "epoch_seconds"))}


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}"


# ---- the two measurements ---------------------------------------------------------------------

def memory_rows(sizes: list[int]) -> list[str]:
    rows = []
    runs = [("default (mnist5k, 5,000 images at 32x32)", [])]
    runs += [(f"imagefolder, {n:,} PNG images at 64x64",
              ["data.dataset=imagefolder", f"data.root={image_folder(n)}", "data.image_size=64"]) for n in sizes]
    for name, args in runs:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp), [str(ROOT / "configs" / "default.yaml"), "data.in_memory=false", *args, *TINY])
        p = r["peaks"]
        cells = [_mib(p.get(k, 0)) for k in ("driver", "driver_anon", "train_worker", "train_worker_anon",
                                             "train_worker_shmem", "ray_worker", "ray_worker_anon")]
        rows.append(f"| {name} | {' | '.join(cells)} | {r['first_batch_s'][0]:.1f} | {r['items_per_s'][0]:.0f} | "
                    f"{r['data_wait_s'][0]:.1f} | {r['seconds']:.0f} |")
        print(rows[-1], flush=True)
    return rows


def throughput_rows(baseline: str) -> list[str]:
    base = Path(tempfile.mkdtemp(prefix="hvae-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(base), baseline], cwd=ROOT, check=True,
                   capture_output=True)
    rows = []
    try:
        for name, tree in ((f"baseline {baseline} (arrays in the object store)", base), ("this tree (Ray Data)", ROOT)):
            with tempfile.TemporaryDirectory() as tmp:
                r = run(Path(tmp), [str(tree / "configs" / "default.yaml"), "stage1.epochs=3", "cluster.num_workers=2",
                                    "cluster.cpus_per_worker=1", "--until", "stage1"],
                        pythonpath=str(tree))
            speed = r["items_per_s"]
            rows.append((name, float(np.mean(speed[1:])), speed))
            print(name, speed, flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    ref = rows[0][1]
    return [f"| {name} | {mean:.0f} | {', '.join(f'{s:.0f}' for s in speed)} | {mean / ref:.2f}× |"
            for name, mean, speed in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="200000", help="image folder sizes, comma-separated (e.g. 5000,60000)")
    ap.add_argument("--baseline", default="60c465e")
    ap.add_argument("--skip-folder", action="store_true", help="only the throughput comparison")
    ap.add_argument("--skip-throughput", action="store_true", help="only the memory rows")
    a = ap.parse_args()
    sizes = [int(n) for n in a.images.split(",")]
    flags = ("" if a.skip_folder else f" --images {a.images}") + (" --skip-folder" if a.skip_folder else "") + \
        (" --skip-throughput" if a.skip_throughput else f" --baseline {a.baseline}")
    lines = []
    if not a.skip_folder:
        lines += ["One stage-1 epoch, tiny VQ-VAE-2, 2 workers × 1 CPU, `data.in_memory=false` (every image read "
                  "and decoded by Ray Data tasks sharing the workers' CPUs, `data.decode_cpus=0`).\n",
                  "Peak MiB of each: RSS, heap (RssAnon: the process's own memory) and, for the training "
                  "workers, object-store pages (RssShmem: shared pages of the node's object store it has "
                  "touched, bounded by the store's size, not by the process).\n",
                  "| data | driver RSS | driver heap | train worker RSS | its heap | its object-store pages | "
                  "other Ray worker RSS | its heap | first batch s | items/s | data wait s | run s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|",
                  *memory_rows(sizes), ""]
    if not a.skip_throughput:
        lines += ["Stage-1 throughput on the default set (configs/default.yaml, 3 epochs), the two trees one after "
                  "the other in this call:\n",
                  "| code | items/s (epochs 2-3) | per epoch | ratio |", "|---|---|---|---|",
                  *throughput_rows(a.baseline)]
    record("data_plane", f"python bench/data_plane.py{flags}", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
