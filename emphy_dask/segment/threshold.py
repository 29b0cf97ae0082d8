"""Classical (CPU, no model) lung segmentation: threshold + morphology.

Pipeline (on an internal working grid of ~1.5-2 mm, then refined at full resolution):

1. air = HU < ``air_threshold_hu``; padding / outside-FOV voxels count as air.
2. Outside air: per-slice 2D components of air touching the slice border or the
   padding, plus small internal pockets 3D-connected to them.
3. Trachea and main bronchi: seeded at the most superior slice with a small, central
   air tube (tight threshold), tracked slice by slice downwards until each branch
   enters the lung (its surroundings become lung air, or its area jumps because it
   merged with the parenchyma). Removed from the candidates.
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
from emphy_dask.segment.morphology import (S2D, bbox_slices, block_mean, close_mm, disk, fill_slices, label_sizes,
                                          upsample)
from emphy_dask.volume import craniocaudal_axis

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RIGHT, LEFT = 1, 2
#: 2D face (4-) connectivity as a 3D structure: ``ndi.label``'s default on one slice.
S2D_4 = np.zeros((3, 3, 3), bool)
S2D_4[1] = ndi.generate_binary_structure(2, 1)

#: Largest cross-section of one tracked airway component (trachea ~ 250-500 mm^2), mm^2.
MAX_AIRWAY_SECTION_MM2 = 800.0
#: Largest plausible trachea + main bronchi volume; more means the tracker entered the lung, mL.
MAX_AIRWAY_ML = 150.0


def _face_neighbours(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour in ``mask`` (3D, 6-connectivity), by shifted ORs."""
    out = np.zeros_like(mask)
    for ax in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def _dilate_2d(mask: np.ndarray, struct: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask, struct)`` of one slice, computed in the mask's box grown by the
    structure's radius only (the same pixels; a whole 350 x 350 slice per call was most of the
    tracker's time)."""
    out = np.zeros_like(mask)
    if mask.any():
        bb = bbox_slices(mask, (struct.shape[0] // 2 + 1, struct.shape[1] // 2 + 1))
        out[bb] = ndi.binary_dilation(mask[bb], struct)
    return out


def _track_airway(tight, loose, outside, sp, lr_axis_2d, mid_lr, half_width, sup_first):
    """Trachea + main bronchi (bool, working grid) by slice-wise tracking from the top.

    ``tight``: lumen air (HU < -900); ``loose``: air (HU < air threshold), both (z,y,x)
    bool with outside air already removed from ``tight``. ``mid_lr`` / ``half_width``:
    body midline and half width along ``lr_axis_2d`` (1=y, 2=x) in voxels.
    """
    nz = tight.shape[0]
    px_mm2 = sp[1] * sp[2]
    ring_out = disk((5.0 / sp[1], 5.0 / sp[2]))
    ring_in = disk((1.5 / sp[1], 1.5 / sp[2]))
    grow = disk((3.0 / sp[1], 3.0 / sp[2]))
    airway = np.zeros_like(tight)
    order = list(range(nz - 1, -1, -1)) if sup_first else list(range(nz))
    # per-slice components of the lumen air (4-connected in the slice), all slices in one call
    lab3, _ = ndi.label(tight, structure=S2D_4)

    def lung_fraction(z, comp):
        ring = _dilate_2d(comp, ring_out) & ~_dilate_2d(comp, ring_in)
        ring &= ~outside[z]
        return float(loose[z][ring].mean()) if ring.any() else 0.0

    # seed: most superior slice (top 40 %) holding a small, central, non-lung air tube
    seed_pos, prev = None, None
    for pos, z in enumerate(order[: max(1, int(0.4 * nz))]):
        lab = lab3[z]
        ids = np.unique(lab)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        areas = np.bincount(lab.ravel())[ids] * px_mm2
        coms = ndi.center_of_mass(tight[z], lab, ids)
        best = None
        for i, a, c in zip(ids, areas, coms):
            off = abs(c[lr_axis_2d - 1] - mid_lr)
            if 30.0 <= a <= 800.0 and off < 0.25 * half_width:
                comp = lab == i
                if lung_fraction(z, comp) < 0.5 and (best is None or off < best[0]):
                    best = (off, comp)
        if best is not None:
            seed_pos, prev = pos, best[1]
            break
    if seed_pos is None:
        return airway  # scan starts below the carina: nothing to remove
    airway[order[seed_pos]] = prev
    prev_area = prev.sum() * px_mm2
    for z in order[seed_pos + 1:]:
        lab = lab3[z]
        hit = np.unique(lab[_dilate_2d(prev, grow) & (lab > 0)])
        keep = np.zeros_like(prev)
        for i in hit:
            comp = lab == i
            a = comp.sum() * px_mm2
            if a > min(MAX_AIRWAY_SECTION_MM2, max(1000.0, 3.0 * prev_area)):
                continue  # merged with emphysematous parenchyma: the branch entered the lung
            if lung_fraction(z, comp) > 0.5:
                continue  # surrounded by lung: intrapulmonary bronchus, part of the lung
            keep |= comp
        if not keep.any() or keep.sum() * px_mm2 > 2 * MAX_AIRWAY_SECTION_MM2:
            break         # more than two main bronchi's worth of air: we are in the lung
        airway[z] = keep
        prev, prev_area = keep, keep.sum() * px_mm2
    if airway.sum() * px_mm2 * sp[0] / 1000.0 > MAX_AIRWAY_ML:
        # not a trachea: tracking wandered into lung (e.g. a scan starting below the carina);
        # better to keep a bronchus stump in the mask than to cut a lung away
        return np.zeros_like(airway)
    return airway


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
        lab, n = ndi.label(dist > r_mm)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = label_sizes(lab, n)
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
                        closing_radius_mm: float = 8.0, min_lung_ml: float = 50.0) -> np.ndarray:
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

    Returns
    -------
    ndarray of uint8, shape (n_z, n_y, n_x): 0 background, 1 right lung, 2 left lung.

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
    labels = _segment(hu_t, sp_t, axis_lps, sup_up, fov_t, air_threshold_hu,
                      closing_radius_mm, min_lung_ml)
    return np.ascontiguousarray(np.transpose(labels, inv))


def _segment(hu, sp, axis_lps, sup_up, fov, thr, closing_mm, min_ml):
    """Core of ``lung_mask_threshold`` on an array whose axis 0 is craniocaudal.

    ``axis_lps``: (3, 3) LPS unit vector of each numpy axis; ``sup_up``: a larger
    axis-0 index is more superior. Works on a grid coarsened by integer factors to
    ~2 x 1.5 x 1.5 mm (block mean), then refines the boundary at full resolution.
    """
    shape = hu.shape
    f = (max(1, int(2.0 / sp[0] + 0.5)), max(1, int(1.5 / sp[1] + 0.5)), max(1, int(1.5 / sp[2] + 0.5)))
    spc = tuple(s * k for s, k in zip(sp, f))
    vox_ml = float(np.prod(spc)) / 1000.0
    work = block_mean(hu, f)
    pad = np.zeros(work.shape, bool) if fov is None else block_mean(~fov, f) > 0.5
    air = (work < thr) | pad

    # outside air: per-slice components touching the slice border or padding
    lab2d, n2d = ndi.label(air, structure=S2D)
    border = np.zeros(air.shape, bool)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    is_out = np.zeros(n2d + 1, bool)      # lookup table by label: np.isin sorts the whole grid
    is_out[lab2d[(border | pad) & air]] = True
    is_out[0] = False
    outside = is_out[lab2d]
    inside = air & ~outside
    # internal pockets (arm/body folds, bed) 3D-linked to outside air in a neighbour slice: an
    # inside component shares a 3D air component with outside air exactly when one of its voxels
    # face-touches an outside voxel (a 3D labelling of all air, inside and out, is not needed)
    lab_in, n_in = ndi.label(inside)
    if n_in:
        vol = label_sizes(lab_in, n_in) * vox_ml
        big = np.zeros(n_in + 1, bool)
        big[1:] = vol >= 100.0  # a lung linked via the airway to the mouth must survive
        linked_in = np.unique(lab_in[_face_neighbours(outside) & inside])
        drop = np.zeros(n_in + 1, bool)
        drop[linked_in] = True
        drop &= ~big
        drop[0] = False
        inside &= ~drop[lab_in]

    body = ~outside
    # L-R geometry: the in-plane axis with the largest |LPS x| component
    lr_axis = 1 + int(np.argmax(np.abs(axis_lps[1:, 0])))
    lr_profile = body.sum(axis=(0, 3 - lr_axis))
    idx = np.arange(lr_profile.size)
    mid_lr = float((lr_profile * idx).sum() / max(lr_profile.sum(), 1))
    extent = idx[lr_profile > 0.05 * lr_profile.max()] if lr_profile.any() else idx
    half_width = max((extent.max() - extent.min()) / 2.0, 1.0)

    tight = (work < -900.0) & inside
    airway = _track_airway(tight, inside, outside, spc, lr_axis, mid_lr, half_width,
                           sup_first=sup_up)
    airway_loose = ndi.binary_dilation(airway, S2D) & inside  # add partial-volume wall
    cand = inside & ~airway_loose

    lab, n = ndi.label(cand)
    if n == 0:
        raise ScanError("<array>", "no lung found: no air enclosed by the body", stage="segment")
    vols = label_sizes(lab, n) * vox_ml
    order = np.argsort(vols)[::-1]
    if vols[order[0]] < min_ml:
        raise ScanError("<array>", f"no lung found: largest air region inside the body is "
                        f"{vols[order[0]]:.0f} mL (< {min_ml:.0f} mL)", stage="segment")

    def lr_coord(mask, bb=None):
        c = ndi.center_of_mass(mask)[lr_axis]
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
        filled.append(m & ~others)

    # physical L-R: LPS x of each centroid; smaller x = patient right
    def lps_x(mask):
        c = np.asarray(ndi.center_of_mass(mask))
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
        return out
    return _refine(hu, fov, thr, f, filled, names, airway_loose, shape, sp[1] * sp[2])


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
