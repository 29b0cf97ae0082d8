"""``emphy extract``: the distributed job. It only orchestrates; the work is in ``pipeline``
(CPU stages) and ``device_stages`` (lungmask, backbone).

Flow: resolve the model weights (a missing file stops the job here) -> connect -> index the
input into ``manifest.parquet``, streamed unit by unit on the workers (``manifest``) ->
repair/resume the run folder -> read the manifest back in batches and run each remaining scan as
a chain of CPU and device tasks with bounded in-flight counts (``flow.ScanFlow``) -> stage each
result as it completes, write Parquet parts -> ``run.json``. The driver holds no per-file data
and no future per scan beyond those in flight: its memory is flat in the archive's size except
for the set of done keys (~100 bytes a scan).

Progress goes to the progress bar and to the scheduler's Prometheus ``/metrics`` (``metrics``).
``--pseudonymize`` (``pseudonym``) replaces every key before any work. A lost scheduler stops the
job (``SchedulerLost``; the CLI exits 3) with every finished scan written: a rerun resumes. The
summary, exit code and ``run.json`` are ``run_record``'s.

INPUT and OUT may be object-store URLs (``io.storage``; INPUT kinds: ``inputs``): the job checks
both before any work, workers read their series from the store themselves, and a scan whose store
could not be reached (``StorageUnavailable``) is reported but not written, so a rerun does it.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..embed.weights import resolve_weights
from ..errors import StorageUnavailable
from ..io import storage
from ..io.dicomweb import TRANSFER_FAILED
from .cluster import connect, worker_count
from .flow import FlowLimits, ScanFlow, SchedulerLost
from .inputs import check_input, iter_input
from .interrupt import (Interrupted, drop_artifacts, local_workers_ignore_sigint, quiet_workers, shielded,
                        signal_of)
from .logs import LOG_DIR, RunLogs, WorkerLogs
from .manifest import MANIFEST_FILE, ManifestWriter, iter_manifest_file
from .metrics import MetricsReporter
from .pseudonym import Pseudonymizer
from .run_record import (ExtractSummary, _killed_worker, _Progress, _unavailable, _write_run_json,
                         lost_scan_result)
from .storage_options import share_storage_options
from .store import ConfigMismatch, RunStore, clean_out_dir

__all__ = ["run_extract", "ExtractSummary", "SchedulerLost", "Interrupted"]


#: Scans lost with their workers are retried one at a time after the run (a dying worker takes
#: down the tasks queued on it too); at most this many are kept for that, the rest fail at once.
MAX_ISOLATED_RETRIES = 1000


@dataclass
class _Indexed:
    root: Path
    work_manifest: Path             # the manifest the run reads (real paths; pseudonymised keys)
    n_tasks: int = 0                # scans to process (label maps etc. left out)
    n_done: int = 0                 # of those, already in OUT
    kinds: Counter = field(default_factory=Counter)
    redo: dict = field(default_factory=dict)   # failed scans to redo -> why ("input changed", "--retry failed")


def _index(input_path, out_dir: Path, client, done: dict, limit: int | None, pseudo, tmp: Path,
           failed: dict | None = None, retry_failed: bool = False) -> _Indexed:
    """Stream the manifest of ``input_path`` into OUT/manifest.parquet (and, pseudonymised, a
    working copy with the paths outside OUT); count what is to do. ``failed`` (scan_key ->
    input fingerprint of the failed scans in OUT): those whose input changed, or all of them
    with ``retry_failed``, are to be redone (``redo``) instead of resumed."""
    failed = failed or {}
    root, stream = iter_input(input_path, client)
    public = ManifestWriter(out_dir / MANIFEST_FILE, root, drop_paths=pseudo is not None)
    # the run reads its manifest back: a local copy when OUT is in an object store
    work = ManifestWriter(tmp / MANIFEST_FILE, root) if pseudo is not None or storage.is_url(out_dir) else public
    if pseudo is not None:
        pseudo = dataclasses.replace(pseudo, root=root)
    info = _Indexed(root, work.final)
    try:
        for task in stream:
            if pseudo is not None:
                task = pseudo.task(task)
            if task.kind != "skipped":
                if limit is not None and info.n_tasks >= limit:
                    break
                info.n_tasks += 1
                if task.scan_key in failed and (retry_failed or failed[task.scan_key]
                                                != task.selection.get("input_fingerprint")):
                    info.redo[task.scan_key] = "--retry failed" if retry_failed else "input changed"
                else:
                    info.n_done += task.scan_key in done
            info.kinds[task.kind] += 1
            public.add(task)
            if work is not public:
                work.add(task)
    except BaseException:
        for w in {id(public): public, id(work): work}.values():
            w.abort()
        raise
    stream.close()
    public.close()
    if work is not public:
        work.close()
    return info


def _memory_limit(client) -> str | None:
    limits = {w.get("memory_limit") for w in client.scheduler_info().get("workers", {}).values()}
    limits.discard(None)
    return ", ".join(f"{b / 2**30:.1f} GiB" for b in sorted(limits) if b) or None


def run_extract(input_path, out_dir, config, *, pseudonymize: bool = False, **kwargs) -> ExtractSummary:
    """Run the extract job; see the module docstring. Returns counts and the exit code to use.

    Keyword arguments: ``scheduler``, ``workers``, ``limit``, ``progress``, ``log`` (one call per
    terminal line), ``security`` (a ``distributed.security.Security``: TLS for the LocalCluster or
    the client), ``pseudonymize`` (keys -> HMAC pseudonyms, secret in ``EMPHY_PSEUDONYM_KEY``, paths
    scrubbed), ``overwrite`` (remove what emphy wrote in OUT first; ``force``: even when OUT holds
    other files, which are kept) and ``retry_failed`` (redo every failed scan; those whose input
    changed always are). Dask's, pydicom's and lungmask's log records and warnings go to
    ``OUT/logs/`` meanwhile, not the terminal (``job.logs``).
    Raises ``SchedulerLost`` when the scheduler goes away mid-run (finished scans are written),
    ``Interrupted`` on Ctrl-C/SIGTERM (finished scans are written, ``run.json`` says so).
    """
    storage_options, config = config.storage, dataclasses.replace(config, storage={})  # never in a task
    storage.configure(storage_options)
    check_input(input_path, out_dir)         # bad INPUT/OUT, URL, credential or PACS: refused before any write
    pseudo = Pseudonymizer.from_env() if pseudonymize else None   # no secret: stops here
    config = resolve_weights(config)         # a missing weight file stops here, before any work
    if storage.is_url(out_dir):
        out_dir = Path(storage.as_url(out_dir))
        storage.check_output(out_dir)
        log_dir = Path(tempfile.gettempdir()) / "emphy-logs" / out_dir.name   # logs stay on this machine
    else:
        out_dir = Path(out_dir).resolve()
        log_dir = out_dir / LOG_DIR
    if kwargs.get("overwrite"):
        clean_out_dir(out_dir, force=kwargs.get("force", False))   # before logs/ opens
    with RunLogs(log_dir) as logs:
        return _extract(input_path, out_dir, config, logs=logs, pseudo=pseudo, storage_options=storage_options,
                        **kwargs)


def _extract(input_path, out_dir, config, *, scheduler: str | None = None, workers: int | None = None,
             limit: int | None = None, overwrite: bool = False, progress: bool = True,
             log=print, security=None, pseudo=None, force: bool = False, retry_failed: bool = False,
             logs: RunLogs, storage_options: dict) -> ExtractSummary:
    t0 = time.perf_counter()
    if not storage.is_url(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(out_dir, config.output.part_size)
    try:
        store.check_config(config)           # before any work: refuse mixing settings in one OUT
        store.check_pseudonym(pseudo.fingerprint if pseudo else None)
    except ConfigMismatch:
        store.tidy()
        raise
    repaired = store.repair()
    if not (out_dir / "run.json").exists():  # the settings of the rows to come, even if the run is killed
        _write_run_json(out_dir, config, input_path, ExtractSummary(out_dir, 0, 0), 0.0, repaired, Counter(),
                        pseudo, state="running")

    conn = connect(config.cluster, scheduler=scheduler, workers=workers, security=security, log=log)
    if conn.cluster is not None:                 # our own workers: their logs go to OUT/logs/ too
        conn.client.register_plugin(WorkerLogs(str(logs.folder)))
    local_workers_ignore_sigint(conn)
    share_storage_options(conn.client, storage_options)
    metrics = MetricsReporter(conn.client, out_dir.name, {"job": config.name, "config_hash": config.config_hash,
                                                          "version": __version__}, log=log)
    bar = _Progress(0, False)
    tmp = tempfile.TemporaryDirectory(prefix="emphy-manifest-")
    link = conn.dashboard_link
    admitted: dict = {}                      # scans handed to the flow and not yet recorded
    idx = _Indexed(Path(input_path), Path(tmp.name))
    t_index = 0.0
    try:
        log(f"scheduler {conn.client.scheduler.address}; dashboard: {link}  ({worker_count(conn.client)} workers)")
        metrics.register()
        t_index = time.perf_counter()
        retried = store.failed_keys(TRANSFER_FAILED)   # transient (a PACS away): a rerun retries them
        if retried:
            store.forget(retried)
            log(f"{len(retried)} scan(s) whose DICOMweb transfer failed last time are retried")
        done = store.done_keys()
        idx = _index(input_path, out_dir, conn.client, done, limit, pseudo, Path(tmp.name),
                     store.failed_fingerprints(), retry_failed)
        t_index = time.perf_counter() - t_index
        n_todo = idx.n_tasks - idx.n_done
        log(f"manifest: {idx.n_tasks} scans {dict(idx.kinds)}; {idx.n_done} already done; indexing {t_index:.1f} s")
        if idx.redo:
            store.forget(set(idx.redo))      # their old rows go; the new ones replace them
            for key in idx.redo:
                done.pop(key, None)
            why = Counter(idx.redo.values())
            log(f"redoing {len(idx.redo)} failed scan(s) ({', '.join(f'{n} {w}' for w, n in why.items())})")
        if pseudo is not None:
            pseudo = dataclasses.replace(pseudo, root=idx.root)

        bar = _Progress(n_todo, progress)
        metrics.start(in_manifest=idx.n_tasks, remaining=n_todo)
        n_cpu = max(1, worker_count(conn.client) - (conn.n_device_workers if conn.device == "cuda" else 0))
        cpu_limit = config.cluster.max_in_flight or 2 * n_cpu
        batch = config.embed.batch_size if conn.device == "cuda" else 1
        limits = FlowLimits(cpu_limit=cpu_limit, device_backlog=cpu_limit + 2 * batch * max(1, conn.n_device_workers),
                            batch_size=batch, device_slots=max(1, conn.n_device_workers))
        log(f"device stages on {conn.device} ({conn.n_device_workers} workers); "
            f"{cpu_limit} scans in CPU stages at most")
        flow = ScanFlow(conn.client, config, str(out_dir), conn.cpu_resources, conn.device_resources,
                        conn.device, limits)
        todo = _tracked(_todo(idx.work_manifest, done, idx.n_tasks), admitted)
        mem = _memory_limit(conn.client)
        left = n_todo
        retry: list = []
        unavailable: list = []

        def record(task, result, in_flight: int) -> None:
            nonlocal left
            if isinstance(result, BaseException):
                result = lost_scan_result(task, config, result, mem)
            if pseudo is not None:
                result = pseudo.scrub_result(result, task)
            if _unavailable(result):             # the store was unreachable: not done, a rerun does it
                unavailable.append((result["scans"]["scan_key"], result["scans"]["reason"]))
                left -= 1
                bar.update("unavailable")
                return
            store.add(result)
            admitted.pop(task.scan_key, None)
            left -= 1
            bar.update(result["scans"]["status"])
            metrics.scan(result["scans"], in_flight, left)

        for task, result in flow.run(todo):
            # a worker that died (out of memory) also took the tasks queued on it: such scans are
            # retried alone at the end, so only the scan that kills workers is marked failed
            if isinstance(result, BaseException) and _killed_worker(result) and len(retry) < MAX_ISOLATED_RETRIES:
                retry.append(task)
                continue
            record(task, result, flow.in_flight)
        if retry:
            log(f"{len(retry)} scan(s) were lost with their workers; retrying them one at a time")
            solo = ScanFlow(conn.client, config, str(out_dir), conn.cpu_resources, conn.device_resources,
                            conn.device, FlowLimits(cpu_limit=1, device_backlog=1, batch_size=1, device_slots=1))
            for task, result in solo.run(iter(retry)):
                record(task, result, solo.in_flight)
    except SchedulerLost:
        bar.close()
        store.close()                          # what finished is written: a rerun resumes from there
        _close_quietly(conn)
        _write_run_json(out_dir, config, input_path, ExtractSummary(out_dir, idx.n_tasks, idx.n_done,
                        Counter(store.counts()), time.perf_counter() - t0, link), t_index, repaired, bar.counts,
                        pseudo, state="scheduler_lost")
        raise
    except KeyboardInterrupt as exc:           # Ctrl-C, or SIGTERM through interrupt.install_sigterm
        with shielded():
            bar.close()
            store.close()                      # every scan recorded so far becomes rows
            quiet_workers(conn.client)
            _close_quietly(conn)               # the workers stop; their scans in flight are dropped
            drop_artifacts(out_dir, admitted)  # ... with the files they had written: no file without a row
            summary = ExtractSummary(out_dir, idx.n_tasks, idx.n_done, Counter(store.counts()),
                                     time.perf_counter() - t0, link, n_redone=len(idx.redo))
            _write_run_json(out_dir, config, input_path, summary, t_index, repaired, bar.counts, pseudo,
                            state="interrupted")
        raise Interrupted(sum(bar.counts.values()), len(admitted), signal_of(exc)) from None
    except BaseException as exc:
        _close_quietly(conn)                   # staged results stay in _staging/ for the next start
        store.tidy()
        if storage.is_url(out_dir) and storage.unreachable(exc):   # the output store went away: one line
            raise StorageUnavailable(out_dir, "the output store could not be reached; every scan written so "
                                              "far stays, rerun the same command to resume") from exc
        raise
    finally:
        bar.close()
        tmp.cleanup()
    store.close()
    metrics.finish()
    with shielded():     # every result is written: a slow teardown (a worker killed late) is no error
        _close_quietly(conn)

    wall = time.perf_counter() - t0
    counts = Counter(store.counts())
    summary = ExtractSummary(out_dir, idx.n_tasks, idx.n_done, counts, wall, link, n_redone=len(idx.redo),
                             unavailable=unavailable)
    if unavailable:
        log(f"{len(unavailable)} scan(s) not done, their object store could not be reached "
            f"(e.g. {unavailable[0][1]}); rerun the same command to complete them")
    _write_run_json(out_dir, config, input_path, summary, t_index, repaired, bar.counts, pseudo,
                    storage_options=storage.redacted(storage_options))
    return summary


def _close_quietly(conn) -> None:
    """Close a client whose scheduler is gone without waiting for its reconnection attempts."""
    try:
        conn.client.close(timeout=5)
    except Exception:  # noqa: BLE001 - nothing left to close cleanly
        pass
    if conn.cluster is not None:
        try:
            conn.cluster.close()
        except (TimeoutError, OSError):    # a worker process that outlived the nanny's kill timeout
            pass


def _tracked(tasks, admitted: dict):
    """The tasks, each noted in ``admitted`` as the flow takes it (``record`` removes it)."""
    for task in tasks:
        admitted[task.scan_key] = task
        yield task


def _todo(manifest: Path, done: dict, n_tasks: int):
    """The manifest's scans to process, read back in batches (the first ``n_tasks`` processable ones)."""
    n = 0
    for task in iter_manifest_file(manifest):
        if task.kind == "skipped":
            continue
        if n >= n_tasks:
            return
        n += 1
        if task.scan_key not in done:
            yield task


