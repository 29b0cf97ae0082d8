"""``emphy extract``: the distributed job. It only orchestrates; the work is in ``pipeline``
(CPU stages) and ``device_stages`` (lungmask, backbone).

Flow: resolve the model weights (a missing file stops the job here) -> connect -> index the
input into a manifest (distributed) -> repair/resume the run folder -> run each remaining scan
as a chain of CPU and device tasks with bounded in-flight counts (``flow.ScanFlow``) -> stage each
result as it completes, write Parquet parts -> ``run.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ScanError
from ..device_stages import resolve_weights
from ..pipeline import STAGES, ScanTask
from .cluster import connect, worker_count
from .flow import FlowLimits, ScanFlow
from .manifest import build_manifest, manifest_summary, scan_tasks, write_manifest
from .store import RunStore, clean_out_dir
from .summary import exclusion_report


@dataclass
class ExtractSummary:
    out_dir: Path
    n_scans: int
    n_skipped: int
    counts: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    dashboard_link: str | None = None

    @property
    def exit_code(self) -> int:
        """0 unless nothing at all could be processed."""
        processed = self.counts.get("ok", 0) + self.counts.get("excluded", 0)
        return 0 if (processed > 0 or (self.n_scans > 0 and self.n_skipped == self.n_scans)) else 1


def lost_scan_result(task: ScanTask, config, exc: BaseException) -> dict:
    """Rows for a scan whose task died with its worker(s) (e.g. out of memory) after all retries."""
    message = f"{task.scan_key}: worker lost while processing ({type(exc).__name__}: {exc}); " \
              "likely out of memory on this scan"
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


def run_extract(input_path, out_dir, config, *, scheduler: str | None = None, workers: int | None = None,
                limit: int | None = None, overwrite: bool = False, progress: bool = True,
                log=print) -> ExtractSummary:
    """Run the extract job; see the module docstring. Returns counts and the exit code to use."""
    t0 = time.perf_counter()
    if not Path(input_path).exists():
        raise ScanError(input_path, "input not found: neither a folder nor a manifest file", stage="index")
    config = resolve_weights(config)         # a missing weight file stops here, before any work
    out_dir = Path(out_dir).resolve()
    if overwrite:
        clean_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(out_dir, config.output.part_size)
    store.check_config(config.config_hash)   # before any work: refuse mixing settings in one OUT
    repaired = store.repair()

    conn = connect(config.cluster, scheduler=scheduler, workers=workers)
    try:
        log(f"dashboard: {conn.dashboard_link}  ({worker_count(conn.client)} workers)")
        t_index = time.perf_counter()
        root, tasks = build_manifest(input_path, conn.client)
        tasks, not_scans = scan_tasks(tasks)       # label maps: listed in the manifest, never processed
        if limit is not None:
            tasks = tasks[:limit]
        write_manifest(out_dir, root, tasks + not_scans)
        t_index = time.perf_counter() - t_index
        done = store.done_keys()
        todo = [t for t in tasks if t.scan_key not in done]
        log(f"manifest: {len(tasks)} scans {manifest_summary(tasks + not_scans)}; "
            f"{len(tasks) - len(todo)} already done; "
            f"indexing {t_index:.1f} s")

        bar = _Progress(len(todo), progress)
        n_cpu = max(1, worker_count(conn.client) - (conn.n_device_workers if conn.device == "cuda" else 0))
        cpu_limit = config.cluster.max_in_flight or 2 * n_cpu
        batch = config.embed.batch_size if conn.device == "cuda" else 1
        limits = FlowLimits(cpu_limit=cpu_limit, device_backlog=cpu_limit + 2 * batch * max(1, conn.n_device_workers),
                            batch_size=batch, device_slots=max(1, conn.n_device_workers))
        log(f"device stages on {conn.device} ({conn.n_device_workers} workers); "
            f"{cpu_limit} scans in CPU stages at most")
        flow = ScanFlow(conn.client, config, str(out_dir), conn.cpu_resources, conn.device_resources,
                        conn.device, limits)
        for task, result in flow.run(todo):
            if isinstance(result, BaseException):   # e.g. KilledWorker: the scan killed its workers
                result = lost_scan_result(task, config, result)
            store.add(result)
            bar.update(result["scans"]["status"])
        bar.close()
        store.close()
    finally:
        link = conn.dashboard_link
        conn.close()

    wall = time.perf_counter() - t0
    counts = Counter(store.counts())
    summary = ExtractSummary(out_dir, len(tasks), len(tasks) - len(todo), counts, wall, link)
    _write_run_json(out_dir, config, input_path, summary, t_index, repaired, bar.counts)
    return summary


def _stage_totals(out_dir: Path) -> dict:
    from ..tables import read_table

    cols = [f"t_{s}_s" for s in STAGES] + ["t_total_s"]
    t = read_table(out_dir, "scans", columns=cols)
    return {c: round(sum(v for v in t.column(c).to_pylist() if v is not None), 3) for c in cols}


def _write_run_json(out_dir: Path, config, input_path, summary: ExtractSummary, t_index: float,
                    repaired: dict, this_run: Counter) -> None:
    info = {
        "command": "extract",
        "input": str(Path(input_path).resolve()),
        "config": config.to_dict(),
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
    }
    tmp = out_dir / ".tmp-run.json"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out_dir / "run.json")
