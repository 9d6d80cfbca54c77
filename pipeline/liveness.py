"""Who owns a RUNNING MLflow run: the driver process recorded as host:pid:start-time.

A run whose driver lived on this host and is gone (or whose pid now belongs to another
process) was left RUNNING by a dead driver.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

TAG_DRIVER = "hvae.driver"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def this_driver() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def is_dead(driver: str) -> bool:
    """True only when the driver was on this host and is certainly gone."""
    try:
        host, pid, start = driver.rsplit(":", 2)
        pid_i = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
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
