"""Grid and morphology helpers of the classical segmenter: block means onto a coarse working
grid and back, label sizes, bounding boxes, a closing with a ball in mm, per-slice hole filling.

Pure functions on numpy arrays (z, y, x); spacings in mm.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

import edt
import fill_voids

from emphy_dask.volume import bounding_box

#: 2D (in-slice) 8-connectivity as a 3D structure: no links across slices.
S2D = np.zeros((3, 3, 3), bool)
S2D[1] = True


def block_mean(a: np.ndarray, f: tuple) -> np.ndarray:
    """Block-average ``a`` (z,y,x) by integer factors ``f`` into float32; edges padded by replication.

    One block of slices at a time, summed by strided adds (integer sums for integer and bool
    input): no float copy of the whole scan and no multi-axis reduction, 10x faster than
    ``astype``/``pad``/``reshape(...).mean``, and each mean is the float32 division of the
    exact sum.
    """
    if f == (1, 1, 1):
        return a.astype(np.float32)
    exact = a.dtype == bool or np.issubdtype(a.dtype, np.integer)
    acc = (np.int32 if a.dtype.itemsize <= 2 else np.int64) if exact else np.float64
    nz, ny, nx = (-(-n // k) for n, k in zip(a.shape, f))
    pad_yx = [(0, ny * f[1] - a.shape[1]), (0, nx * f[2] - a.shape[2])]
    out = np.empty((nz, ny, nx), np.float32)
    for i in range(nz):
        rows = [a[min(i * f[0] + k, a.shape[0] - 1)] for k in range(f[0])]    # z edge replicated
        total = rows[0].astype(acc)
        for row in rows[1:]:
            total += row
        if pad_yx[0][1] or pad_yx[1][1]:
            total = np.pad(total, pad_yx, mode="edge")
        total = sum(total[j::f[1]] for j in range(1, f[1])) + total[0::f[1]]
        total = sum(total[:, j::f[2]] for j in range(1, f[2])) + total[:, 0::f[2]]
        out[i] = total.astype(np.float32) / np.float32(np.prod(f))
    return out


def label_sizes(lab: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Voxel count of labels 1..n (``ndi.sum_labels`` of ones, without its float copies: 20x faster).

    ``mask``: the labelled voxels (``lab > 0``), when the caller has it: only they are counted
    (bincount widens its input to int64; the air is a small part of the grid: 3-5x faster).
    """
    if mask is not None:
        return np.bincount(lab[mask], minlength=n + 1)[1:n + 1]
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def centroid(mask: np.ndarray) -> np.ndarray:
    """Centre of mass (voxels, per axis) of a non-empty bool mask, as ``ndi.center_of_mass``.

    From the mask's per-axis voxel counts in its bounding box, in exact integers: scipy's
    multiplies the whole grid by each axis' coordinates in float64 (three grid-sized
    temporaries; 0.1-0.2 s a call). Equal to scipy's up to the last bits of the float sum.
    """
    box = bbox_slices(mask, (0,) * mask.ndim)
    m = mask[box]
    out = np.empty(mask.ndim)
    for ax in range(mask.ndim):
        prof = m.sum(axis=tuple(a for a in range(mask.ndim) if a != ax), dtype=np.int64)
        out[ax] = int((prof * np.arange(box[ax].start, box[ax].stop, dtype=np.int64)).sum()) / int(prof.sum())
    return out


def upsample(a: np.ndarray, f: tuple, shape: tuple) -> np.ndarray:
    """Nearest-neighbour inverse of ``block_mean``: repeat by ``f`` and crop to ``shape``."""
    for ax, k in enumerate(f):
        if k > 1:
            a = np.repeat(a, k, axis=ax)
    return a[: shape[0], : shape[1], : shape[2]]


def bbox_slices(mask: np.ndarray, margin: tuple) -> tuple:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped)."""
    return tuple(slice(max(lo - m, 0), min(hi + m, n))
                 for (lo, hi), m, n in zip(bounding_box(mask), margin, mask.shape))


def close_mm(mask: np.ndarray, radius_mm: float, sp: tuple) -> np.ndarray:
    """3D binary closing with a ball of ``radius_mm`` via distance transforms (anisotropic-safe)."""
    if not mask.any():
        return mask
    margin = tuple(int(np.ceil(radius_mm / s)) + 1 for s in sp)
    bb = bbox_slices(mask, margin)
    m = mask[bb]
    # pad in-plane so the dilation never hits the crop edge; z is left open on purpose:
    # a lung cut by the scan's first/last slice must not be eroded from that face
    pad = [(0, 0), (margin[1], margin[1]), (margin[2], margin[2])]
    mp = np.pad(m, pad)
    # edt (the fill_voids authors' anisotropic EDT) is 4-5x faster than scipy's, which builds a
    # feature transform first; float32 distances, the same voxels on every series measured
    # (benchmarks/segment_compare.py)
    dil = edt.edt(~mp, anisotropy=sp, black_border=False, parallel=1) <= radius_mm
    clo = edt.edt(dil, anisotropy=sp, black_border=False, parallel=1) > radius_mm
    out = mask.copy()
    out[bb] |= clo[:, margin[1]: margin[1] + m.shape[1], margin[2]: margin[2] + m.shape[2]]
    return out


#: Largest in-slice hole filled into a lung, mm^2 (~5 cm disc): vessels, bronchi and
#: nodules are smaller; the liver/spleen dome, which the lung base can ring in one
#: slice, is larger and must stay out.
MAX_HOLE_MM2 = 2000.0


def fill_slices(mask: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """Fill holes up to ``MAX_HOLE_MM2`` in each axial slice (axis 0) of a bool mask."""
    out = mask.copy()
    if not mask.any():
        return out
    max_px = MAX_HOLE_MM2 / pixel_mm2
    # the mask's box with a one-pixel empty rim: every hole lies inside it and the rim keeps the
    # outside connected, so the slices' holes are the same as on the whole grid, at a fraction
    bb = bbox_slices(mask, (0, 1, 1))
    sub, sub_out = mask[bb], out[bb]
    for z in np.nonzero(sub.any(axis=(1, 2)))[0]:
        filled = fill_voids.fill(sub[z], in_place=False)
        holes = filled & ~sub[z]
        if holes.any():
            lab, n = ndi.label(holes)
            size = np.bincount(lab.ravel(), minlength=n + 1)
            keep = size <= max_px
            keep[0] = False
            sub_out[z] |= keep[lab]
    return out


def disk(radius_vox: tuple) -> np.ndarray:
    """In-plane elliptic disc of radii ``radius_vox`` (y, x) voxels, at least 1, as a bool array."""
    ry, rx = (max(int(round(r)), 1) for r in radius_vox)
    yy, xx = np.mgrid[-ry: ry + 1, -rx: rx + 1]
    return (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0


def working_grid(hu: np.ndarray, sp: tuple, fov: np.ndarray | None):
    """The segmenter's coarse grid: factors ``f`` to ~2 x 1.5 x 1.5 mm, its spacing (mm), the
    block-mean HU (float32) and the padding (outside the field of view) on it."""
    f = (max(1, int(2.0 / sp[0] + 0.5)), max(1, int(1.5 / sp[1] + 0.5)), max(1, int(1.5 / sp[2] + 0.5)))
    spc = tuple(s * k for s, k in zip(sp, f))
    work = block_mean(hu, f)
    pad = np.zeros(work.shape, bool) if fov is None else block_mean(~fov, f) > 0.5
    return f, spc, work, pad


def _face_neighbours(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour in ``mask`` (3D, 6-connectivity), by shifted ORs."""
    out = np.zeros_like(mask)
    for ax in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def body_air(work: np.ndarray, pad: np.ndarray, thr: float, voxel_ml: float):
    """(outside, inside): air outside the body and air enclosed by it, bool (z, y, x).

    Outside: per-slice components (8-connected) of ``work < thr`` or padding that touch the slice
    border or the padding, plus internal pockets under 100 mL (arm/body folds, bed) that
    face-touch outside air in a neighbour slice (a lung linked via the airway to the mouth is
    larger and stays inside).
    """
    air = (work < thr) | pad
    lab2d, n2d = ndi.label(air, structure=S2D)
    border = np.zeros(air.shape, bool)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    is_out = np.zeros(n2d + 1, bool)      # lookup table by label: np.isin sorts the whole grid
    is_out[lab2d[(border | pad) & air]] = True
    is_out[0] = False
    outside = is_out[lab2d]
    inside = air & ~outside
    # an inside component shares a 3D air component with outside air exactly when one of its
    # voxels face-touches an outside voxel (no 3D labelling of all air, inside and out, needed)
    lab_in, n_in = ndi.label(inside)
    if n_in:
        big = np.zeros(n_in + 1, bool)
        big[1:] = label_sizes(lab_in, n_in, inside) * voxel_ml >= 100.0
        drop = np.zeros(n_in + 1, bool)
        drop[np.unique(lab_in[_face_neighbours(outside) & inside])] = True
        drop &= ~big
        drop[0] = False
        inside &= ~drop[lab_in]
    return outside, inside


def body_midline(body: np.ndarray, axis_lps: np.ndarray) -> tuple[int, float, float]:
    """(lr_axis, mid_lr, half_width): the in-plane numpy axis (1 or 2) with the largest |LPS x|
    component, the body's midline along it (voxels, mass centre of the body's profile) and its
    half width (voxels, between the 5 % points of the profile)."""
    lr_axis = 1 + int(np.argmax(np.abs(axis_lps[1:, 0])))
    lr_profile = body.sum(axis=(0, 3 - lr_axis))
    idx = np.arange(lr_profile.size)
    mid_lr = float((lr_profile * idx).sum() / max(lr_profile.sum(), 1))
    extent = idx[lr_profile > 0.05 * lr_profile.max()] if lr_profile.any() else idx
    return lr_axis, mid_lr, max((extent.max() - extent.min()) / 2.0, 1.0)
