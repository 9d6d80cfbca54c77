"""cluster.storage_path as a URI (file://, read through pyarrow's filesystems like s3:// or gs://):
everything the pipeline keeps there lands under it, nothing in the working folder."""
import re
from pathlib import Path

import pytest

from conftest import SMOKE, free_port, hvae, wait_for_http

pytestmark = pytest.mark.slow  # two pipelines: `make test` only


def test_a_storage_uri_holds_data_checkpoints_and_outputs_and_force_clears_them_there(tmp_path):
    from hvae.stages import checkpoints

    node, bucket = tmp_path / "node", tmp_path / "bucket"
    node.mkdir()
    uri = bucket.as_uri()  # file:///.../bucket
    # (laid out by cluster.num_workers=auto, as configs/default.yaml is: one worker, every CPU)
    first = hvae(node, "run", SMOKE, f"cluster.storage_path={uri}", "cluster.num_workers=auto", "--until", "extract")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert re.search(r"^\[hvae\] stage1: cluster.num_workers=auto: 1 worker\(s\) of [1-9]\d* CPU\(s\)$", first.stdout, re.M)
    # the working folder holds the tracking store and nothing the storage path should have
    assert {p.name for p in node.iterdir()} <= {"mlartifacts", "mlruns.db", "mlruns.db.lock"}, list(node.iterdir())
    assert list(bucket.glob("data/mnist5k-*/manifest.json")), "the prepared data is not under the storage URI"
    (name,) = [p.name for p in bucket.glob("stage1-*") if p.is_dir()]
    assert list(bucket.glob("outputs/*/extract/codes/train/*.parquet"))
    # the newest complete checkpoint, listed through the URI: epochs 0 and 1 -> resume after 1
    assert checkpoints.resume_epoch(uri, name) == 1
    assert checkpoints.newest(uri, name).path.startswith(f"{uri}/{name}/checkpoint_")

    forced = hvae(node, "run", SMOKE, f"cluster.storage_path={uri}", "--until", "stage1", "--force", "stage1")
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert re.search(r"^\[hvae\] stage1: --force: moved its checkpoints aside to " + re.escape(name) + r"\.forced-",
                     forced.stdout, re.M), forced.stdout[-3000:]
    assert len(list(bucket.glob(f"{name}.forced-*/checkpoint_*"))) >= 1
    assert checkpoints.resume_epoch(uri, name) == 1  # trained afresh, both epochs again
    assert not any(Path(node).glob("file:*"))


@pytest.fixture
def s3(tmp_path):
    """A local S3 endpoint (moto's server) with an empty bucket ``hvae``; ``query`` addresses it
    from a URI (``s3://hvae/...?endpoint_override=...``), ``env`` holds its credentials."""
    import os
    import signal
    import subprocess
    import sys
    from types import SimpleNamespace

    from pyarrow import fs

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(tmp_path / "moto.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, tmp_path / "moto.log", timeout=60)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        bucket = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                 access_key="testing", secret_key="testing", allow_bucket_creation=True)
        bucket.create_dir("hvae")
        yield SimpleNamespace(query=f"?endpoint_override=127.0.0.1:{port}&scheme=http", env=env, fs=bucket)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_images_and_storage_in_a_bucket_run_the_whole_pipeline(s3, tmp_path, monkeypatch):
    """data.root and cluster.storage_path both s3:// (a local S3 endpoint): the pipeline lists the
    bucket, prepares the dataset into it, the workers read the images from it, Ray Train keeps
    the checkpoints there; --force deletes them there (a bucket cannot rename a folder)."""
    import numpy as np
    from PIL import Image
    from pyarrow import fs

    from hvae.stages import checkpoints

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (images / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)).save(images / cls / f"{i}.png")
    fs.copy_files(str(images), "hvae/images", source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3.fs)
    node = tmp_path / "node"
    node.mkdir()
    store = f"s3://hvae/store{s3.query}"
    # the images' bucket read with a key in the URI (user:password@): masked wherever it is shown
    args = ["run", SMOKE, "data.dataset=imagefolder", f"data.root=s3://reader:s3cr3t@hvae/images{s3.query}",
            f"cluster.storage_path={store}"]
    proc = hvae(node, *args, env=s3.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    _the_key_is_masked(node, proc)
    assert "train 64, val 8, test 8 images of 3x32x32, prepared at s3://hvae/store/data/imagefolder-" in proc.stdout
    assert "| ≤" in proc.stdout  # the NLL table: evaluate streamed the test images from the bucket
    assert {p.name for p in node.iterdir()} <= {"mlartifacts", "mlruns.db", "mlruns.db.lock"}, list(node.iterdir())

    files = [i.path for i in s3.fs.get_file_info(fs.FileSelector("hvae/store", recursive=True))
             if i.type == fs.FileType.File]
    assert any(re.fullmatch(r"hvae/store/data/imagefolder-\w+/manifest\.json", f) for f in files), files
    (name,) = {f.split("/")[2] for f in files if re.match(r"hvae/store/stage1-\w+/checkpoint_", f)}
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    found = checkpoints.newest(store, name)  # listed in the bucket, downloaded to be read
    assert found.epoch == 1 and found.load()[1]["epoch"] == 1

    forced = hvae(node, *args, "--until", "stage1", "--force", "stage1", env=s3.env)
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert f"[hvae] stage1: --force: deleted its checkpoints at s3://hvae/store/{name}" in forced.stdout
    assert checkpoints.newest(store, name).path != found.path  # trained afresh into new checkpoints


def _the_key_is_masked(node, proc):
    """A secret in a value (the password in data.root's URI) is masked in the output, the params
    and the recorded config.yaml; `hvae resume` then asks for it again."""
    import subprocess
    import sys

    from conftest import runs

    assert "s3cr3t" not in proc.stdout + proc.stderr
    client, all_runs = runs(node)
    parent = next(r for r in all_runs if r.data.tags.get("hvae.kind") == "pipeline")
    assert parent.data.params["data.root"].startswith("s3://reader:***@hvae/images?")
    recorded = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(node.parent)))
    assert "s3cr3t" not in recorded.read_text() and "reader:***@" in recorded.read_text()
    again = subprocess.run([sys.executable, "-m", "hvae", "resume", parent.info.run_id], cwd=node,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "recorded its config with secrets masked (root)" in again.stderr
