"""Lung regions of a label map: whole lung, sides and cranio-caudal thirds.

Label convention (``emphy_dask.segment``): 0 background, 1 right lung, 2 left lung.
A label map whose nonzero values are anything other than exactly {1, 2} (a binary
mask, a lobe map, one lung only) is treated as *lung without sides*: WholeLung and
the thirds are reported, RightLung / LeftLung are empty (their metrics are NaN).

Thirds (CIP's UpperThird / MiddleThird / LowerThird) are slabs perpendicular to the
cranio-caudal axis, shared by both lungs, that split the WHOLE-LUNG voxel count
into three equal parts. Each slice goes wholly to one third, chosen by the rank of
its middle voxel: with slices ordered superior -> inferior, ``c`` the lung voxels
in the slices above it and ``n`` its own, the slice belongs to third
``floor(3 * (c + n / 2) / N)`` (0 upper, 1 middle, 2 lower; N whole-lung voxels),
i.e. to the third that holds the larger share of its voxels. The rule depends only
on the superior -> inferior order, so it is the same whichever way the array runs.
"""
from __future__ import annotations

import numpy as np

from emphy_dask.volume import craniocaudal_axis

#: Region names in report order (rows of the phenotype table).
REGIONS = ("WholeLung", "RightLung", "LeftLung", "UpperThird", "MiddleThird", "LowerThird")
THIRDS = ("UpperThird", "MiddleThird", "LowerThird")

RIGHT_LABEL = 1
LEFT_LABEL = 2


def has_sides(labels: np.ndarray) -> bool:
    """True iff the nonzero labels are exactly {1 (right), 2 (left)}."""
    present = np.flatnonzero(np.bincount(_as_small_int(labels).ravel()))
    return set(present.tolist()) - {0} == {RIGHT_LABEL, LEFT_LABEL}


def _as_small_int(labels: np.ndarray) -> np.ndarray:
    """Labels as a non-negative integer array bincount accepts (no copy if uint8)."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if labels.size and (labels.min() < 0 or not np.all(np.isfinite(labels))):
        raise ValueError("label map holds negative or non-finite values")
    # Any positive value means lung; clip so odd label values stay cheap to count.
    return np.clip(labels, 0, 255).astype(np.uint8)


def slice_thirds(labels: np.ndarray, direction_xyz) -> tuple[int, np.ndarray]:
    """Third of every slice along the cranio-caudal axis.

    Parameters
    ----------
    labels : ndarray, shape (n_z, n_y, n_x)
        Label map; voxels > 0 are lung.
    direction_xyz : sequence of 9 float
        ITK direction matrix of the grid (see ``CTVolume``).

    Returns
    -------
    axis : int
        The numpy axis that runs head-feet.
    third : ndarray of int8, shape (labels.shape[axis],)
        0 upper, 1 middle, 2 lower, -1 for slices without lung.
    """
    axis, inc_sup = craniocaudal_axis(direction_xyz)
    lung = np.asarray(labels) > 0
    other = tuple(a for a in range(lung.ndim) if a != axis)
    per_slice = lung.sum(axis=other, dtype=np.int64)
    # Order slices superior -> inferior so "upper" never depends on the array sign.
    order = np.arange(per_slice.size)[::-1] if inc_sup else np.arange(per_slice.size)
    n_sup = per_slice[order]
    total = int(n_sup.sum())
    third = np.full(per_slice.size, -1, dtype=np.int8)
    if total == 0:
        return axis, third
    before = np.cumsum(n_sup) - n_sup
    mid_rank = (before + n_sup / 2.0) / total           # in (0, 1)
    t_sup = np.minimum((3.0 * mid_rank).astype(np.int64), 2).astype(np.int8)
    t_sup[n_sup == 0] = -1
    third[order] = t_sup
    return axis, third


def region_codes(labels: np.ndarray, direction_xyz) -> tuple[np.ndarray, np.ndarray, bool]:
    """Side and third of every lung voxel, in C order of ``labels > 0``.

    Compact form of the regions for the phenotype stage: 1-D arrays over lung
    voxels instead of six full-size boolean masks.

    Returns
    -------
    lung : ndarray of bool, shape like ``labels``
        labels > 0.
    code : ndarray of uint8, shape (n_lung_voxels,)
        ``3 * side + third``; side 0 unknown (no sides), 1 right, 2 left;
        third 0 upper, 1 middle, 2 lower.
    sides : bool
        Whether right/left were available (see :func:`has_sides`).
    """
    labels = _as_small_int(labels)
    sides = has_sides(labels)
    lung = labels > 0
    axis, third = slice_thirds(labels, direction_xyz)
    shape = [1] * labels.ndim
    shape[axis] = -1
    third_vol = np.broadcast_to(np.maximum(third, 0).astype(np.uint8).reshape(shape), labels.shape)
    code = third_vol[lung]
    if sides:
        code = code + np.uint8(3) * labels[lung]
    return lung, code, sides


def region_masks(labels: np.ndarray, direction_xyz) -> dict[str, np.ndarray]:
    """Boolean mask of each region, in :data:`REGIONS` order.

    Parameters
    ----------
    labels : ndarray, shape (n_z, n_y, n_x)
        0 background, 1 right, 2 left (other nonzero values: lung without sides).
    direction_xyz : sequence of 9 float
        ITK direction matrix; decides which axis is head-feet and which end is up.

    Returns
    -------
    dict of str -> ndarray of bool, shape like ``labels``
        RightLung / LeftLung are all False when the map has no sides.
    """
    labels = _as_small_int(labels)
    lung = labels > 0
    sides = has_sides(labels)
    axis, third = slice_thirds(labels, direction_xyz)
    shape = [1] * labels.ndim
    shape[axis] = -1
    third_vol = third.reshape(shape)
    masks = {
        "WholeLung": lung,
        "RightLung": (labels == RIGHT_LABEL) if sides else np.zeros_like(lung),
        "LeftLung": (labels == LEFT_LABEL) if sides else np.zeros_like(lung),
    }
    for k, name in enumerate(THIRDS):
        masks[name] = lung & (third_vol == k)
    return {name: masks[name] for name in REGIONS}
