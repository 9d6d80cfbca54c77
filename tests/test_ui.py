"""`hvae ui` (what `make ui` runs) serves the MLflow UI on 127.0.0.1; in a real browser
(headless Chromium: Debian's `chromium`, which `make test` installs when it can), the link a
pipeline printed shows its NLL table and its samples. The browser's screenshots are kept under
test-artifacts/browser/ to look at."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, pipeline_runs, wait_for_http

ARTIFACTS = Path(os.environ.get("HVAE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def test_ui_serves_the_tracking_store(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hvae", "ui", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.time() < deadline, "the UI did not answer within 120 s"
                time.sleep(1)
        assert "experiments" in body
        assert (tmp_path / "mlruns.db").is_file()  # the default store, in the working directory
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def ui(smoke_store, tmp_path):
    """`hvae ui` on a free port in the smoke store's folder -> its root URL."""
    cwd = smoke_store[0]
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hvae", "ui", "--port", str(port)], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{root}/health", proc, tmp_path / "ui.log", timeout=90)
        yield root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _chromium(tmp_path, url: str, *what: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800",
                           "--virtual-time-budget=25000", *what, url],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium here (`make test` installs Debian's chromium when it can: "
                                            "root and apt are needed)")
def test_the_printed_link_shows_the_nll_table_and_the_samples_in_a_browser(smoke_store, ui, tmp_path):
    cwd, proc, parent_id = smoke_store
    printed = re.search(r"^browse: .*?(http://\S+)$", proc.stdout, re.M).group(1)
    assert printed.endswith(f"/runs/{parent_id}?workflowType=machine_learning"), printed
    url = re.sub(r"^http://[^/]+", ui, printed)
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)

    children = pipeline_runs(cwd, parent_id)
    for name, page in (("parent_run", url),
                       ("stage1_run", re.sub(r"/runs/\w+", f"/runs/{children['stage1'].info.run_id}", url)),
                       ("report_html", url.replace("?", "/artifacts/report.html?")),
                       ("runs_list", url.split("/runs/")[0] + "/runs?workflowType=machine_learning")):
        shot = _chromium(tmp_path, page, f"--screenshot={shots / (name + '.png')}")
        assert shot.returncode == 0 and (shots / f"{name}.png").stat().st_size > 10_000, shot.stderr[-2000:]

    dom = _chromium(tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    (shots / "parent_run.html").write_text(html)
    # the description rendered as Markdown: the NLL table is a table, the pictures are images
    assert re.search(r"<table[^>]*>.*?NLL \(nats/image\).*?≤ [0-9.]+ ± .*?</table>", html, re.S | re.I), html[-3000:]
    for stage, path in (("sample", "samples%2Fgrid.png"), ("stage1", "figures%2Freconstructions.png")):
        src = f"get-artifact?path={path}&amp;run_uuid={children[stage].info.run_id}"
        assert f'src="{src}"' in html, (stage, re.findall(r"<img[^>]*>", html))
        body = urllib.request.urlopen(f"{ui}/{src.replace('&amp;', '&')}", timeout=30).read()
        assert body[:8] == b"\x89PNG\r\n\x1a\n", (stage, body[:100])  # the image the page points at is served
    # one click from the description to report.html
    assert re.search(rf'href="#/experiments/\d+/runs/{parent_id}/artifacts/report\.html"', html), \
        re.findall(r"<a [^>]*>", html)
