"""LAA% slice by slice along the head-feet axis (the cranio-caudal LAA curve)."""
from __future__ import annotations

import numpy as np

from emphy_dask.volume import counts_along, craniocaudal_axis


def laa_per_slice(hu, labels, direction_xyz, threshold_hu: float = -950,
                  spacing_zyx_mm=None) -> dict:
    """Low-attenuation fraction of the lung in every slice, superior first.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units.
    labels : ndarray, shape like ``hu``
        Lung where > 0.
    direction_xyz : sequence of 9 float
        ITK direction matrix; picks the head-feet axis and which end is superior.
    threshold_hu : float
        A voxel is low-attenuation when HU < threshold (strict, as LAA950).
    spacing_zyx_mm : sequence of 3 float, optional
        Voxel size; when given, ``depth_mm`` is filled in.

    Returns
    -------
    dict of 1-D numpy arrays, one entry per slice of the head-feet axis, ordered
    from the most superior slice to the most inferior:

    - ``slice_index`` (int64): index along that numpy axis (key ``axis`` holds it),
    - ``rank_from_superior`` (int64): 0 for the top slice,
    - ``depth_mm`` (float64): distance below the top slice's centre, mm (NaN if
      no spacing given),
    - ``n_lung_voxels`` (int64), ``n_laa_voxels`` (int64),
    - ``laa_pct`` (float64): 100 * n_laa / n_lung; NaN where the slice has no
      lung (0 would read as "healthy slice", which it is not).

    Summing ``n_laa_voxels`` gives the whole-lung LAA voxel count.
    """
    hu = np.asarray(hu)
    labels = np.asarray(labels)
    lung = labels if labels.dtype == bool else labels > 0
    if hu.shape != lung.shape:
        raise ValueError(f"HU shape {hu.shape} and label shape {lung.shape} differ")
    axis, inc_sup = craniocaudal_axis(direction_xyz)
    n_lung = counts_along(lung, axis)
    n_laa = np.zeros_like(n_lung)
    # slab by slab along axis 0: two bool temporaries of a slab, not of the whole scan
    step = max(1, (1 << 22) // max(1, hu[0].size))
    for z0 in range(0, hu.shape[0], step):
        laa = lung[z0:z0 + step] & (hu[z0:z0 + step] < threshold_hu)
        part = counts_along(laa, axis)
        if axis == 0:
            n_laa[z0:z0 + step] = part
        else:
            n_laa += part
    idx = np.arange(hu.shape[axis], dtype=np.int64)
    if inc_sup:                      # larger index = more superior: reverse
        idx = idx[::-1].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(n_lung[idx] > 0, 100.0 * n_laa[idx] / n_lung[idx], np.nan)
    rank = np.arange(idx.size, dtype=np.int64)
    if spacing_zyx_mm is not None:
        depth = rank * float(spacing_zyx_mm[axis])
    else:
        depth = np.full(idx.size, np.nan)
    return {
        "axis": axis,
        "slice_index": idx,
        "rank_from_superior": rank,
        "depth_mm": depth,
        "n_lung_voxels": n_lung[idx],
        "n_laa_voxels": n_laa[idx],
        "laa_pct": pct,
    }
