"""Non-DICOM images (NIfTI / NRRD / MetaImage) and the one entry point ``load_ct``.

``load_ct`` accepts what a user would point the tool at: an image file, a series folder,
or a patient folder with several series; everything else is a ScanError with the path.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ScanError
from ..volume import CTVolume
from .dicom_index import find_files, index_files, read_header
from .dicom_read import read_dicom_series
from .series import broken_file_error, group_series, select_series

#: File suffixes read with SimpleITK (lower case), and the format name put in meta.
IMAGE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                  ".mha": "metaimage", ".mhd": "metaimage"}
#: Grid agreement tolerance for label images (spacing/origin in mm, direction cosines).
GRID_TOL = 1e-3


def image_format(path) -> str | None:
    """'nifti' / 'nrrd' / 'metaimage' from the file name, None if not an image file."""
    name = Path(path).name.lower()
    for suffix, fmt in IMAGE_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def _read_sitk(path) -> sitk.Image:
    from .nifti_check import nifti_truncation

    path = Path(path)
    if not path.is_file():
        raise ScanError(path, "not a file (a folder?)" if path.exists() else "file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ScanError(path, f"cannot read image {path.name}: {str(e).strip().splitlines()[-1]}") from e
    cut = nifti_truncation(path)   # ITK zero-fills a truncated NIfTI silently
    if cut:
        raise ScanError(path, f"cannot read image {path.name}: {cut}")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(path, f"expected a 3-D scalar image, got {img.GetDimension()}-D with "
                              f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    return img


def read_image(path) -> CTVolume:
    """NIfTI / NRRD / MetaImage CT -> CTVolume. Voxel values are taken as HU already.

    Returns hu int16 (z, y, x) (rounded, clipped), geometry from the file, fov_mask None,
    meta = {"source_format", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "n_slices",
    "rows", "columns"}.
    """
    img = _read_sitk(path)
    sx, sy, sz = img.GetSpacing()
    nx, ny, nz = img.GetSize()
    meta = {"source_format": image_format(path) or "unknown", "spacing_x_mm": sx,
            "spacing_y_mm": sy, "spacing_z_mm": sz, "n_slices": nz, "rows": ny, "columns": nx}
    return CTVolume.from_sitk(img, fov_mask=None, meta=meta)


def _geometry(img_or_vol) -> dict:
    if isinstance(img_or_vol, CTVolume):
        v = img_or_vol
        return {"size": tuple(v.shape[::-1]), "spacing": tuple(v.spacing_zyx_mm[::-1]),
                "origin": tuple(v.origin_xyz_mm), "direction": tuple(v.direction_xyz)}
    return {"size": tuple(img_or_vol.GetSize()), "spacing": img_or_vol.GetSpacing(),
            "origin": img_or_vol.GetOrigin(), "direction": img_or_vol.GetDirection()}


def _fmt_geom(g: dict) -> str:
    r = lambda t: "(" + ", ".join(f"{x:.4g}" for x in t) + ")"  # noqa: E731
    return f"size {g['size']} spacing {r(g['spacing'])} origin {r(g['origin'])} direction {r(g['direction'])}"


def read_label_map(path, like: CTVolume) -> np.ndarray:
    """Label image on the grid of ``like`` -> its integer values unchanged, array (z, y, x).

    The file must be on ``like``'s grid: the same voxel centres in patient space. The same
    grid stored with its axes in another order or direction (e.g. a NIfTI written by another
    converter) is re-indexed exactly (nearest neighbour onto coinciding centres); any other
    grid is a ScanError naming both geometries (no silent interpolation). Values are kept as
    they are (a CIP label map needs its 16 bits; ``phenotypes.labelmaps`` decodes them);
    non-integer values are a ScanError.
    """
    img = _read_sitk(path)
    got, want = _geometry(img), _geometry(like)
    ok = got["size"] == want["size"] and all(
        np.allclose(got[k], want[k], atol=GRID_TOL) for k in ("spacing", "origin", "direction"))
    if not ok:
        ref = like.to_sitk(np.zeros(like.shape, np.uint8))
        if not _same_voxel_centres(img, ref):
            raise ScanError(path, f"label grid does not match the CT: label {_fmt_geom(got)} vs CT {_fmt_geom(want)}")
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
    arr = sitk.GetArrayFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.all(np.isfinite(arr)) and np.array_equal(arr, np.rint(arr))):
            raise ScanError(path, "label image holds non-integer values: not a label map")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ScanError(path, f"label image holds negative values (min {int(arr.min())}): not a label map")
    return arr


def read_label_image(path, like: CTVolume) -> np.ndarray:
    """Lung label image on the grid of ``like`` -> uint8 array (z, y, x), as the job's masks.

    Grid rules as :func:`read_label_map`. Values: if every label is in {0, 1, 2} they are
    kept (0 background, 1 right lung, 2 left lung, the lungmask convention); any other
    labelling is binarised to (value != 0) -> 1, i.e. "lung, sides unknown". To measure
    a CIP or lobe label map, read it with :func:`read_label_map` (keeps the values).
    """
    arr = read_label_map(path, like)
    values = np.unique(arr)
    if np.all(np.isin(values, (0, 1, 2))):
        return arr.astype(np.uint8)
    return (arr != 0).astype(np.uint8)


#: A label map has at most this many distinct values (CIP maps: tens of region/type pairs).
LABEL_MAP_MAX_VALUES = 256
#: CT always holds air (outside the body, trachea, lungs): some voxel at or below this HU.
AIR_HU = -800


def _distinct_values(arr: np.ndarray, at_most: int) -> np.ndarray | None:
    """Sorted distinct values of an integer array, or None when there are more than ``at_most``.

    Counted in chunks (a full-size volume never becomes one int64 copy)."""
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo >= 1 << 16:
        values = np.unique(arr)
        return values if values.size <= at_most else None
    counts = np.zeros(hi - lo + 1, np.int64)
    flat = arr.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.size, step):
        counts += np.bincount(flat[i:i + step].astype(np.int64) - lo, minlength=counts.size)
    values = np.flatnonzero(counts) + lo
    return values if values.size <= at_most else None


def label_image_reason(path) -> str | None:
    """Why an image file is a label map rather than a CT, or None when it may be a CT.

    A label map is integer data with a handful of distinct values (at most
    ``LABEL_MAP_MAX_VALUES``) and no air: no voxel at or below ``AIR_HU``. Every CT holds
    air (room air, trachea, lungs near -1000 HU), so a CT is never taken for a mask.
    Unreadable files return None here (the scan then fails with the reader's reason).
    """
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) or reader.GetNumberOfComponents() != 1:
            return None
        img = reader.Execute()
    except RuntimeError:
        return None
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size == 0 or arr.min() <= AIR_HU:
        return None
    values = _distinct_values(arr, LABEL_MAP_MAX_VALUES)
    if values is None:
        return None
    shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if values.size > 6 else "")
    return (f"a label map, not a CT: integer data with {values.size} distinct value(s) ({shown}) "
            f"and no air (smallest value {int(arr.min())} > {AIR_HU} HU)")


def _same_voxel_centres(img: sitk.Image, ref: sitk.Image, tol_voxels: float = 0.01) -> bool:
    """True if every voxel centre of ``ref`` is a voxel centre of ``img`` (and the counts match).

    The index map is affine, so checking the corners of ``ref``'s grid suffices.
    """
    if int(np.prod(img.GetSize())) != int(np.prod(ref.GetSize())):
        return False
    size = ref.GetSize()
    for corner in np.ndindex(2, 2, 2):
        idx = [int(c * (n - 1)) for c, n in zip(corner, size)]
        cont = img.TransformPhysicalPointToContinuousIndex(ref.TransformIndexToPhysicalPoint(idx))
        if any(abs(c - round(c)) > tol_voxels or not 0 <= round(c) < n for c, n in zip(cont, img.GetSize())):
            return False
    return True


def write_label_image(labels: np.ndarray, like: CTVolume, path) -> Path:
    """Write ``labels`` (z, y, x) as a compressed uint8 NIfTI (or any SimpleITK format by
    suffix) with ``like``'s geometry. Returns the path."""
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise ScanError(path, f"label array shape {labels.shape} does not match CT shape {like.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(like.to_sitk(labels.astype(np.uint8)), str(path), True)
    return path


def _load_dicom_folder(folder: Path) -> CTVolume:
    files = find_files(folder)
    if not files:
        raise ScanError(folder, "no DICOM files found (empty folder)")
    records = index_files(files, folder)
    if not records:
        raise ScanError(folder, f"no DICOM files found ({len(files)} other files)")
    err = broken_file_error(records)
    if err is not None:
        raise err
    series = group_series(records)
    # CT of several patients = an archive, not one scan: choosing one silently would analyse
    # an arbitrary patient. (Several studies of one patient are fine: the paper's rule picks.)
    ct = [s for s in series if (s.modality or "").upper() == "CT" and not s.is_localizer]
    ct_keys = sorted({s.scan_key for s in ct})
    refs = {s.patient_ref for s in ct if s.patient_ref}
    n_patients = len(refs) if refs else (len({s.study_uid for s in ct}) if len(ct_keys) > 1 else 1)
    if n_patients > 1:
        shown = ", ".join(ct_keys[:3]) + (", ..." if len(ct_keys) > 3 else "")
        raise ScanError(folder, f"folder holds CT of {n_patients} patients in {len(ct_keys)} scan folders with CT "
                                f"({shown}); pass one patient's folder, or run `emphy extract` on the archive")
    choice = select_series(series, where=str(folder))
    vol = read_dicom_series(choice.picked.files)
    meta = dict(vol.meta, not_picked=list(choice.not_picked),
                multi_kernel_kernels=tuple(choice.multi_kernel_kernels),
                source_format="dicom")
    return replace(vol, meta=meta)


def load_ct(path) -> CTVolume:
    """Load a CT from an image file, a DICOM series folder or a scan/patient folder.

    * NIfTI/NRRD/MetaImage file -> ``read_image``.
    * A DICOM file -> the series it belongs to, read from its folder.
    * A folder -> its DICOM series grouped, one picked by ``select_series`` and read;
      meta gains ``not_picked`` [(series_uid, reason)], ``multi_kernel_kernels`` and
      ``source_format``.

    Raises ScanError (path + reason) for anything unusable: missing path, empty folder
    ("no DICOM files found"), no CT ("no CT series: ..."), truncated files, gaps, ...
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(path, "path does not exist")
    if path.is_dir():
        return _load_dicom_folder(path)
    if image_format(path) is not None:
        return read_image(path)
    h = read_header(path)
    if h is None:
        raise ScanError(path, "neither a DICOM file nor a NIfTI/NRRD/MetaImage image")
    if h["read_error"]:
        raise ScanError(path, f"unreadable DICOM file {path.name}: {h['read_error']}")
    # Only the file's own folder (not recursive): a series lives in one folder.
    siblings = sorted(p for p in path.parent.iterdir() if p.is_file() and not p.name.startswith("."))
    same = [r for r in index_files(siblings, path.parent) if r["series_uid"] == h["series_uid"]]
    choice = select_series(group_series(same), where=str(path.parent))
    vol = read_dicom_series(choice.picked.files)
    return replace(vol, meta=dict(vol.meta, not_picked=[], multi_kernel_kernels=(), source_format="dicom"))
