"""Start a local Ray, or join the cluster named by ``cluster.address``."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from hvae.stages.base import StageError


def _configure_ray_data() -> None:
    """Ray Data prints a progress report per dataset; the stages say what they do themselves.
    Datasets the driver runs (extract, evaluate, figures) keep their rows' order, so a stage
    computes the same batches every time."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING"))


def _ray_log_level() -> str:
    """Ray's own log level in this driver: ERROR unless `--verbose` (pipeline/cli.quiet_output)."""
    return os.environ.get("HVAE_RAY_LOG_LEVEL", "WARNING")


@contextlib.contextmanager
def _loopback_only():
    """A local Ray that opens every port on 127.0.0.1 only.

    Ray gives each node the address other nodes reach it at, and binds its gRPC servers (GCS,
    raylet, object manager, workers) and metrics exporters to all interfaces unless that address
    is the loopback one; ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into the
    machine's address. Ray's single-machine mode (``ray_constants.ENABLE_RAY_CLUSTER`` false, the
    default on macOS and Windows) picks 127.0.0.1 instead. It is read when the node starts, so it
    is switched on for ``ray.init`` alone and restored after (a later ``cluster.address`` in the
    same process must find the machine's address again). A local Ray has one node and never
    needs another to reach it.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def connect(cluster_cfg) -> int:
    """Start or join Ray (once per process); returns the number of alive nodes."""
    import signal

    import ray

    from . import signals

    _configure_ray_data()
    if ray.is_initialized():
        return len([n for n in ray.nodes() if n.get("Alive")])
    ours = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with a bare sys.exit
    quiet = _ray_log_level() == "ERROR"
    if quiet:  # (the C++ cores' error lines: see KNOWN_NOISE; --verbose keeps them)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if quiet:
        _drop_known_noise()
    with _stderr_without(KNOWN_NOISE) if quiet else contextlib.nullcontext():
        started = _init(cluster_cfg)
    signals.keep_ours(ours)
    if getattr(started, "dashboard_url", None):
        url = started.dashboard_url if "://" in started.dashboard_url else f"http://{started.dashboard_url}"
        print(f"[hvae] Ray dashboard: {url} (workers, their logs and resources while it runs)", flush=True)
    return len([n for n in ray.nodes() if n.get("Alive")])


def _init(cluster_cfg):
    """ray.init for ``cluster_cfg``: a Ray job's own cluster, a new local one, or one at an address."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every worker's epoch lines
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # inherited by the local Ray Data actors
    if cluster_cfg.address is None and os.environ.get("RAY_ADDRESS"):
        started = ray.init(logging_level=_ray_log_level())  # inside a Ray job: the job's cluster
    elif cluster_cfg.address is None:
        # a new local Ray, never a stale one named in /tmp/ray/ray_current_cluster; the dashboard
        # serves the State API that Ray Train's controller polls: keep it on loopback
        # Ray's own processes reach the State API at RAY_API_SERVER_ADDRESS when it is set, and
        # otherwise at the cluster named in /tmp/ray/ray_current_cluster, which may be another,
        # long dead one: then Ray Train cannot see that a controller died and never frees its
        # workers' placement group (what a Tune trial stopped by ASHA leaves behind). Pick the
        # dashboard port and tell every process this cluster starts.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        with _loopback_only():
            started = ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port,
                               logging_level=_ray_log_level())
    else:
        from .reach import ray_address

        ray_address(cluster_cfg.address, cluster_cfg.connect_timeout_s)
        started = ray.init(address=cluster_cfg.address, logging_level=_ray_log_level())
    return started


# Ray's C++ core logs the first at error level for every actor that may restart and was given
# its arguments through the object store (Ray Train's controller, a Ray Data actor pool):
# nothing is wrong (ray-project/ray#53727), yet a newcomer reads it as a failure. In quiet mode
# the C++ cores log only fatal lines (RAY_BACKEND_LOG_LEVEL, inherited by every Ray process),
# and each process then says the second once when it starts.
KNOWN_NOISE = ("has constructor arguments in the object store and max_restarts > 0",
               "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL")


@contextlib.contextmanager
def _stderr_without(noise: tuple[str, ...]):
    """This process's file descriptor 2 (where Ray's C++ core writes) into a temporary file
    for the duration; then what was written there goes to the real stderr, less the lines
    holding ``noise``. For a bounded call only (ray.init): nothing is lost, only held back."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(n in line for n in noise)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _drop_known_noise() -> None:
    """Leave ``KNOWN_NOISE`` out of the worker lines Ray forwards to this driver (quiet mode:
    not `--verbose`): every batch of lines passes through Ray's private log dispatcher, whose
    ``emit`` this wraps, before ray.init (a handler swapped in after it left a moment in which
    a raylet's line reached stdout: seen once in a test). If a Ray release moves the
    dispatcher, the lines are simply not filtered."""
    try:
        from ray._private import worker as w

        dispatcher = w.global_worker_stdstream_dispatcher
        if getattr(dispatcher.emit, "drops_known_noise", False):
            return
        emit = dispatcher.emit

        def emit_without_noise(data):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in KNOWN_NOISE)]
            if lines:
                emit({**data, "lines": lines})

        emit_without_noise.drops_known_noise = True
        dispatcher.emit = emit_without_noise
    except (AttributeError, ImportError):
        pass


class ResourceError(StageError):
    """What a stage asks of the Ray cluster cannot be placed on it (in the time allowed)."""


def fits(nodes: list[dict], need: dict[str, float], strict_spread: bool = False) -> int:
    """How many bundles of ``need`` the nodes (``ray.nodes()``' "Resources") hold at most."""
    count = 0
    for have in nodes:
        n = min((int(have.get(r, 0) // v) for r, v in need.items() if v > 0), default=0)
        count += min(n, 1) if strict_spread else n
    return count


def _describe(nodes: list[dict]) -> str:
    def one(r):
        return f"{r.get('CPU', 0):g} CPU" + (f", {r['GPU']:g} GPU" if r.get("GPU") else "")

    shapes = sorted({one(r) for r in nodes})
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + "; ".join(
        f"{sum(one(r) == s for r in nodes)}× {s}" if len(nodes) > 1 else s for s in shapes)


def check_resources(cluster_cfg, what: str, bundles: int, need: dict[str, float], local: bool) -> None:
    """Wait (``cluster.resource_timeout_s``; unset: 0 on a local Ray, 600 s on a joined cluster)
    until the alive nodes could hold ``bundles`` bundles of ``need``; else raise ResourceError
    naming the keys that ask for them. Ray itself would wait for them forever."""
    import time

    import ray

    timeout = cluster_cfg.resource_timeout_s
    timeout = (0.0 if local else 600.0) if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        can = fits(nodes, need, cluster_cfg.placement_strategy == "STRICT_SPREAD")
        if can >= bundles:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    asked = " and ".join(f"{v:g} {r}" for r, v in need.items() if v > 0)
    missing = [r for r, v in need.items() if v > 0 and not any(n.get(r, 0) >= v for n in nodes)]
    waited = f" (waited {timeout:g} s: cluster.resource_timeout_s)" if timeout else ""
    hint = ("set cluster.use_gpu=false, or run where GPUs are" if "GPU" in missing else
            "lower cluster.num_workers or cluster.cpus_per_worker (or cluster.num_workers=auto)")
    raise ResourceError(f"{what} asks for {bundles} × ({asked}); the Ray cluster ({_describe(nodes)}) can place "
                        f"{can}{waited}: {hint}")


def resolve_layout(cluster_cfg):
    """``cluster.num_workers=auto`` -> the section with a worker count and CPUs per worker for
    the Ray this process is connected to; any other section as it is. With ``use_gpu``: one
    worker per GPU, the CPUs of its node shared out between its GPUs. On CPUs: one worker per
    node, holding all of that node's CPUs as threads (on one machine a process with N threads
    outruns N one-thread DDP processes, which add an all-reduce a step: bench/layout.py)."""
    if cluster_cfg.num_workers != "auto":
        return cluster_cfg
    import ray

    return layout_for(cluster_cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])


def layout_for(cluster_cfg, nodes: list[dict]):
    """``resolve_layout`` over the alive nodes' resources (``ray.nodes()``' "Resources")."""
    if cluster_cfg.use_gpu:
        held = [r for r in nodes if r.get("GPU", 0) >= 1]
        workers = sum(int(r["GPU"]) for r in held)
        cpus = min((max(1, int(r.get("CPU", 1) // int(r["GPU"]))) for r in held), default=1)
    else:
        held = [r for r in nodes if r.get("CPU", 0) >= 1]
        workers, cpus = len(held), min((int(r["CPU"]) for r in held), default=1)
    return cluster_cfg.model_copy(update={"num_workers": max(workers, 1), "cpus_per_worker": float(cpus)})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class StorageError(RuntimeError):
    """cluster.storage_path cannot be seen from every node of the cluster."""


def check_shared_storage(storage_path: str) -> int:
    """On a multi-node cluster, prove that every alive node sees ``storage_path``.

    Writes a marker file there and asks a tiny task pinned to each node to read it back.
    Returns the number of nodes checked; raises StorageError naming the first node that
    cannot see it (a node-local path on a multi-node cluster loses checkpoints).
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or "://" in storage_path:
        return len(nodes)
    marker = Path(storage_path) / f".hvae-shared-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("hvae")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.isfile(path)

    try:
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(str(marker)) for n in nodes]
        for node, ok in zip(nodes, ray.get(checks, timeout=120)):
            if not ok:
                raise StorageError(
                    f"cluster.storage_path={storage_path} is not visible from node {node['NodeManagerAddress']}: "
                    f"a multi-node run needs storage every node shares (NFS, EFS, a ReadWriteMany volume, "
                    f"or an s3:// / gs:// URI)")
    finally:
        marker.unlink(missing_ok=True)
    return len(nodes)
