"""Tune's experiment folder on a local storage path (pipeline.whole_files): a driver killed while
Tune copies its snapshot there leaves every file whole, never empty."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pyarrow.fs as pafs

from conftest import ROOT
from hvae.pipeline.whole_files import storage


def test_a_driver_killed_while_writing_a_snapshot_file_leaves_the_previous_one_whole(tmp_path):
    state = tmp_path / "sweep-x" / "basic-variant-state-1.json"
    state.parent.mkdir()
    state.write_bytes(b"the whole old state")
    # half of the new file written and flushed, then the process dies (as `kill -9` of a driver would)
    script = textwrap.dedent(f"""
        import os, signal
        from hvae.pipeline.whole_files import storage
        fs, _ = storage({str(tmp_path)!r})
        stream = fs.open_output_stream({str(state)!r})
        stream.write(b"the new")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert state.read_bytes() == b"the whole old state"
    # what the kill left is hidden from the globs that Tune restores with
    assert [p.name for p in state.parent.glob("basic-variant-state-*.json")] == [state.name]
    assert [p.name.endswith(".partial") for p in state.parent.iterdir() if p != state] == [True]


def test_a_snapshot_copied_through_it_arrives_whole_and_reads_back(tmp_path):
    staging = tmp_path / "staging"
    (staging / "trial_0").mkdir(parents=True)
    (staging / "experiment_state-1.json").write_text('{"trials": 1}')
    (staging / "trial_0" / "params.pkl").write_bytes(pickle.dumps({"lr": 3e-3}))
    fs, root = storage((tmp_path / "results").as_uri())  # file:// goes through it as a folder does
    assert root == str(tmp_path / "results")
    fs = pickle.loads(pickle.dumps(fs))  # (Tune sends it to its trial actors)
    pafs.copy_files(str(staging), f"{root}/sweep-x", destination_filesystem=fs)
    pafs.copy_files(str(staging), f"{root}/sweep-x", destination_filesystem=fs)  # the next snapshot
    copied = tmp_path / "results" / "sweep-x"
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()) == [
        "experiment_state-1.json", os.path.join("trial_0", "params.pkl")]
    assert pickle.loads((copied / "trial_0" / "params.pkl").read_bytes()) == {"lr": 3e-3}
    with fs.open_input_stream(f"{root}/sweep-x/experiment_state-1.json") as f:
        assert f.read() == b'{"trials": 1}'


def test_a_bucket_is_left_to_pyarrow():
    assert storage("s3://bucket/ray_results") == (None, "s3://bucket/ray_results")
