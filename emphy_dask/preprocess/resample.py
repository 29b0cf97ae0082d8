"""Resampling of CT volumes and label maps between grids (SimpleITK).

Geometry convention: the new grid covers the same physical extent as the old one
(the outer faces of the first voxel stay where they were); its size along each
axis is ``ceil(extent_mm / new_spacing_mm)``, so the last voxel may stick out by
less than one new voxel and is filled with ``PADDING_HU`` / outside-FOV.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from emphy_dask.volume import PADDING_HU, CTVolume, bounding_box


def _target_geometry(volume: CTVolume, spacing_zyx_mm):
    """(size_xyz, spacing_xyz, origin_xyz) of the same-extent grid at the new spacing."""
    old_sp = np.asarray(volume.spacing_zyx_mm, float)[::-1]
    new_sp = np.asarray(spacing_zyx_mm, float)[::-1]
    n_old = np.asarray(volume.shape, float)[::-1]
    extent = n_old * old_sp
    # round() first so that 300 * 1.0 / 1.0 does not become 301 through float noise
    size = [max(1, int(math.ceil(round(e / s, 6)))) for e, s in zip(extent, new_sp)]
    d = np.asarray(volume.direction_xyz, float).reshape(3, 3)
    # voxel centres move by half the spacing change so the outer face stays put
    origin = np.asarray(volume.origin_xyz_mm, float) + d @ ((new_sp - old_sp) / 2.0)
    return size, tuple(float(s) for s in new_sp), tuple(float(o) for o in origin)


def _resample(img: sitk.Image, size, spacing, origin, direction, interp, default, out_type):
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputSpacing(spacing)
    f.SetOutputOrigin(origin)
    f.SetOutputDirection(tuple(float(v) for v in direction))
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(default)
    f.SetOutputPixelType(out_type)
    f.SetTransform(sitk.Transform())
    return f.Execute(img)


def _source_crop(volume: CTVolume, size_xyz, spacing_xyz, origin_xyz, direction_xyz) -> tuple:
    """The part of ``volume``'s grid that a resampling onto the given grid reads: (z, y, x)
    slices and the origin of that part.

    The target grid's corner voxel centres mapped to source indices, plus two voxels (linear
    interpolation reads the two neighbours; ITK clamps at the buffer edge, so the crop must end
    where the whole grid ends or beyond the last neighbour), clipped to the grid. Resampling
    the crop gives the very same voxels as resampling the whole scan, without converting the
    whole scan (3-5x the lung box) to a SimpleITK image first.
    """
    d_src = np.asarray(volume.direction_xyz, float).reshape(3, 3)
    d_dst = np.asarray(direction_xyz, float).reshape(3, 3)
    old_sp = np.asarray(volume.spacing_zyx_mm, float)[::-1]
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    pts = corners * (np.asarray(size_xyz, float) - 1.0)
    world = np.asarray(origin_xyz, float) + (pts * np.asarray(spacing_xyz, float)) @ d_dst.T
    idx = np.linalg.solve(d_src, (world - np.asarray(volume.origin_xyz_mm, float)).T).T / old_sp
    n_xyz = np.asarray(volume.shape)[::-1]
    lo = np.clip(np.floor(idx.min(0)) - 2, 0, n_xyz).astype(int)
    hi = np.clip(np.ceil(idx.max(0)) + 3, 0, n_xyz).astype(int)
    hi = np.maximum(hi, np.minimum(lo + 1, n_xyz))          # never an empty crop
    origin = np.asarray(volume.origin_xyz_mm, float) + d_src @ (lo * old_sp)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
    return box, tuple(float(o) for o in origin)


def resampled_shape(volume: CTVolume, spacing_zyx_mm=(1.0, 1.0, 1.0)) -> tuple:
    """(n_z, n_y, n_x) of the grid ``resample_volume`` makes, without resampling anything."""
    return tuple(_target_geometry(volume, spacing_zyx_mm)[0][::-1])


def roi_on_grid(volume: CTVolume, mask: np.ndarray, spacing_zyx_mm=(1.0, 1.0, 1.0), margin_mm=0.0,
                square_axes: tuple = ()) -> tuple:
    """Index box, on the ``spacing_zyx_mm`` grid of ``volume``, covering ``mask`` plus a margin.

    Parameters
    ----------
    volume : CTVolume
    mask : ndarray of bool, shape ``volume.shape`` (e.g. the lungs)
    spacing_zyx_mm : the target grid's spacing (as ``resample_volume``)
    margin_mm : float
        Added on every side (plus one voxel for interpolation), clamped to the grid.
    square_axes : tuple of numpy axes
        These axes are widened to the largest extent among them (e.g. an in-plane square).

    Returns
    -------
    tuple of 3 (start, stop) index pairs (z, y, x) on the target grid.
    """
    size, sp, origin = _target_geometry(volume, spacing_zyx_mm)
    box = bounding_box(mask)
    if box is None:
        raise ValueError("empty mask: no region of interest")
    d = np.asarray(volume.direction_xyz, float).reshape(3, 3)
    old_sp = np.asarray(volume.spacing_zyx_mm, float)[::-1]
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    lo = np.array([b[0] for b in box[::-1]], float)                 # x, y, z voxel indices
    hi = np.array([b[1] - 1 for b in box[::-1]], float)
    pts = lo + corners * (hi - lo)                                   # the box's corner voxel centres
    world = np.asarray(volume.origin_xyz_mm) + (pts * old_sp) @ d.T
    new = np.linalg.solve(d, (world - origin).T).T / np.asarray(sp)  # continuous indices, new grid
    start_f, stop_f = new.min(0), new.max(0)
    pad = np.asarray(margin_mm) / np.asarray(sp) + 1.0
    start, stop = np.floor(start_f - pad), np.ceil(stop_f + pad) + 1
    if square_axes:
        xyz = [2 - a for a in square_axes]
        width = max(stop[i] - start[i] for i in xyz)
        for i in xyz:
            grow = width - (stop[i] - start[i])
            start[i] -= np.floor(grow / 2)
            stop[i] += np.ceil(grow / 2)
    start = np.clip(start, 0, np.asarray(size)).astype(int)
    stop = np.clip(stop, 0, np.asarray(size)).astype(int)
    return tuple((int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))


def resample_volume(volume: CTVolume, spacing_zyx_mm=(1.0, 1.0, 1.0), roi=None) -> CTVolume:
    """Resample HU with linear interpolation onto a grid of ``spacing_zyx_mm``.

    Parameters
    ----------
    volume : CTVolume
        ``hu`` shape (n_z, n_y, n_x), HU.
    spacing_zyx_mm : 3 floats
        New voxel size (slice, row, column), mm.

    Returns
    -------
    CTVolume
        ``hu`` int16 (rounded), shape ``ceil(extent / spacing)`` per axis, same
        direction, origin shifted so the physical extent is kept. Voxels outside the
        old grid get ``PADDING_HU``. ``fov_mask`` is resampled nearest-neighbour (None
        if every new voxel is inside the old FOV). ``meta`` is copied.
    roi : tuple of 3 (start, stop), optional
        Only this index box of the new grid (``roi_on_grid``): the same voxels, values and
        geometry as that part of the whole resampled grid, at a fraction of the cost.
    """
    size, sp, origin = _target_geometry(volume, spacing_zyx_mm)
    if roi is not None:
        d = np.asarray(volume.direction_xyz, float).reshape(3, 3)
        start_xyz = np.array([roi[2][0], roi[1][0], roi[0][0]], float)
        origin = tuple(float(o) for o in np.asarray(origin) + d @ (start_xyz * np.asarray(sp)))
        size = [roi[2][1] - roi[2][0], roi[1][1] - roi[1][0], roi[0][1] - roi[0][0]]
    box, crop_origin = _source_crop(volume, size, sp, origin, volume.direction_xyz)
    src = CTVolume(hu=volume.hu[box], spacing_zyx_mm=volume.spacing_zyx_mm, origin_xyz_mm=crop_origin,
                   direction_xyz=volume.direction_xyz)
    # int16 in, float32 out: ITK interpolates in double either way (no float copy of the scan)
    out = _resample(src.to_sitk(np.ascontiguousarray(src.hu)), size, sp, origin, volume.direction_xyz,
                    sitk.sitkLinear, float(PADDING_HU), sitk.sitkFloat32)
    hu = np.clip(np.rint(sitk.GetArrayFromImage(out)), -32768, 32767).astype(np.int16)

    fov = (np.ones(src.shape, np.uint8) if volume.fov_mask is None
           else volume.fov_mask[box].astype(np.uint8))
    fov_out = _resample(src.to_sitk(fov), size, sp, origin, volume.direction_xyz,
                        sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    fov_mask = sitk.GetArrayFromImage(fov_out).astype(bool)
    if fov_mask.all():
        fov_mask = None
    else:
        hu[~fov_mask] = PADDING_HU  # linear interpolation blurs padding into the edge
    return CTVolume(hu=hu, spacing_zyx_mm=tuple(float(s) for s in sp[::-1]), origin_xyz_mm=origin,
                    direction_xyz=tuple(float(v) for v in volume.direction_xyz),
                    fov_mask=fov_mask, meta=dict(volume.meta))


def resample_labels(labels: np.ndarray, volume: CTVolume, target: CTVolume) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from ``volume``'s grid to ``target``'s.

    Used for lung masks: native grid -> 1 mm for the model/phenotypes and back.

    Parameters
    ----------
    labels : ndarray, shape ``volume.shape`` (z, y, x), integer labels 0..255.
    volume : CTVolume
        Grid ``labels`` lives on.
    target : CTVolume
        Grid to resample onto (only its geometry is used).

    Returns
    -------
    ndarray of uint8, shape ``target.shape``; 0 outside the source grid.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} != volume shape {volume.shape}")
    size, sp = target.shape[::-1], tuple(float(s) for s in target.spacing_zyx_mm[::-1])
    origin = tuple(float(o) for o in target.origin_xyz_mm)
    box, crop_origin = _source_crop(volume, size, sp, origin, target.direction_xyz)
    src = CTVolume(hu=labels[box], spacing_zyx_mm=volume.spacing_zyx_mm, origin_xyz_mm=crop_origin,
                   direction_xyz=volume.direction_xyz)
    out = _resample(src.to_sitk(np.ascontiguousarray(src.hu, dtype=np.uint8)), size, sp, origin,
                    target.direction_xyz, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(np.uint8)
