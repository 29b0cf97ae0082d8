"""Each scan as a chain of resource-tagged tasks, bounded per stage, results streamed back.

Per scan (futures chained; the scheduler runs a task when its inputs exist):

    prepare (CPU)                                   threshold segmenter
    prepare (CPU) -> lungmask input (CPU, same worker) -> U-Net (device) -> finish (CPU, same worker)
    ... then, batched across scans: embed (device) -> rows to the driver

"device" is ``{"GPU": 1}`` when the cluster has GPU workers (``device="cuda"``), else the CPU
workers run the same functions with ``device="cpu"``. The large arrays stay on the worker that
made them (the full volume never leaves its CPU worker); only lungmask's slices and labels and
the model inputs cross to the device worker, and only rows come back to the driver.

Flow control keeps memory flat however long the manifest is: at most ``cpu_limit`` scans are in
their CPU stages, and new scans are admitted only while the scans waiting for or inside the
device stage stay under ``device_backlog``. The device never idles while inputs are ready: a
batch is sent as soon as a device slot is free, and when it is busy scans accumulate into full
batches. Device tasks have higher priority than new CPU work, so on a CPU-only cluster finished
inputs are embedded before more scans are decoded.

Task keys read ``<stage>-<n>-<run token>-<scan key>`` (``prepare-12-3fa2b9c1-LIDC-IDRI-0001``):
Dask groups tasks by the key's leading words up to the first one that is not alphabetic, so the
dashboard's progress bars and task stream show one group per stage (prepare, lungmask-input,
lungmask, finish, embed) and the hover names the scan. The token keeps keys of two runs on one
scheduler apart.

A future that comes back cancelled means the client lost the scheduler (Dask cancels every
future then): the flow raises ``SchedulerLost`` instead of recording those scans, so a rerun
does them again.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from ..device_stages import embed_states, lungmask_on_device
from ..pipeline import finish_scan, prepare_scan


def _address() -> str | None:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return None


def _prepare_task(task, config, out_dir):
    return prepare_scan(task, config, out_dir, worker=_address())


def _lungmask_input_task(state):
    return state.lungmask_input


def _lungmask_task(lungmask_input, config, device):
    return None if lungmask_input is None else lungmask_on_device(lungmask_input, config, device)


def _finish_task(state, raw, config, out_dir):
    return state if raw is None else finish_scan(state, raw, config, out_dir)


def _embed_task(states, config, out_dir, device):
    return embed_states(list(states), config, out_dir, device, worker=_address())


class SchedulerLost(RuntimeError):
    """The client lost its scheduler mid-run: the scans in flight have no result."""


def _exception(fut) -> BaseException:
    try:
        return fut.exception()
    except BaseException as exc:  # noqa: BLE001 - cancelled futures raise instead of returning
        return exc


@dataclass
class FlowLimits:
    cpu_limit: int            # scans in their CPU stages at once
    device_backlog: int       # scans prepared but not yet embedded
    batch_size: int           # scans per device batch
    device_slots: int         # device tasks that can run at once (device workers)


@dataclass
class ScanFlow:
    """Submits the task chains of a stream of scans and yields ``(task, result | exception)``."""

    client: object
    config: object
    out_dir: str
    cpu_resources: dict | None
    device_resources: dict | None
    device: str
    limits: FlowLimits
    _n: itertools.count = field(default_factory=itertools.count)
    _token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    in_flight: int = 0                 # scans submitted and not yet yielded (for progress metrics)

    def _submit(self, fn, *args, stage: str, name: str, resources, priority: int = 0):
        key = f"{stage}-{next(self._n)}-{self._token}-{name}"
        return self.client.submit(fn, *args, key=key, pure=False, resources=resources, priority=priority,
                                  retries=self.config.cluster.retries)

    def _cpu_chain(self, task):
        """Futures up to the scan's CPU result (a ScanState with its model input)."""
        cfg, out, cpu = self.config, self.out_dir, self.cpu_resources
        prep = self._submit(_prepare_task, task, cfg, out, stage="prepare", name=task.scan_key, resources=cpu)
        if cfg.segment.name != "lungmask":
            return prep
        lmi = self._submit(_lungmask_input_task, prep, stage="lungmask-input", name=task.scan_key, resources=cpu)
        raw = self._submit(_lungmask_task, lmi, cfg, self.device, stage="lungmask", name=task.scan_key,
                           resources=self.device_resources, priority=1)
        return self._submit(_finish_task, prep, raw, cfg, out, stage="finish", name=task.scan_key,
                            resources=cpu, priority=1)

    def run(self, tasks):
        from distributed import as_completed

        embed = self.config.embed.backbone != "none"
        lim = self.limits
        queue = iter(tasks)
        pool = as_completed()
        owner: dict = {}               # future key -> ("cpu", task) | ("embed", [tasks])
        ready: list = []               # (task, CPU-result future) waiting for a device batch
        in_cpu = in_device = 0         # scans in CPU stages / scans in submitted device batches
        device_tasks = 0
        exhausted = False

        def admit():
            nonlocal in_cpu, exhausted
            while not exhausted and in_cpu < lim.cpu_limit and len(ready) + in_device < lim.device_backlog:
                task = next(queue, None)
                if task is None:
                    exhausted = True
                    return
                fut = self._cpu_chain(task)
                owner[fut.key] = ("cpu", task)
                pool.add(fut)
                in_cpu += 1

        def send_batches():
            nonlocal in_device, device_tasks
            while ready and (len(ready) >= lim.batch_size or device_tasks < lim.device_slots
                             or (exhausted and in_cpu == 0)):
                batch, ready[:] = ready[:lim.batch_size], ready[lim.batch_size:]
                tasks_ = [t for t, _ in batch]
                fut = self._submit(_embed_task, [f for _, f in batch], self.config, self.out_dir, self.device,
                                   stage="embed", name=f"{len(batch)}scans-{tasks_[0].scan_key}",
                                   resources=self.device_resources, priority=2)
                owner[fut.key] = ("embed", tasks_)
                pool.add(fut)
                for _, f in batch:      # the embed task holds them now: drop the driver's references
                    f.release()
                in_device += len(batch)
                device_tasks += 1

        admit()
        for fut in pool:
            kind, who = owner.pop(fut.key)
            if fut.status == "cancelled":
                raise SchedulerLost(self._lost_message(in_cpu + len(ready) + in_device))
            if kind == "cpu":
                in_cpu -= 1
                if fut.status != "finished":
                    yield who, _exception(fut)
                elif embed:
                    ready.append((who, fut))   # kept (not released) until its embed task is submitted
                    fut = None
                else:                  # no device stage: the state holds no arrays, only rows
                    yield who, fut.result().result
            else:
                in_device -= len(who)
                device_tasks -= 1
                if fut.status == "finished":
                    yield from zip(who, fut.result())
                else:
                    exc = _exception(fut)
                    for task in who:
                        yield task, exc
            if fut is not None:
                fut.release()
            admit()
            if embed:
                send_batches()
            self.in_flight = in_cpu + len(ready) + in_device

    def _lost_message(self, n: int) -> str:
        address = getattr(getattr(self.client, "scheduler", None), "address", None) or "the scheduler"
        status = getattr(self.client, "status", "?")
        what = (f"lost the scheduler {address} (client {status})" if status != "running"
                else f"the scheduler {address} cancelled this job's tasks")
        return f"{what}; {n} scan(s) in flight were not recorded: rerun the same command to resume"
