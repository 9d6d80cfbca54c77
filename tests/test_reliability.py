"""Held wrong, it still answers: what cannot be had, or cannot be reached, ends in one line and
exit 2, in bounded time (RELIABILITY.md lists every case and its answer)."""
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, runs, stage_runs
from hvae.pipeline.raycluster import fits


def test_how_many_workers_a_cluster_can_place():
    two_cpus, gpu_node = {"CPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}
    assert fits([two_cpus], {"CPU": 0.5}) == 4
    assert fits([two_cpus], {"CPU": 1.0, "GPU": 1.0}) == 0
    assert fits([two_cpus, gpu_node], {"CPU": 2.0, "GPU": 1.0}) == 2
    assert fits([gpu_node, gpu_node], {"CPU": 1.0}, strict_spread=True) == 2


@pytest.mark.parametrize("override,line", [
    ("cluster.use_gpu=true", "stage1 (cluster.num_workers=2, cluster.cpus_per_worker=0.5, cluster.use_gpu=true) "
                             "asks for 2 × (0.5 CPU and 1 GPU); the Ray cluster (1 node: 2 CPU) can place 0: "
                             "set cluster.use_gpu=false, or run where GPUs are"),
    ("cluster.num_workers=16", "stage1 (cluster.num_workers=16, cluster.cpus_per_worker=0.5) asks for 16 × (0.5 CPU); "
                               "the Ray cluster (1 node: 2 CPU) can place 4: lower cluster.num_workers or "
                               "cluster.cpus_per_worker (or cluster.num_workers=auto)"),
])
def test_resources_the_cluster_cannot_hold_end_in_one_line_not_a_hang(tmp_path, override, line):
    """Ray would wait for them forever (a traceback every minute, Ctrl-C ignored)."""
    proc = subprocess.run([sys.executable, "-m", "hvae", "run", SMOKE, override, "--until", "stage1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[-1] == f"error: stage stage1 failed: ResourceError: {line}"
    _, all_runs = runs(tmp_path)
    assert [r.info.status for r in stage_runs(all_runs, "stage1")] == ["FAILED"]


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hvae_line(cwd, *args, timeout=60):
    """Run the CLI -> (exit code, its last line of output)."""
    proc = subprocess.run([sys.executable, "-m", "hvae", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr).rstrip().splitlines()[-1]


@pytest.mark.parametrize("dry", [[], ["--dry-run"]])
def test_a_tracking_server_or_ray_cluster_that_does_not_answer_is_named_at_once(tmp_path, dry):
    port = _closed_port()
    code, line = hvae_line(tmp_path, "run", SMOKE, f"tracking.uri=http://127.0.0.1:{port}", *dry)
    assert (code, line) == (2, f"error: tracking.uri=http://127.0.0.1:{port} does not answer "
                               f"(Connection refused; 10 s allowed)")
    code, line = hvae_line(tmp_path, "run", SMOKE, f"cluster.address=127.0.0.1:{port}", *dry)
    assert (code, line) == (2, f"error: cluster.address=127.0.0.1:{port}: no Ray cluster answers at "
                               f"127.0.0.1:{port} (Connection refused; 10 s allowed)")
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no store created


def test_a_server_that_accepts_but_never_answers_is_given_up_on_after_its_time_out(tmp_path):
    with socket.socket() as server:  # listens, never replies
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        # (left to MLflow: four minutes of retries, past hvae_line's 60 s)
        code, line = hvae_line(tmp_path, "run", SMOKE, f"tracking.uri=http://127.0.0.1:{port}", "tracking.timeout_s=1")
    assert (code, line) == (2, f"error: tracking.uri=http://127.0.0.1:{port} does not answer (no answer in 1 s; "
                               f"1 s allowed)")


_LISTING = """
import json, os, ray
from hvae.settings.config import load_config
from hvae.pipeline.raycluster import connect

connect(load_config({smoke!r}).cluster)
ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(4)])  # workers started too
children = {{}}
for stat in os.listdir("/proc"):
    try:
        ppid = int(open(f"/proc/{{stat}}/stat").read().rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat))
    except (ValueError, OSError, IndexError):
        pass
ours, todo = set(), [os.getpid()]
while todo:
    ours.add(pid := todo.pop())
    todo += children.get(pid, [])
inodes = {{}}
for pid in ours:
    try:
        for fd in os.listdir(f"/proc/{{pid}}/fd"):
            link = os.readlink(f"/proc/{{pid}}/fd/{{fd}}")
            if link.startswith("socket:["):
                inodes[link[8:-1]] = open(f"/proc/{{pid}}/comm").read().strip()
    except OSError:
        pass
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).read().splitlines()[1:]:
        cells = row.split()
        if cells[3] == "0A" and cells[9] in inodes:  # LISTEN, one of ours
            listening.append([cells[1], inodes[cells[9]]])
print(json.dumps(listening))
"""
_LOOPBACK = {"0100007F",  # 127.0.0.1 in /proc/net/tcp's byte order
             "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
             "00000000000000000000000001000000"}  # ::1


def test_the_local_ray_opens_every_port_on_loopback_only():
    """Ray 2.60 binds its GCS, raylet, worker and metrics servers to all interfaces unless the
    node's address is 127.0.0.1 (RELIABILITY.md, ports)."""
    import json

    proc = subprocess.run([sys.executable, "-c", _LISTING.format(smoke=SMOKE)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for _, name in listening}
    assert {"gcs_server", "raylet"} <= names and len(listening) >= 8, listening
    assert [(address, name) for address, name in listening if address.split(":")[0] not in _LOOPBACK] == []


@pytest.mark.parametrize("command", [["status", "raysubmit_123"], ["stop", "raysubmit_123"],
                                     ["submit", "configs/smoke.yaml"]])
def test_a_job_server_that_does_not_answer_is_named_in_one_line(command):
    port = _closed_port()
    code, line = hvae_line(ROOT, *command, "--address", f"http://127.0.0.1:{port}")
    assert (code, line) == (2, f"error: --address=http://127.0.0.1:{port} does not answer "
                               f"(Connection refused; 10 s allowed)")


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(tmp_path, capsys):
    """One flipped byte inside state.pt leaves a readable zip that torch loads: only its sha256,
    kept in meta.json, tells."""
    import json

    import torch

    from hvae.stages import checkpoints

    for epoch in (0, 1):
        folder = tmp_path / "stage1-abc" / f"checkpoint_00000{epoch}"
        folder.mkdir(parents=True)
        checkpoints.save(folder, {"model": {"w": torch.full((4096,), float(epoch))}}, {"epoch": epoch})
    assert checkpoints.newest(str(tmp_path), "stage1-abc").epoch == 1
    state = tmp_path / "stage1-abc" / "checkpoint_000001" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    torch.load(state, weights_only=True)  # (torch itself does not notice)
    found = checkpoints.newest(str(tmp_path), "stage1-abc")
    assert found.epoch == 0 and found.load()[0]["model"]["w"][0] == 0.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: the checkpoint of epoch 2" in err and "passed over" in err
    meta = tmp_path / "stage1-abc" / "checkpoint_000001" / "meta.json"  # one written before sha256s: trusted
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "state_sha256"}))
    assert checkpoints.newest(str(tmp_path), "stage1-abc").epoch == 1


def test_an_unreadable_image_is_named_or_with_on_bad_image_skip_left_out(tmp_path):
    """data.on_bad_image=fail (the default) stops the stage in one line naming the file (it was
    Ray Data's advice on retries); skip checks every image once and trains on the rest."""
    from test_datasets import _image_folder, _plant_bad_images

    root = tmp_path / "img"
    _image_folder(root, per_class=40)
    _plant_bad_images(root)
    args = [sys.executable, "-m", "hvae", "run", SMOKE, "data.dataset=imagefolder", f"data.root={root}",
            "stage1.epochs=1", "stage1.batch_size=16", "--until", "stage1"]
    failed = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    last = failed.stdout.rstrip().splitlines()[-1]
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert re.fullmatch(r"error: stage stage1 failed: ValueError: cannot read image \S+/img/(dogs/3|cats/[57])\.png: "
                        r".+ \(data\.on_bad_image=skip leaves unreadable images out\) \(full traceback: .+\)", last), last
    skipped = subprocess.run(args + ["data.on_bad_image=skip"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert skipped.returncode == 0, skipped.stdout[-3000:] + skipped.stderr[-3000:]
    assert "[hvae] data: 3 of 80 images cannot be read and are left out;" in skipped.stdout
    assert re.search(r"\[hvae\] data imagefolder: train 62, val 7, test 8 images of 3x32x32 "
                     r"\(3 unreadable left out\)", skipped.stdout), skipped.stdout[:3000]
    _, all_runs = runs(tmp_path)
    assert sorted(r.info.status for r in stage_runs(all_runs, "stage1")) == ["FAILED", "FINISHED"]
