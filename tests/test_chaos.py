"""Chaos: a smoke pipeline killed with SIGKILL at random moments, and started again each time,
ends with the NLL of an uninterrupted run and no run left RUNNING.

`make chaos` (not in `make test`: it takes several minutes); RELIABILITY.md has its counts.
A moment kills either the driver with the local Ray it started (its whole process group: a
crashed machine or a killed shell) or one process of Ray's (a training worker, an actor, a
task: a lost worker). `HVAE_CHAOS_SEED` picks the moments.
"""
import os
import random
import re
import signal
import subprocess
import time

import pytest

from conftest import SMOKE, hvae, hvae_background, kill_group, runs

pytestmark = pytest.mark.chaos
KILLS = 5


def _nll(stdout: str) -> str:
    return re.search(r"\| ≤ ([0-9.]+) ± [0-9.]+ \| ≤ ([0-9.]+) ± [0-9.]+ \|", stdout).group(0)


def _ray_processes(group: int) -> list[int]:
    """Ray's worker processes (ray::...) of the process group ``group``."""
    ps = subprocess.run(["ps", "-eo", "pid,pgid,args"], capture_output=True, text=True).stdout
    return [int(p) for p, g, *args in (line.split(None, 2) for line in ps.splitlines()[1:])
            if int(g) == group and args and args[0].startswith("ray::")]


def test_killed_at_random_moments_and_started_again_it_ends_with_the_same_nll(tmp_path):
    rng = random.Random(int(os.environ.get("HVAE_CHAOS_SEED", "0")))
    straight_dir, chaos_dir = tmp_path / "straight", tmp_path / "chaos"
    straight_dir.mkdir()
    chaos_dir.mkdir()
    straight = hvae(straight_dir, "run", SMOKE)
    assert straight.returncode == 0, straight.stdout[-3000:]

    kills, starts, what = 0, 0, []
    while True:
        starts += 1
        proc = hvae_background(chaos_dir, "run", SMOKE, log=chaos_dir / f"run{starts}.log")
        if kills < KILLS:
            deadline = time.time() + rng.uniform(3, 45)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            if proc.poll() is None:
                workers = _ray_processes(proc.pid)
                if workers and rng.random() < 0.5:
                    victim = rng.choice(workers)
                    os.kill(victim, signal.SIGKILL)
                    what.append("a Ray worker")
                    try:
                        proc.wait(timeout=600)  # it goes on, or its stage fails
                    finally:
                        kill_group(proc)
                else:
                    kill_group(proc)
                    what.append("the driver and its Ray")
                kills += 1
                continue
        proc.wait(timeout=900)
        log = (chaos_dir / f"run{starts}.log").read_text()
        if proc.returncode == 0:
            break
        assert starts < 20, log[-3000:]
    assert _nll(log) == _nll(straight.stdout)
    client, all_runs = runs(chaos_dir)
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    print(f"\nchaos: {kills} kills ({', '.join(what)}), {starts} starts, the NLL of the uninterrupted run: "
          f"{_nll(log)}; runs: " + ", ".join(f"{s} {sum(r.info.status == s for r in all_runs)}"
                                             for s in ("FINISHED", "KILLED", "FAILED")))
