"""Who owns a RUNNING MLflow run, and whether that driver is still alive.

Each run records its driver process as host:pid:start-time (``TAG_DRIVER``), and the driver
keeps a heartbeat on its top run (``TAG_HEARTBEAT``: the Unix time, rewritten every
``HEARTBEAT_S`` seconds by a background thread). A run was left RUNNING by a dead driver when
that driver lived on this host and is gone (or its pid now belongs to another process), or,
from any host (a head pod that died with its node), when its top run's heartbeat is older than
``STALE_S``. A run with neither a local driver nor a heartbeat (written before heartbeats, or a
driver on another host that never beat) is left alone.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

TAG_DRIVER = "hvae.driver"
TAG_HEARTBEAT = "hvae.heartbeat"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats: a driver that is gone, not one the store kept waiting


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def this_driver() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def is_dead(driver: str, heartbeat: str | None = None, now: float | None = None) -> bool:
    """True only when the driver is certainly gone: on this host, its process is; elsewhere, its
    ``heartbeat`` (Unix time, as the tag holds it) is older than STALE_S."""
    try:
        host, pid, start = driver.rsplit(":", 2)
        pid_i = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        try:
            return (now if now is not None else time.time()) - float(heartbeat) > STALE_S
        except (TypeError, ValueError):
            return False
    if Path("/proc/self/stat").is_file():
        now = _start_time(pid_i)
        return now is None or (start != "?" and now != start)
    try:
        os.kill(pid_i, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Heartbeat:
    """While open, rewrite ``TAG_HEARTBEAT`` on ``run_id`` every ``every`` seconds (a daemon
    thread with its own MLflow client). ``with Heartbeat(uri, run_id): ...``"""

    def __init__(self, uri: str, run_id: str, every: float = HEARTBEAT_S):
        self.uri, self.run_id, self.every = uri, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hvae-heartbeat", daemon=True)

    def _beat(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        while True:
            try:
                client.set_tag(self.run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - a store that is briefly away: beat again later
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
