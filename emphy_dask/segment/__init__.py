"""Lung segmentation: a registry of segmenters with one calling convention.

Every entry of ``SEGMENTERS`` is a callable
``f(hu, spacing_zyx_mm, direction_xyz=identity, fov_mask=None) -> ndarray uint8 (z, y, x)``
taking native-grid HU and returning 0 background, 1 right lung, 2 left lung (the
lungmask convention). ``lungmask`` (R231 U-Net, ``segment/lungmask.py``) runs here in one
process on the local device; the job runs its preprocessing, U-Net and post-processing as
separate CPU and device tasks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from emphy_dask.segment.lungmask import lung_mask_lungmask
from emphy_dask.segment.threshold import LEFT, RIGHT, lung_mask_threshold
from emphy_dask.volume import CTVolume

SEGMENTERS: dict[str, Callable[..., np.ndarray]] = {
    "threshold": lung_mask_threshold,
    "lungmask": lung_mask_lungmask,     # R231 U-Net; the job splits it into CPU and device tasks
}


def segment_lungs(volume: CTVolume, name: str = "threshold") -> np.ndarray:
    """Lung labels of ``volume`` with the segmenter registered as ``name``.

    Returns
    -------
    ndarray of uint8, shape ``volume.shape`` (z, y, x): 0 background, 1 right, 2 left lung.

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
    return fn(volume.hu, volume.spacing_zyx_mm, volume.direction_xyz, volume.fov_mask)


__all__ = ["SEGMENTERS", "segment_lungs", "lung_mask_threshold", "RIGHT", "LEFT"]
