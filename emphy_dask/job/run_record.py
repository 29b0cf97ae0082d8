"""What a run reports: its summary and exit code, the progress bar, the rows of a scan lost with
its worker, and ``run.json`` (settings, versions, counts, seconds per stage, exclusions).

The run loop (``runner``) calls these; nothing here touches the cluster.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..io import storage
from ..io.atomic import atomic_write
from ..scan_state import STAGES, ScanTask
from .summary import exclusion_report


@dataclass
class ExtractSummary:
    out_dir: Path
    n_scans: int
    n_skipped: int
    counts: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    dashboard_link: str | None = None
    n_redone: int = 0               # failed scans redone (input changed, --retry failed)
    #: (scan_key, reason) of scans whose object store could not be reached: not written, a rerun does them
    unavailable: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 unless no scan of OUT could be processed, or scans are left for a rerun (1). ``counts``
        covers every scan of OUT, resumed ones included, so a rerun that changes nothing exits as
        the first run did."""
        if self.unavailable:
            return 1
        processed = self.counts.get("ok", 0) + self.counts.get("excluded", 0)
        return 0 if processed > 0 else 1


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


def _unavailable(result: dict) -> bool:
    return any(e.get("error_type") == "StorageUnavailable" for e in result.get("errors", []))


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


def _stage_totals(out_dir: Path) -> dict:
    from ..tables import read_table

    cols = [f"t_{s}_s" for s in STAGES] + ["t_total_s"]
    t = read_table(out_dir, "scans", columns=cols)
    return {c: round(sum(v for v in t.column(c).to_pylist() if v is not None), 3) for c in cols}


def _input_label(input_path) -> str:
    """INPUT as run.json records it: the absolute path, the object-store URL, or the DICOMweb URL
    (never credentials: ``io.dicomweb.parse_source`` refuses URLs holding them)."""
    from ..io.dicomweb import is_dicomweb_url, parse_source

    if is_dicomweb_url(input_path):
        return parse_source(input_path).url
    return storage.as_url(input_path) if storage.is_url(input_path) else str(Path(input_path).resolve())


def _write_run_json(out_dir: Path, config, input_path, summary: ExtractSummary, t_index: float,
                    repaired: dict, this_run: Counter, pseudo=None, state: str = "complete",
                    storage_options: dict | None = None) -> None:
    info = {
        "command": "extract",
        "state": state,                       # running | complete | interrupted | scheduler_lost
        "input": _input_label(input_path) if pseudo is None else pseudo.key(_input_label(input_path)),
        "pseudonymized": pseudo is not None,
        "config": {**config.to_dict(), "storage": storage_options or {}},   # secrets as ***
        "config_hash": config.config_hash,
        "result_settings": config.result_settings(),   # what config_hash covers: diffed when OUT is refused
        "versions": _versions(),
        "git_revision": _git_revision(),
        "counts": dict(summary.counts),
        "n_scans_in_manifest": summary.n_scans,
        "processed_this_run": dict(this_run),
        "resumed_from_previous": summary.n_skipped,
        "failed_redone": summary.n_redone,
        "repair": repaired,
        "wall_s": round(summary.wall_s, 3),
        "index_s": round(t_index, 3),
        "worker_seconds_per_stage": _stage_totals(out_dir),
        "exclusions": exclusion_report(out_dir),   # per QC rule: count, value range, job key, warnings
        "unavailable": [{"scan_key": k, "reason": r} for k, r in summary.unavailable],
    }
    atomic_write(out_dir / "run.json", lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
