"""Trachea and bronchi: found by region growing from the trachea, taken out of the lungs.

The airway lumen is air, like the lung, and at a ~2 mm working grid the trachea and main
bronchi touch the lung air through partial volume: a segmenter (or a given mask) that labels air
inside the body counts them as lung, and LAA%-950 then measures the trachea. CIP and lungmask
leave the airways out; so does this module:

1. Seed: the most superior slice (top 40 %, above the lungs' widest part) holding a small
   (30-800 mm^2), central (within a quarter of the body's half width of the midline) air tube
   that lung does not surround (less than half of a 1.5-5 mm ring around it is air): the
   trachea above or between the lung apices.
2. Growth: wavefront region growing from the seed through lumen air (block-mean HU of the
   working grid below each of ``LUMEN_STEPS_HU``, inside the body, face-connected; the union
   of the trees), with leak control: a
   front larger than ``LEAK_FRONT`` cross-sections of the trachea (at least ``TRACHEA_MM2``
   each) means the growth entered the lung: it stops there and drops the leak's first steps;
   a tree over ``MAX_AIRWAY_ML`` (a slow leak through emphysema) is dropped whole. So the tree holds what the lumen lets a tracker follow at this scan's
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

#: Lumen: block-mean HU of the working grid below these, each grown on its own and united (the
#: trachea's lumen reads -920 to -970 on LIDC-IDRI-0002's 2 x 2 x 2 means, and is connected from
#: -950 up on LIDC-IDRI-0013's 3 x 3 means; higher thresholds meet the lung sooner).
LUMEN_STEPS_HU = (-975.0, -950.0, -925.0, -900.0)
#: Cross-section of an adult trachea, mm^2: the least the growth assumes (150-500 measured in adults).
TRACHEA_MM2 = 300.0
#: A growth front this many times the trachea's cross-section (the seed) is a leak into the lung ...
LEAK_FRONT = 3.0
#: ... and the steps back to the last front under this many cross-sections are dropped.
BACKTRACK_FRONT = 1.5
#: Largest plausible trachea + bronchi volume, mL; more means the growth entered the lung (the
#: trees of the real chests in ../shared/data measure 25-38 mL, a trachea of 12 x 2.5 cm^2 30 mL).
MAX_AIRWAY_ML = 80.0
#: Seed: cross-section of the trachea, mm^2 (adult trachea ~150-500 mm^2).
SEED_AREA_MM2 = (30.0, 800.0)
#: Seed: only in slices whose inner air (lungs, trachea) is at most this fraction of the largest
#: slice's (LIDC-IDRI-0013, -0002, RIDER: the trachea is found at 0.01-0.1).
SEED_MAX_AIR_FRACTION = 0.3


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
    # above the lungs' widest part only: a scan that starts lower (below the carina) shows lung
    # cut across in its top slice, and a piece of it near the midline looks like a tube
    air_area = loose.sum(axis=(1, 2))
    for z in list(order)[: max(1, int(0.4 * nz))]:
        if air_area[z] > SEED_MAX_AIR_FRACTION * air_area.max():
            break
        lab, n = ndi.label(tight[z])
        if n == 0:
            continue
        areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * px_mm2
        coms = ndi.center_of_mass(tight[z], lab, np.arange(1, n + 1))
        for i, (a, c) in enumerate(zip(areas, coms)):
            central = abs(c[lr_axis - 1] - mid_lr) < 0.25 * half_width
            if not (SEED_AREA_MM2[0] <= a <= SEED_AREA_MM2[1] and central):
                continue
            comp = lab == i + 1
            ring = dilate_2d(comp, ring_out) & ~dilate_2d(comp, ring_in) & ~outside[z]
            if not ring.any() or loose[z][ring].mean() < 0.5:     # lung does not surround it
                seed[z] |= comp
        if seed[z].any():
            break
    return seed


def grow_airway(work_hu: np.ndarray, inside: np.ndarray, seed: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """The airway tree grown from ``seed`` through lumen air, with leak control (module docstring).

    Wavefront growth: each step adds the lumen voxels (``HU < t``, inside the body) that
    face-touch the previous step's new voxels; one growth per ``t`` in ``LUMEN_STEPS_HU``, and
    the tree is their union. Along the trachea and bronchi a front is about
    one cross-section; where the lumen meets lung air at that threshold (emphysema, partial
    volume) the front spreads like a sphere's surface. A front larger than ``LEAK_FRONT`` times
    the trachea's cross-section (the seed's, at least ``TRACHEA_MM2``: the top slice may show
    the narrower subglottic trachea) is a leak: the growth stops there, and the steps back to
    the last front under ``BACKTRACK_FRONT`` cross-sections are dropped (the leak's beginning).
    Front areas are voxel counts times the in-slice pixel area.

    Parameters
    ----------
    work_hu : ndarray of float32, shape (n_z, n_y, n_x)
        HU on the working grid.
    inside : ndarray of bool, same shape
        Air inside the body (where the tree may grow).
    seed : ndarray of bool, same shape
        From :func:`trachea_seed`.
    spacing_zyx_mm : 3 floats
        Working voxel size, mm.

    Returns
    -------
    ndarray of bool, same shape; all False for an empty seed.
    """
    tree = seed.copy()
    if not seed.any():
        return tree
    px_mm2 = float(spacing_zyx_mm[1] * spacing_zyx_mm[2])
    top = max(int(seed.sum(axis=(1, 2)).max()) * px_mm2, TRACHEA_MM2) / px_mm2   # voxels
    max_voxels = MAX_AIRWAY_ML / (float(np.prod(spacing_zyx_mm)) / 1000.0)
    for t in LUMEN_STEPS_HU:     # the union: each tree is leak-controlled on its own
        tree |= _wavefront(seed, (work_hu < t) & inside, top, max_voxels)
    return tree


def _wavefront(seed: np.ndarray, lumen: np.ndarray, top: float, max_voxels: float) -> np.ndarray:
    """One leak-controlled wavefront growth of ``seed`` in ``lumen`` (see :func:`grow_airway`);
    ``top``: the trachea's cross-section, voxels."""
    struct = ndi.generate_binary_structure(3, 1)
    tree, steps = seed.copy(), []
    box = bbox_slices(seed, (0, 0, 0))
    front, count = seed[box], int(seed.sum())
    while True:
        # the front lives in its own box: one step reaches one voxel beyond it
        bb = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, tree.shape))
        local = np.zeros(tuple(b.stop - b.start for b in bb), bool)
        local[tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, bb))] = front
        grown = ndi.binary_dilation(local, struct) & lumen[bb] & ~tree[bb]
        n = int(grown.sum())
        if n == 0:
            break
        if count + n > max_voxels:
            # a slow leak (through emphysema, fronts never large): no step can be trusted; better
            # keep a bronchus in the lung than cut a lung away (another threshold may do)
            return np.zeros_like(tree)
        if n > LEAK_FRONT * top:                                    # the front entered the lung
            while steps and steps[-1][2] > BACKTRACK_FRONT * top:
                sb, part, _ = steps.pop()
                tree[sb] &= ~part
            break
        tree[bb] |= grown
        count += n
        steps.append((bb, grown, n))
        inner = bbox_slices(grown, (0, 0, 0))
        box = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(bb, inner))
        front = grown[inner]
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
    return airway_wall(grow_airway(work, inside, seed, spc), inside), inside


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
