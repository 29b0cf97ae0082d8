"""Find files and read DICOM headers (no pixels) into plain, PHI-free dicts.

This is the cheap, embarrassingly parallel first pass over an archive: ``index_files``
is mapped over chunks of ``find_files`` output on Dask workers, so it is stateless and
returns only picklable built-in types.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from . import storage

# Allow-list of tags read from each header (pydicom ``specific_tags``): reading only these
# is faster than a full parse and guarantees no PHI enters the record.
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType", "StudyInstanceUID",
    "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "AcquisitionNumber",
    "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "Rows", "Columns", "ConvolutionKernel", "Manufacturer",
    "ManufacturerModelName", "KVP", "XRayTubeCurrent", "RescaleSlope", "RescaleIntercept",
    "NumberOfFrames", "SpecificCharacterSet", "PatientID", "StudyDate", "SeriesDate", "AcquisitionDate",
]
#: A scan's date is shifted back by 0-365 days, the same for every scan of a patient (a hash of
#: PatientID): intervals between a patient's scans stay exact (tracking needs them) while the
#: calendar date, an identifier (``metadata.PHI_TAGS``), never leaves ``read_header``.
DATE_SHIFT_MAX_DAYS = 365
# PixelData tag as it appears on disk, little and big endian.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
#: Media Storage Directory (DICOMDIR): a valid DICOM file that is an index of a CD/export, not
#: an image; treated like any other non-image file in the tree.
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def find_files(root, skipped: list | None = None, inside: str | None = None) -> list[Path]:
    """Every regular file under ``root`` (recursive), sorted; hidden files/folders skipped.

    Uses ``os.scandir`` (one syscall per directory entry) because archives hold 10^5-10^6
    files. Symlinked directories are followed (a cohort curated as links into a read-only
    archive is an ordinary input); a folder reached again by its real path is walked once.

    Parameters
    ----------
    root : path
        A folder (or one file, returned alone).
    skipped : list, optional
        Receives ``(path, reason)`` for everything passed over: a symbolic-link loop, a second
        way into a folder already walked, an unreadable folder, a dangling link.
    inside : str, optional
        A real path above ``root`` (the INPUT tree): a link from ``root`` into another part of it
        is passed over, since that part is indexed in its own right.
    An object-store URL is listed by its store (``storage.list_files``).
    """
    if storage.is_url(root):
        return [Path(u) for u in storage.list_files(root)]
    root = Path(root)
    if root.is_file():
        return [root]
    return [Path(p) for p in sorted(_walk_files(root, skipped, inside))]


def _walk_files(folder, skipped: list | None = None, inside: str | None = None):
    """Paths (str) of the files below ``folder``, lazily: hidden entries skipped, symlinked
    directories followed once each (by real path), what is passed over noted in ``skipped``."""
    def note(path, reason):
        if skipped is not None:
            skipped.append((path, reason))

    start_real = os.path.realpath(folder)
    walked: dict[str, str] = {}             # real path -> the path it was first walked by
    stack = [(str(folder), start_real)]
    while stack:
        path, real = stack.pop()
        if real in walked:
            note(path, f"same folder as {walked[real]}: walked once")
            continue
        walked[real] = path
        try:
            with os.scandir(path) as it:
                # popped in name order, real folders before links to them (the first way in is kept)
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name), reverse=True)
        except OSError as exc:
            note(path, f"unreadable folder: {exc.strerror or exc}")
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if not e.is_symlink():
                    if e.is_dir():
                        stack.append((e.path, f"{real}/{e.name}"))
                    elif e.is_file():
                        yield e.path
                    continue
                target = os.path.realpath(e.path)
                if not os.path.exists(target):
                    note(e.path, f"dangling symbolic link to {os.readlink(e.path)}")
                elif e.is_file():
                    yield e.path
                elif not e.is_dir():
                    continue
                elif real == target or real.startswith(target + os.sep):
                    note(e.path, f"symbolic link loop: points to {target}, a folder above it")
                elif inside and (target == inside or target.startswith(inside + os.sep)) \
                        and not target.startswith(start_real + os.sep):
                    note(e.path, f"links to {target}, inside the input tree: indexed there, not twice")
                else:
                    stack.append((e.path, target))
            except OSError as exc:
                note(e.path, f"unreadable: {exc.strerror or exc}")


def _has_files(folder: Path) -> bool:
    return next(_walk_files(folder), None) is not None


def empty_scan_folders(root, keys, include_root: bool = True) -> list[str]:
    """Keys (paths relative to ``root``) of folders without any file that sit beside scan
    folders (or, with ``include_root``, directly under ``root``): where a patient folder was
    expected and is empty.

    Only the parents of the known scan keys are listed (one ``scandir`` each), so this stays
    cheap on large archives; empty study/series folders inside a patient are not scans.
    """
    if storage.is_url(root):
        return []       # an object store has no empty folders: a prefix exists through its files
    root = Path(root)
    folder_keys = {k.split("#")[0] for k in keys if k != root.name}
    parents = {Path(k).parent for k in folder_keys}
    parents = parents | {Path(".")} if include_root else parents - {Path(".")}
    found = []
    for parent in sorted(parents):
        try:
            subdirs = [e for e in os.scandir(root / parent) if e.is_dir() and not e.name.startswith(".")]
        except OSError:
            continue
        for e in subdirs:
            rel = (parent / e.name).as_posix()
            if rel in folder_keys or any(k.startswith(rel + "/") for k in folder_keys):
                continue
            if not _has_files(Path(e.path)):
                found.append(rel)
    return sorted(found)


def _str(v):
    return None if v is None else str(v).strip() or None


def _float(v):
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _int(v):
    f = _float(v)
    return None if f is None else int(round(f))


def _floats(v, n: int):
    """Multi-valued numeric tag -> list of n floats, or None if absent/malformed."""
    if v is None:
        return None
    try:
        vals = [float(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v])]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _strs(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x).strip() for x in v]
    return [s.strip() for s in str(v).split("\\")]


def _read_dataset(path: str):
    """(dataset, has_pixels), None when ``path`` is not DICOM or is a DICOMDIR (an index, not
    an image), or an error string when it is DICOM (has the "DICM" preamble) but cannot be
    parsed (truncated / corrupt). A file in an object store is parsed from its first
    ``storage.HEAD_BYTES`` (one ranged GET), or whole when its header runs past them."""
    if not storage.is_url(path):
        with open(path, "rb") as fp:
            return _parse_header(fp, path)
    head = storage.read_bytes(path, end=storage.HEAD_BYTES)
    got = _parse_header(io.BytesIO(head), path)
    if len(head) < storage.HEAD_BYTES or (isinstance(got, tuple) and got[1]):
        return got
    return _parse_header(io.BytesIO(storage.read_bytes(path)), path)   # no pixel tag within the head


def _parse_header(fp, path: str):
    """``_read_dataset`` on an open binary file."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # No 128-byte preamble + "DICM": old/raw files may still be DICOM. Force-parse,
        # and accept only if it yields the identifying UIDs (random bytes won't).
        fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
            if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
                return None
        except Exception:
            return None
    except Exception as e:  # DICM preamble present but the header is broken
        return f"truncated or corrupt DICOM header ({type(e).__name__}: {e})"
    fm = getattr(ds, "file_meta", None)
    if fm is not None and str(fm.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
        return None   # DICOMDIR
    if "SeriesInstanceUID" not in ds:
        # Type 1 in every image object: without it the header stopped early (a truncated
        # copy), and the file must fail its scan rather than drop out of its series
        return "truncated or incomplete DICOM header (no SeriesInstanceUID)"
    # stop_before_pixels leaves the file positioned at the PixelData element if any.
    has_pixels = fp.read(4) in _PIXEL_TAG_BYTES
    return ds, has_pixels


def read_header(path) -> dict | None:
    """Header fields of one DICOM file as plain Python values; None if not DICOM.

    Returns
    -------
    dict with keys: path, sop_class_uid, sop_instance_uid, modality, image_type (list of
    str), study_uid, series_uid, frame_of_reference_uid, series_number,
    acquisition_number, series_description, position_xyz_mm (3 float, LPS, mm),
    orientation (6 float direction cosines), pixel_spacing_mm ([row spacing, column
    spacing], mm), slice_thickness_mm, rows, columns, n_frames, kernel (multi-values
    joined with "/"), manufacturer, model, kvp, tube_current_ma, transfer_syntax_uid,
    rescale_slope, rescale_intercept, has_pixels, read_error (None), patient_ref (a one-way
    hash of PatientID, to tell patients apart; output only as scans.patient_key), study_date_shifted
    (``shifted_date``). Missing tags -> None.
    A DICOM file (DICM preamble) whose header cannot be parsed (truncated) gives a short
    record {path, read_error: str, has_pixels: False, series_uid: None} instead of None.
    Never any patient-identifying tag (see ``metadata.PHI_TAGS``).
    """
    path = str(path)
    got = _read_dataset(path)
    if got is None:
        return None
    if isinstance(got, str):
        # Keep broken DICOM visible (never silently skipped): callers fail the scan on it.
        return {"path": path, "read_error": got, "has_pixels": False, "series_uid": None}
    ds, has_pixels = got
    return header_record(ds, path, has_pixels)


def header_record(ds, path: str, has_pixels: bool, transfer_syntax_uid: str | None = None) -> dict:
    """``read_header``'s record of a pydicom dataset already in memory (e.g. a DICOMweb
    metadata answer, ``io.dicomweb``); ``path`` names where its pixels are."""
    fm = getattr(ds, "file_meta", None)
    ts = fm.get("TransferSyntaxUID") if fm is not None else None
    ts = ts or transfer_syntax_uid
    sop_class = ds.get("SOPClassUID") or (fm.get("MediaStorageSOPClassUID") if fm is not None else None)
    kernel = ds.get("ConvolutionKernel")
    kernel = "/".join(_strs(kernel)) if kernel is not None else None
    return {
        "path": path,
        "sop_class_uid": _str(sop_class),
        "sop_instance_uid": _str(ds.get("SOPInstanceUID")),
        "modality": _str(ds.get("Modality")),
        "image_type": [s.upper() for s in _strs(ds.get("ImageType"))],
        "study_uid": _str(ds.get("StudyInstanceUID")),
        "series_uid": _str(ds.get("SeriesInstanceUID")),
        "frame_of_reference_uid": _str(ds.get("FrameOfReferenceUID")),
        "series_number": _int(ds.get("SeriesNumber")),
        "acquisition_number": _int(ds.get("AcquisitionNumber")),
        "series_description": _str(ds.get("SeriesDescription")),
        "position_xyz_mm": _floats(ds.get("ImagePositionPatient"), 3),
        "orientation": _floats(ds.get("ImageOrientationPatient"), 6),
        "pixel_spacing_mm": _floats(ds.get("PixelSpacing"), 2),
        "slice_thickness_mm": _float(ds.get("SliceThickness")),
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "n_frames": _int(ds.get("NumberOfFrames")) or 1,
        "kernel": _str(kernel),
        "manufacturer": _str(ds.get("Manufacturer")),
        "model": _str(ds.get("ManufacturerModelName")),
        "kvp": _float(ds.get("KVP")),
        "tube_current_ma": _float(ds.get("XRayTubeCurrent")),
        "transfer_syntax_uid": _str(ts),
        "rescale_slope": _float(ds.get("RescaleSlope")),
        "rescale_intercept": _float(ds.get("RescaleIntercept")),
        "has_pixels": bool(has_pixels),
        "read_error": None,
        "patient_ref": patient_ref(ds.get("PatientID")),
        "study_date_shifted": shifted_date(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate"),
                                           ds.get("PatientID")),
    }


def patient_ref(patient_id) -> str | None:
    """Salted one-way hash of PatientID (16 hex): tells patients apart; written only as
    ``scans.patient_key`` (replaced by the run's HMAC pseudonym of it under ``--pseudonymize``)."""
    if patient_id in (None, ""):
        return None
    return hashlib.sha256(b"emphy-dask/patient/" + str(patient_id).encode()).hexdigest()[:16]


def shifted_date(dicom_date, patient_id) -> str | None:
    """A DICOM date (DA, ``YYYYMMDD``) moved back by the patient's own offset, as ISO ``YYYY-MM-DD``.

    The offset (0-``DATE_SHIFT_MAX_DAYS`` days) is a salted hash of PatientID, so every scan of
    one patient moves by the same number of days and the intervals between them are kept.
    None when the date is missing or not a valid date.
    """
    import datetime as dt

    text = str(dicom_date or "").strip().replace(".", "")[:8]   # ACR-NEMA wrote YYYY.MM.DD
    try:
        day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    salt = hashlib.sha256(b"emphy-dask/date-shift/" + str(patient_id or "").encode()).digest()
    return (day - dt.timedelta(days=int.from_bytes(salt[:4], "big") % (DATE_SHIFT_MAX_DAYS + 1))).isoformat()


def scan_key_of(path, root) -> str:
    """The scan (patient) folder of ``path``, relative to ``root``, as a posix string.

    DICOM archives are laid out patient/study/series/file (TCIA, LIDC-IDRI), possibly below
    collection folders: the key is the folder two levels above the file's series folder
    (``collection/LIDC-IDRI-0001`` for ``collection/LIDC-IDRI-0001/<study>/<series>/x.dcm``).
    Shallower trees fall back to the first component (patient/series/file), and a file
    directly in ``root`` belongs to ``root`` itself (its folder name).
    """
    p, r = Path(path), Path(root)
    try:
        rel = p.relative_to(r)
    except ValueError:
        rel = Path(os.path.relpath(os.path.abspath(p), os.path.abspath(r)))
    parts = rel.parts
    if len(parts) <= 1 or parts[0] == "..":
        return Path(os.path.abspath(r)).name if len(parts) <= 1 else p.parent.name
    if len(parts) >= 4:
        return "/".join(parts[:-3])
    return parts[0]


def index_files(paths, root) -> list[dict]:
    """``read_header`` over ``paths`` (any chunk of ``find_files(root)``), non-DICOM skipped.

    Each record gets ``scan_key`` (see ``scan_key_of``). Stateless and picklable, so it
    can be mapped over chunks on Dask workers.
    """
    paths, out = list(paths), []
    for p, rec in zip(paths, storage.fetch_map(read_header, paths)):
        if rec is not None:
            rec["scan_key"] = scan_key_of(p, root)
            out.append(rec)
    return out
