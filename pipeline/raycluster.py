"""Start a local Ray, or join the cluster named by ``cluster.address``."""
from __future__ import annotations

import logging
import os
from pathlib import Path


def _configure_ray_data() -> None:
    """Ray Data prints a progress report per dataset; the stages say what they do themselves.
    Datasets the driver runs (extract, evaluate, figures) keep their rows' order, so a stage
    computes the same batches every time."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def connect(cluster_cfg) -> int:
    """Start or join Ray (once per process); returns the number of alive nodes."""
    import signal

    import ray

    from . import signals

    _configure_ray_data()
    if ray.is_initialized():
        return len([n for n in ray.nodes() if n.get("Alive")])
    ours = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with a bare sys.exit
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every worker's epoch lines
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # inherited by the local Ray Data actors
    if cluster_cfg.address is None and os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")  # inside a Ray job: the job's cluster
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
        ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, logging_level="WARNING")
    else:
        ray.init(address=cluster_cfg.address, logging_level="WARNING")
    signals.keep_ours(ours)
    return len([n for n in ray.nodes() if n.get("Alive")])


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
