"""``emphy export OUT --dicom DIR [--stow URL] [--pseudonymize]``: a SEG and an SR per ok scan.

For each ok scan of the run: its source series is read again from the manifest's paths (files,
or WADO-RS for a DICOMweb run), its mask from ``masks/``, its numbers from ``phenotypes/``,
``scans/`` and, when the run was scored, ``predictions/``. The objects go to
``DIR/<shard>/<scan key>/{seg,sr}.dcm`` and/or to a PACS by STOW-RS. A scan that cannot be
exported (source gone, gantry-tilted series whose mask is not on the source grid) is reported
with its reason and the others go on. Patient identity goes only into these objects (never a
table); ``--pseudonymize`` replaces it (``identity.py``).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScanError


@dataclass
class ExportSummary:
    """What ``export_run`` did: files written, scans stored to the PACS, failures (key -> reason)."""

    written: list = field(default_factory=list)
    stored: int = 0
    failed: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _sorted_sources(files: list[Path]) -> list:
    """The series' datasets (headers) in ``read_dicom_series``' slice order (along the normal)."""
    import pydicom

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first = sources[0]
    row, col = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    z = [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in sources]
    return [sources[i] for i in np.argsort(z, kind="stable")]


def _source_files(task, folder: Path) -> list[Path]:
    if task.kind == "dicomweb":
        from ..io.dicomweb import retrieve_instances

        return retrieve_instances(task.paths, folder)[1]
    return [Path(p) for p in task.paths]


def build_objects(task, out_dir: Path, scan_row: dict, phenotype_rows: list[dict], scores: dict):
    """(SEG, SR) of one ok scan (see the module doc); ScanError with the reason otherwise."""
    from ..io import read_dicom_series, read_label_image
    from .seg import build_segmentation, segment_masks
    from .sr import build_report

    if not scan_row.get("mask_path"):
        raise ScanError(out_dir, "the run wrote no mask for this scan ([output] write_masks = false)", stage="export")
    folder = Path(tempfile.mkdtemp(prefix="emphy-export-"))
    try:
        files = _source_files(task, folder)
        volume = read_dicom_series(files)
        if volume.meta.get("gantry_tilt_deg"):
            raise ScanError(task.paths[0], f"gantry-tilted series ({volume.meta['gantry_tilt_deg']} deg): its mask is "
                                           "on the untilted grid, not the source's", stage="export")
        sources = _sorted_sources(files)
        labels = read_label_image(out_dir / scan_row["mask_path"], volume)
        masks = segment_masks(labels, volume.hu, volume.direction_xyz, volume.spacing_zyx_mm)
        seg = build_segmentation(sources, masks, scan_row.get("segmenter") or "unknown")
        sr = build_report(seg, sources, phenotype_rows, scan_row, scores)
        return seg, sr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _tasks(out_dir: Path, input_path, pseudo):
    """The run's ScanTasks with their source paths, streamed from its manifest (or, for a
    ``--pseudonymize`` run whose public manifest holds no paths, from INPUT indexed again and
    keyed by the same pseudonyms)."""
    import pyarrow.parquet as pq

    from ..job.manifest import MANIFEST_FILE, PSEUDONYMIZED, iter_manifest, iter_manifest_file

    manifest = out_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise ScanError(manifest, "not a run of emphy extract (no manifest.parquet)", stage="export")
    if (pq.ParquetFile(manifest).schema_arrow.metadata or {}).get(PSEUDONYMIZED) != b"true":
        yield from iter_manifest_file(manifest)
        return
    if input_path is None or pseudo is None:
        raise ScanError(manifest, "a --pseudonymize run's manifest holds no paths: give --input (the run's INPUT) "
                                  "and --pseudonymize with the run's secret", stage="export")
    for task in iter_manifest(input_path)[1]:
        yield dataclasses.replace(task, scan_key=pseudo.key(task.scan_key))


def export_run(out_dir, dicom_dir=None, stow_url: str | None = None, pseudonymize: bool = False,
               input_path=None, scan: str | None = None, log=print) -> ExportSummary:
    """Write (``dicom_dir``) and/or STOW-RS (``stow_url``, ``http(s)://host/dicom-web``) a SEG and
    an SR for every ok scan of the run ``out_dir`` (or only ``scan``); see the module doc."""
    from ..job.pseudonym import Pseudonymizer
    from ..tables import read_frame

    out_dir = Path(out_dir)
    if dicom_dir is None and stow_url is None:
        raise ScanError(out_dir, "say where the objects go: --dicom DIR and/or --stow URL", stage="export")
    pseudo = Pseudonymizer.from_env() if pseudonymize else None
    stow = None
    if stow_url:
        from ..io.dicomweb import dicomweb_client, is_dicomweb_url, parse_source

        stow = dicomweb_client(parse_source(stow_url).base_url if is_dicomweb_url(stow_url) else stow_url)
    scans = read_frame(out_dir, "scans")
    scans = scans[scans["status"] == "ok"]
    if scan is not None:
        scans = scans[scans["scan_key"] == scan]
        if scans.empty:
            raise ScanError(out_dir, f"no ok scan {scan!r} in this run", stage="export")
    pheno = read_frame(out_dir, "phenotypes")
    pheno = pheno[pheno["hu_source"] == "raw"]
    pred = read_frame(out_dir, "predictions") if (out_dir / "predictions").is_dir() else None
    todo = {row["scan_key"]: row for row in scans.to_dict("records")}
    summary = ExportSummary()
    for task in _tasks(out_dir, input_path, pseudo):
        row = todo.pop(task.scan_key, None)
        if row is not None:
            _export_scan(task, row, out_dir, pheno, pred, dicom_dir, stow, pseudo, summary, log)
    for key in todo:       # ok in the tables but not in the manifest: told, never silently skipped
        summary.failed[key] = "scan not in the run's manifest"
        log(f"{key}: not exported: scan not in the run's manifest")
    return summary


def _export_scan(task, row: dict, out_dir: Path, pheno, pred, dicom_dir, stow, pseudo, summary, log) -> None:
    """SEG + SR of one scan, written and/or stored; a failure is recorded in ``summary`` with its reason."""
    from ..pipeline import artifact_stem
    from .identity import pseudonymize_dataset

    key = row["scan_key"]
    scores = {}
    if pred is not None:
        mine = pred[pred["scan_key"] == key]
        scores = dict(zip(mine["model"], mine["probability"]))
    try:
        seg, sr = build_objects(task, out_dir, row, pheno[pheno["scan_key"] == key].to_dict("records"), scores)
        if pseudo is not None:
            key = key if key.startswith("anon-") else pseudo.key(key)   # a --pseudonymize run's keys already are
            refs = seg.ReferencedSeriesSequence
            uids = {str(seg.StudyInstanceUID), str(seg.FrameOfReferenceUID), *(str(r.SeriesInstanceUID) for r in refs),
                    *(str(i.ReferencedSOPInstanceUID) for r in refs for i in r.ReferencedInstanceSequence)}
            for ds in (seg, sr):
                pseudonymize_dataset(ds, key, uids, pseudo.secret)
        if dicom_dir is not None:
            folder = Path(dicom_dir) / artifact_stem(key)
            folder.mkdir(parents=True, exist_ok=True)
            for name, ds in (("seg", seg), ("sr", sr)):
                tmp = folder / f".tmp-{name}.dcm"       # a reader never sees a partial file
                ds.save_as(tmp, enforce_file_format=True)
                summary.written.append(tmp.replace(folder / f"{name}.dcm"))
        if stow is not None:
            stow.store_instances([seg, sr])
            summary.stored += 1
        log(f"{key}: SEG ({len(seg.SegmentSequence)} segments) and SR exported")
    except Exception as exc:  # noqa: BLE001 - one scan's failure is reported, the others go on
        if isinstance(exc, FileNotFoundError):
            reason = f"{exc.filename}: source file not found (moved or deleted since the run)"
        else:
            reason = f"{exc.path}: {exc.reason}" if isinstance(exc, ScanError) else f"{type(exc).__name__}: {exc}"
        summary.failed[key] = " ".join(str(reason).split())[:500]
        log(f"{key}: not exported: {summary.failed[key]}")
