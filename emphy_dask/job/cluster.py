"""Getting a Dask client: a LocalCluster of processes, or joining a running scheduler.

Workers advertise abstract resources: CPU workers ``CPU=1`` (per thread), GPU workers
(``dask cuda worker --resources GPU=1``) ``GPU=1``. CPU stages are submitted with
``resources={"CPU": 1}`` and GPU stages with ``{"GPU": 1}``, so a mixed cluster routes work
by itself. A cluster whose workers advertise no resources at all still works: tasks are then
submitted without them (a warning says so) instead of waiting forever.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Connection:
    client: object
    cluster: object | None          # None when joined to an external scheduler
    cpu_resources: dict | None      # what CPU tasks ask for

    @property
    def dashboard_link(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def connect(settings, scheduler: str | None = None, workers: int | None = None) -> Connection:
    """Start or join a cluster.

    Parameters
    ----------
    settings : ClusterSettings
        Worker count, memory limit per worker, dashboard address (127.0.0.1 by default).
    scheduler : str, optional
        ``tcp://HOST:PORT`` (or a scheduler file path) of a running cluster to join.
    workers : int, optional
        Overrides ``settings.workers`` for the LocalCluster.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        if scheduler.endswith(".json"):
            client = Client(scheduler_file=scheduler, timeout="30s")
        else:
            client = Client(scheduler, timeout="30s")
        cluster = None
    else:
        n = workers or settings.workers
        cluster = LocalCluster(n_workers=n, threads_per_worker=settings.threads_per_worker, processes=True,
                               memory_limit=settings.memory_limit, host="127.0.0.1",
                               dashboard_address=settings.dashboard_address,
                               resources={"CPU": settings.threads_per_worker})
        client = Client(cluster)
    return Connection(client, cluster, cpu_resources(client))


def cpu_resources(client) -> dict | None:
    """``{"CPU": 1}`` when some worker advertises a CPU resource, else None (with a warning)."""
    client.wait_for_workers(1, timeout=120)
    workers = client.scheduler_info().get("workers", {}).values()
    if any("CPU" in (w.get("resources") or {}) for w in workers):
        return {"CPU": 1}
    warnings.warn("no worker advertises a CPU resource (start them with --resources CPU=1); "
                  "CPU tasks are submitted without resource restrictions", stacklevel=2)
    return None


def worker_count(client) -> int:
    return len(client.scheduler_info().get("workers", {}))
