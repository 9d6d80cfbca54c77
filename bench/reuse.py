"""A fully reused pipeline: how long `hvae run` takes when every stage has a finished run.

    .venv/bin/python bench/reuse.py [CONFIG] [--grow GIB]   (default: configs/smoke.yaml, 1 GiB)

In a fresh temporary folder: the pipeline once (every stage runs), then the same command
five times (every stage reused), wall seconds each and their median. Interleaved with these, the
same run three other ways, five times each, each with one more of the changes that made it fast
undone: every file's imports parsed with ``ast`` (the import cache of ``pipeline/fingerprint.py``
neither read nor written: the code before it); then also what is held once MLflow's store is open
left unfrozen (``tracking._freeze_long_lived`` made a no-op); then also ``pipeline.cli.main`` with
a plain exit (the interpreter collects its garbage at exit, which ``cli.entry`` skips with
``gc.freeze()``) and the collector left on while MLflow is imported (``tracking._collector_paused``
made a no-op): what ``hvae`` did before all four. Then one more reused run under ``python -X importtime``: what
its imports cost, by top-level package (the interpreter's own start-up, ``python -c pass``,
measured apart); and, three times, what
MLflow's client alone costs before it can answer: import it, open the run's SQLite store,
list its experiments (a reused run cannot do less: it asks MLflow for each stage's run).
Last, the extract run's codes grown by ``--grow`` GiB (default 1: the codes of ~100k images at the
VQ-VAE-2 paper's 32×32 and 64×64 maps, int16; a file added to its artifacts and its manifest), a
reused run three times as it is (a reused run's manifest checked against the store's listing,
only pictures and tables downloaded) interleaved with three that download every reused run whole
and hash it (``_Fetcher.glance`` made the whole fetch: the code before).
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))
from common import record  # noqa: E402


PARSE = ("import hvae.pipeline.fingerprint as f; f._ImportCache._read = staticmethod(lambda path: {}); "
         "f._ImportCache.save = lambda self: None; ")
PARSED = ("-c", f"import sys; {PARSE}from hvae.pipeline.cli import entry; sys.exit(entry())")
UNFROZEN = ("-c", f"import sys; {PARSE}import hvae.pipeline.tracking as t; t._freeze_long_lived = lambda: None; "
                  "from hvae.pipeline.cli import entry; sys.exit(entry())")
WHOLE = ("-c", "import sys; import hvae.pipeline.runner as r; r._Fetcher.glance = r._Fetcher.__call__; "
                "from hvae.pipeline.cli import entry; sys.exit(entry())")
COLLECTED = ("-c", f"import contextlib, sys; {PARSE}import hvae.pipeline.tracking as t; "
                   "t._collector_paused = contextlib.nullcontext; from hvae.pipeline.cli import main; sys.exit(main())")


def _run(cwd: str, config: str, *flags: str, program: tuple[str, ...] = ("-m", "hvae")
         ) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *flags, *program, "run", config], cwd=cwd,
                          capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def _client_start(cwd: str) -> float:
    """Seconds for a fresh interpreter to import MLflow's client and answer from the store in ``cwd``."""
    code = ("import time; t0 = time.perf_counter(); from mlflow.tracking import MlflowClient; "
            "MlflowClient('sqlite:///mlruns.db').search_experiments(); print(time.perf_counter() - t0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _imports(stderr: str) -> dict[str, float]:
    """Seconds of the top-level imports in ``-X importtime`` output, by top-level package."""
    by = defaultdict(float)
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and not m.group(2):  # not indented: imported by the program itself, not by a module
            by[m.group(3).split(".")[0]] += int(m.group(1)) / 1e6
    return dict(by)


def _grow(cwd: str, gib: float) -> None:
    """Add a file of ``gib`` GiB to the codes of the extract run in ``cwd``'s store, and to its
    manifest (with its size and sha256), as if it had encoded that much more."""
    import hashlib
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`hvae.stage` = 'extract'")[0]
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    chunk, digest, left = os.urandom(1 << 24), hashlib.sha256(), int(gib * 2**30)
    with open(root / "codes" / "train" / "grown.bin", "wb") as f:
        while left > 0:
            part = chunk[:left]
            f.write(part)
            digest.update(part)
            left -= len(part)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["codes/train/grown.bin"] = {"size": int(gib * 2**30), "sha256": digest.hexdigest()}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def main(argv: list[str]) -> int:
    gib = float(argv[argv.index("--grow") + 1]) if "--grow" in argv else 1.0
    argv = [a for i, a in enumerate(argv) if a != "--grow" and (i == 0 or argv[i - 1] != "--grow")]
    config = os.path.abspath(argv[0]) if argv else str(ROOT / "configs" / "smoke.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        first, proc = _run(tmp, config)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.returncode
        again, parsed, unfrozen, old = [], [], [], []
        for _ in range(5):
            for times, program in ((again, ("-m", "hvae")), (parsed, PARSED), (unfrozen, UNFROZEN),
                                   (old, COLLECTED)):
                secs, proc = _run(tmp, config, program=program)
                if proc.returncode or "REUSED" not in proc.stdout or " FINISHED " in proc.stdout:
                    print(f"bench: the re-run did not reuse every stage:\n{proc.stdout[-3000:]}")
                    return 1
                times.append(secs)
        traced, proc = _run(tmp, config, "-X", "importtime")
        imports = _imports(proc.stderr)
        client = statistics.median(_client_start(tmp) for _ in range(3))
        _grow(tmp, gib)
        glanced, whole = [], []
        for _ in range(3):
            for times, program in ((glanced, ("-m", "hvae")), (whole, WHOLE)):
                secs, proc = _run(tmp, config, program=program)
                if proc.returncode or " FINISHED " in proc.stdout:
                    print(f"bench: the re-run did not reuse every stage:\n{proc.stdout[-3000:]}")
                    return 1
                times.append(secs)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t0
    top = sorted(imports.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} {secs:.2f}" for name, secs in top[:8] if secs >= 0.01)
    cmd = ("python bench/reuse.py" + (f" {os.path.relpath(config, ROOT)}" if argv else "")
           + (f" --grow {gib:g}" if gib != 1.0 else ""))
    record("reuse", cmd, "\n".join([
        f"`hvae run {os.path.relpath(config, ROOT)}` in a fresh folder: **{first:.1f} s** with every stage run; "
        f"again with every stage reused: {', '.join(f'{s:.2f}' for s in again)} s, "
        f"**median {statistics.median(again):.2f} s**.", "",
        f"Interleaved with these, each with one more change undone: every file's imports parsed (the code "
        f"before the import cache): {', '.join(f'{s:.2f}' for s in parsed)} s, median "
        f"{statistics.median(parsed):.2f} s, **{statistics.median(parsed) / statistics.median(again):.2f}×** "
        f"the time now; also what is held once MLflow's store is open left unfrozen: "
        f"{', '.join(f'{s:.2f}' for s in unfrozen)} s, median {statistics.median(unfrozen):.2f} s, "
        f"**{statistics.median(unfrozen) / statistics.median(again):.2f}×**; also a plain exit and the "
        f"collector on while MLflow is imported (the code before the four): "
        f"{', '.join(f'{s:.2f}' for s in old)} s, median {statistics.median(old):.2f} s, "
        f"**{statistics.median(old) / statistics.median(again):.2f}×**.", "",
        f"One more reused run under `-X importtime` ({traced:.2f} s, the tracing included): imports "
        f"{sum(imports.values()):.2f} s in all, by package: {shown}. The interpreter alone "
        f"(`python -c pass`): {bare:.2f} s.", "",
        f"MLflow's client alone (import, open the SQLite store, list experiments; median of 3): "
        f"**{client:.2f} s**, which every reused run pays.", "",
        f"The extract run's codes grown by {gib:g} GiB: a reused run as it is (manifests against the "
        f"store's listing, pictures and tables downloaded): {', '.join(f'{s:.2f}' for s in glanced)} s, "
        f"median **{statistics.median(glanced):.2f} s**; downloading every reused run whole and hashing it "
        f"(the code before): {', '.join(f'{s:.2f}' for s in whole)} s, median {statistics.median(whole):.2f} s, "
        f"**{statistics.median(whole) / statistics.median(glanced):.1f}×** the time now.",
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
