"""An inserted cohort on disk: real base scans x patterns x severities, as DICOM with truth.

Layout under ``out_dir`` (like ``emphy synth``, so ``emphy extract OUT/dicom`` keys the scans
by ``scan_key``)::

    dicom/<scan_key>/<study_uid>/<series_uid>/<n>.dcm     one series per variant
    masks/<scan_key>-lesion.nii.gz                          changed voxels (the lesion mask)
    masks/<base_id>-lung.nii.gz                             the base's lung mask the truth is on
    truth.csv                                               one row per variant (``TRUTH_COLUMNS``)
    refused.csv                                             base, reason: bases not used

``scan_key`` = ``<base_id>[-TAG]-<pattern>-<severity>-s<seed>``; ``base_id`` = ``anat-`` + 10 hex
digits of SHA-256 of the base key: every variant of one base carries it as PatientID (so a
run groups them as one patient) and nothing of the base's identity (PS3.15 keywords in
``io.metadata.PHI_TAGS``, private tags and patient-module attributes are removed; dates fixed).
A variant is written in ``.partial/`` and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian

from emphy_dask.errors import ScanError
from emphy_dask.io.dicom_index import find_files, index_files
from emphy_dask.io.dicom_read import read_dicom_series
from emphy_dask.io.image_io import image_format, label_image_reason
from emphy_dask.io.metadata import PHI_TAGS
from emphy_dask.io.series import group_series, select_series
from emphy_dask.segment import segment_lungs
from emphy_dask.synth.dicom_write import synth_uid
from emphy_dask.synth.insert import LAA_HU, insert_emphysema, psf_sigma_mm
from emphy_dask.synth.lesions import PATTERNS
from emphy_dask.volume import CTVolume, craniocaudal_axis

#: A base must cover this much of the chest (cranio-caudal extent, mm) and hold this much lung.
MIN_EXTENT_MM = 150.0
MIN_LUNG_L = 1.0
ZONES = ("upper", "middle", "lower")
TRUTH_COLUMNS = (["scan_key", "base_key", "base_id", "pattern", "severity_aimed_pct", "seed",
                  "base_laa950_pct", "added_laa950_pct", "expected_laa950_pct", "expected_mld_hu", "expected_label",
                  "lesion_fraction_pct", "lesion_volume_ml", "n_lesions", "d_aimed", "d_base", "d_lesions", "d_after",
                  "psf_sigma_mm", "kernel", "lung_volume_l"]
                 + [f"{what}_{z}_pct" for z in ZONES for what in ("base_laa950", "added_laa950", "lesion_fraction")]
                 + ["lesion_mask", "lung_mask", "n_slices", "t_insert_s", "d_sampled", "d_tries"])


def base_id(base_key: str) -> str:
    """Non-identifying anatomy id of a base: ``anat-`` + 10 hex digits of SHA-256 of the key's
    anatomy (the part before ``#``: ``Lung_Dx-A0001#L`` and ``#B``, two kernels of one
    acquisition, are one anatomy and one patient)."""
    return "anat-" + hashlib.sha256(base_key.split("#")[0].encode("utf-8")).hexdigest()[:10]


def _tag(base_key: str) -> str:
    """The ``#TAG`` of a base key as a scan-key part (``-L``), or ''."""
    tag = base_key.split("#", 1)[1] if "#" in base_key else ""
    return "-" + "".join(c for c in tag if c.isalnum()) if tag else ""


def parse_base(spec: str) -> tuple[str, Path]:
    """``KEY=PATH`` or ``PATH`` (key = the folder or file name without suffix). ``KEY#TAG=PATH``:
    another reconstruction (kernel) of the anatomy ``KEY``."""
    if "=" in spec and not Path(spec).exists():
        key, path = spec.split("=", 1)
        return key, Path(path)
    p = Path(spec)
    return p.name.split(".")[0] or str(p), p


def load_base(path) -> tuple[CTVolume, list[Path]]:
    """The base CT and its slice files in the volume's slice order.

    Raises ScanError (path + reason) for anything that is not one axial, untilted chest CT
    series of at least ``MIN_EXTENT_MM`` (label images, NIfTI bases, slabs, corrupt files).
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(path, "path does not exist")
    if path.is_file() and image_format(path) is not None:
        reason = label_image_reason(path)
        raise ScanError(path, reason or "insertion writes DICOM and needs a DICOM series as its base")
    folder = path if path.is_dir() else path.parent
    files = find_files(folder)
    records = index_files(files, folder) if files else []
    if not records:
        raise ScanError(path, "no DICOM files found")
    choice = select_series(group_series(records), where=str(folder))
    vol = read_dicom_series(choice.picked.files)
    if vol.meta.get("gantry_tilt_deg"):
        raise ScanError(path, f"gantry tilt {vol.meta['gantry_tilt_deg']} deg: insertion needs untilted slices")
    if craniocaudal_axis(vol.direction_xyz)[0] != 0:
        raise ScanError(path, "not an axial series")
    extent_mm = vol.shape[0] * vol.spacing_zyx_mm[0]
    if extent_mm < MIN_EXTENT_MM:
        raise ScanError(path, f"a slab of {vol.shape[0]} slices ({extent_mm:.0f} mm), not a full chest "
                              f"(needs >= {MIN_EXTENT_MM:.0f} mm)")
    normal = np.asarray(vol.direction_xyz, float).reshape(3, 3)[:, 2]
    by_z = sorted(choice.picked.files, key=lambda f: float(np.dot(_position(f), normal)))
    return vol, [Path(f) for f in by_z]


def _position(path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
                      .ImagePositionPatient, float)


def _deidentified(ds, patient_id: str):
    """Remove identity: PS3.15 keywords, private tags, the rest of the patient module."""
    for kw in PHI_TAGS:
        if kw in ds:
            delattr(ds, kw)
    ds.remove_private_tags()
    for tag in [t for t in ds.keys() if t.group == 0x0010]:
        del ds[tag]
    for kw in ("ReferencedImageSequence", "SourceImageSequence", "ReferencedStudySequence",
               "ReferencedPerformedProcedureStepSequence", "RequestAttributesSequence", "IrradiationEventUID"):
        if kw in ds:
            delattr(ds, kw)
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    return ds


def write_variant_series(files, old_hu, new_hu, out_dir, *, scan_key, patient_id, seed, description) -> int:
    """Copy the base slices with the new pixels, new UIDs and no identity; returns slices written.

    Raw values change by exactly the HU change (divided by the slope), so every voxel the
    insertion left alone keeps its stored value, padding included.
    """
    study, series, frame = (synth_uid("insert", kind, scan_key, seed) for kind in ("study", "series", "for"))
    out = Path(out_dir) / study / series
    out.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        raw = ds.pixel_array
        diff = new_hu[k].astype(np.int32) - old_hu[k].astype(np.int32)
        if diff.any():
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            info = np.iinfo(raw.dtype)
            raw = np.clip(raw.astype(np.int32) + np.rint(diff / slope).astype(np.int32), info.min, info.max)
            raw = raw.astype(ds.pixel_array.dtype)
        _deidentified(ds, patient_id)
        sop = synth_uid("insert", "sop", scan_key, seed, k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesDescription = description
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<")).tobytes()
        ds.save_as(out / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return len(files)


def _write_mask(vol: CTVolume, mask, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(vol.to_sitk(np.ascontiguousarray(mask, np.uint8)), str(path), useCompression=True)


def variant_key(bid: str, pattern: str, severity_pct: float, seed: int, tag: str = "") -> str:
    return f"{bid}{tag}-{pattern}-{severity_pct:g}-s{seed}"


def insert_base(base_key: str, path, out_dir, patterns, severities, seed: int = 0, log=print) -> list[dict]:
    """All variants of one base; returns their truth rows. Raises ScanError for an unusable base
    (nothing written then)."""
    import time

    out = Path(out_dir)
    vol, files = load_base(path)
    labels = segment_lungs(vol)
    lung_l = float(np.count_nonzero(labels)) * vol.voxel_volume_mm3 / 1e6
    if lung_l < MIN_LUNG_L:
        raise ScanError(path, f"{lung_l:.2f} L of lung found (needs >= {MIN_LUNG_L} L): not a chest CT")
    bid = base_id(base_key)
    psf = psf_sigma_mm(vol.hu, vol.spacing_zyx_mm, vol.fov_mask)
    thickness = float(vol.meta.get("slice_thickness_mm") or vol.spacing_zyx_mm[0])
    lung_rel = f"masks/{bid}{_tag(base_key)}-lung.nii.gz"
    _write_mask(vol, labels, out / lung_rel)
    plan = [("none", 0.0)] if any(float(s) == 0 for s in severities) else []
    plan += [(p, float(s)) for p in patterns for s in severities if float(s) > 0]
    rows = []
    for pattern, sev in plan:
        key = variant_key(bid, pattern, sev, seed, _tag(base_key))
        t0 = time.perf_counter()
        if pattern == "none":
            new_hu, lesion = vol.hu, np.zeros(vol.shape, bool)
            _, _, truth = insert_emphysema(vol.hu, labels, vol.spacing_zyx_mm, "centrilobular", 0.0, seed,
                                           psf_mm=psf, direction_xyz=vol.direction_xyz)
            truth["pattern"] = "none"
        else:
            new_hu, lesion, truth = insert_emphysema(
                vol.hu, labels, vol.spacing_zyx_mm, pattern, sev, [seed, int(bid[5:], 16) % 2**31],
                psf_mm=psf, slice_thickness_mm=thickness, direction_xyz=vol.direction_xyz)
        t_insert = time.perf_counter() - t0
        partial = out / ".partial" / key
        shutil.rmtree(partial, ignore_errors=True)
        write_variant_series(files, vol.hu, new_hu, partial / "dicom", scan_key=key, patient_id=bid, seed=seed,
                             description=f"emphy insert {pattern} {sev:g}%")
        lesion_rel = f"masks/{key}-lesion.nii.gz"
        _write_mask(vol, lesion, partial / lesion_rel)
        final = out / "dicom" / key
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial / "dicom", final)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        os.replace(partial / lesion_rel, out / lesion_rel)
        shutil.rmtree(partial, ignore_errors=True)
        lung_vals = new_hu[labels > 0]
        mld = float(lung_vals.mean())
        truth.update(scan_key=key, base_key=base_key, base_id=bid, seed=seed, expected_mld_hu=mld,
                     expected_label=int(truth["expected_laa950_pct"] >= 6.0 and mld < -850.0),
                     kernel=str(vol.meta.get("kernel") or ""), lung_volume_l=lung_l, lesion_mask=lesion_rel,
                     lung_mask=lung_rel, n_slices=vol.shape[0], t_insert_s=round(t_insert, 3))
        rows.append({c: truth.get(c) for c in TRUTH_COLUMNS})
        log(f"{key}: {pattern} aimed {sev:g} %, added {truth['added_laa950_pct']:.2f} % "
            f"(base {truth['base_laa950_pct']:.2f} %) in {t_insert:.1f} s")
    return rows


def insert_cohort(bases, out_dir, patterns=tuple(PATTERNS), severities=(0, 10, 25), seed: int = 0,
                  log=print) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Variants of every base; returns (truth table, [(base, one-line reason)] refused).

    ``bases``: ``KEY=PATH`` or ``PATH`` strings (see ``parse_base``). ``truth.csv`` keeps the
    rows of earlier calls for other scan keys, so cohorts can be built base by base.
    """
    for p in patterns:
        if p not in PATTERNS:
            raise ValueError(f"unknown pattern {p!r}; known: {', '.join(PATTERNS)}")
    for s in severities:
        if not 0 <= float(s) <= 40:
            raise ValueError(f"severity {s} outside 0-40 (% of the lung)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, refused = [], []
    for spec in bases:
        key, path = parse_base(spec)
        try:
            rows += insert_base(key, path, out, patterns, severities, seed, log)
        except (ScanError, ValueError) as exc:
            reason = str(exc).replace("\n", " ")
            refused.append((key, reason))
            log(f"refused {key}: {reason}")
    truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    old = out / "truth.csv"
    if old.exists():
        prev = pd.read_csv(old)
        truth = pd.concat([prev[~prev["scan_key"].isin(truth["scan_key"])], truth], ignore_index=True)
    tmp = out / ".truth.csv.tmp"
    truth.to_csv(tmp, index=False)
    os.replace(tmp, old)
    pd.DataFrame(refused, columns=["base_key", "reason"]).to_csv(out / "refused.csv", index=False)
    shutil.rmtree(out / ".partial", ignore_errors=True)
    return truth, refused


__all__ = ["insert_cohort", "insert_base", "load_base", "base_id", "TRUTH_COLUMNS", "LAA_HU"]
