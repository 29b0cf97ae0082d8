"""Write synthetic HU volumes as real CT Image Storage DICOM files (pydicom).

Deterministic: the same inputs give the same bytes (UIDs come from hashed entropy, dates
are fixed constants, never the clock). File names are hashed hex, so listing a folder does
not give the slices in z order, as in real archives.

Geometry: identity orientation (ImageOrientationPatient 1,0,0,0,1,0); array slice k (index 0
= most inferior) sits at ImagePositionPatient z = origin_z + k * spacing_z (DICOM +z = head).
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from emphy_dask.synth.phantom import PADDING_HU_SYNTH

RESCALE_INTERCEPT = -1024
#: Fixed dates/times: determinism (and no real acquisition date leaks into synthetic data).
_DATE, _TIME = "20000101", "120000"
MANUFACTURER = "emphy-dask synth"


_UID_NAMESPACE = uuid.UUID("6f0c1d52-9a57-4e0e-8b8e-7e3d2a1c5b10")


def synth_uid(*parts) -> str:
    """Deterministic DICOM UID: "2.25." + the integer of a name-based UUID (uuid5) of ``parts``.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns
    a random uuid4, so it cannot be used for reproducible files.)
    """
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}")


def _ds_str(v: float) -> str:
    """Decimal-string value: exact short decimals (DS is at most 16 characters)."""
    s = f"{float(v):.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def ct_dataset(study_uid, series_uid, for_uid, sop_uid, series_number, series_description,
               patient_name, patient_id, image_type, study_date: str = _DATE) -> Dataset:
    """The header every synthetic CT slice shares (file meta, patient, study, series, pixel
    format, rescale); the caller adds geometry, kernel and pixels. ``study_date``: DICOM DA."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _TIME
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST (synthetic)"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed: stored = HU + 1024 spans -2000 (padding) .. 2624
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _stored(hu2d: np.ndarray, padding_value: int | None = None) -> bytes:
    """HU (int) -> raw signed 16-bit little-endian pixel bytes (stored = HU - intercept);
    voxels at or below ``PADDING_HU_SYNTH`` (-3024) become ``padding_value``."""
    hu2d = np.asarray(hu2d, np.int32)
    raw = hu2d - RESCALE_INTERCEPT
    if padding_value is not None:
        raw[hu2d <= PADDING_HU_SYNTH] = padding_value
    return np.clip(raw, -32768, 32767).astype("<i2").tobytes()


def _uids(seed, series_number, study_uid, series_uid, frame_of_reference_uid):
    return (study_uid or synth_uid("study", seed),
            series_uid or synth_uid("series", seed, series_number),
            frame_of_reference_uid or synth_uid("for", seed))


def write_dicom_series(hu, spacing_zyx_mm, out_dir, *, origin_xyz_mm=(0.0, 0.0, 0.0), study_uid=None,
                       series_uid=None, frame_of_reference_uid=None, kernel="STANDARD", series_number=2,
                       series_description="CHEST 1.25 STANDARD", slice_thickness_mm=None, seed=0,
                       padding_value=-2000, patient_name="SYNTH^0001", patient_id="SYNTH-0001",
                       kvp=120.0, tube_current_ma=200, window=(-600, 1500), study_date=_DATE) -> list[Path]:
    """Write an axial CT series, one file per slice.

    Parameters
    ----------
    hu : ndarray int (n_z, n_y, n_x)
        HU; slice 0 is the most inferior. Voxels <= ``PADDING_HU_SYNTH`` (-3024 HU) are
        padding (outside the scan circle) and are stored as ``padding_value``.
    spacing_zyx_mm : (slice spacing, row spacing, column spacing), mm.
    out_dir : folder to create; files are ``<hex>.dcm``.
    origin_xyz_mm : LPS position (mm) of voxel (0, 0, 0) = ImagePositionPatient of slice 0.
    study_uid, series_uid, frame_of_reference_uid : str or None
        None = derived deterministically from ``seed`` (and ``series_number``).
    kernel : ConvolutionKernel.
    slice_thickness_mm : SliceThickness; default = slice spacing.
    seed : int, feeds the default UIDs and the (hashed, unordered) file names.
    padding_value : raw PixelPaddingValue (signed).
    patient_name, patient_id : synthetic identifiers (treat as PHI downstream).

    Returns
    -------
    list of Path, in slice (z) order.
    """
    hu = np.asarray(hu)
    nz, ny, nx = hu.shape
    dz, dy, dx = (float(s) for s in spacing_zyx_mm)
    study_uid, series_uid, for_uid = _uids(seed, series_number, study_uid, series_uid,
                                           frame_of_reference_uid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(nz):
        sop = synth_uid("sop", series_uid, k)
        ds = ct_dataset(study_uid, series_uid, for_uid, sop, series_number, series_description,
                        patient_name, patient_id, ["ORIGINAL", "PRIMARY", "AXIAL"], study_date)
        ds.ConvolutionKernel = kernel
        ds.KVP = _ds_str(kvp)
        ds.XRayTubeCurrent = int(tube_current_ma)
        ds.SliceThickness = _ds_str(slice_thickness_mm if slice_thickness_mm is not None else dz)
        ds.SpacingBetweenSlices = _ds_str(dz)
        ds.InstanceNumber = k + 1
        z = float(origin_xyz_mm[2]) + k * dz
        ds.ImagePositionPatient = [_ds_str(origin_xyz_mm[0]), _ds_str(origin_xyz_mm[1]), _ds_str(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_str(z)
        ds.PixelSpacing = [_ds_str(dy), _ds_str(dx)]  # row spacing, column spacing
        ds.Rows, ds.Columns = ny, nx
        ds.add_new(0x00280120, "SS", int(padding_value))  # PixelPaddingValue (signed pixels)
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
        ds.PixelData = _stored(hu[k], padding_value)
        name = hashlib.sha1(f"{seed}/{sop}".encode()).hexdigest()[:16] + ".dcm"
        path = out / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_localizer(hu, spacing_zyx_mm, out_dir, *, origin_xyz_mm=(0.0, 0.0, 0.0), study_uid=None,
                    series_uid=None, frame_of_reference_uid=None, series_number=1, seed=0,
                    patient_name="SYNTH^0001", patient_id="SYNTH-0001") -> Path:
    """Write a single-slice frontal (AP) LOCALIZER (scout) image of the volume.

    The scout is the mean HU along y (padding ignored), rows running head -> feet
    (ImageOrientationPatient 1,0,0,0,0,-1). ImageType ORIGINAL/PRIMARY/LOCALIZER.
    Returns the file path.
    """
    hu = np.asarray(hu)
    nz, ny, nx = hu.shape
    dz, dy, dx = (float(s) for s in spacing_zyx_mm)
    valid = hu > -2000
    proj = np.where(valid, hu, 0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)   # (z, x)
    img = np.rint(proj[::-1]).astype(np.int32)                                    # row 0 = top (head)
    study_uid, series_uid, for_uid = _uids(seed, series_number, study_uid, series_uid,
                                           frame_of_reference_uid)
    sop = synth_uid("sop", series_uid, 0)
    ds = ct_dataset(study_uid, series_uid, for_uid, sop, series_number, "SCOUT", patient_name, patient_id,
               ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    ds.KVP = "120"
    ds.XRayTubeCurrent = 30
    ds.InstanceNumber = 1
    ds.SliceThickness = _ds_str(dx)
    y_mid = float(origin_xyz_mm[1]) + (ny - 1) / 2 * dy
    z_top = float(origin_xyz_mm[2]) + (nz - 1) * dz
    ds.ImagePositionPatient = [_ds_str(origin_xyz_mm[0]), _ds_str(y_mid), _ds_str(z_top)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds_str(dz), _ds_str(dx)]
    ds.Rows, ds.Columns = nz, nx
    ds.WindowCenter, ds.WindowWidth = "-500", "1500"
    ds.PixelData = _stored(img)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (hashlib.sha1(f"{seed}/{sop}".encode()).hexdigest()[:16] + ".dcm")
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
