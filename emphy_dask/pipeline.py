"""One scan, start to finish, as a plain function: the unit of work the Dask job schedules.

``process_scan`` runs ingest -> QC -> resample -> segment -> phenotypes -> artifacts for one
scan and returns the rows for every output table. It never raises for a bad scan: errors become
a ``failed`` row with the stage and a one-line reason, QC exclusions an ``excluded`` row. It
knows nothing about Dask, so it runs the same in a loop, a test or on a worker.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ScanError

STAGES = ("ingest", "qc", "resample", "segment", "phenotypes", "artifacts")


@dataclass(frozen=True)
class ScanTask:
    """What a worker needs to process one scan (small: it is shipped to the worker).

    Attributes
    ----------
    scan_key : str
        Output key (top-level folder of the scan in the input tree, or the manifest's key).
    kind : str
        ``dicom`` (``paths`` = the picked series' files), ``image`` (``paths`` = one
        NIfTI/NRRD/MHD file) or ``error`` (indexing failed: ``error`` says why).
    paths : tuple of str
    selection : dict
        Series-selection facts for the scans table (n_candidate_series, not_picked, ...).
    error, error_path : str or None
        Why no series could be picked, and the file/folder at fault (``kind == "error"``).
    """

    scan_key: str
    kind: str
    paths: tuple = ()
    selection: dict = field(default_factory=dict)
    error: str | None = None
    error_path: str | None = None


def artifact_stem(scan_key: str) -> str:
    """Relative path (no suffix) of a scan's masks/QC files: the key's folders kept as folders.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when that changed anything, a short hash
    of the key is appended so two keys never share files.
    """
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in scan_key.split("/")]
    stem = "/".join(parts)
    if stem != scan_key:
        stem += "-" + hashlib.sha256(scan_key.encode()).hexdigest()[:8]
    return stem


def _meta_columns(meta: dict) -> dict:
    keys = ("series_uid", "study_uid", "series_number", "series_description", "manufacturer", "model",
            "kernel", "kernel_is_sharp", "kvp", "tube_current_ma", "slice_thickness_mm", "spacing_x_mm",
            "spacing_y_mm", "spacing_z_mm", "n_slices", "rows", "columns", "transfer_syntax")
    row = {k: meta.get(k) for k in keys}
    row["source_format"] = meta.get("source_format", "dicom")
    return row


def _load(task: ScanTask):
    from .io import read_dicom_series, read_image

    if task.kind == "dicom":
        return read_dicom_series([Path(p) for p in task.paths])
    if task.kind == "image":
        return read_image(Path(task.paths[0]))
    raise ScanError(task.error_path or task.scan_key, task.error or f"unknown scan kind {task.kind!r}", stage="index")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def process_scan(task: ScanTask, config, out_dir: str | Path, worker: str | None = None) -> dict:
    """Process one scan; return ``{"scans": row, "phenotypes": [...], "slices": [...], "errors": [...]}``.

    Parameters
    ----------
    task : ScanTask
    config : emphy_dask.job.config.JobConfig
    out_dir : path
        Run folder; masks go to ``masks/``, QC images to ``qc/`` (paths in the row are relative).
    worker : str, optional
        Recorded in the scans row.
    """
    out_dir = Path(out_dir)
    timings = {f"t_{s}_s": None for s in STAGES}
    row = {"scan_key": task.scan_key, "config_hash": config.config_hash, "status": "ok",
           "emphy_version": __version__, "worker": worker, **task.selection}
    result = {"scans": row, "phenotypes": [], "slices": [], "errors": []}
    t_start = time.perf_counter()
    stage = "ingest"

    def timed(name, fn, *args, **kwargs):
        nonlocal stage
        stage = name
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[f"t_{name}_s"] = round(time.perf_counter() - t0, 4)
        return value

    try:
        volume = timed("ingest", _load, task)
        row.update(_meta_columns(volume.meta))
        qc = timed("qc", _run_qc, volume, config)
        row.update(qc_max_hu=qc.max_hu, qc_std_hu=qc.std_hu, qc_rule=qc.rule)
        if not qc.passed:
            row.update(status="excluded", reason=f"QC rule {qc.rule}: value {qc.value:.1f}")
        else:
            grid = timed("resample", _resampled_grid, volume, config)
            row.update(grid_1mm_z=grid[0], grid_1mm_y=grid[1], grid_1mm_x=grid[2])
            labels = timed("segment", _segment, volume, config)
            pheno = timed("phenotypes", _phenotypes, volume, labels, config)
            row.update(pheno["summary"])
            result["phenotypes"] = [{"scan_key": task.scan_key, "config_hash": config.config_hash, **r}
                                    for r in pheno["regions"]]
            result["slices"] = [{"scan_key": task.scan_key, "config_hash": config.config_hash, **r}
                                for r in pheno["slices"]]
            row.update(timed("artifacts", _artifacts, task, volume, labels, pheno, config, out_dir))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the job goes on
        path = None
        if isinstance(exc, ScanError):
            stage = exc.stage if exc.stage != "ingest" else stage
            path = task.scan_key if exc.path == "<array>" else exc.path   # array-level stages name no file
            message = f"{path}: {exc.reason}"
        else:
            message = f"{task.scan_key}: {type(exc).__name__}: {exc}"
        message = " ".join(message.split())[:1000]
        row.update(status="failed", reason=message, error_stage=stage)
        result["phenotypes"], result["slices"] = [], []
        result["errors"].append({"scan_key": task.scan_key, "config_hash": config.config_hash, "stage": stage,
                                 "error_type": type(exc).__name__, "message": message, "path": path})
    row.update(timings)
    row["t_total_s"] = round(time.perf_counter() - t_start, 4)
    return result


def _run_qc(volume, config):
    from .preprocess import qc_check

    return qc_check(volume, config.qc)


def _resampled_grid(volume, config) -> tuple:
    """Resample to the model grid (1 mm) and return its shape; the embedding stage consumes it."""
    from .preprocess import resample_volume

    return tuple(int(n) for n in resample_volume(volume, tuple(config.resample.spacing_mm)).hu.shape)


def _segment(volume, config):
    from .segment import segment_lungs

    return segment_lungs(volume, config.segment.name)


def _phenotypes(volume, labels, config) -> dict:
    from .phenotypes import measure_lungs

    m = measure_lungs(volume.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz, config.label)
    c = m.curve
    slices = [{"slice_index": int(k), "rank_from_superior": int(r), "depth_mm": float(dmm),
               "n_lung_voxels": int(n), "laa950_pct": float(pct)}
              for k, r, dmm, n, pct in zip(c["slice_index"], c["rank_from_superior"], c["depth_mm"],
                                           c["n_lung_voxels"], c["laa_pct"]) if n > 0]
    summary = {"lung_volume_l": m.whole["volume_l"], "laa950_pct": m.whole["laa950_pct"],
               "hu_mean": m.whole["hu_mean"],
               "cluster_d": float(m.cluster_d) if np.isfinite(m.cluster_d) else None, "label": m.label}
    return {"regions": m.regions, "slices": slices, "summary": summary}


def _artifacts(task, volume, labels, pheno, config, out_dir: Path) -> dict:
    from .io import write_label_image
    from .qc_images import laa_curve_png, qc_montage_png

    name = artifact_stem(task.scan_key)
    paths = {"mask_path": None, "qc_montage_path": None, "qc_curve_path": None}
    if config.output.write_masks:
        rel = f"masks/{name}.nii.gz"
        _atomic(out_dir / rel, lambda p: write_label_image(labels, volume, p))
        paths["mask_path"] = rel
    if config.output.write_qc_png:
        rel_m, rel_c = f"qc/{name}_montage.png", f"qc/{name}_laa_curve.png"
        _atomic(out_dir / rel_m, lambda p: qc_montage_png(volume.hu, labels, volume.direction_xyz, p))
        _atomic(out_dir / rel_c, lambda p: laa_curve_png(pheno["slices"], p, title=task.scan_key))
        paths.update(qc_montage_path=rel_m, qc_curve_path=rel_c)
    return paths


def selection_columns(n_candidates: int, not_picked, multi_kernel_kernels) -> dict:
    """Scans-table columns describing how the series was picked."""
    return {"n_candidate_series": int(n_candidates),
            "not_picked": json.dumps([{"series_uid": uid, "reason": why} for uid, why in not_picked]),
            "multi_kernel": bool(multi_kernel_kernels),
            "kernels_in_study": ",".join(multi_kernel_kernels) if multi_kernel_kernels else None}
