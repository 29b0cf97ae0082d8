"""Tiny synthetic DICOM files for bad-input tests (8x8 pixels, CT Image Storage)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def make_slice(path, *, z_mm: float, series_uid: str, study_uid: str, for_uid: str,
               raw: np.ndarray | None = None, rows: int = 8, cols: int = 8,
               modality: str = "CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
               kernel: str = "B30f", series_number: int = 2, slope: float = 1.0,
               intercept: float = -1024.0, padding_value: int | None = None,
               spacing_mm: float = 0.5, thickness_mm: float = 1.0, phi: dict | None = None,
               instance_number: int = 1) -> Path:
    """Write one signed-16-bit CT slice at LPS z = ``z_mm`` (axial) and return its path.

    ``raw`` holds stored values (before rescale); default = 1024 everywhere (0 HU).
    ``phi``: extra patient/institution attributes to embed (to prove they never leak).
    """
    raw = np.full((rows, cols), 1024, np.int16) if raw is None else np.asarray(raw, np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = "synthetic"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Synthetic"
    ds.ConvolutionKernel = kernel
    ds.KVP = 120
    ds.XRayTubeCurrent = 200
    ds.ImagePositionPatient = [-2.0, -2.0, float(z_mm)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.SliceThickness = thickness_mm
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    for k, v in (phi or {}).items():
        setattr(ds, k, v)
    ds.PixelData = raw.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder, n: int = 4, step_mm: float = 2.0, z0_mm: float = 0.0, *,
                 series_uid: str | None = None, study_uid: str | None = None,
                 for_uid: str | None = None, names=None, **kw) -> list[Path]:
    """``n`` slices at z0 + i*step into ``folder``; slice i holds raw value 1024 + 10*i
    (HU 10*i) so order can be checked. ``names``: file names (default s000.dcm ...)."""
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    names = names or [f"s{i:03d}.dcm" for i in range(n)]
    out = []
    for i in range(n):
        raw = np.full((8, 8), 1024 + 10 * i, np.int16)
        out.append(make_slice(Path(folder) / names[i], z_mm=z0_mm + i * step_mm, series_uid=series_uid,
                              study_uid=study_uid, for_uid=for_uid, raw=raw, instance_number=i + 1, **kw))
    return out


def invalidate_series_number(files) -> None:
    """Rewrite each file's SeriesNumber as "1.5" (not a valid IS): pydicom then warns on every read."""
    import warnings

    import pydicom
    from pydicom import config as pydicom_config

    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for f in files:
                ds = pydicom.dcmread(f)
                ds["SeriesNumber"].value = "1.5"
                ds.save_as(f)
    finally:
        pydicom_config.settings.writing_validation_mode = mode
