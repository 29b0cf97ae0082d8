"""Classical (CPU, no model) lung segmentation: threshold + morphology.

Pipeline (on an internal working grid of ~1.5-2 mm, then refined at full resolution):

1. air = HU < ``air_threshold_hu``; padding / outside-FOV voxels count as air.
2. Outside air: per-slice 2D components of air touching the slice border or the
   padding, plus small internal pockets 3D-connected to them.
3. Trachea and bronchi: seeded at the most superior slice with a small, central air
   tube, grown in 3D through lumen air with leak control (``segment/airway.py``).
   Removed from the candidates, and again from each lung after its closing and hole
   filling (which would close the lung around a bronchus like around a vessel).
4. Lungs: the largest internal air components; if one component spans both sides of
   the body midline (lungs touching anteriorly/posteriorly), it is split by
   erosion (distance-transform cores) and nearest-core assignment.
5. Vessels and holes: per-slice hole filling, 3D closing with a ball in mm, 3D void
   filling, per lung.
6. Left/right from the physical LPS x of each lung's centroid (direction cosines),
   never from the array index.
7. Full-resolution refinement: the boundary band (one working voxel) is re-decided
   by the air threshold at full resolution, then holes are refilled per slice.

Labels: 0 background, 1 right lung, 2 left lung (the lungmask convention).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

import fill_voids

from emphy_dask.errors import ScanError
from emphy_dask.segment.airway import airway_wall, grow_airway, trachea_seed
from emphy_dask.segment.morphology import (S2D, bbox_slices, body_air, body_midline, centroid, close_mm,
                                          fill_slices, label_sizes, upsample, working_grid)
from emphy_dask.volume import craniocaudal_axis

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RIGHT, LEFT = 1, 2

def _split_merged(comp: np.ndarray, sp: tuple, lr_coord, mid_lr: float):
    """Split one component spanning both sides into two by erosion cores.

    Returns (part_a, part_b) bool masks or None if no split into two sides was found.
    ``lr_coord``: function mapping a bool mask to its centroid coordinate along L-R.
    """
    bb = bbox_slices(comp, (1, 1, 1))
    m = comp[bb]
    # in-plane distance only: lungs touch across a thin in-plane junction line
    dist = np.stack([ndi.distance_transform_edt(s, sampling=sp[1:]) for s in m])
    total = m.sum()
    for r_mm in np.arange(2.0, 30.0, 1.5):
        core = dist > r_mm
        lab, n = ndi.label(core)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = label_sizes(lab, n, core)
        a, b = np.argsort(sizes)[::-1][:2] + 1
        if sizes[b - 1] < 0.05 * total:
            continue
        ca, cb = lr_coord(lab == a, bb), lr_coord(lab == b, bb)
        if (ca - mid_lr) * (cb - mid_lr) >= 0:
            continue  # both cores on one side (e.g. a lobe pinched off): erode further
        seeds = (lab == a) | (lab == b)
        _, ind = ndi.distance_transform_edt(~seeds, sampling=sp, return_indices=True)
        near = lab[tuple(ind)]
        out_a = np.zeros_like(comp)
        out_b = np.zeros_like(comp)
        out_a[bb] = m & (near == a)
        out_b[bb] = m & (near == b)
        return out_a, out_b
    return None


def lung_mask_threshold(hu: np.ndarray, spacing_zyx_mm, direction_xyz=IDENTITY,
                        fov_mask: np.ndarray | None = None, *, air_threshold_hu: float = -320.0,
                        closing_radius_mm: float = 8.0, min_lung_ml: float = 50.0,
                        return_airway: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment the lungs of a chest CT by thresholding and morphology.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units (native grid; anisotropic spacing is fine).
    spacing_zyx_mm : 3 floats
        Voxel size, mm.
    direction_xyz : 9 floats
        ITK direction matrix (row-major, LPS); decides which lung is left/right and
        which end is superior.
    fov_mask : ndarray of bool, same shape, or None
        True inside the scan field of view; outside counts as outside-the-body air.
    air_threshold_hu : float
        Air/tissue threshold, HU.
    closing_radius_mm : float
        Ball radius of the 3D closing that pulls hilar vessels into the lung, mm.
    min_lung_ml : float
        Smallest air component accepted as a lung, mL.
    return_airway : bool
        Also return the airway kept out of the lungs.

    Returns
    -------
    ndarray of uint8, shape (n_z, n_y, n_x): 0 background, 1 right lung, 2 left lung; with
    ``return_airway``, a tuple (labels, airway): airway bool, same shape, the trachea and
    bronchi (lumen plus a voxel of wall, ``segment/airway.py``) that the lungs exclude.

    Raises
    ------
    ScanError
        If no lung-sized air component is found (``path`` is ``"<array>"``; callers
        re-raise with the file path).
    """
    hu = np.asarray(hu)
    sp = tuple(float(s) for s in spacing_zyx_mm)
    # bring the craniocaudal axis to axis 0 so "slice" means axial slice
    cc_axis, sup_up = craniocaudal_axis(direction_xyz)
    perm = [cc_axis] + [a for a in range(3) if a != cc_axis]
    inv = np.argsort(perm)
    d = np.asarray(direction_xyz, float).reshape(3, 3)
    hu_t = np.transpose(hu, perm)
    fov_t = None if fov_mask is None else np.transpose(np.asarray(fov_mask, bool), perm)
    sp_t = tuple(sp[a] for a in perm)
    # LPS vector per (transposed) numpy axis: column (2 - a) of the direction matrix
    axis_lps = np.stack([d[:, 2 - a] for a in perm])
    labels, airway, f = _segment(hu_t, sp_t, axis_lps, sup_up, fov_t, air_threshold_hu,
                                 closing_radius_mm, min_lung_ml)
    labels = np.ascontiguousarray(np.transpose(labels, inv))
    if not return_airway:
        return labels
    airway_t = np.zeros(hu_t.shape, bool)
    if airway.any():
        # upsampled in the tree's box only (the same voxels: nothing outside it; the whole
        # grid's three repeats cost 0.2-0.3 s)
        bb = bbox_slices(airway, (0, 0, 0))
        full_bb = tuple(slice(s.start * k, min(s.stop * k, n)) for s, k, n in zip(bb, f, hu_t.shape))
        airway_t[full_bb] = upsample(airway[bb], f, tuple(b.stop - b.start for b in full_bb))
    airway = np.ascontiguousarray(np.transpose(airway_t, inv))
    airway &= labels == 0
    return labels, airway


def _segment(hu, sp, axis_lps, sup_up, fov, thr, closing_mm, min_ml):
    """Core of ``lung_mask_threshold`` on an array whose axis 0 is craniocaudal.

    ``axis_lps``: (3, 3) LPS unit vector of each numpy axis; ``sup_up``: a larger
    axis-0 index is more superior. Works on a grid coarsened by integer factors to
    ~2 x 1.5 x 1.5 mm (block mean), then refines the boundary at full resolution.
    """
    shape = hu.shape
    f, spc, work, pad = working_grid(hu, sp, fov)
    vox_ml = float(np.prod(spc)) / 1000.0
    outside, inside = body_air(work, pad, thr, vox_ml)
    body = ~outside
    lr_axis, mid_lr, half_width = body_midline(body, axis_lps)
    idx = np.arange(body.shape[lr_axis])

    seed = trachea_seed((work < -900.0) & inside, inside, outside, spc, lr_axis, mid_lr, half_width, sup_up)
    airway_loose = airway_wall(grow_airway(work, inside, seed, spc), inside)    # with its wall
    cand = inside & ~airway_loose

    lab, n = ndi.label(cand)
    if n == 0:
        raise ScanError("<array>", "no lung found: no air enclosed by the body", stage="segment")
    vols = label_sizes(lab, n, cand) * vox_ml
    order = np.argsort(vols)[::-1]
    if vols[order[0]] < min_ml:
        raise ScanError("<array>", f"no lung found: largest air region inside the body is "
                        f"{vols[order[0]]:.0f} mL (< {min_ml:.0f} mL)", stage="segment")

    def lr_coord(mask, bb=None):
        c = centroid(mask)[lr_axis]
        return c + (bb[lr_axis].start if bb is not None else 0)

    first = lab == order[0] + 1
    lungs = [first]
    frac_left = (first.sum(axis=(0, 3 - lr_axis)) * (idx > mid_lr)).sum() / first.sum()
    if min(frac_left, 1 - frac_left) > 0.15:
        parts = _split_merged(first, spc, lr_coord, mid_lr)
        if parts is not None:
            lungs = list(parts)
    if len(lungs) == 1:
        side = lr_coord(first) > mid_lr
        for k in order[1:]:
            if vols[k] < max(min_ml, 0.1 * vols[order[0]]):
                break
            other = lab == k + 1
            if (lr_coord(other) > mid_lr) != side:
                lungs.append(other)
                break

    # vessels and holes, one lung at a time so the closing cannot bridge the two
    filled = []
    for i, m in enumerate(lungs):
        others = np.zeros_like(m)
        for j, o in enumerate(lungs):
            if j != i:
                others |= o
        m = fill_slices(m, spc[1] * spc[2])
        m = close_mm(m, closing_mm, spc) & ~others & body
        m = fill_voids.fill(fill_slices(m, spc[1] * spc[2]), in_place=False)
        # the closing and the hole filling close the lung around a bronchus or the trachea
        # (it is a hole, like a vessel): take the airway out again
        filled.append(m & ~others & ~airway_loose)

    # physical L-R: LPS x of each centroid; smaller x = patient right
    def lps_x(mask):
        c = centroid(mask)
        return float((c * np.asarray(spc)) @ axis_lps[:, 0])

    xs = [lps_x(m) for m in filled]
    if len(filled) == 2:
        names = [RIGHT, LEFT] if xs[0] < xs[1] else [LEFT, RIGHT]
    else:
        names = [RIGHT if xs[0] - lps_x(body) < 0 else LEFT]

    if f == (1, 1, 1):
        out = np.zeros(shape, np.uint8)
        for m, name in zip(filled, names):
            out[m] = name
        return out, airway_loose, f
    return _refine(hu, fov, thr, f, filled, names, airway_loose, shape, sp[1] * sp[2]), airway_loose, f


def _paste(part: np.ndarray, bb: tuple, shape: tuple) -> np.ndarray:
    """A bool array of ``shape`` holding ``part`` at the box ``bb``, False elsewhere."""
    out = np.zeros(shape, bool)
    out[bb] = part
    return out


def _refine(hu, fov, thr, f, filled, names, airway, shape, pixel_mm2):
    """Re-decide the one-working-voxel boundary band at full resolution by the threshold."""
    out = np.zeros(shape, np.uint8)
    union = np.zeros(filled[0].shape, bool)
    for m in filled:
        union |= m
    for m, name in zip(filled, names):
        # erosion and dilation by one pixel in this lung's box (+1) only: the same voxels
        bb = bbox_slices(m, (0, 1, 1))
        m_bb = m[bb]
        interior = ndi.binary_erosion(m_bb, S2D)
        band = ndi.binary_dilation(m_bb, S2D) & ~(union[bb] & ~m_bb) & ~interior
        interior, band = _paste(interior, bb, m.shape), _paste(band, bb, m.shape)
        bb = bbox_slices(m | band, (0, 0, 0))
        full_bb = tuple(slice(s.start * k, min(s.stop * k, n)) for s, k, n in zip(bb, f, shape))
        sub_shape = tuple(s.stop - s.start for s in full_bb)
        inter_up = upsample(interior[bb], f, sub_shape)
        band_up = upsample(band[bb], f, sub_shape)
        # full-resolution air only inside this lung's box (the whole scan is 3-5x larger)
        band_up &= hu[full_bb] < thr
        if fov is not None:
            band_up &= fov[full_bb]
        band_up &= ~upsample(airway[bb], f, sub_shape)
        lung = inter_up | band_up
        lung = fill_slices(lung, pixel_mm2)
        region = out[full_bb]
        region[lung & (region == 0)] = name
    return out
