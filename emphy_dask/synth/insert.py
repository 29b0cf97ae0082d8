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
from emphy_dask.phenotypes.regions import THIRDS, slice_thirds
from emphy_dask.synth.lesions import (PATTERNS, VESSEL_MIN_HU, blob_template, cell_grid, mean_volume_mm3,
                                      placement_weights, sample_centres, sample_volumes_mm3)
from emphy_dask.volume import bounding_box, craniocaudal_axis

LAA_HU = -950
#: Stop adding lesions once the added LAA% is this close to the aim (percentage points).
TOLERANCE_PCT = 0.25
MAX_PASSES = 12
NO_OWNER = np.iinfo(np.int32).max
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


def _first_claims(idx: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Lesions (rows of flat voxel indices, (m, k)) that share no voxel with an earlier row.
    ``scratch``: int32 flat array of the canvas' size holding ``NO_OWNER`` (restored)."""
    m, k = idx.shape
    flat = idx.ravel()
    lid = np.repeat(np.arange(m, dtype=np.int32), k)
    np.minimum.at(scratch, flat, lid)          # each voxel: its first claimant
    keep = np.ones(m, bool)
    keep[lid[scratch[flat] != lid]] = False
    scratch[flat] = NO_OWNER
    return keep


class _Canvas:
    """The change field of one variant on the (padded) lung box, built lesion group by group.

    ``change`` (float32, HU) holds per voxel the most negative ``delta * weight`` of the
    lesions covering it; ``owner`` marks covered voxels, so that a pass may refuse lesions
    that would touch others (kept apart, lesions stay separate clusters and the size law
    survives into the LAA clusters); later passes let them merge (confluent emphysema).
    """

    def __init__(self, hu_b, lung_b, paren_b, floor_hu):
        self.hu, self.lung, self.paren, self.floor = hu_b, lung_b, paren_b, floor_hu
        self.change = np.zeros(hu_b.shape, np.float32)
        self.covered = np.zeros(hu_b.shape, bool)
        self.laa = lung_b & (hu_b < LAA_HU)
        self.scratch = np.full(hu_b.size, NO_OWNER, np.int32)
        self.n_lesions = 0

    def add(self, centres, bins, which, deltas, templates, separate: bool) -> tuple[int, int]:
        """Add lesions (centres (n, 3) in box voxels, template ``templates[bins][which]``);
        returns (core voxels (weight >= 0.5) of the lesions accepted, lesions accepted)."""
        flat_change, flat_cov = self.change.reshape(-1), self.covered.reshape(-1)
        touched, n_core, n_accepted = [], 0, 0
        for b in np.unique(bins):
            for t in range(len(templates[b])):
                sel = (bins == b) & (which == t)
                if not sel.any():
                    continue
                off, w, halo = templates[b][t]
                c, d = centres[sel], deltas[sel]
                if separate:
                    # Refuse lesions touching covered voxels, and all but one of a group that touch.
                    near = np.ravel_multi_index((c[:, None, :] + halo[None]).transpose(2, 0, 1), self.change.shape)
                    free = ~flat_cov[near].any(axis=1)
                    c, d, near = c[free], d[free], near[free]
                    if len(c) > 1:
                        keep = _first_claims(near, self.scratch)
                        c, d = c[keep], d[keep]
                idx = np.ravel_multi_index((c[:, None, :] + off[None]).transpose(2, 0, 1), self.change.shape)
                if not len(idx):
                    continue
                vals = (d[:, None] * w[None]).astype(np.float32)
                np.minimum.at(flat_change, idx.ravel(), vals.ravel())
                flat_cov[idx.ravel()] = True
                touched.append(idx.ravel())
                self.n_lesions += len(idx)
                n_core += len(idx) * int(np.count_nonzero(w >= 0.5))
                n_accepted += len(idx)
        if touched:
            mark = np.zeros(self.change.size, bool)
            for t in touched:
                mark[t] = True
            t = np.flatnonzero(mark)
            self.laa.reshape(-1)[t] = self.lung.reshape(-1)[t] & (self._values(t) < LAA_HU)
        return n_core, n_accepted

    def _values(self, t):
        hu = self.hu.reshape(-1)[t].astype(np.int32)
        step = np.rint(self.change.reshape(-1)[t]).astype(np.int32)
        moved = self.paren.reshape(-1)[t] & (step <= -1)
        return np.where(moved, np.maximum(hu + step, self.floor), hu)

    def result(self):
        """(new HU of the box, changed voxels of the box)."""
        t = np.flatnonzero(self.covered)
        out = self.hu.astype(np.int32)
        out.reshape(-1)[t] = self._values(t)
        return out, out != self.hu


def _third_rows(labels, lung, hu, new_hu, lesion, direction_xyz) -> dict:
    """Per third: base LAA%, added LAA%, lesion fraction (% of the third's lung)."""
    axis, _ = craniocaudal_axis(direction_xyz)
    _, third = slice_thirds(labels, direction_xyz)
    out = {}
    for t, name in enumerate(THIRDS):
        zone_name = name.replace("Third", "").lower()
        sel = np.zeros(lung.shape[axis], bool)
        sel[third == t] = True
        m = lung & np.expand_dims(sel, tuple(a for a in range(3) if a != axis))
        n = max(int(m.sum()), 1)
        base = 100.0 * np.count_nonzero(m & (hu < LAA_HU)) / n
        after = 100.0 * np.count_nonzero(m & (new_hu < LAA_HU)) / n
        out[f"base_laa950_{zone_name}_pct"] = base
        out[f"added_laa950_{zone_name}_pct"] = after - base
        out[f"lesion_fraction_{zone_name}_pct"] = 100.0 * np.count_nonzero(m & lesion) / n
    return out


def insert_emphysema(hu, lung_labels, spacing_zyx_mm, pattern: str, added_laa950_pct: float, seed, *,
                     psf_mm: float = 0.6, slice_thickness_mm: float | None = None,
                     direction_xyz=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), d_aim: float | None = None,
                     measure_d: bool = True):
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
    n_lung = int(np.count_nonzero(lung))
    if n_lung == 0:
        raise ValueError("the lung mask is empty")
    base_laa = int(np.count_nonzero(lung & (hu < LAA_HU)))
    spec_sigma = np.sqrt(np.array([float(slice_thickness_mm or sp[0]) / 2.355, psf_mm, psf_mm]) ** 2
                         + spec.extra_blur_mm ** 2)
    radii, templates = _templates(spec, sp, spec_sigma, rng)
    # The lung box, padded by the largest template's reach so that no lesion leaves it.
    pad = np.max([np.abs(off).max(axis=0) for row in templates for off, _, _ in row], axis=0) + 2
    bb = bounding_box(lung)
    box = tuple(slice(max(lo - p, 0), min(hi + 1 + p, n)) for (lo, hi), p, n in zip(bb, pad, hu.shape))
    # Where the lung reaches the volume's edge (apex on the first slice), pad the box instead.
    widths = [(int(max(p - lo, 0)), int(max(hi + 1 + p - n, 0))) for (lo, hi), p, n in zip(bb, pad, hu.shape)]
    hu_b = np.pad(hu[box], widths, mode="edge")
    lung_b = np.pad(lung[box], widths)
    paren_b = lung_b & (hu_b < VESSEL_MIN_HU)
    floor_hu = int(hu_b[lung_b].min())          # the scanner's floor (e.g. -1024): never go below it
    canvas = _Canvas(hu_b, lung_b, paren_b, floor_hu)
    goal = float(added_laa950_pct) / 100.0 * n_lung
    added = 0
    if goal > 0:
        grid = cell_grid(hu_b, lung_b, sp, inc_sup)
        weights = placement_weights(grid, spec)
        fallback_hu = float(np.nanmean(grid.paren_mean_hu)) if np.isfinite(grid.paren_mean_hu).any() else -850.0
        voxel_mm3 = float(np.prod(sp))
        efficiency = 0.8                        # new LAA voxels per core voxel; measured after each pass
        mean_mm3 = mean_volume_mm3(d_aim, spec.diameter_mm)
        core_vox = np.zeros((len(templates), TEMPLATES_PER_BIN), np.int64)
        for i, row in enumerate(templates):
            core_vox[i, :len(row)] = [np.count_nonzero(w >= 0.5) for _, w, _ in row]
        n_shapes = np.array([len(row) for row in templates])
        separate = True
        for _ in range(MAX_PASSES):
            # Aim a little short, then top up: approach the severity from below.
            need_vox = 0.9 * (goal - added) / efficiency
            vols = sample_volumes_mm3(int(math.ceil(1.5 * need_vox * voxel_mm3 / mean_mm3)) + 4, d_aim,
                                      spec.diameter_mm, rng)
            bins = np.clip(np.searchsorted(radii, np.cbrt(vols * 3.0 / (4.0 * np.pi))), 0, len(radii) - 1)
            which = rng.integers(0, n_shapes[bins])
            size = core_vox[bins, which]
            fits = size <= max(1.5 * need_vox, size.min())        # no single lesion far past the aim
            bins, which, size = bins[fits], which[fits], size[fits]
            n = int(np.searchsorted(np.cumsum(size), need_vox)) + 1
            bins, which = bins[:n], which[:n]
            centres = sample_centres(grid, weights, len(bins), rng).clip(0, np.asarray(hu_b.shape) - 1)
            ok = lung_b[tuple(centres.T)]
            centres, bins, which = centres[ok], bins[ok], which[ok]
            cell = tuple((centres // np.asarray(grid.factor)).clip(0, np.asarray(grid.paren_mean_hu.shape) - 1).T)
            local = np.nan_to_num(grid.paren_mean_hu[cell], nan=fallback_hu)
            deltas = np.minimum(spec.target_hu + rng.normal(0, 8, len(bins)) - local, 0.0).astype(np.float32)
            before = added
            n_core, n_accepted = canvas.add(centres, bins, which, deltas, templates, separate)
            added = int(np.count_nonzero(canvas.laa)) - base_laa
            if added >= goal - TOLERANCE_PCT / 100.0 * n_lung:
                break
            if n_accepted < 0.5 * max(len(bins), 1):
                separate = False                    # the lung is full of separate lesions: let them merge
            if n_core and added > before:
                efficiency = float(np.clip((added - before) / n_core, 0.1, 1.5))
    out_b, moved_b = canvas.result()
    crop = tuple(slice(lo, n - hi) for (lo, hi), n in zip(widths, out_b.shape))
    out_b, moved_b = out_b[crop], moved_b[crop]
    new_hu = hu.copy()
    new_hu[box] = out_b.astype(hu.dtype)
    lesion = np.zeros(hu.shape, bool)
    lesion[box] = moved_b
    n_lesions = canvas.n_lesions
    truth = {
        "pattern": pattern, "severity_aimed_pct": float(added_laa950_pct), "seed": str(seed),
        "base_laa950_pct": 100.0 * base_laa / n_lung,
        "added_laa950_pct": 100.0 * added / n_lung,
        "expected_laa950_pct": 100.0 * np.count_nonzero(lung & (new_hu < LAA_HU)) / n_lung,
        "lesion_fraction_pct": 100.0 * np.count_nonzero(lesion) / n_lung,
        "lesion_volume_ml": float(np.count_nonzero(lesion) * np.prod(sp) / 1000.0),
        "n_lesions": int(n_lesions), "psf_sigma_mm": float(psf_mm), "d_aimed": d_aim,
    }
    truth.update(_third_rows(lung_labels, lung, hu, new_hu, lesion, direction_xyz))
    if measure_d:
        truth["d_base"] = laa_cluster_exponent_d(hu, lung, sp)
        truth["d_lesions"] = laa_cluster_exponent_d(new_hu, lesion, sp) if lesion.any() else math.nan
        truth["d_after"] = laa_cluster_exponent_d(new_hu, lung, sp)
    return new_hu, lesion, truth
