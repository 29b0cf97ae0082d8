"""Trachea and bronchi: found by region growing from the trachea, taken out of the lungs.

The airway lumen is air, like the lung, and at a ~2 mm working grid the trachea and main
bronchi touch the lung air through partial volume: a segmenter (or a given mask) that labels air
inside the body counts them as lung, and LAA%-950 then measures the trachea. CIP and lungmask
leave the airways out; so does this module:

1. Seed: the most superior slices (top 40 %) holding a small (30-800 mm^2), central (within a
   quarter of the body's half width of the midline) air tube that lung does not surround
   (less than half of a 1.5-5 mm ring around it is air): the trachea above the lungs.
2. Growth: wavefront region growing from the seed through lumen air (block-mean HU of the
   working grid below ``LUMEN_HU``, inside the body, face-connected), with leak control: a
   front larger than ``LEAK_FRONT`` cross-sections of the trachea, or a tree over
   ``MAX_AIRWAY_ML``, means the growth entered the lung; it stops there and drops the leak's
   first steps. So the tree holds what the lumen lets a tracker follow at this scan's
   resolution: trachea, main bronchi and, where their lumen stays darker than the lung
   around them, lobar bronchi.
3. The grown tree plus one voxel in each slice (the partial-volume wall) is removed from the lung.

A scan that starts below the carina, or shows no trachea, gets no seed: nothing is removed.

Pure functions on numpy arrays (z, y, x), axis 0 cranio-caudal; spacings in mm.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from emphy_dask.segment.morphology import (S2D, bbox_slices, body_air, body_midline, disk, upsample,
                                          working_grid)
from emphy_dask.volume import craniocaudal_axis

#: Lumen: block-mean HU of the working grid below this (a 3 x 3 mean of LIDC-IDRI-0013's trachea
#: is connected from -950 up; -920 and above take in its wall's partial volume).
LUMEN_HU = -940.0
#: A growth front this many times the trachea's cross-section (the seed) is a leak into the lung ...
LEAK_FRONT = 3.0
#: ... and the steps back to the last front under this many cross-sections are dropped.
BACKTRACK_FRONT = 1.5
#: Largest plausible trachea + bronchi volume; more means the growth entered the lung, mL.
MAX_AIRWAY_ML = 150.0
#: Seed: cross-section of the trachea, mm^2 (adult trachea ~150-500 mm^2).
SEED_AREA_MM2 = (30.0, 800.0)


def dilate_2d(mask: np.ndarray, struct: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask, struct)`` of one slice, computed in the mask's box grown by the
    structure's radius only (the same pixels; a whole 350 x 350 slice per call is slow)."""
    out = np.zeros_like(mask)
    if mask.any():
        bb = bbox_slices(mask, (struct.shape[0] // 2 + 1, struct.shape[1] // 2 + 1))
        out[bb] = ndi.binary_dilation(mask[bb], struct)
    return out


def trachea_seed(tight: np.ndarray, loose: np.ndarray, outside: np.ndarray, spacing_zyx_mm,
                 lr_axis: int, mid_lr: float, half_width: float, sup_first: bool) -> np.ndarray:
    """The trachea's cross-section in the most superior slice that shows it (bool, like ``tight``).

    Parameters
    ----------
    tight : ndarray of bool, shape (n_z, n_y, n_x)
        Lumen air (HU < -900) inside the body.
    loose : ndarray of bool, same shape
        Air (HU below the segmenter's air threshold) inside the body.
    outside : ndarray of bool, same shape
        Air outside the body.
    spacing_zyx_mm : 3 floats
        Voxel size, mm.
    lr_axis : int
        The in-plane numpy axis (1 or 2) closest to the patient's left-right.
    mid_lr, half_width : float
        Body midline and half width along ``lr_axis``, voxels.
    sup_first : bool
        True when a larger axis-0 index is more superior.

    Returns
    -------
    ndarray of bool, shape like ``tight``: every small central tube of that slice not
    surrounded by lung (the trachea, and the oesophagus when it holds air); all False when no
    slice of the top 40 % has one (the scan starts below the carina or shows no trachea).
    """
    nz = tight.shape[0]
    sp = spacing_zyx_mm
    px_mm2 = sp[1] * sp[2]
    ring_out = disk((5.0 / sp[1], 5.0 / sp[2]))
    ring_in = disk((1.5 / sp[1], 1.5 / sp[2]))
    seed = np.zeros_like(tight)
    order = range(nz - 1, -1, -1) if sup_first else range(nz)
    for z in list(order)[: max(1, int(0.4 * nz))]:
        lab, n = ndi.label(tight[z])
        if n == 0:
            continue
        areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * px_mm2
        coms = ndi.center_of_mass(tight[z], lab, np.arange(1, n + 1))
        for i, (a, c) in enumerate(zip(areas, coms)):
            if not (SEED_AREA_MM2[0] <= a <= SEED_AREA_MM2[1] and abs(c[lr_axis - 1] - mid_lr) < 0.25 * half_width):
                continue
            comp = lab == i + 1
            ring = dilate_2d(comp, ring_out) & ~dilate_2d(comp, ring_in) & ~outside[z]
            if not ring.any() or loose[z][ring].mean() < 0.5:     # lung does not surround it
                seed[z] |= comp
        if seed[z].any():
            break
    return seed


def grow_airway(work_hu: np.ndarray, inside: np.ndarray, seed: np.ndarray, voxel_ml: float) -> np.ndarray:
    """The airway tree grown from ``seed`` through lumen air, with leak control (module docstring).

    Wavefront growth: each step adds the lumen voxels (``HU < LUMEN_HU``, inside the body) that
    face-touch the previous step's new voxels. Along the trachea and bronchi a front is about
    one cross-section; where the lumen meets lung air at that threshold (emphysema, partial
    volume) the front spreads like a sphere's surface. A front larger than ``LEAK_FRONT`` times
    the seed's cross-section is a leak: the growth stops there, and the steps back to the last
    front under ``BACKTRACK_FRONT`` times the seed are dropped (the leak's beginning).

    Parameters
    ----------
    work_hu : ndarray of float32, shape (n_z, n_y, n_x)
        HU on the working grid.
    inside : ndarray of bool, same shape
        Air inside the body (where the tree may grow).
    seed : ndarray of bool, same shape
        From :func:`trachea_seed`.
    voxel_ml : float
        Volume of one working voxel, mL.

    Returns
    -------
    ndarray of bool, same shape; all False for an empty seed.
    """
    tree = seed.copy()
    ref = int(seed.sum())
    if ref == 0:
        return tree
    lumen = (work_hu < LUMEN_HU) & inside
    struct = ndi.generate_binary_structure(3, 1)
    front, steps = seed, []
    max_voxels = MAX_AIRWAY_ML / voxel_ml
    while True:
        bb = bbox_slices(front, (1, 1, 1))
        grown = ndi.binary_dilation(front[bb], struct) & lumen[bb] & ~tree[bb]
        n = int(grown.sum())
        if n == 0:
            break
        if n > LEAK_FRONT * ref or tree.sum() + n > max_voxels:     # the front entered the lung
            while steps and steps[-1][2] > BACKTRACK_FRONT * ref:
                box, part, _ = steps.pop()
                tree[box] &= ~part
            break
        tree[bb] |= grown
        steps.append((bb, grown, n))
        front = np.zeros_like(tree)
        front[bb] = grown
    return tree


def airway_wall(tree: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The tree plus one voxel around it in each slice, within ``inside`` (the partial-volume wall)."""
    if not tree.any():
        return tree
    bb = bbox_slices(tree, (0, 1, 1))
    out = np.zeros_like(tree)
    out[bb] = ndi.binary_dilation(tree[bb], S2D) & inside[bb]
    return out


def airway_on_working_grid(work, pad, spc, axis_lps, sup_up, air_threshold_hu: float = -320.0):
    """(tree with its wall, inside): the airway found on a working grid (axis 0 cranio-caudal)."""
    vox_ml = float(np.prod(spc)) / 1000.0
    outside, inside = body_air(work, pad, air_threshold_hu, vox_ml)
    lr_axis, mid_lr, half_width = body_midline(~outside, axis_lps)
    seed = trachea_seed((work < -900.0) & inside, inside, outside, spc, lr_axis, mid_lr, half_width, sup_up)
    return airway_wall(grow_airway(work, inside, seed, vox_ml), inside), inside


def airway_tree(hu: np.ndarray, spacing_zyx_mm, direction_xyz, fov_mask: np.ndarray | None = None,
                air_threshold_hu: float = -320.0) -> np.ndarray:
    """Trachea and bronchi (lumen plus a voxel of wall) of a chest CT, on its native grid.

    The threshold segmenter finds them on its own working grid (``segment/threshold.py``); this
    is the same search for a mask made elsewhere (a user's ``--mask``, lungmask's output).

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units.
    spacing_zyx_mm : 3 floats
        Voxel size, mm.
    direction_xyz : 9 floats
        ITK direction matrix (row-major, LPS).
    fov_mask : ndarray of bool, same shape, or None
        True inside the scan field of view.
    air_threshold_hu : float
        Air/tissue threshold of the body's inner air, HU.

    Returns
    -------
    ndarray of bool, shape like ``hu``; all False when no trachea is seen.
    """
    sp = tuple(float(s) for s in spacing_zyx_mm)
    cc_axis, sup_up = craniocaudal_axis(direction_xyz)
    perm = [cc_axis] + [a for a in range(3) if a != cc_axis]
    d = np.asarray(direction_xyz, float).reshape(3, 3)
    axis_lps = np.stack([d[:, 2 - a] for a in perm])
    hu_t = np.transpose(np.asarray(hu), perm)
    fov_t = None if fov_mask is None else np.transpose(np.asarray(fov_mask, bool), perm)
    f, spc, work, pad = working_grid(hu_t, tuple(sp[a] for a in perm), fov_t)
    tree, _ = airway_on_working_grid(work, pad, spc, axis_lps, sup_up, air_threshold_hu)
    return np.ascontiguousarray(np.transpose(upsample(tree, f, hu_t.shape), np.argsort(perm)))


def remove_airway(labels: np.ndarray, airway: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` with the airway set to 0, and the voxels that were taken out of the lung.

    Parameters
    ----------
    labels : ndarray of int, shape (n_z, n_y, n_x)
        Any label map with 0 as background (sides, lobes, CIP codes).
    airway : ndarray of bool, same shape
        From :func:`airway_tree`.

    Returns
    -------
    (labels without the airway, same dtype; bool mask of the voxels removed)
    """
    removed = airway & (labels > 0)
    if not removed.any():
        return labels, removed
    out = labels.copy()
    out[removed] = 0
    return out, removed
