"""Emphysema inserted into a real chest CT, in the image domain, with voxel-exact truth.

Method (one variant = one pattern at one severity):

1. Lesion cores (``lesions.py``): irregular blobs, sizes from a power law of exponent D,
   placed by the pattern's anatomy (zone, distance to the pleura, small vessels).
2. Each core voxel gets the change ``target_hu - m`` where ``m`` is the local parenchymal mean
   (the mean HU of parenchyma in the lesion centre's 4 mm cell): the lesion's density replaces
   the local mean, and the scan's own noise (``hu - m``) stays on top, so a sharp kernel's
   grain stays sharp and a soft one soft.
3. That change field is blurred with the scan's point spread (in-plane sigma from the scan's own
   noise power spectrum, ``psf_sigma_mm``; along z the slice thickness), plus an extra graded
   fall for panlobular loss: partial volume at the borders, no punched holes.
4. Only parenchyma changes: lung-mask voxels below ``VESSEL_MIN_HU``. Vessels, airway walls and
   everything outside the lung mask keep their exact values.
5. Severity = LAA%-950 added, measured on the result: lesions are added in passes until the
   added LAA% reaches the aim (from below, within ``TOLERANCE_PCT``).

Truth (returned, exact): the changed voxels (lesion mask), LAA%-950 of the base and of the
result on the same mask, per third, and the cluster exponent D of the inserted lesions.
"""
from __future__ import annotations

import math

import numpy as np

from emphy_dask.phenotypes.clusters import laa_cluster_exponent_d
from emphy_dask.phenotypes.regions import THIRDS, thirds_of_slices
from emphy_dask.synth.canvas import LAA_HU, TOLERANCE_PCT, Canvas, place_lesions
from emphy_dask.synth.lesions import (PATTERNS, VESSEL_MIN_HU, blob_template, cell_grid, centre_table,
                                      placement_weights)
from emphy_dask.volume import bounding_box, craniocaudal_axis

#: Closed loop on D: at most this many tries (with the prior-slope first step no variant of
#: LIDC-IDRI-0013 x 4 patterns x 10, 30 % asked for a fourth); stop once the read-back is within
#: ``D_TOLERANCE``.
D_TRIES, D_TOLERANCE = 3, 0.1
#: ... and stop once the read-back no longer responds: a try predicted to move it less than this
#: toward the aim (at 20-30 % severity merged lesions pin the read-back; each try costs a placement).
#: The secant overstates the gain, the read-back flattens as the sampled exponent grows: third
#: tries predicted to gain 0.06-0.11 gained -0.02-0.01 (LIDC-IDRI-0013, 10-30 %), bullous's 0.1.
D_MIN_GAIN = 0.1
#: Range of the sampled exponent the loop may use.
D_SAMPLED_RANGE = (0.3, 5.0)
#: The read-back's response to the sampled exponent before two tries have measured it: on
#: LIDC-IDRI-0013 (4 patterns x 10-30 %) the first secant slopes were 0.1-0.35 (median 0.2);
#: a step of one (read-back = sampled) took 2-3 more tries to reach where the loop settles.
D_PRIOR_SLOPE = 0.25
#: Templates per radius bin and radius bins per pattern (shapes are reused, flipped).
TEMPLATES_PER_BIN, RADIUS_BINS = 6, 12
FEW_TEMPLATES_MM = 8.0


def psf_sigma_mm(hu: np.ndarray, spacing_zyx_mm, fov_mask=None, default_mm: float = 0.6) -> float:
    """In-plane Gaussian point-spread sigma (mm) of a scan, from its own soft-tissue noise.

    Filtered back-projection noise has NPS(f) ~ f |MTF(f)|^2, so ln(NPS / f) falls as
    -4 pi^2 sigma^2 f^2 for a Gaussian MTF; the fit uses ``kernel_estimate.soft_tissue_nps``
    over 0.1-0.5 lp/mm. Sharp kernels boost high frequencies: their sigma is clipped to
    0.3 mm. ``default_mm`` without enough uniform soft tissue (phantoms, slabs).
    """
    from emphy_dask.preprocess.kernel_estimate import MIN_ROIS, soft_tissue_nps

    f, nps, n_rois = soft_tissue_nps(hu, spacing_zyx_mm, 0, fov_mask)
    nyquist = 0.5 / max(spacing_zyx_mm[1], spacing_zyx_mm[2])
    sel = (f >= 0.1) & (f <= min(0.5, 0.9 * nyquist)) & np.isfinite(nps) & (nps > 1e-3)
    if n_rois < MIN_ROIS or sel.sum() < 5:
        return float(default_mm)
    slope = np.polyfit(f[sel] ** 2, np.log(nps[sel] / f[sel]), 1)[0]
    return float(np.clip(math.sqrt(max(-slope, 0.0) / (4 * math.pi ** 2)), 0.3, 2.0))


def _templates(spec, spacing_zyx_mm, sigma_mm, rng):
    """Radius bins (mm, ascending) and per bin a list of (offsets, weights, halo) blobs
    (``TEMPLATES_PER_BIN`` shapes per bin; 2 above ``FEW_TEMPLATES_MM``, where lesions are few
    and templates costly)."""
    radii = np.geomspace(spec.diameter_mm[0] / 2, spec.diameter_mm[1] / 2, RADIUS_BINS)
    return radii, [[blob_template(r, spacing_zyx_mm, spec.irregularity, sigma_mm, rng)
                    for _ in range(TEMPLATES_PER_BIN if r < FEW_TEMPLATES_MM else 2)] for r in radii]


def _stage_weights(grid, spec, radius_mm: float) -> list:
    """Placement weights of a lesion of ``radius_mm``, one ``centre_table`` per stage of
    ``place_lesions``: the pattern's own, flatter (square root), then every allowed cell up to
    three times the pattern's distance to the pleura (deeper subpleural rows once the first is full)."""
    w = placement_weights(grid, spec, radius_mm)
    return [centre_table(w), centre_table(np.sqrt(w)),
            centre_table(placement_weights(grid, spec, radius_mm, reach=3.0) > 0)]


def _next_exponent(tries, d_aim: float) -> float:
    """The exponent of the next try from the (sampled, read) pairs so far: the read-back's miss
    over ``D_PRIOR_SLOPE``, then secant steps (slope floored: the read-back responds weakly where
    lesions merge), within ``D_SAMPLED_RANGE``."""
    pts = [(d, r) for d, r in tries if math.isfinite(r)]
    d, r = pts[-1]
    slope = D_PRIOR_SLOPE
    if len(pts) > 1 and pts[-2][0] != d:
        slope = float(np.clip((r - pts[-2][1]) / (d - pts[-2][0]), 0.25, 2.0))
    return float(np.clip(d + (d_aim - r) / slope, *D_SAMPLED_RANGE))


def _stalled(tries, d_next: float, d_aim: float) -> bool:
    """True when another try would not pay: the last two tries' read-backs (secant slope, not
    floored) predict that ``d_next`` moves the read-back by less than ``D_MIN_GAIN`` toward the aim."""
    pts = [(d, r) for d, r in tries if math.isfinite(r)]
    if len(pts) < 2 or pts[-2][0] == pts[-1][0]:
        return False
    (d0, r0), (d1, r1) = pts[-2:]
    slope = (r1 - r0) / (d1 - d0)
    gain = slope * (d_next - d1) * math.copysign(1.0, d_aim - r1)
    return gain < D_MIN_GAIN


def _third_rows(per_slice: dict, superior_is_high_index: bool) -> dict:
    """Per third: base LAA%, added LAA%, lesion fraction (% of the third's lung), from counts per
    slice (``lung``, ``base_laa``, ``after_laa``, ``lesion``: voxels of every axial slice)."""
    third = thirds_of_slices(per_slice["lung"], superior_is_high_index)
    out = {}
    for t, name in enumerate(THIRDS):
        zone_name = name.replace("Third", "").lower()
        sel = third == t
        n = max(int(per_slice["lung"][sel].sum()), 1)
        base = 100.0 * int(per_slice["base_laa"][sel].sum()) / n
        after = 100.0 * int(per_slice["after_laa"][sel].sum()) / n
        out[f"base_laa950_{zone_name}_pct"] = base
        out[f"added_laa950_{zone_name}_pct"] = after - base
        out[f"lesion_fraction_{zone_name}_pct"] = 100.0 * int(per_slice["lesion"][sel].sum()) / n
    return out


def insert_emphysema(hu, lung_labels, spacing_zyx_mm, pattern: str, added_laa950_pct: float, seed, *,
                     psf_mm: float = 0.6, slice_thickness_mm: float | None = None,
                     direction_xyz=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), d_aim: float | None = None,
                     measure_d: bool = True, fit_d: bool = True):
    """Insert emphysema of one pattern and severity into a CT.

    Parameters
    ----------
    hu : ndarray int16, shape (n_z, n_y, n_x)
        The base scan, HU (axial: array axis 0 runs head-feet).
    lung_labels : ndarray uint8, shape like ``hu``
        Lung mask (> 0), e.g. from the project's segmenter on the base.
    spacing_zyx_mm : 3 floats, mm.
    pattern : one of ``lesions.PATTERNS`` (centrilobular, panlobular, paraseptal, bullous).
    added_laa950_pct : float in [0, 40]
        LAA%-950 to add, percentage points of the lung mask.
    seed : int or sequence of int (``numpy.random.default_rng``).
    psf_mm : in-plane Gaussian point-spread sigma of the scan, mm (``psf_sigma_mm``).
    slice_thickness_mm : FWHM of the slice profile, mm (default: the slice spacing).
    direction_xyz : ITK direction of the grid (which end is the head).
    d_aim : power-law exponent of lesion volumes (default: the pattern's).
    measure_d : also measure cluster D (base lung, inserted lesions, result lung).
    fit_d : closed loop on D: re-place the lesions (at most ``D_TRIES`` times), steering the
        sampled exponent until D of the LAA inside the lesion mask is within ``D_TOLERANCE`` of
        ``d_aim`` or another try is predicted to move it less than ``D_MIN_GAIN``; the try nearest
        the aim is kept. False: one try with the aim as exponent.

    Returns
    -------
    new_hu : ndarray like ``hu`` (same dtype), HU.
    lesion_mask : ndarray bool, shape like ``hu``: exactly the voxels whose value changed.
    truth : dict (see ``TRUTH_KEYS`` in ``insert_cohort``): LAA% base / added / expected on
        ``lung_labels``, per third, lesion count and volume, D aimed and read back, psf used.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    if not 0.0 <= float(added_laa950_pct) <= 40.0:
        raise ValueError(f"added_laa950_pct must be within 0-40, got {added_laa950_pct}")
    hu = np.asarray(hu)
    lung = np.asarray(lung_labels) > 0
    if hu.shape != lung.shape:
        raise ValueError(f"HU shape {hu.shape} and mask shape {lung.shape} differ")
    axis, inc_sup = craniocaudal_axis(direction_xyz)
    if axis != 0:
        raise ValueError("insertion needs axial slices (array axis 0 head-feet)")
    spec = PATTERNS[pattern]
    d_aim = spec.d_aim if d_aim is None else float(d_aim)
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing_zyx_mm, dtype=np.float64)
    bb = bounding_box(lung)
    if bb is None:
        raise ValueError("the lung mask is empty")
    spec_sigma = np.sqrt(np.array([float(slice_thickness_mm or sp[0]) / 2.355, psf_mm, psf_mm]) ** 2
                         + spec.extra_blur_mm ** 2)
    radii, templates = _templates(spec, sp, spec_sigma, rng)
    # The lung box, padded by the largest template's reach so that no lesion leaves it.
    pad = np.max([np.abs(off).max(axis=0) for row in templates for off, _, _ in row], axis=0) + 2
    box = tuple(slice(max(lo - p, 0), min(hi + 1 + p, n)) for (lo, hi), p, n in zip(bb, pad, hu.shape))
    # Where the lung reaches the volume's edge (apex on the first slice), pad the box instead.
    widths = [(int(max(p - lo, 0)), int(max(hi + 1 + p - n, 0))) for (lo, hi), p, n in zip(bb, pad, hu.shape)]
    hu_b = np.pad(hu[box], widths, mode="edge")
    lung_b = np.pad(lung[box], widths)
    paren_b = lung_b & (hu_b < VESSEL_MIN_HU)
    # the scanner's floor (e.g. -1024): never go below it
    floor_hu = int(np.min(hu_b, where=lung_b,
                          initial=np.iinfo(hu_b.dtype).max if hu_b.dtype.kind in "iu" else np.inf))
    canvas = Canvas(hu_b, lung_b, paren_b, floor_hu)
    # Every count of the truth on the box (no lung outside it), per axial slice for the thirds.
    lung_z = np.count_nonzero(lung_b, axis=(1, 2))
    base_laa_z = np.count_nonzero(canvas.base_laa, axis=(1, 2))
    n_lung, base_laa = int(lung_z.sum()), int(base_laa_z.sum())
    goal = float(added_laa950_pct) / 100.0 * n_lung
    added, tries = 0, []
    if goal > 0:
        grid = cell_grid(hu_b, lung_b, sp, inc_sup, paren_b)
        core_vox = np.zeros((len(templates), TEMPLATES_PER_BIN), np.int64)
        for i, row in enumerate(templates):
            core_vox[i, :len(row)] = [np.count_nonzero(w >= 0.5) for _, w, _ in row]
        plan = dict(spec=spec, grid=grid, weights=[_stage_weights(grid, spec, r) for r in radii],
                    flat_templates=canvas.flat(templates), radii=radii,
                    core_vox=core_vox, n_shapes=np.array([len(row) for row in templates]), n_lung=n_lung,
                    voxel_mm3=float(np.prod(sp)), target_hu=spec.target_hu,
                    fallback_hu=float(np.nanmean(grid.paren_mean_hu)) if np.isfinite(grid.paren_mean_hu).any()
                    else -850.0)
        d_s, best = d_aim, None
        for k in range(D_TRIES if fit_d else 1):
            if k:
                canvas.reset()
            added = place_lesions(canvas, plan, d_s, goal, rng)
            d_read = canvas.lesion_d(sp) if fit_d else math.nan
            tries.append((d_s, d_read))
            miss = abs(d_read - d_aim) if math.isfinite(d_read) else math.inf
            # A try that reached the severity beats one that did not; then the nearer D wins.
            short = added < goal - TOLERANCE_PCT / 100.0 * n_lung
            rank = (short, -added if short else miss)
            if best is None or rank < best[0]:
                best = (rank, k, added, canvas.state() if fit_d and k + 1 < D_TRIES else None)
            if not math.isfinite(d_read) or (miss <= D_TOLERANCE and not short):   # nothing to steer by, or done
                break
            d_s = _next_exponent(tries, d_aim)
            if _stalled(tries, d_s, d_aim):         # the read-back no longer responds: a try would be wasted
                break
        if best[1] != len(tries) - 1:
            canvas.restore(best[3])
            added = best[2]
    # Only the changed voxels are written: no box-sized copies of the result.
    t_b, new_vals = canvas.changes()
    z_b, y_b, x_b = np.unravel_index(t_b, hu_b.shape)
    origin = [sl.start - lo for sl, (lo, _) in zip(box, widths)]     # volume index of the box's first voxel
    at = np.ravel_multi_index((z_b + origin[0], y_b + origin[1], x_b + origin[2]), hu.shape)
    new_hu = hu.copy()
    new_hu.reshape(-1)[at] = new_vals.astype(hu.dtype)
    lesion = np.zeros(hu.shape, bool)
    lesion.reshape(-1)[at] = True
    # LAA gained (or lost) per changed voxel, per slice; every changed voxel is lung
    laa_gain = (new_vals < LAA_HU).astype(np.int64) - (hu_b.reshape(-1)[t_b] < LAA_HU)
    n_slices_b = hu_b.shape[0]
    per_slice = {k: np.zeros(hu.shape[0], np.int64) for k in ("lung", "base_laa", "after_laa", "lesion")}
    in_volume = slice(widths[0][0], n_slices_b - widths[0][1])
    for k, v in (("lung", lung_z), ("base_laa", base_laa_z),
                 ("after_laa", base_laa_z + np.bincount(z_b, laa_gain, n_slices_b).astype(np.int64)),
                 ("lesion", np.bincount(z_b, minlength=n_slices_b))):
        per_slice[k][box[0]] = v[in_volume]
    n_lesions = canvas.n_lesions
    kept = tries[best[1]] if goal > 0 else (d_aim, math.nan)
    truth = {
        "pattern": pattern, "severity_aimed_pct": float(added_laa950_pct), "seed": str(seed),
        "base_laa950_pct": 100.0 * base_laa / n_lung,
        "added_laa950_pct": 100.0 * added / n_lung,
        "expected_laa950_pct": 100.0 * int(per_slice["after_laa"].sum()) / n_lung,
        "lesion_fraction_pct": 100.0 * len(at) / n_lung,
        "lesion_volume_ml": float(len(at) * np.prod(sp) / 1000.0),
        "n_lesions": int(n_lesions), "psf_sigma_mm": float(psf_mm), "d_aimed": d_aim,
        "d_sampled": float(kept[0]), "d_tries": len(tries),
    }
    truth.update(_third_rows(per_slice, inc_sup))
    if measure_d:
        truth["d_base"] = laa_cluster_exponent_d(hu, lung, sp)
        truth["d_lesions"] = laa_cluster_exponent_d(new_hu, lesion, sp) if lesion.any() else math.nan
        truth["d_after"] = laa_cluster_exponent_d(new_hu, lung, sp)
    return new_hu, lesion, truth
