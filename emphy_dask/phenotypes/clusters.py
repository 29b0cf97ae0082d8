"""Power-law exponent D of low-attenuation cluster sizes (Mishima et al., PNAS 1999).

Mishima et al. ("Complexity of terminal airspace geometry assessed by lung computed
tomography in normal subjects and patients with chronic obstructive pulmonary
disease", PNAS 96:8829) showed that the cumulative size distribution of LAA
clusters follows a power law, Y(>= X) ~ X^-D, and that emphysema lowers D (small
holes merge into large ones) even when LAA% barely moves.

Here clusters are 3-D connected components of ``lung & (HU < threshold)``
(``scipy.ndimage.label``; default face connectivity, 6 neighbours, so two voxels
touching only at an edge/corner are separate holes). Sizes are in mm^3.
Fit: ordinary least squares of log10 Y on log10 X, one point per distinct
cluster size X, where Y = (clusters with size >= X) / (all clusters); the tail
where fewer than ``min_tail_clusters`` clusters are >= X is left out (a handful of
giant clusters would otherwise steer the slope). D = -slope. NaN when there are
fewer than ``min_clusters`` clusters or fewer than 3 fit points.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from emphy_dask.volume import bounding_box


def cluster_sizes_mm3(hu, lung_mask, spacing_zyx_mm, threshold_hu: float = -950,
                      connectivity: int = 1) -> np.ndarray:
    """Sizes (mm^3) of the connected LAA clusters inside the lung, shape (n_clusters,).

    ``connectivity`` as ``scipy.ndimage.generate_binary_structure(3, c)``:
    1 = faces (6-neighbour), 2 = +edges (18), 3 = +corners (26).
    """
    hu = np.asarray(hu)
    lung = np.asarray(lung_mask).astype(bool, copy=False)
    if hu.shape != lung.shape:
        raise ValueError(f"HU shape {hu.shape} and mask shape {lung.shape} differ")
    if not lung.any():
        return np.zeros(0)
    # Crop to the lung's bounding box: labelling allocates an int32 volume.
    box = _box(lung)
    return mask_cluster_sizes_mm3(lung[box] & (hu[box] < threshold_hu), spacing_zyx_mm, connectivity)


def _box(mask: np.ndarray) -> tuple:
    """The bounding box of a non-empty mask, as slices (``volume.bounding_box``)."""
    return tuple(slice(lo, hi) for lo, hi in bounding_box(mask))


def mask_cluster_sizes_mm3(laa, spacing_zyx_mm, connectivity: int = 1, *, voxels=None,
                           output=None) -> np.ndarray:
    """Sizes (mm^3) of the connected clusters of a ready LAA mask (bool), shape (n_clusters,).

    ``voxels`` (the mask's flat indices) and ``output`` (int32, the mask's shape, overwritten),
    for a caller that labels many masks of one box: the mask is then labelled uncropped into
    ``output`` (a fresh label volume per call is paged in anew) and the sizes are counted on
    ``voxels`` (no scan of the labels). The same sizes either way, maybe in another order."""
    laa = np.asarray(laa).astype(bool, copy=False)
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx_mm, dtype=np.float64)))
    structure = ndimage.generate_binary_structure(laa.ndim, connectivity)
    if voxels is not None:
        if not len(voxels):
            return np.zeros(0)
        n = ndimage.label(laa, structure=structure, output=output)
        sizes = np.bincount(output.reshape(-1)[voxels], minlength=n + 1)
        return sizes[1:].astype(np.float64) * voxel_mm3
    if not laa.any():
        return np.zeros(0)
    laa = laa[_box(laa)]
    comp, n = ndimage.label(laa, structure=structure)
    # counted on the LAA voxels only: bincount widens its input to int64, and the whole box's
    # labels would be a second copy of the box
    sizes = np.bincount(comp[laa], minlength=n + 1)
    return sizes[1:].astype(np.float64) * voxel_mm3


def power_law_exponent(sizes, min_clusters: int = 10, min_tail_clusters: int = 5) -> float:
    """D of Y(>= X) ~ X^-D fitted to cluster sizes (any unit); NaN if too few.

    Parameters
    ----------
    sizes : array-like, shape (n_clusters,)
        Cluster sizes (> 0).
    min_clusters : int
        Fewer clusters than this -> NaN.
    min_tail_clusters : int
        Fit only sizes X with at least this many clusters >= X.
    """
    s = np.sort(np.asarray(sizes, dtype=np.float64))
    s = s[s > 0]
    n = s.size
    if n < min_clusters:
        return math.nan
    x, first = np.unique(s, return_index=True)
    tail = n - first                      # clusters with size >= x
    keep = tail >= min_tail_clusters
    if np.count_nonzero(keep) < 3:
        return math.nan
    slope = np.polyfit(np.log10(x[keep]), np.log10(tail[keep] / n), 1)[0]
    return float(-slope)


def laa_cluster_exponent_d(hu, lung_mask, spacing_zyx_mm, threshold_hu: float = -950,
                           connectivity: int = 1, min_clusters: int = 10,
                           min_tail_clusters: int = 5) -> float:
    """Mishima's D for the LAA clusters of one lung (mask) region.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units.
    lung_mask : ndarray of bool, shape like ``hu``
        Region to analyse (usually labels > 0).
    spacing_zyx_mm : sequence of 3 float
        Voxel size, mm (sizes are in mm^3; D does not depend on the unit).
    threshold_hu : float
        LAA means HU < threshold.
    connectivity : int
        1 faces (default), 2 edges, 3 corners.

    Returns
    -------
    float
        D (dimensionless, typically 1-2 in lungs), NaN when too few clusters.
    """
    sizes = cluster_sizes_mm3(hu, lung_mask, spacing_zyx_mm, threshold_hu, connectivity)
    return power_law_exponent(sizes, min_clusters=min_clusters, min_tail_clusters=min_tail_clusters)
