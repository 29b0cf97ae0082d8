"""Copy of the classical segmenter as of commit c896889 (before the issue-17 speed work and the
airway removal of issue 18): the reference that `segment_compare.py` compares today's masks with.
Not part of the package; threshold.py and morphology.py of that commit, pasted into one file."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
import fill_voids

from emphy_dask.errors import ScanError
from emphy_dask.volume import bounding_box, craniocaudal_axis




#: 2D (in-slice) 8-connectivity as a 3D structure: no links across slices.
S2D = np.zeros((3, 3, 3), bool)
S2D[1] = True


def block_mean(a: np.ndarray, f: tuple) -> np.ndarray:
    """Block-average ``a`` (z,y,x) by integer factors ``f`` into float32; edges padded by replication.

    One block of slices at a time, summed by strided adds (integer sums for integer and bool
    input): no float copy of the whole scan and no multi-axis reduction, 10x faster than
    ``astype``/``pad``/``reshape(...).mean``, and each mean is the float32 division of the
    exact sum.
    """
    if f == (1, 1, 1):
        return a.astype(np.float32)
    exact = a.dtype == bool or np.issubdtype(a.dtype, np.integer)
    acc = (np.int32 if a.dtype.itemsize <= 2 else np.int64) if exact else np.float64
    nz, ny, nx = (-(-n // k) for n, k in zip(a.shape, f))
    pad_yx = [(0, ny * f[1] - a.shape[1]), (0, nx * f[2] - a.shape[2])]
    out = np.empty((nz, ny, nx), np.float32)
    for i in range(nz):
        rows = [a[min(i * f[0] + k, a.shape[0] - 1)] for k in range(f[0])]    # z edge replicated
        total = rows[0].astype(acc)
        for row in rows[1:]:
            total += row
        if pad_yx[0][1] or pad_yx[1][1]:
            total = np.pad(total, pad_yx, mode="edge")
        total = sum(total[j::f[1]] for j in range(1, f[1])) + total[0::f[1]]
        total = sum(total[:, j::f[2]] for j in range(1, f[2])) + total[:, 0::f[2]]
        out[i] = total.astype(np.float32) / np.float32(np.prod(f))
    return out


def label_sizes(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of labels 1..n (``ndi.sum_labels`` of ones, without its float copies: 20x faster)."""
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def upsample(a: np.ndarray, f: tuple, shape: tuple) -> np.ndarray:
    """Nearest-neighbour inverse of ``block_mean``: repeat by ``f`` and crop to ``shape``."""
    for ax, k in enumerate(f):
        if k > 1:
            a = np.repeat(a, k, axis=ax)
    return a[: shape[0], : shape[1], : shape[2]]


def bbox_slices(mask: np.ndarray, margin: tuple) -> tuple:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped)."""
    return tuple(slice(max(lo - m, 0), min(hi + m, n))
                 for (lo, hi), m, n in zip(bounding_box(mask), margin, mask.shape))


def close_mm(mask: np.ndarray, radius_mm: float, sp: tuple) -> np.ndarray:
    """3D binary closing with a ball of ``radius_mm`` via distance transforms (anisotropic-safe)."""
    if not mask.any():
        return mask
    margin = tuple(int(np.ceil(radius_mm / s)) + 1 for s in sp)
    bb = bbox_slices(mask, margin)
    m = mask[bb]
    # pad in-plane so the dilation never hits the crop edge; z is left open on purpose:
    # a lung cut by the scan's first/last slice must not be eroded from that face
    pad = [(0, 0), (margin[1], margin[1]), (margin[2], margin[2])]
    mp = np.pad(m, pad)
    dil = ndi.distance_transform_edt(~mp, sampling=sp) <= radius_mm
    clo = ndi.distance_transform_edt(dil, sampling=sp) > radius_mm
    out = mask.copy()
    out[bb] |= clo[:, margin[1]: margin[1] + m.shape[1], margin[2]: margin[2] + m.shape[2]]
    return out


#: Largest in-slice hole filled into a lung, mm^2 (~5 cm disc): vessels, bronchi and
#: nodules are smaller; the liver/spleen dome, which the lung base can ring in one
#: slice, is larger and must stay out.
MAX_HOLE_MM2 = 2000.0


def fill_slices(mask: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """Fill holes up to ``MAX_HOLE_MM2`` in each axial slice (axis 0) of a bool mask."""
    out = mask.copy()
    max_px = MAX_HOLE_MM2 / pixel_mm2
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        filled = fill_voids.fill(mask[z], in_place=False)
        holes = filled & ~mask[z]
        if holes.any():
            lab, n = ndi.label(holes)
            size = np.bincount(lab.ravel(), minlength=n + 1)
            keep = size <= max_px
            keep[0] = False
            out[z] |= keep[lab]
    return out


def disk(radius_vox: tuple) -> np.ndarray:
    """In-plane elliptic disc of radii ``radius_vox`` (y, x) voxels, at least 1, as a bool array."""
    ry, rx = (max(int(round(r)), 1) for r in radius_vox)
    yy, xx = np.mgrid[-ry: ry + 1, -rx: rx + 1]
    return (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RIGHT, LEFT = 1, 2

#: Largest cross-section of one tracked airway component (trachea ~ 250-500 mm^2), mm^2.
MAX_AIRWAY_SECTION_MM2 = 800.0
#: Largest plausible trachea + main bronchi volume; more means the tracker entered the lung, mL.
MAX_AIRWAY_ML = 150.0


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

    def lung_fraction(z, comp):
        ring = ndi.binary_dilation(comp, ring_out) & ~ndi.binary_dilation(comp, ring_in)
        ring &= ~outside[z]
        return float(loose[z][ring].mean()) if ring.any() else 0.0

    # seed: most superior slice (top 40 %) holding a small, central, non-lung air tube
    seed_pos, prev = None, None
    for pos, z in enumerate(order[: max(1, int(0.4 * nz))]):
        lab, n = ndi.label(tight[z])
        if n == 0:
            continue
        areas = label_sizes(lab, n) * px_mm2
        coms = ndi.center_of_mass(tight[z], lab, np.arange(1, n + 1))
        best = None
        for i, (a, c) in enumerate(zip(areas, coms)):
            off = abs(c[lr_axis_2d - 1] - mid_lr)
            if 30.0 <= a <= 800.0 and off < 0.25 * half_width:
                comp = lab == i + 1
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
        lab, n = ndi.label(tight[z])
        hit = np.unique(lab[ndi.binary_dilation(prev, grow) & (lab > 0)])
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
    lab2d, _ = ndi.label(air, structure=S2D)
    border = np.zeros(air.shape, bool)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    out_ids = np.unique(lab2d[(border | pad) & air])
    outside = np.isin(lab2d, out_ids[out_ids > 0])
    inside = air & ~outside
    # internal pockets (arm/body folds, bed) 3D-linked to outside air in a neighbour slice
    lab3, _ = ndi.label(air)
    linked = np.unique(lab3[outside])
    lab_in, n_in = ndi.label(inside)
    if n_in:
        vol = label_sizes(lab_in, n_in) * vox_ml
        big = np.zeros(n_in + 1, bool)
        big[1:] = vol >= 100.0  # a lung linked via the airway to the mouth must survive
        linked_in = np.unique(lab_in[np.isin(lab3, linked) & inside])
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


def _refine(hu, fov, thr, f, filled, names, airway, shape, pixel_mm2):
    """Re-decide the one-working-voxel boundary band at full resolution by the threshold."""
    out = np.zeros(shape, np.uint8)
    union = np.zeros(filled[0].shape, bool)
    for m in filled:
        union |= m
    for m, name in zip(filled, names):
        interior = ndi.binary_erosion(m, S2D)
        band = ndi.binary_dilation(m, S2D) & ~(union & ~m) & ~interior
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
