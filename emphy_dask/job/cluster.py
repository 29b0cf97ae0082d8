"""Getting a Dask client: a LocalCluster of processes, or joining a running scheduler.

Workers advertise abstract resources: CPU workers ``CPU=1`` (per thread), GPU workers
(``dask cuda worker --resources GPU=1``) ``GPU=1``. CPU stages are submitted with
``resources={"CPU": 1}`` and GPU stages with ``{"GPU": 1}``, so a mixed cluster routes work
by itself. A cluster whose workers advertise no resources at all still works: tasks are then
submitted without them (a warning says so) instead of waiting forever. Without GPU workers the
device stages (lungmask, backbone) run on the CPU workers with ``device="cpu"``.

LocalCluster workers start without ``MALLOC_TRIM_THRESHOLD_`` (the nanny sets 65536 by default,
which turns off glibc's dynamic mmap threshold: every large numpy array is then mmap'ed and
page-faulted afresh, 3.8x the page faults on this pipeline) and with ``MALLOC_ARENA_MAX=1`` (a
task runs in a worker thread, whose own malloc arena fragments: +230-270 MB peak RSS on a
full-size scan, 1.4x the page faults; one arena gives the one-process loop's figures). External
clusters: the same keys under ``distributed.nanny.pre-spawn-environ`` in the Dask config of the
process that starts the nannies (``deploy/dask.yaml`` has the first).

``security`` (``distributed.security.Security``) secures every connection with TLS: a
LocalCluster then listens on ``tls://``; joining a cluster, it holds the CA and client
certificate (``--tls-ca-file``, ``--tls-cert``, ``--tls-key``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Connection:
    client: object
    cluster: object | None          # None when joined to an external scheduler
    cpu_resources: dict | None      # what CPU tasks ask for
    device_resources: dict | None = None   # what device tasks (lungmask, backbone) ask for
    device: str = "cpu"             # "cuda" when GPU workers exist, else the CPU workers run device tasks
    n_device_workers: int = 0       # workers that can run device tasks at once

    @property
    def dashboard_link(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def close(self) -> None:
        """Close the client and our LocalCluster. A worker slow to stop (a loaded machine) is killed
        by its nanny; the close timing out then is logged, not raised: every result is written."""
        pids = _worker_pids(self.cluster)
        self.client.close()
        if self.cluster is not None:
            try:
                self.cluster.close()
            except (TimeoutError, asyncio.TimeoutError) as exc:
                log.warning("closing the LocalCluster timed out (%r); its workers are being killed", exc)
                _wait_gone(pids)      # their nannies' last records then land in the run's log, not after it


def _worker_pids(cluster) -> list[int]:
    """Process ids of a LocalCluster's worker processes (empty for a joined cluster)."""
    pids = []
    for nanny in getattr(cluster, "workers", {}).values():
        proc = getattr(getattr(nanny, "process", None), "process", None)
        pid = getattr(proc, "pid", None)
        if pid:
            pids.append(pid)
    return pids


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> None:
    """Wait until the processes ``pids`` have ended (at most ``timeout_s``), then a moment for the
    event loop's callbacks about them."""
    import time

    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:            # gone (or never ours to see)
            return False

    end = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(1.0)


#: The nanny's environment for LocalCluster workers (see the module doc; one thread per worker).
NANNY_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
             "distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1}


#: Peak RSS of a worker on a full-size scan with the 3D backbone on CPU (benchmarks/README.md:
#: 2.46-2.98 GiB; torch and the model are ~1.35 GB of it): a scan's estimated need.
SCAN_PEAK_BYTES = 3 * 2**30
#: Dask pauses a worker at this fraction of its limit (``distributed.worker.memory.pause``).
PAUSE_FRACTION = 0.8
#: ``memory_limit = "auto"`` leaves this share of the machine to the driver and the system.
AUTO_RESERVE = 0.1


def worker_memory_limit(setting: str, n_workers: int, total_bytes: int | None = None) -> tuple[int, str | None]:
    """Bytes per LocalCluster worker for ``[cluster].memory_limit``, and a one-line warning or None.

    ``"auto"``: the machine's memory (``psutil``) less ``AUTO_RESERVE``, shared by ``n_workers``.
    Any other value (``"3GiB"``) is used as given. The warning says, once, when Dask would pause
    a worker (or the OS kill it) below a full-size scan's estimated need, and what to change.
    """
    import psutil
    from dask.utils import format_bytes, parse_bytes

    total = total_bytes or psutil.virtual_memory().total
    limit = int(total * (1 - AUTO_RESERVE) / n_workers) if setting == "auto" else int(parse_bytes(setting))
    need = SCAN_PEAK_BYTES / PAUSE_FRACTION
    if limit >= need:
        return limit, None
    return limit, (f"warning: {n_workers} worker(s) with {format_bytes(limit)} each (this machine has "
                   f"{format_bytes(total)}): a full-size scan needs ~{format_bytes(SCAN_PEAK_BYTES)} and Dask pauses "
                   f"a worker at {PAUSE_FRACTION:.0%} of its limit; use fewer workers (--workers) or raise "
                   "[cluster].memory_limit")


def connect(settings, scheduler: str | None = None, workers: int | None = None,
            security=None, log=None) -> Connection:
    """Start or join a cluster.

    Parameters
    ----------
    settings : ClusterSettings
        Worker count, memory limit per worker, dashboard address (127.0.0.1 by default).
    scheduler : str, optional
        ``tcp://HOST:PORT`` (or a scheduler file path) of a running cluster to join.
    workers : int, optional
        Overrides ``settings.workers`` for the LocalCluster.
    security : distributed.security.Security, optional
        TLS for the scheduler, workers and client (LocalCluster), or the client's side of it.
    log : callable, optional
        Receives the one-line memory warning of ``worker_memory_limit`` (LocalCluster only).
    """
    import dask
    from distributed import Client, LocalCluster

    kw = {"security": security} if security is not None else {}
    if scheduler:
        if scheduler.endswith(".json"):
            client = Client(scheduler_file=scheduler, timeout="30s", **kw)
        else:
            client = Client(scheduler, timeout="30s", **kw)
        cluster = None
    else:
        n_cpu = workers or settings.workers
        n_gpu = count_gpus() if settings.gpu_workers == "auto" else int(settings.gpu_workers)
        if security is not None:
            kw["protocol"] = "tls://"
        # the nannies read their environment when created (here) and reuse it on restarts
        _drop_inherited_malloc_trim()
        memory, warning = worker_memory_limit(settings.memory_limit, n_cpu)
        if warning and log is not None:
            log(warning)
        settings = dataclasses.replace(settings, memory_limit=memory)
        with dask.config.set(NANNY_ENV):
            cluster = local_cuda_cluster(settings, n_cpu, n_gpu, security) if n_gpu else LocalCluster(
                n_workers=n_cpu, threads_per_worker=settings.threads_per_worker, processes=True,
                memory_limit=settings.memory_limit, host="127.0.0.1", dashboard_address=settings.dashboard_address,
                resources={"CPU": settings.threads_per_worker}, **kw)
            client = Client(cluster, **({"security": security} if security is not None else {}))
            client.wait_for_workers(n_cpu + n_gpu, timeout=180)
    cpu = cpu_resources(client)
    n_gpu_workers = gpu_worker_count(client)
    if n_gpu_workers:
        return Connection(client, cluster, cpu, {"GPU": 1}, "cuda", n_gpu_workers)
    return Connection(client, cluster, cpu, cpu, "cpu", worker_count(client))


def _drop_inherited_malloc_trim() -> None:
    """Unset Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` in this process's environment.

    A nanny writes its pre-spawn environment into ``os.environ`` of the process that starts it
    and never takes it back, so any earlier cluster in this process (a test, a notebook) leaves
    65536 behind, and the next nannies' workers would inherit it whatever their config says.
    Another value is the user's own choice and is kept.
    """
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]


def count_gpus() -> int:
    """NVIDIA GPUs visible to this process (0 when there is no driver)."""
    try:
        from dask_cuda.utils import get_n_gpus

        return int(get_n_gpus())
    except Exception:  # noqa: BLE001 - no NVML / no driver / no dask-cuda: no GPU
        return 0


def local_cuda_cluster(settings, n_cpu: int, n_gpu: int, security=None):
    """A LocalCUDACluster (one ``GPU=1`` worker per GPU) plus ``n_cpu`` ``CPU=1`` workers on its scheduler.

    The same scheduler and routing as a hand-started mixed cluster (``dask cuda worker`` beside
    ``dask worker``): the CPU workers are added to the cluster's worker spec as plain Nannies.
    """
    from dask_cuda import LocalCUDACluster
    from distributed import Nanny

    tls = {"security": security, "protocol": "tls://"} if security is not None else {}
    cluster = LocalCUDACluster(n_workers=n_gpu, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=settings.dashboard_address, resources={"GPU": 1}, **tls)
    for i in range(n_cpu):
        cluster.worker_spec[f"cpu-{i}"] = {"cls": Nanny, "options": {
            "nthreads": settings.threads_per_worker, "memory_limit": settings.memory_limit, "host": "127.0.0.1",
            "resources": {"CPU": settings.threads_per_worker},
            **({"security": security} if security is not None else {})}}
    cluster.scale(len(cluster.worker_spec))   # starts the added specs
    return cluster


def cpu_resources(client) -> dict | None:
    """``{"CPU": 1}`` when some worker advertises a CPU resource, else None (with a warning)."""
    client.wait_for_workers(1, timeout=120)
    workers = client.scheduler_info().get("workers", {}).values()
    if any("CPU" in (w.get("resources") or {}) for w in workers):
        return {"CPU": 1}
    warnings.warn("no worker advertises a CPU resource (start them with --resources CPU=1); "
                  "CPU tasks are submitted without resource restrictions", stacklevel=2)
    return None


def gpu_worker_count(client) -> int:
    """Workers advertising a ``GPU`` resource (``dask cuda worker --resources GPU=1``)."""
    workers = client.scheduler_info().get("workers", {}).values()
    return sum(1 for w in workers if "GPU" in (w.get("resources") or {}))


def worker_count(client) -> int:
    return len(client.scheduler_info().get("workers", {}))
