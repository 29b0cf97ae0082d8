"""A synthetic chest-CT cohort on disk: DICOM studies, true lung masks, truth table.

Layout under ``out_dir``::

    dicom/<scan_key>/<study_uid>/<series_uid>/<hex>.dcm   localizer, thin and thick series
    masks/<scan_key>.nii.gz                                true lung labels on the thin grid
    truth.csv                                              one row per patient

Everything derives from ``seed``: the same seed gives the same bytes in every file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from emphy_dask.synth.dicom_write import synth_uid, write_dicom_series, write_localizer
from emphy_dask.synth.phantom import PADDING_HU_SYNTH, make_phantom

TRUTH_COLUMNS = ["scan_key", "pattern", "severity_pct", "laa950_pct", "hu_mean", "lung_volume_l", "label",
                 "n_slices", "spacing_z_mm", "spacing_xy_mm", "thin_series_uid", "study_uid",
                 "thick_series_uid"]


def _grid(size: str, rng) -> tuple[tuple, tuple, int]:
    """(shape_zyx, spacing_zyx_mm, thick_factor) of a patient's thin reconstruction."""
    if size == "small":   # test grid: ~0.5 M voxels, lungs ~30 voxels across, trachea ~5 voxels
        dx = round(float(rng.uniform(3.5, 3.8)), 2)
        return (int(rng.integers(50, 59)), 96, 96), (5.0, dx, dx), 2
    if size == "full":    # clinical thin-slice chest CT
        dx = round(float(rng.uniform(0.68, 0.80)), 3)
        dz = float(rng.choice([1.0, 1.25]))
        nz = int(np.clip(round(rng.uniform(300, 345) / dz), 250, 350))
        return (nz, 512, 512), (dz, dx, dx), 3 if dz == 1.0 else 2
    raise ValueError(f"size must be 'small' or 'full', got {size!r}")


def _plan(n_patients: int, seed: int) -> list[tuple[str, float]]:
    """(pattern, requested severity %) per patient: about half positives (8-25 %, patterns
    alternating so both appear), the rest negatives (0-3 %, 'none' below 1 %)."""
    rng = np.random.default_rng([seed, 10_000])
    positive = np.zeros(n_patients, bool)
    positive[rng.permutation(n_patients)[: (n_patients + 1) // 2]] = True
    first = int(rng.integers(2))
    plan, n_pos = [], 0
    for pos in positive:
        if pos:
            pattern = ("centrilobular", "panlobular")[(first + n_pos) % 2]
            plan.append((pattern, round(float(rng.uniform(8, 25)), 1)))
            n_pos += 1
        else:
            sev = round(float(rng.uniform(0, 3)), 1)
            plan.append(("none", 0.0) if sev < 1 else (str(rng.choice(["centrilobular", "panlobular"])), sev))
    return plan


def _thick(hu: np.ndarray, m: int) -> np.ndarray:
    """Average every ``m`` thin slices (thicker reconstruction); padding stays padding."""
    n = hu.shape[0] // m * m
    thick = hu[:n].reshape(n // m, m, *hu.shape[1:]).mean(axis=1, dtype=np.float32)
    return np.rint(thick).astype(np.int16)


def write_mask_nifti(labels: np.ndarray, spacing_zyx_mm, origin_xyz_mm, path) -> Path:
    """Labels (z,y,x) uint8 -> NIfTI with the DICOM series' geometry (identity direction,
    origin = ImagePositionPatient of the most inferior slice)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels, np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx_mm[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_xyz_mm))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def synth_patient(out_dir, index: int, pattern: str, severity_pct: float, *, seed=0, size="small") -> dict:
    """Make, write and describe patient ``index`` (1-based key SYNTH-<index:04d>). Returns a truth row."""
    out = Path(out_dir)
    key = f"SYNTH-{index:04d}"
    rng = np.random.default_rng([seed, index])
    shape, spacing, m = _grid(size, rng)
    ph = make_phantom(shape, spacing, severity_pct, pattern, rng)
    study = synth_uid("study", seed, key)
    frame = synth_uid("for", seed, key)
    thin_uid, thick_uid, scout_uid = (synth_uid("series", seed, key, s) for s in ("thin", "thick", "scout"))
    common = dict(study_uid=study, frame_of_reference_uid=frame, seed=seed,
                  patient_name=f"SYNTH^{index:04d}", patient_id=key)
    base = out / "dicom" / key / study
    write_localizer(ph.hu, spacing, base / scout_uid, origin_xyz_mm=ph.origin_xyz_mm, series_uid=scout_uid,
                    series_number=1, **common)
    dz, dx = spacing[0], spacing[2]
    ox, oy, oz = ph.origin_xyz_mm
    write_dicom_series(_thick(ph.hu, m), (m * dz, dx, dx), base / thick_uid, series_uid=thick_uid,
                       origin_xyz_mm=(ox, oy, round(oz + (m - 1) / 2 * dz, 4)), kernel="LUNG", series_number=2,
                       series_description=f"CHEST {m * dz:g}mm LUNG", slice_thickness_mm=m * dz,
                       tube_current_ma=180, **common)
    write_dicom_series(ph.hu, spacing, base / thin_uid, series_uid=thin_uid, origin_xyz_mm=ph.origin_xyz_mm,
                       kernel="STANDARD", series_number=3, series_description=f"CHEST {dz:g}mm STANDARD",
                       slice_thickness_mm=dz, tube_current_ma=180, **common)
    write_mask_nifti(ph.lung_labels, spacing, ph.origin_xyz_mm, out / "masks" / f"{key}.nii.gz")
    t = ph.truth
    return {"scan_key": key, "pattern": t["pattern"], "severity_pct": t["severity_pct"],
            "laa950_pct": t["laa950_pct"], "hu_mean": t["hu_mean"], "lung_volume_l": t["lung_volume_l"],
            "label": t["label"], "n_slices": shape[0], "spacing_z_mm": dz, "spacing_xy_mm": dx,
            "thin_series_uid": thin_uid, "study_uid": study, "thick_series_uid": thick_uid}


def synth_cohort(out_dir, n_patients: int, seed: int = 0, size: str = "small") -> pd.DataFrame:
    """Write ``n_patients`` synthetic chest CTs under ``out_dir``; return the truth table.

    Parameters
    ----------
    out_dir : folder (created).
    n_patients : int >= 1. Keys SYNTH-0001 ... ; about half emphysema-positive.
    seed : int; same seed -> identical files.
    size : "small" (96 x 96 x 50-58 at 3.5-3.8 mm x 5 mm; < 1 s per patient) or
        "full" (512 x 512 x 250-350 at 0.68-0.80 mm x 1-1.25 mm; ~10 s per patient).

    Returns
    -------
    pandas.DataFrame with ``TRUTH_COLUMNS`` (also written to ``out_dir/truth.csv``). Truth
    values refer to the thin series (the one with most slices) and ``masks/<key>.nii.gz``.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [synth_patient(out, i + 1, pattern, sev, seed=seed, size=size)
            for i, (pattern, sev) in enumerate(_plan(n_patients, seed))]
    truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    truth.to_csv(out / "truth.csv", index=False)
    return truth


__all__ = ["synth_cohort", "synth_patient", "write_mask_nifti", "TRUTH_COLUMNS", "PADDING_HU_SYNTH"]
