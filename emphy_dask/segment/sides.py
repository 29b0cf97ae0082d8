"""Right and left lung of a binary lung mask, split the way the threshold segmenter splits.

A user's mask (or a model's) may mark lung without saying which lung. The two lungs are then
found as the threshold segmenter finds them (``segment/threshold.py``): face-connected
components; the largest one, if it spans both sides of the midline (lungs touching
anteriorly or posteriorly), is split by its erosion cores (``_split_merged``, the very same
function); otherwise the largest component on the other side is the other lung. Sides come
from the patient's left-right axis of the direction cosines (LPS x of each lung's centroid:
smaller x = patient right), never from the array index.

Unlike the segmenter, no voxel of the mask is dropped: small components (islands, a lobe tip
cut by the slab) go to the lung on their side of the midpoint between the two lungs.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from emphy_dask.segment.threshold import LEFT, RIGHT, _split_merged
from emphy_dask.volume import craniocaudal_axis

#: The second lung must hold at least this fraction of the largest component (as the segmenter).
MIN_SECOND_LUNG_FRACTION = 0.1
#: A component with more than this fraction of its voxels on each side of the midline is two merged lungs.
MERGED_SIDE_FRACTION = 0.15


def _centroid(part: np.ndarray) -> np.ndarray:
    """Centroid (array index units) of a 3-D bool mask, from its three projections (fast)."""
    out = np.empty(3)
    for a in range(3):
        prof = part.sum(axis=tuple(b for b in range(3) if b != a), dtype=np.int64)
        out[a] = float((prof * np.arange(prof.size)).sum()) / max(int(prof.sum()), 1)
    return out


def split_sides(mask: np.ndarray, spacing_zyx_mm, direction_xyz) -> np.ndarray | None:
    """Label the right (1) and left (2) lung of a binary lung mask.

    Parameters
    ----------
    mask : ndarray of bool, shape (n_z, n_y, n_x)
        Lung voxels (any nonzero value).
    spacing_zyx_mm : 3 floats
        Voxel size along the array axes, mm.
    direction_xyz : 9 floats
        ITK direction matrix (row-major, LPS).

    Returns
    -------
    ndarray of uint8, shape like ``mask`` (0 background, 1 right, 2 left), every mask voxel
    labelled; or None when the mask holds only one lung (nothing on the other side).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if not mask.any():
        return None
    sp = tuple(float(s) for s in spacing_zyx_mm)
    cc_axis, _ = craniocaudal_axis(direction_xyz)
    perm = [cc_axis] + [a for a in range(3) if a != cc_axis]
    d = np.asarray(direction_xyz, float).reshape(3, 3)
    axis_lps = np.stack([d[:, 2 - a] for a in perm])     # LPS vector of each (transposed) axis
    m = np.transpose(mask, perm)
    sp_t = tuple(sp[a] for a in perm)
    lr_axis = 1 + int(np.argmax(np.abs(axis_lps[1:, 0])))  # in-plane axis closest to L-R

    # crop to the mask: labelling allocates int32 volumes
    bb = []
    for a in range(3):
        hit = np.flatnonzero(m.any(axis=tuple(b for b in range(3) if b != a)))
        bb.append(slice(int(hit[0]), int(hit[-1]) + 1))
    bb = tuple(bb)
    sub = m[bb]
    lab, n = ndi.label(sub)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    coords = np.arange(sub.shape[lr_axis])
    profile = sub.sum(axis=tuple(a for a in range(3) if a != lr_axis))
    extent = coords[profile > 0]
    mid_lr = (extent.min() + extent.max()) / 2.0           # midline: middle of the mask's L-R extent

    def lr_coord(part, box=None):
        return _centroid(part)[lr_axis] + (box[lr_axis].start if box is not None else 0)

    first = lab == order[0] + 1
    lungs = None
    frac_hi = float((first.sum(axis=tuple(a for a in range(3) if a != lr_axis)) * (coords > mid_lr)).sum()
                    / sizes[order[0]])
    if min(frac_hi, 1.0 - frac_hi) > MERGED_SIDE_FRACTION:
        lungs = _split_merged(first, sp_t, lr_coord, mid_lr)
    if lungs is None:
        side = lr_coord(first) > mid_lr
        for k in order[1:]:
            if sizes[k] < MIN_SECOND_LUNG_FRACTION * sizes[order[0]]:
                break
            other = lab == k + 1
            if (lr_coord(other) > mid_lr) != side:
                lungs = (first, other)
                break
    if lungs is None:
        return None
    a, b = lungs
    rest = sub & ~a & ~b
    if rest.any():                                          # islands: to the lung on their side
        ca, cb = lr_coord(a), lr_coord(b)
        rl, nr = ndi.label(rest)
        cent = np.asarray(ndi.center_of_mass(rest, rl, np.arange(1, nr + 1)), float).reshape(nr, 3)
        to_a = np.abs(cent[:, lr_axis] - ca) <= np.abs(cent[:, lr_axis] - cb)
        pick = np.zeros(nr + 1, bool)
        pick[1:] = to_a
        a = a | (pick[rl] & rest)
        b = b | (~pick[rl] & rest)

    def lps_x(part):
        return float((_centroid(part) * np.asarray(sp_t)) @ axis_lps[:, 0])

    a_is_right = lps_x(a) < lps_x(b)                      # LPS +x is the patient's left
    out_t = np.zeros(m.shape, np.uint8)
    out_t[bb][a] = RIGHT if a_is_right else LEFT
    out_t[bb][b] = LEFT if a_is_right else RIGHT
    return np.ascontiguousarray(np.transpose(out_t, np.argsort(perm)))
