"""Read one DICOM CT series (with pixels) into a ``CTVolume`` in HU.

Geometry comes only from ImagePositionPatient / ImageOrientationPatient: slices are
ordered by their position projected on the slice normal, never by file name or
InstanceNumber (both are unreliable in real archives). Every inconsistency that would
silently distort volumes (gap, duplicate, mixed spacing or orientation) is a ScanError.

Gantry tilt (slices stacked along the table axis, not along their normal: a sheared grid) is
resampled, not refused: each slice is moved within its own plane, by whole pixels, so that the
slices stack along their normal (``unshear``: no HU value is interpolated, every pixel lands
within half a pixel of its true position), on a matrix grown to keep every pixel. Tilts above
``MAX_TILT_DEG`` are refused with the angle.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pydicom

from ..errors import ScanError
from ..volume import PADDING_HU, CTVolume
from . import storage
from .dicom_index import read_header
from .metadata import scan_metadata

#: Any HU below this is out-of-field-of-view padding. Real tissue/air never goes below
#: about -1024 HU (scanners clip there; noise in air stays above ~-1100), while the
#: padding codes seen in archives are -2000 raw (-3024 HU), -2048 HU or -3024 HU. -1500
#: sits far from both, so the rule neither eats noisy air nor misses a padding code.
PADDING_BELOW_HU = -1500
#: Slice step tolerance: |step - median step| <= max(0.01 mm, 1 % of the median).
STEP_TOL_MM = 0.01
STEP_TOL_REL = 0.01
_GEOM_TOL = 1e-4  # direction cosines / pixel spacing agreement between slices
_TILT_TOL = 1e-3  # max in-plane component of the slice step, relative (~0.06 degree)
#: CT gantries tilt by at most +-30 degrees; a steeper shear is not a tilt but broken geometry.
MAX_TILT_DEG = 30.0
#: Largest series read, in voxels (slices x rows x columns), checked from the headers before
#: any pixel is decoded. The CPU pipeline peaks at about ``PEAK_BYTES_PER_VOXEL`` (measured:
#: 1.57 GB RSS for 512x512x345 slices, benchmarks/README.md), so the default (512 x 512 x
#: 1200 slices, ~5 GiB peak) fits the default 6 GiB worker. Override per process with the
#: environment variable ``EMPHY_MAX_VOXELS`` (workers inherit the environment they start in).
MAX_VOXELS = 512 * 512 * 1200
MAX_VOXELS_ENV = "EMPHY_MAX_VOXELS"
PEAK_BYTES_PER_VOXEL = 17
#: Without rescale tags the stored values are taken as HU only if some in-field-of-view voxel
#: is air (below this); raw scanner values (air ~ 0) never are, and would shift every HU.
AIR_BELOW_HU = -900


def _as_signed(value: int, bits: int, pixel_rep: int) -> int:
    # PixelPaddingValue may be stored as US while the pixels are signed (LIDC: 63536 = -2000).
    if pixel_rep == 1 and value >= 2 ** (bits - 1):
        return value - 2 ** bits
    return value


def _padding_raw(ds, raw: np.ndarray) -> np.ndarray | None:
    """Bool mask of raw (pre-rescale) values equal to PixelPaddingValue (or in its range)."""
    if "PixelPaddingValue" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 16))
    rep = int(ds.get("PixelRepresentation", 0))
    try:
        v = _as_signed(int(ds.PixelPaddingValue), bits, rep)
    except (TypeError, ValueError):
        return None
    if "PixelPaddingRangeLimit" in ds:
        lim = _as_signed(int(ds.PixelPaddingRangeLimit), bits, rep)
        lo, hi = min(v, lim), max(v, lim)
        return (raw >= lo) & (raw <= hi)
    return raw == v


def _touching_edge(mask: np.ndarray) -> np.ndarray:
    """The connected regions of a 2D bool mask that touch the image border."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    # a lookup table by label: np.isin sorts the whole slice (4 ms a slice, 1.5 s a scan)
    edge = np.zeros(n + 1, bool)
    for side in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        edge[side] = True
    edge[0] = False
    return edge[lab]


def _read_slice(path: str, src=None):
    """One slice file (or ``src``, its bytes fetched from an object store) -> (HU int16 (rows, cols),
    padding mask)."""
    try:
        ds = pydicom.dcmread(path if src is None else src)
    except Exception as e:  # truncated / not DICOM: pydicom raises many types
        raise ScanError(path, f"cannot read DICOM file {Path(path).name}: {e}") from e
    if "PixelData" not in ds:
        raise ScanError(path, f"no pixel data in {Path(path).name}")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ScanError(path, f"multi-frame (enhanced) CT is not supported: {Path(path).name}")
    try:
        raw = ds.pixel_array  # decodes JPEG 2000 / JPEG-LS / RLE via pylibjpeg plugins
    except Exception as e:
        raise ScanError(path, f"broken or truncated pixel data in {Path(path).name}: {e}") from e
    if raw.ndim != 2:
        raise ScanError(path, f"unexpected pixel array shape {raw.shape} in {Path(path).name}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    fits16 = False
    if slope == 1.0 and intercept.is_integer() and raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2 \
            and abs(intercept) < 32768:
        # HU within int16 (the usual case): add in int16 directly, no int32 copy and no clip;
        # the int16 wrap-around of a uint16 raw value undoes itself when the sum is in range
        fits16 = -32768 <= int(raw.min()) + int(intercept) and int(raw.max()) + int(intercept) <= 32767
    if fits16:
        hu = raw.astype(np.int16)
        hu += np.int16(intercept)
    elif slope == 1.0 and intercept.is_integer():
        hu = raw.astype(np.int32) + int(intercept)  # exact integer path
    else:
        hu = np.rint(raw.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    pad = hu < PADDING_BELOW_HU
    declared = _padding_raw(ds, raw)
    if declared is not None and (declared & ~pad).any():
        # PixelPaddingValue may also be a legitimate value (raw 0 = -1024 HU air): only its
        # regions that reach the image edge are padding, never air enclosed by the body.
        # (Skipped when every declared voxel is already below PADDING_BELOW_HU, the usual
        # -2000 / -3024 codes: its edge regions would add nothing to ``pad``.)
        pad |= _touching_edge(declared)
    if not fits16:
        hu = np.clip(hu, -32768, 32767).astype(np.int16)
    return hu, pad


def _fmt(z: float) -> str:
    return f"{z:.2f} mm"


def _name(h: dict) -> str:
    return Path(h["path"]).name


def _check_headers(headers: list[dict]) -> None:
    """Every slice has geometry and pixels, and agrees with the first on orientation, pixel
    spacing and image size (a series mixing them is not one volume)."""
    first = headers[0]
    for h in headers:
        if not h["has_pixels"]:   # first: a truncated header also lacks the geometry tags
            raise ScanError(h["path"], f"no pixel data in {_name(h)} (truncated file?)")
        for key in ("position_xyz_mm", "orientation", "pixel_spacing_mm", "rows", "columns"):
            if h[key] is None:
                raise ScanError(h["path"], f"missing or malformed {key} in {_name(h)}")
        if not np.allclose(h["orientation"], first["orientation"], atol=_GEOM_TOL):
            raise ScanError(h["path"], f"mixed slice orientation within the series: ImageOrientationPatient "
                                       f"{h['orientation']} in {_name(h)}, {first['orientation']} in {_name(first)}")
        if not np.allclose(h["pixel_spacing_mm"], first["pixel_spacing_mm"], atol=_GEOM_TOL):
            mm = lambda v: " x ".join(f"{x:g}" for x in v) + " mm"  # noqa: E731
            raise ScanError(h["path"], f"mixed pixel spacing within the series: PixelSpacing "
                                       f"{mm(h['pixel_spacing_mm'])} in {_name(h)}, "
                                       f"{mm(first['pixel_spacing_mm'])} in {_name(first)}")
        if (h["rows"], h["columns"]) != (first["rows"], first["columns"]):
            raise ScanError(h["path"], f"image size {h['rows']}x{h['columns']} of {_name(h)} "
                                       f"differs from {first['rows']}x{first['columns']}")


def _check_steps(z: np.ndarray, headers: list[dict]) -> float:
    """Uniform slice step along the normal (mm), or a ScanError naming the files: a duplicate
    position, a gap (missing slices) or mixed spacing. ``z`` sorted, ``headers`` in its order."""
    steps = np.diff(z)
    name = lambda i: _name(headers[i])  # noqa: E731
    for i in np.flatnonzero(steps < STEP_TOL_MM):
        raise ScanError(headers[i]["path"], f"duplicate slice position {_fmt(z[i])}: files "
                                            f"{name(i)} and {name(i + 1)}")
    if not len(steps):
        return float(headers[0]["slice_thickness_mm"] or 1.0)
    step_mm = float(np.median(steps))
    tol = max(STEP_TOL_MM, STEP_TOL_REL * step_mm)
    bad = np.flatnonzero(np.abs(steps - step_mm) > tol)
    if not bad.size:
        return step_mm
    i = int(bad[0])
    where = (f"between positions {_fmt(z[i])} and {_fmt(z[i + 1])} (files {name(i)}, {name(i + 1)})")
    multiples = steps[bad] / step_mm
    isolated = bad.size == 1 or np.diff(bad).min() > 1   # a run of long steps is a spacing change
    if isolated and (multiples > 1.5).all() and np.allclose(multiples, np.rint(multiples), atol=0.05):
        missing = int(np.rint(multiples - 1).sum())
        raise ScanError(headers[i]["path"], f"slice gap: {steps[i]:.3f} mm {where}, expected {step_mm:.3f} mm: "
                                            f"{missing} slice(s) missing")
    values, counts = np.unique(np.round(steps, 2), return_counts=True)
    shown = ", ".join(f"{v:.3f} mm ({c}x)" for v, c in sorted(zip(values, counts), key=lambda t: -t[1])[:3])
    j = int(np.flatnonzero(np.abs(steps - steps[0]) > tol)[0])      # where the step first changes
    raise ScanError(headers[j]["path"], f"mixed slice spacing within the series (non-uniform spacing): steps of "
                                        f"{shown}; the step changes from {steps[j - 1]:.3f} to {steps[j]:.3f} mm "
                                        f"between positions {_fmt(z[j])} and {_fmt(z[j + 1])} (files {name(j)}, "
                                        f"{name(j + 1)})")


def _tilt(pos: np.ndarray, z: np.ndarray, row_cos, col_cos, normal, pixel_mm, path: str):
    """In-plane offsets (n, 2) [along row cosine, along column cosine] of each slice's origin from
    the first slice's, mm, and the gantry tilt in degrees; (None, 0.0) when the slices stack
    along their normal. ScanError for an irregular drift or a tilt above ``MAX_TILT_DEG``."""
    extent = float(z[-1] - z[0])
    inplane = (pos - pos[0]) - np.outer(z - z[0], normal)
    uv = np.column_stack([inplane @ row_cos, inplane @ col_cos])
    if extent <= 0 or np.linalg.norm(uv, axis=1).max() <= _TILT_TOL * extent + STEP_TOL_MM:
        return None, 0.0
    slope = uv[-1] / extent                      # in-plane mm per mm along the normal
    off_line = np.linalg.norm(uv - np.outer(z - z[0], slope), axis=1).max()
    if off_line > max(STEP_TOL_MM, 0.1 * min(pixel_mm)):
        raise ScanError(path, f"slice positions drift in-plane irregularly ({off_line:.2f} mm off a straight "
                              "line): neither a straight stack nor a gantry tilt")
    angle = math.degrees(math.atan(float(np.linalg.norm(slope))))
    if angle > MAX_TILT_DEG:
        raise ScanError(path, f"gantry tilt {angle:.1f} degrees (slices sheared along the table) exceeds "
                              f"{MAX_TILT_DEG:.0f} degrees, the most a CT gantry tilts: geometry not trusted")
    return uv, angle


def _pixel_shifts(offsets_uv_mm: np.ndarray, spacing_yx_mm) -> tuple[np.ndarray, np.ndarray]:
    """Whole-pixel (row, column) shift of each slice on the unsheared grid (all >= 0)."""
    dy, dx = spacing_yx_mm
    rows = np.rint((offsets_uv_mm[:, 1] - offsets_uv_mm[:, 1].min()) / dy).astype(int)
    cols = np.rint((offsets_uv_mm[:, 0] - offsets_uv_mm[:, 0].min()) / dx).astype(int)
    return rows, cols


def unsheared_shape(offsets_uv_mm: np.ndarray, rows: int, cols: int, spacing_yx_mm) -> tuple[int, int]:
    """(rows, columns) of the grid that holds every pixel of every shifted slice."""
    shift_rows, shift_cols = _pixel_shifts(offsets_uv_mm, spacing_yx_mm)
    return rows + int(shift_rows.max()), cols + int(shift_cols.max())


def unshear(hu: np.ndarray, fov: np.ndarray, offsets_uv_mm: np.ndarray, spacing_yx_mm):
    """Move a sheared (gantry-tilted) stack onto slices stacked along their normal.

    Parameters
    ----------
    hu : int16 (n, rows, cols), HU; fov : bool, same shape (False = padding)
    offsets_uv_mm : (n, 2) in-plane offset of slice k's first pixel from slice 0's, mm, along the
        row cosine (array x) and the column cosine (array y).
    spacing_yx_mm : (row spacing, column spacing), mm.

    Returns
    -------
    hu, fov on the grown grid (n, rows', cols'), and the in-plane shift (u, v) in mm of the new
    grid's first pixel from slice 0's (add ``u * row_cos + v * col_cos`` to the origin).

    Each slice is shifted within its own plane by the nearest whole number of pixels, never
    interpolated: every HU value is kept as measured (LAA% and MLD react to any smoothing, as they
    do to a sharper kernel), every voxel keeps its volume (a shear preserves it), and each pixel
    lands within half a pixel of its true position. The grown margins are padding.
    """
    n, rows, cols = hu.shape
    shift_rows, shift_cols = _pixel_shifts(offsets_uv_mm, spacing_yx_mm)
    shape = unsheared_shape(offsets_uv_mm, rows, cols, spacing_yx_mm)
    out_hu = np.full((n, *shape), PADDING_HU, np.int16)
    out_fov = np.zeros((n, *shape), bool)
    for k in range(n):
        r, c = shift_rows[k], shift_cols[k]
        out_hu[k, r:r + rows, c:c + cols] = hu[k]
        out_fov[k, r:r + rows, c:c + cols] = fov[k]
    return out_hu, out_fov, (float(offsets_uv_mm[:, 0].min()), float(offsets_uv_mm[:, 1].min()))


def max_voxels() -> int:
    """The voxel limit in force: ``EMPHY_MAX_VOXELS`` if set, else ``MAX_VOXELS``."""
    env = os.environ.get(MAX_VOXELS_ENV, "").strip()
    try:
        return int(float(env)) if env else MAX_VOXELS
    except ValueError:
        raise ScanError(MAX_VOXELS_ENV, f"environment variable {MAX_VOXELS_ENV}={env!r} is not a number") from None


def _check_size(n: int, rows: int, cols: int, limit: int, path: str) -> None:
    voxels = n * rows * cols
    if voxels > limit:
        peak = voxels * PEAK_BYTES_PER_VOXEL
        peak_txt = f"{peak / 2 ** 30:.1f} GiB" if peak >= 2 ** 30 else f"{peak / 2 ** 20:.0f} MiB"
        raise ScanError(path, f"series too large, not decoded: {n} slices of {rows}x{cols} = {voxels / 1e6:.1f} M "
                              f"voxels, about {peak_txt} at the pipeline's peak ({PEAK_BYTES_PER_VOXEL} "
                              f"bytes/voxel), over the limit of {limit / 1e6:.1f} M voxels ({MAX_VOXELS_ENV})")


def _check_rescale(headers: list[dict], hu: np.ndarray, fov: np.ndarray) -> None:
    """Without RescaleIntercept the stored values are used as HU only if they hold air."""
    missing = [h for h in headers if h["rescale_intercept"] is None]
    if not missing:
        return
    inside = hu[fov] if fov.any() else hu.ravel()
    if inside.size and (inside < AIR_BELOW_HU).any():
        return
    more = f" and {len(missing) - 1} more files" if len(missing) > 1 else ""
    lo, hi = (int(inside.min()), int(inside.max())) if inside.size else (0, 0)
    raise ScanError(missing[0]["path"], f"no RescaleIntercept/RescaleSlope in {_name(missing[0])}{more}, and the "
                                        f"stored values ({lo} to {hi}) hold no air below {AIR_BELOW_HU} HU, so "
                                        "they are not HU: cannot convert to HU")


def read_dicom_series(paths, max_voxels_limit: int | None = None) -> CTVolume:
    """Read the slices of one series into a CTVolume.

    Parameters
    ----------
    paths : iterable of path-like
        The files of one series (any order).
    max_voxels_limit : int, optional
        Refuse (before decoding) a series with more voxels; default ``max_voxels()``.

    Returns
    -------
    CTVolume
        hu int16 (n_slices, rows, columns), HU, padding set to ``PADDING_HU``;
        spacing_zyx_mm = (measured slice step along the normal, row spacing, column spacing);
        origin = ImagePositionPatient of the first slice along the normal (for axial
        LPS scans the most inferior one); direction columns = row cosine (array x),
        column cosine (array y), slice normal (array z); fov_mask bool, False where the
        raw value is PixelPaddingValue or HU < ``PADDING_BELOW_HU``; meta from
        ``scan_metadata`` (no PHI) plus ``gantry_tilt_deg`` (0.0 unless resampled, see
        ``unshear``: then rows/columns grow and the origin moves within the first slice).
        Missing RescaleIntercept: stored values are HU if they hold air, else ScanError.

    Raises
    ------
    ScanError
        Unreadable/truncated file, no pixels, inconsistent slices, a gap, a duplicate, mixed
        spacing, a tilt above ``MAX_TILT_DEG``, a series over the voxel limit, no rescale.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ScanError("<empty series>", "no DICOM files found")
    headers = []
    for p, h in zip(paths, storage.fetch_map(read_header, paths)):   # remote: GETs overlap
        if h is None:
            raise ScanError(p, f"not a DICOM file: {Path(p).name}")
        if h["read_error"]:
            raise ScanError(p, f"unreadable DICOM file {Path(p).name}: {h['read_error']}")
        headers.append(h)
    _check_headers(headers)
    first = headers[0]

    row_cos = np.asarray(first["orientation"][:3])
    col_cos = np.asarray(first["orientation"][3:])
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise ScanError(first["path"], f"degenerate ImageOrientationPatient {first['orientation']}")
    normal /= np.linalg.norm(normal)
    pos = np.asarray([h["position_xyz_mm"] for h in headers])
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z, pos = z[order], pos[order]
    headers = [headers[i] for i in order]
    step_mm = _check_steps(z, headers)
    row_mm, col_mm = (float(v) for v in first["pixel_spacing_mm"])  # DICOM: (between rows, between columns)
    offsets, tilt_deg = _tilt(pos, z, row_cos, col_cos, normal, (row_mm, col_mm), headers[0]["path"])

    n, rows, cols = len(headers), first["rows"], first["columns"]
    limit = max_voxels() if max_voxels_limit is None else max_voxels_limit
    grown = unsheared_shape(offsets, rows, cols, (row_mm, col_mm)) if offsets is not None else (rows, cols)
    _check_size(n, *grown, limit, headers[0]["path"])

    hu = np.empty((n, rows, cols), dtype=np.int16)
    fov = np.empty((n, rows, cols), dtype=bool)
    sources = storage.fetch_map(lambda h: storage.source(h["path"]), headers,
                                storage.is_url(paths[0]))   # a few files ahead
    for k, (h, src) in enumerate(zip(headers, sources)):
        sl, pad = _read_slice(h["path"], src)
        if sl.shape != (rows, cols):
            raise ScanError(h["path"], f"pixel array {sl.shape} of {_name(h)} does not match Rows/Columns")
        fov[k] = ~pad
        sl[pad] = PADDING_HU
        hu[k] = sl
    _check_rescale(headers, hu, fov)

    origin = pos[0]
    if offsets is not None:
        hu, fov, (du, dv) = unshear(hu, fov, offsets, (row_mm, col_mm))
        origin = pos[0] + du * row_cos + dv * col_cos
    spacing_zyx = (step_mm, row_mm, col_mm)
    direction = np.column_stack([row_cos, col_cos, normal]).ravel()
    meta = scan_metadata(first, n, spacing_zyx)
    meta.update(rows=int(hu.shape[1]), columns=int(hu.shape[2]), gantry_tilt_deg=round(tilt_deg, 2))
    return CTVolume(
        hu=hu,
        spacing_zyx_mm=spacing_zyx,
        origin_xyz_mm=tuple(float(v) for v in origin),
        direction_xyz=tuple(float(v) for v in direction),
        fov_mask=fov,
        meta=meta,
    )
