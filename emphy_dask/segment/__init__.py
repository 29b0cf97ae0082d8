"""Lung segmentation: a registry of segmenters with one calling convention.

Every entry of ``SEGMENTERS`` is a callable
``f(hu, spacing_zyx_mm, direction_xyz=identity, fov_mask=None) -> ndarray uint8 (z, y, x)``
taking native-grid HU and returning 0 background, 1 right lung, 2 left lung (the
lungmask convention). ``lungmask`` (R231 U-Net, ``segment/lungmask.py``) runs here in one
process on the local device; the job runs its preprocessing, U-Net and post-processing as
separate CPU and device tasks.

The trachea and bronchi are not lung (``segment/airway.py``): ``segment_lungs`` leaves them out
whatever the segmenter, and ``airway_out`` takes them out of any other mask (a user's own).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from emphy_dask.segment.airway import airway_tree, remove_airway
from emphy_dask.segment.lungmask import lung_mask_lungmask
from emphy_dask.segment.threshold import LEFT, RIGHT, lung_mask_threshold
from emphy_dask.volume import CTVolume

SEGMENTERS: dict[str, Callable[..., np.ndarray]] = {
    "threshold": lung_mask_threshold,
    "lungmask": lung_mask_lungmask,     # R231 U-Net; the job splits it into CPU and device tasks
}


def segment_lungs(volume: CTVolume, name: str = "threshold", *, with_airway: bool = False):
    """Lung labels of ``volume`` with the segmenter registered as ``name``, airways left out.

    Returns
    -------
    ndarray of uint8, shape ``volume.shape`` (z, y, x): 0 background, 1 right, 2 left lung; with
    ``with_airway``, a tuple (labels, airway): airway bool, same shape, the trachea and bronchi
    kept out of the lungs (drawn in the QC montage, ``airway_ml_removed`` in the scans table).

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the registered ones).
    ScanError
        From the segmenter, e.g. no lung found.
    """
    try:
        fn = SEGMENTERS[name]
    except KeyError:
        raise ValueError(f"unknown segmenter {name!r}; known: {', '.join(sorted(SEGMENTERS))}") from None
    if fn is lung_mask_threshold:   # finds the airway on its own working grid, before the lungs
        labels, airway = lung_mask_threshold(volume.hu, volume.spacing_zyx_mm, volume.direction_xyz,
                                             volume.fov_mask, return_airway=True)
    else:
        labels, airway = airway_out(volume, fn(volume.hu, volume.spacing_zyx_mm, volume.direction_xyz,
                                               volume.fov_mask))
    return (labels, airway) if with_airway else labels


def airway_out(volume: CTVolume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Any label map of ``volume`` (0 background) without the trachea and bronchi.

    Returns
    -------
    (labels, removed): the labels with airway voxels set to 0, and the bool mask of the voxels
    that were lung in ``labels`` and lie in the airway tree (``segment/airway.py``).
    """
    labels = np.asarray(labels)
    return remove_airway(labels, airway_tree(volume.hu, volume.spacing_zyx_mm, volume.direction_xyz,
                                             volume.fov_mask))


__all__ = ["SEGMENTERS", "segment_lungs", "airway_out", "airway_tree", "lung_mask_threshold", "RIGHT", "LEFT"]
