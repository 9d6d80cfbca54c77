"""How a run answers SIGINT (Ctrl-C) and SIGTERM (`hvae stop`, a job stop, a scheduler).

Both become a ``KeyboardInterrupt`` in the driver's main thread (SIGTERM as its subclass
``Terminated``): the runner marks the stage and parent runs KILLED, stops Ray's workers (the
newest checkpoint on storage is kept), prints how to resume and exits 130 (SIGINT) or 143
(SIGTERM). While it does, a second signal exits at once. Ray Train's ``fit`` runs in a helper
thread (``stages/train_loop.fit``) so that it installs no SIGINT handler of its own, and
``ray.init``'s SIGTERM handler (a bare ``sys.exit``) is replaced again by this one
(``pipeline/raycluster.connect``).
"""
from __future__ import annotations

import os
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt."""


def _terminate(signum, frame):
    raise Terminated


def install() -> None:
    """SIGTERM -> ``Terminated`` in the main thread (SIGINT keeps Python's KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def keep_ours(previous) -> None:
    """Put back ``previous`` (the handler before a library replaced it) when it was ours."""
    if previous is _terminate and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def exit_code(exc: BaseException) -> int:
    return 143 if isinstance(exc, Terminated) else 130


def next_one_exits_at_once(code: int) -> None:
    """From now on SIGINT or SIGTERM ends the process at once (the clean-up is under way)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: os._exit(code))
