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
job (``SchedulerLost``; the CLI exits 3) with every finished scan written: a rerun resumes.

INPUT and OUT may be object-store URLs (``io.storage``; INPUT kinds: ``inputs``): the job checks
both before any work, workers read their series from the store themselves, and a scan whose store
could not be reached (``StorageUnavailable``) is reported but not written, so a rerun does it.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..device_stages import resolve_weights
from ..errors import StorageUnavailable
from ..io import storage
from ..pipeline import STAGES, ScanTask
from .cluster import connect, worker_count
from .flow import FlowLimits, ScanFlow, SchedulerLost
from .inputs import check_input, iter_input
from .manifest import MANIFEST_FILE, ManifestWriter, iter_manifest_file
from .metrics import MetricsReporter
from .pseudonym import Pseudonymizer
from .storage_options import share_storage_options
from .store import RunStore, clean_out_dir
from .summary import exclusion_report

__all__ = ["run_extract", "ExtractSummary", "SchedulerLost"]


@dataclass
class ExtractSummary:
    out_dir: Path
    n_scans: int
    n_skipped: int
    counts: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    dashboard_link: str | None = None
    #: (scan_key, reason) of scans whose object store could not be reached: not written, a rerun does them
    unavailable: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 unless nothing at all could be processed, or scans are left for a rerun (1)."""
        if self.unavailable:
            return 1
        processed = self.counts.get("ok", 0) + self.counts.get("excluded", 0)
        return 0 if (processed > 0 or (self.n_scans > 0 and self.n_skipped == self.n_scans)) else 1


#: Scans lost with their workers are retried one at a time after the run (a dying worker takes
#: down the tasks queued on it too); at most this many are kept for that, the rest fail at once.
MAX_ISOLATED_RETRIES = 1000


def _killed_worker(exc: BaseException) -> bool:
    from distributed import KilledWorker

    return isinstance(exc, KilledWorker)


def lost_scan_result(task: ScanTask, config, exc: BaseException, memory_limit: str | None = None) -> dict:
    """Rows for a scan whose task died with its worker(s) (e.g. out of memory) after all retries."""
    from dask.utils import key_split

    limit = f" (workers' memory limit {memory_limit})" if memory_limit else ""
    if _killed_worker(exc):
        stage = key_split(str(getattr(exc, "task", "") or "")) or "a"
        n = (getattr(exc, "allowed_failures", None) or 0) + 1
        message = (f"{task.scan_key}: {n} worker(s) died running its {stage} task, the last time with this "
                   f"scan alone on the cluster (KilledWorker); likely out of memory on this scan{limit}")
    else:
        message = f"{task.scan_key}: worker lost while processing ({type(exc).__name__}: {exc}); " \
                  f"likely out of memory on this scan{limit}"
    message = " ".join(message.split())[:1000]
    row = {"scan_key": task.scan_key, "config_hash": config.config_hash, "status": "failed", "reason": message,
           "error_stage": "worker", "emphy_version": __version__, **task.selection}
    err = {"scan_key": task.scan_key, "config_hash": config.config_hash, "stage": "worker",
           "error_type": type(exc).__name__, "message": message, "path": None}
    return {"scans": row, "phenotypes": [], "slices": [], "embeddings": [], "errors": [err]}


class _Progress:
    """A progress bar with done/excluded/failed counts and ETA (stderr)."""

    def __init__(self, total: int, enabled: bool):
        self.counts = Counter()
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="scan", file=sys.stderr, dynamic_ncols=True)

    def update(self, status: str) -> None:
        self.counts[status] += 1
        if self.bar is not None:
            self.bar.set_postfix(ok=self.counts["ok"], excluded=self.counts["excluded"],
                                 failed=self.counts["failed"], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"emphy-dask": __version__, "python": sys.version.split()[0]}
    for pkg in ("dask", "distributed", "numpy", "SimpleITK", "pydicom", "pyarrow", "scipy", "scikit-image", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class _Indexed:
    root: Path
    work_manifest: Path             # the manifest the run reads (real paths; pseudonymised keys)
    n_tasks: int = 0                # scans to process (label maps etc. left out)
    n_done: int = 0                 # of those, already in OUT
    kinds: Counter = field(default_factory=Counter)


def _index(input_path, out_dir: Path, client, done: dict, limit: int | None, pseudo, tmp: Path) -> _Indexed:
    """Stream the manifest of ``input_path`` into OUT/manifest.parquet (and, pseudonymised, a
    working copy with the paths outside OUT); count what is to do."""
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


def run_extract(input_path, out_dir, config, *, scheduler: str | None = None, workers: int | None = None,
                limit: int | None = None, overwrite: bool = False, progress: bool = True,
                log=print, security=None, pseudonymize: bool = False) -> ExtractSummary:
    """Run the extract job; see the module docstring. Returns counts and the exit code to use.

    ``security``: a ``distributed.security.Security`` (TLS) for the LocalCluster or the client.
    ``pseudonymize``: keys -> HMAC pseudonyms (secret in ``EMPHY_PSEUDONYM_KEY``), paths scrubbed.
    Raises ``SchedulerLost`` when the scheduler goes away mid-run (finished scans are written).
    """
    t0 = time.perf_counter()
    storage_options, config = config.storage, dataclasses.replace(config, storage={})  # never in a task
    storage.configure(storage_options)
    check_input(input_path)                  # a bad path or URL, a refused credential: stops here
    pseudo = Pseudonymizer.from_env() if pseudonymize else None   # no secret: stops here
    config = resolve_weights(config)         # a missing weight file stops here, before any work
    if storage.is_url(out_dir):
        out_dir = Path(storage.as_url(out_dir))
        storage.check_output(out_dir)
    else:
        out_dir = Path(out_dir).resolve()
    if overwrite:
        clean_out_dir(out_dir)
    if not storage.is_url(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(out_dir, config.output.part_size)
    store.check_config(config.config_hash)   # before any work: refuse mixing settings in one OUT
    store.check_pseudonym(pseudo.fingerprint if pseudo else None)
    repaired = store.repair()

    conn = connect(config.cluster, scheduler=scheduler, workers=workers, security=security)
    share_storage_options(conn.client, storage_options)
    metrics = MetricsReporter(conn.client, out_dir.name, {"job": config.name, "config_hash": config.config_hash,
                                                          "version": __version__}, log=log)
    bar = _Progress(0, False)
    tmp = tempfile.TemporaryDirectory(prefix="emphy-manifest-")
    link = conn.dashboard_link
    try:
        log(f"scheduler {conn.client.scheduler.address}; dashboard: {link}  ({worker_count(conn.client)} workers)")
        metrics.register()
        t_index = time.perf_counter()
        done = store.done_keys()
        idx = _index(input_path, out_dir, conn.client, done, limit, pseudo, Path(tmp.name))
        t_index = time.perf_counter() - t_index
        n_todo = idx.n_tasks - idx.n_done
        log(f"manifest: {idx.n_tasks} scans {dict(idx.kinds)}; {idx.n_done} already done; indexing {t_index:.1f} s")
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
        todo = _todo(idx.work_manifest, done, idx.n_tasks)
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
        raise
    except BaseException as exc:
        _close_quietly(conn)                   # staged results stay in _staging/ for the next start
        if storage.is_url(out_dir) and storage.unreachable(exc):   # the output store went away: one line
            raise StorageUnavailable(out_dir, "the output store could not be reached; every scan written so "
                                              "far stays, rerun the same command to resume") from exc
        raise
    finally:
        bar.close()
        tmp.cleanup()
    store.close()
    metrics.finish()
    conn.close()

    wall = time.perf_counter() - t0
    counts = Counter(store.counts())
    summary = ExtractSummary(out_dir, idx.n_tasks, idx.n_done, counts, wall, link, unavailable)
    if unavailable:
        log(f"{len(unavailable)} scan(s) not done, their object store could not be reached "
            f"(e.g. {unavailable[0][1]}); rerun the same command to complete them")
    _write_run_json(out_dir, config, input_path, summary, t_index, repaired, bar.counts, pseudo,
                    storage.redacted(storage_options))
    return summary


def _unavailable(result: dict) -> bool:
    return any(e.get("error_type") == "StorageUnavailable" for e in result.get("errors", []))


def _close_quietly(conn) -> None:
    """Close a client whose scheduler is gone without waiting for its reconnection attempts."""
    try:
        conn.client.close(timeout=5)
    except Exception:  # noqa: BLE001 - nothing left to close cleanly
        pass
    if conn.cluster is not None:
        conn.cluster.close()


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


def _stage_totals(out_dir: Path) -> dict:
    from ..tables import read_table

    cols = [f"t_{s}_s" for s in STAGES] + ["t_total_s"]
    t = read_table(out_dir, "scans", columns=cols)
    return {c: round(sum(v for v in t.column(c).to_pylist() if v is not None), 3) for c in cols}


def _write_run_json(out_dir: Path, config, input_path, summary: ExtractSummary, t_index: float,
                    repaired: dict, this_run: Counter, pseudo=None, storage_options: dict | None = None) -> None:
    source = storage.as_url(input_path) if storage.is_url(input_path) else str(Path(input_path).resolve())
    info = {
        "command": "extract",
        "input": source if pseudo is None else pseudo.key(source),
        "pseudonymized": pseudo is not None,
        "config": {**config.to_dict(), "storage": storage_options or {}},   # secrets as ***
        "config_hash": config.config_hash,
        "versions": _versions(),
        "git_revision": _git_revision(),
        "counts": dict(summary.counts),
        "n_scans_in_manifest": summary.n_scans,
        "processed_this_run": dict(this_run),
        "resumed_from_previous": summary.n_skipped,
        "repair": repaired,
        "wall_s": round(summary.wall_s, 3),
        "index_s": round(t_index, 3),
        "worker_seconds_per_stage": _stage_totals(out_dir),
        "exclusions": exclusion_report(out_dir),   # per QC rule: count, value range, job key, warnings
        "unavailable": [{"scan_key": k, "reason": r} for k, r in summary.unavailable],
    }
    storage.write_bytes(out_dir / "run.json", json.dumps(info, indent=2, default=str).encode())
