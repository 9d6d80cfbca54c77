"""Start a local Ray, or join the cluster named by ``cluster.address``."""
from __future__ import annotations

import logging
import os


def _quiet_ray_data() -> None:
    """Ray Data prints a progress report per dataset; the stages say what they do themselves."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def connect(cluster_cfg) -> None:
    import ray

    _quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every worker's epoch lines
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # inherited by the local Ray Data actors
    if cluster_cfg.address is None:
        # the dashboard serves the State API that Ray Train's controller polls; keep it on loopback
        ray.init(dashboard_host="127.0.0.1", logging_level="WARNING")
    else:
        ray.init(address=cluster_cfg.address, logging_level="WARNING")


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
