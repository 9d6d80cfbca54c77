"""The services a run talks to outside this process (an MLflow server, a Ray cluster, a Ray job
server) are reached first with a bounded time-out; one that does not answer ends the command
with one line naming its address and the key that set it (exit 2), before any work. (Left to
themselves, MLflow retries for about four minutes and Ray waits for over ten.)"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from .masking import mask
from hvae.settings.base import ConfigError


class Unreachable(ConfigError):
    """A service named by the config or the command line does not answer."""


def _tcp(host: str, port: int, timeout: float) -> str | None:
    """None when something accepts a connection at host:port within ``timeout`` s, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer in {timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def http(url: str, timeout: float, what: str, path: str = "") -> None:
    """An HTTP service at ``url`` answers (any HTTP status) within ``timeout`` s, or Unreachable."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    why = _tcp(parts.hostname or "", port, timeout)
    if why is None:
        try:
            urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = f"no answer in {timeout:g} s" if isinstance(reason, (socket.timeout, TimeoutError)) else str(reason)
    if why is not None:
        raise Unreachable(f"{what}={mask(url)} does not answer ({why}; {timeout:g} s allowed)")


def ray_address(address: str, timeout: float, what: str = "cluster.address") -> None:
    """A Ray cluster named as ``host:port`` (its GCS) or ``ray://host:port`` (Ray Client) accepts a
    connection within ``timeout`` s, or Unreachable. ("auto" and a local Ray are not probed.)"""
    if address in ("auto", "local") or not address:
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    port = parts.port or (10001 if parts.scheme == "ray" else 6379)
    why = _tcp(parts.hostname or "", port, timeout)
    if why is not None:
        raise Unreachable(f"{what}={address}: no Ray cluster answers at {parts.hostname}:{port} ({why}; "
                          f"{timeout:g} s allowed)")
