"""Lungs cut by the reconstruction field of view.

A lung never reaches the edge of the image in a complete chest CT: the chest wall lies
between. When the reconstruction field of view (FOV) is too small, the lung runs into the
image edge or into the padding outside the scan circle, and the part beyond is missing:
volume, mass and every percentage then describe a truncated lung.

Measured per axial slice (the two in-plane axes of the head-feet axis from the direction
cosines): a lung border voxel is a lung voxel with an in-plane 4-neighbour that is not lung;
it is on the FOV edge when that neighbour lies outside the image or outside the scan field of
view (``fov_mask`` False). Slabs that stop at the first/last slice are not FOV truncation.
"""
from __future__ import annotations

import math

import numpy as np

from emphy_dask.volume import bounding_box, craniocaudal_axis

#: ``fov_truncated`` when more than this percentage of the lung border lies on the FOV edge.
#: A complete lung has 0 %; a few edge voxels (a mask drawn to the border by hand) stay below.
FOV_TRUNCATED_MIN_PCT = 0.1


def lung_border_at_fov_edge_pct(lung, fov_mask=None, direction_xyz=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> float:
    """Percentage of the lung's in-plane border lying on the image edge or the FOV boundary.

    Parameters
    ----------
    lung : ndarray of bool, shape (n_z, n_y, n_x)
    fov_mask : ndarray of bool, same shape, or None
        True inside the scan field of view (None: the whole image).
    direction_xyz : 9 floats
        ITK direction matrix; picks the axial (in-plane) axes.

    Returns
    -------
    float
        0-100; NaN when there is no lung.
    """
    lung = np.asarray(lung).astype(bool, copy=False)
    if not lung.any():
        return math.nan
    axis, _ = craniocaudal_axis(direction_xyz)
    inplane = [a for a in range(3) if a != axis]
    # crop to the lung grown by one voxel in-plane; beyond the image counts as outside the FOV
    bb = []
    for a, (lo, hi) in enumerate(bounding_box(lung)):
        if a in inplane:
            lo, hi = max(lo - 1, 0), min(hi + 1, lung.shape[a])
        bb.append(slice(lo, hi))
    bb = tuple(bb)
    # in-plane neighbours never cross the head-feet axis: counted in slabs along it, so the
    # padded copies and neighbour masks are a slab's, not the whole box's
    n_border = n_edge = 0
    n = bb[axis].stop - bb[axis].start
    step = max(1, (1 << 22) // max(1, lung[bb].size // max(1, n)))
    for k0 in range(bb[axis].start, bb[axis].stop, step):
        slab = list(bb)
        slab[axis] = slice(k0, min(k0 + step, bb[axis].stop))
        b, e = _border_counts(lung, fov_mask, tuple(slab), inplane)
        n_border += b
        n_edge += e
    return 100.0 * n_edge / n_border if n_border else math.nan


def _border_counts(lung, fov_mask, bb, inplane) -> tuple[int, int]:
    """(lung border voxels, of those on the image edge or FOV boundary) in the box ``bb``."""
    pad = [(1, 1) if a in inplane else (0, 0) for a in range(3)]
    lp = np.pad(lung[bb], pad, constant_values=False)
    outside = np.zeros(lung[bb].shape, bool) if fov_mask is None else ~np.asarray(fov_mask, bool)[bb]
    off = np.pad(outside, pad, constant_values=True)
    core = tuple(slice(1, -1) if a in inplane else slice(None) for a in range(3))
    lung_c = lp[core]
    not_lung_nb = np.zeros(lung_c.shape, bool)
    off_nb = np.zeros(lung_c.shape, bool)
    for a in inplane:
        for step in (-1, 1):
            sl = list(core)
            sl[a] = slice(1 + step, lp.shape[a] - 1 + step)
            sl = tuple(sl)
            not_lung_nb |= ~lp[sl]
            off_nb |= off[sl]
    border = lung_c & not_lung_nb
    return int(np.count_nonzero(border)), int(np.count_nonzero(border & off_nb))


def fov_columns(lung, fov_mask=None, direction_xyz=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> dict:
    """Scans-table columns ``fov_truncated`` (bool, None without lung) and
    ``lung_border_at_fov_edge_pct`` (%, None without lung)."""
    pct = lung_border_at_fov_edge_pct(lung, fov_mask, direction_xyz)
    if math.isnan(pct):
        return {"fov_truncated": None, "lung_border_at_fov_edge_pct": None}
    return {"fov_truncated": bool(pct > FOV_TRUNCATED_MIN_PCT), "lung_border_at_fov_edge_pct": round(pct, 3)}
