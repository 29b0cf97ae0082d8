"""Read one DICOM CT series (with pixels) into a ``CTVolume`` in HU.

Geometry comes only from ImagePositionPatient / ImageOrientationPatient: slices are
ordered by their position projected on the slice normal, never by file name or
InstanceNumber (both are unreliable in real archives). Every inconsistency that would
silently distort volumes (gap, duplicate, mixed orientation, gantry tilt) is a ScanError.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from ..errors import ScanError
from ..volume import PADDING_HU, CTVolume
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
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return np.isin(lab, edge[edge > 0])


def _read_slice(path: str):
    """One slice file -> (header dict, HU int16 (rows, cols), padding mask or None)."""
    try:
        ds = pydicom.dcmread(path)
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
    if slope == 1.0 and intercept.is_integer():
        hu = raw.astype(np.int32) + int(intercept)  # exact integer path (the usual case)
    else:
        hu = np.rint(raw.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    pad = hu < PADDING_BELOW_HU
    declared = _padding_raw(ds, raw)
    if declared is not None:
        # PixelPaddingValue may also be a legitimate value (raw 0 = -1024 HU air): only its
        # regions that reach the image edge are padding, never air enclosed by the body
        pad |= _touching_edge(declared)
    hu = np.clip(hu, -32768, 32767).astype(np.int16)
    return hu, pad


def _fmt(z: float) -> str:
    return f"{z:.2f} mm"


def read_dicom_series(paths) -> CTVolume:
    """Read the slices of one series into a CTVolume.

    Parameters
    ----------
    paths : iterable of path-like
        The files of one series (any order).

    Returns
    -------
    CTVolume
        hu int16 (n_slices, rows, columns), HU, padding set to ``PADDING_HU``;
        spacing_zyx_mm = (measured slice step, row spacing, column spacing);
        origin = ImagePositionPatient of the first slice along the normal (for axial
        LPS scans the most inferior one); direction columns = row cosine (array x),
        column cosine (array y), slice normal (array z); fov_mask bool, False where the
        raw value is PixelPaddingValue or HU < ``PADDING_BELOW_HU``; meta from
        ``scan_metadata`` (no PHI).

    Raises
    ------
    ScanError
        Unreadable/truncated file, no pixels, inconsistent slices, a gap or a duplicate.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ScanError("<empty series>", "no DICOM files found")
    headers = []
    for p in paths:
        h = read_header(p)
        if h is None:
            raise ScanError(p, f"not a DICOM file: {Path(p).name}")
        if h["read_error"]:
            raise ScanError(p, f"unreadable DICOM file {Path(p).name}: {h['read_error']}")
        headers.append(h)
    first = headers[0]
    for h in headers:
        for key in ("position_xyz_mm", "orientation", "pixel_spacing_mm", "rows", "columns"):
            if h[key] is None:
                raise ScanError(h["path"], f"missing or malformed {key} in {Path(h['path']).name}")
        if not h["has_pixels"]:
            raise ScanError(h["path"], f"no pixel data in {Path(h['path']).name} (truncated file?)")
        for key, tol in (("orientation", _GEOM_TOL), ("pixel_spacing_mm", _GEOM_TOL)):
            if not np.allclose(h[key], first[key], atol=tol):
                raise ScanError(h["path"], f"{key} {h[key]} of {Path(h['path']).name} differs from "
                                           f"{first[key]} of {Path(first['path']).name}")
        if (h["rows"], h["columns"]) != (first["rows"], first["columns"]):
            raise ScanError(h["path"], f"image size {h['rows']}x{h['columns']} of {Path(h['path']).name} "
                                       f"differs from {first['rows']}x{first['columns']}")

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

    steps = np.diff(z)
    name = lambda i: Path(headers[i]["path"]).name  # noqa: E731
    for i in np.flatnonzero(steps < STEP_TOL_MM):
        raise ScanError(headers[i]["path"], f"duplicate slice position {_fmt(z[i])}: files "
                                            f"{name(i)} and {name(i + 1)}")
    step_mm = float(np.median(steps)) if len(steps) else float(first["slice_thickness_mm"] or 1.0)
    tol = max(STEP_TOL_MM, STEP_TOL_REL * step_mm)
    for i in np.flatnonzero(np.abs(steps - step_mm) > tol):
        kind = "gap" if steps[i] > step_mm else "non-uniform spacing"
        raise ScanError(headers[i]["path"], f"slice {kind}: {steps[i]:.3f} mm between positions "
                                            f"{_fmt(z[i])} and {_fmt(z[i + 1])} (files {name(i)}, "
                                            f"{name(i + 1)}), expected {step_mm:.3f} mm")
    if len(steps):
        # In-plane drift between slices = gantry tilt / shear: the volume would need resampling.
        inplane = (pos[-1] - pos[0]) - (z[-1] - z[0]) * normal
        if np.linalg.norm(inplane) > _TILT_TOL * (z[-1] - z[0]) + STEP_TOL_MM:
            raise ScanError(headers[0]["path"], "slice positions drift in-plane (gantry tilt or "
                                                f"sheared series, {np.linalg.norm(inplane):.2f} mm); not supported")

    n, rows, cols = len(headers), first["rows"], first["columns"]
    hu = np.empty((n, rows, cols), dtype=np.int16)
    fov = np.empty((n, rows, cols), dtype=bool)
    for k, h in enumerate(headers):
        sl, pad = _read_slice(h["path"])
        if sl.shape != (rows, cols):
            raise ScanError(h["path"], f"pixel array {sl.shape} of {name(k)} does not match Rows/Columns")
        fov[k] = ~pad
        sl[pad] = PADDING_HU
        hu[k] = sl

    row_mm, col_mm = first["pixel_spacing_mm"]  # DICOM: (between rows, between columns)
    spacing_zyx = (step_mm, float(row_mm), float(col_mm))
    direction = np.column_stack([row_cos, col_cos, normal]).ravel()
    return CTVolume(
        hu=hu,
        spacing_zyx_mm=spacing_zyx,
        origin_xyz_mm=tuple(float(v) for v in pos[0]),
        direction_xyz=tuple(float(v) for v in direction),
        fov_mask=fov,
        meta=scan_metadata(first, n, spacing_zyx),
    )
