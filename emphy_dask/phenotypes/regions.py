"""Lung regions: names, and the cranio-caudal thirds of a lung mask.

Regions reported (rows of the phenotype table, :data:`REGIONS` order): WholeLung,
RightLung, LeftLung, Upper/Middle/LowerThird, and the per-lung thirds RightUpperThird ...
LeftLowerThird (= a side intersected with a third); then the lobes when the label map has
them (``labelmaps.LOBES``). How a label map gives sides, thirds and lobes:
:mod:`.labelmaps`.

Thirds (CIP's UpperThird / MiddleThird / LowerThird) are slabs perpendicular to the
cranio-caudal axis, shared by both lungs, that split the WHOLE-LUNG voxel count
into three equal parts. Each slice goes wholly to one third, chosen by the rank of
its middle voxel: with slices ordered superior -> inferior, ``c`` the lung voxels
in the slices above it and ``n`` its own, the slice belongs to third
``floor(3 * (c + n / 2) / N)`` (0 upper, 1 middle, 2 lower; N whole-lung voxels),
i.e. to the third that holds the larger share of its voxels. The rule depends only
on the superior -> inferior order, so it is the same whichever way the array runs.
A label map that carries its own thirds (CIP's partial-lung maps) keeps them.
"""
from __future__ import annotations

import numpy as np

from emphy_dask.volume import counts_along, craniocaudal_axis

#: Region names in report order (rows of the phenotype table).
REGIONS = ("WholeLung", "RightLung", "LeftLung", "UpperThird", "MiddleThird", "LowerThird",
           "RightUpperThird", "RightMiddleThird", "RightLowerThird",
           "LeftUpperThird", "LeftMiddleThird", "LeftLowerThird")
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
    labels = np.asarray(labels)
    per_slice = counts_along(labels if labels.dtype == bool else labels > 0, axis)
    return axis, thirds_of_slices(per_slice, inc_sup)


def thirds_of_slices(per_slice: np.ndarray, superior_is_high_index: bool) -> np.ndarray:
    """``slice_thirds`` from the lung voxels of every slice (int, (n_slices,)), for a caller
    that has counted them: third per slice, int8, -1 without lung."""
    per_slice = np.asarray(per_slice, dtype=np.int64)
    # Order slices superior -> inferior so "upper" never depends on the array sign.
    order = np.arange(per_slice.size)[::-1] if superior_is_high_index else np.arange(per_slice.size)
    n_sup = per_slice[order]
    total = int(n_sup.sum())
    third = np.full(per_slice.size, -1, dtype=np.int8)
    if total == 0:
        return third
    before = np.cumsum(n_sup) - n_sup
    mid_rank = (before + n_sup / 2.0) / total           # in (0, 1)
    t_sup = np.minimum((3.0 * mid_rank).astype(np.int64), 2).astype(np.int8)
    t_sup[n_sup == 0] = -1
    third[order] = t_sup
    return third
