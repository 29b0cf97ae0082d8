"""Synthetic progression: the same anatomy scanned at several time points, emphysema growing,
each scan taken at another depth of inspiration, with the true change in the truth table.

Inspiration (the sponge physics that volume adjustment assumes): at a volume factor ``k`` the
lungs are ``k`` times as large (the diaphragm descends: the slice spacing grows by ``k``) and
hold the same tissue, so every lung voxel's density above air falls by ``k``:
``HU_k + 1000 = (HU + 1000) / k``. The scanner's blur and quantum noise are added after that,
independently at each time point, as a real scanner would (noise does not scale with
inspiration; this is where the sponge model stops being exact).

Truth per scan: the phantom's own Perc15 and LAA%-950 at the scan's inspiration, and at the
reference inspiration (``k = 1``, the same noise): the true progression at a fixed lung volume
is the change of ``true_perc15_ref_hu`` between time points.

Layout under ``out_dir``: ``dicom/<PROG-nnnn-Tt>/<study>/<series>/*.dcm`` (each time point is
its own study of one patient: one PatientID, study dates a year apart), ``masks/<key>.nii.gz``,
``truth.csv``.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd

from .cohort import _grid, write_mask_nifti
from .dicom_write import synth_uid, write_dicom_series
from .phantom import _NOISE_SD_HU, MAX_HU, PADDING_HU_SYNTH, _binomial_blur, make_phantom

FIRST_DATE = dt.date(2010, 3, 1)


def inspire(hu_object: np.ndarray, lung: np.ndarray, fov_yx: np.ndarray, spacing_zyx_mm, k: float,
            noise_rng, *, noise_sd_hu: float = _NOISE_SD_HU) -> tuple[np.ndarray, tuple]:
    """A noise-free phantom (``make_phantom(..., scanner=False).hu``) at volume factor ``k``,
    then blurred and noised like a scan.

    Parameters
    ----------
    hu_object : (z, y, x) int16, noise-free; padding outside ``fov_yx``.
    lung : (z, y, x) bool, the true lungs.
    fov_yx : (y, x) bool, inside the scan circle.
    spacing_zyx_mm : the reference spacing; the slice spacing is stretched by ``k``.
    k : lung volume factor (1 = reference inspiration).
    noise_rng : numpy Generator of this scan's quantum noise.

    Returns
    -------
    (hu int16 with padding, spacing_zyx_mm of this scan)
    """
    img = hu_object.astype(np.float32)
    img[:, ~fov_yx] = -1000.0                      # no padding values bleeding into the blur
    img[lung] = (img[lung] + 1000.0) / np.float32(k) - 1000.0
    spacing = (float(spacing_zyx_mm[0]) * k, float(spacing_zyx_mm[1]), float(spacing_zyx_mm[2]))
    _binomial_blur(img, spacing)
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_sd_hu)
    hu = np.clip(np.rint(img), -1024, MAX_HU).astype(np.int16)
    hu[:, ~fov_yx] = PADDING_HU_SYNTH
    return hu, spacing


def synth_progression(out_dir, n_patients: int, timepoints: int = 3, *, seed: int = 0, size: str = "small",
                      inspiration_pct: float = 15.0, growth_pct_per_year: tuple = (1.0, 4.0)) -> pd.DataFrame:
    """Write ``n_patients`` x ``timepoints`` scans of growing emphysema at varying inspiration.

    Parameters
    ----------
    n_patients, timepoints : int >= 1 and >= 2.
    seed : same seed, same files.
    size : "small" or "full" (as ``synth_cohort``).
    inspiration_pct : volume factors drawn uniformly in 1 +- this / 100 (the first scan too).
    growth_pct_per_year : range of the yearly growth of LAA%-950 (percentage points).

    Returns
    -------
    DataFrame (also ``truth.csv``): scan_key, patient_id, timepoint, study_date, years,
    volume_factor, severity_pct, pattern, lung_volume_l, laa950_pct, perc15_hu (at the scan's
    inspiration, true mask), true_perc15_ref_hu and true_laa950_ref_pct (at k = 1).
    """
    if n_patients < 1 or timepoints < 2:
        raise ValueError("need n_patients >= 1 and timepoints >= 2")
    out = Path(out_dir)
    rows = []
    for i in range(1, n_patients + 1):
        plan = np.random.default_rng([seed, i, 77])
        pattern = ("centrilobular", "panlobular")[i % 2]
        start = float(plan.uniform(3.0, 10.0))
        growth = float(plan.uniform(*growth_pct_per_year))
        pid = f"PROG-{i:04d}"
        for t in range(timepoints):
            rng = np.random.default_rng([seed, i])       # same anatomy and lesion propensity every time
            shape, spacing, _ = _grid(size, rng)
            severity = start + growth * t
            ph = make_phantom(shape, spacing, severity, pattern, rng, scanner=False)
            lung = ph.lung_labels > 0
            k = float(plan.uniform(1 - inspiration_pct / 100, 1 + inspiration_pct / 100))
            hu_ref, _ = inspire(ph.hu, lung, ph.fov_mask_yx, spacing, 1.0, np.random.default_rng([seed, i, t, 5]))
            hu, sp = inspire(ph.hu, lung, ph.fov_mask_yx, spacing, k, np.random.default_rng([seed, i, t, 5]))
            date = FIRST_DATE + dt.timedelta(days=int(round(365.25 * t)) + int(plan.integers(-20, 21)))
            key = f"{pid}-T{t}"
            study = synth_uid("study", seed, key)
            series = synth_uid("series", seed, key)
            nz = shape[0]
            origin = (ph.origin_xyz_mm[0], ph.origin_xyz_mm[1], round(-(nz - 1) * sp[0], 4))
            write_dicom_series(hu, sp, out / "dicom" / key / study / series, origin_xyz_mm=origin, study_uid=study,
                               series_uid=series, frame_of_reference_uid=synth_uid("for", seed, key),
                               kernel="STANDARD", series_number=2, series_description=f"CHEST T{t}",
                               seed=seed, patient_name=f"PROG^{i:04d}", patient_id=pid,
                               study_date=date.strftime("%Y%m%d"))
            write_mask_nifti(ph.lung_labels, sp, origin, out / "masks" / f"{key}.nii.gz")
            vals, ref = hu[lung].astype(np.float64), hu_ref[lung].astype(np.float64)
            rows.append({"scan_key": key, "patient_id": pid, "timepoint": t, "study_date": date.isoformat(),
                         "years": (date - FIRST_DATE).days / 365.25, "volume_factor": k,
                         "severity_pct": severity, "pattern": pattern,
                         "lung_volume_l": int(lung.sum()) * float(np.prod(sp)) / 1e6,
                         "laa950_pct": 100.0 * float((vals < -950).mean()),
                         "perc15_hu": float(np.percentile(vals, 15)),
                         "true_perc15_ref_hu": float(np.percentile(ref, 15)),
                         "true_laa950_ref_pct": 100.0 * float((ref < -950).mean())})
    truth = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    truth.to_csv(out / "truth.csv", index=False)
    return truth
