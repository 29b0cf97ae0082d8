"""Publishable scan metadata and reconstruction-kernel sharpness.

Everything here is safe to write into results tables: scanner, kernel, dose-ish
settings and geometry. Patient-identifying DICOM attributes (``PHI_TAGS``) are never
read into these dicts; the header reader picks fields by name (an allow-list), so PHI
cannot leak by accident when a new tag shows up in an archive.

Why the kernel matters: sharp (lung/bone/edge) kernels add high-frequency noise that
pushes lung voxels below -950 HU, raising LAA%-950 by several percentage points on the
same lungs. So series selection prefers soft kernels and the result records the kernel.
"""
from __future__ import annotations

import re

#: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile keywords that
#: identify a patient, a clinician, an institution or a date/time. None of these is ever
#: returned by ``read_header`` / ``scan_metadata`` / ``CTVolume.meta``.
#: Deliberate exceptions (in the profile but published on purpose): the study / series /
#: frame-of-reference UIDs (needed to trace a result back to its series; public archives
#: such as TCIA already replace them) and SeriesDescription (a protocol label, e.g. "5mm").
PHI_TAGS: frozenset[str] = frozenset({
    # patient
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "PatientBirthName", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientComments", "PatientReligiousPreference", "EthnicGroup",
    "Occupation", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "AdditionalPatientHistory", "PregnancyStatus", "IssuerOfPatientID", "PatientInsurancePlanCodeSequence",
    "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson", "ResponsibleOrganization",
    "MedicalAlerts", "Allergies", "SmokingStatus", "LastMenstrualDate", "PatientState",
    # clinicians and staff
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "OperatorsName", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "PersonName", "ConsultingPhysicianName",
    # institution and device
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "RequestingService",
    # visit / order identifiers
    "AccessionNumber", "StudyID", "AdmissionID", "RequestedProcedureID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "StudyDescription", "RequestAttributesSequence",
    "ImageComments", "DerivationDescription",
    # dates and times
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
    "AcquisitionDateTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
})

#: Keys of the dict returned by ``scan_metadata``: the only scan facts we publish.
PUBLIC_KEYS: tuple[str, ...] = (
    "manufacturer", "model", "kernel", "kernel_is_sharp", "kvp", "tube_current_ma",
    "slice_thickness_mm", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "n_slices",
    "rows", "columns", "transfer_syntax", "series_uid", "study_uid", "series_number",
    "series_description",
)

# --- kernel tables ---------------------------------------------------------------
# GE names (normalised: upper case, no spaces/underscores/dashes). DETAIL sits between
# STANDARD and BONE but already shifts LAA% upwards, so it counts as sharp.
_GE_SHARP = {"LUNG", "BONE", "BONEPLUS", "EDGE", "DETAIL", "ULTRA", "HDLUNG", "HDBONE"}
_GE_SOFT = {"STANDARD", "SOFT", "SMOOTH", "HDSTANDARD", "HDSOFT"}
# Philips single/double letters: A (smooth), B (standard), C (sharper standard) are
# body kernels; D, E (sharp), L (lung), Y-series YA..YF (high resolution) are sharp.
_PHILIPS_SHARP = {"D", "E", "L", "YA", "YB", "YC", "YD", "YE", "YF", "EC", "LA", "LB"}
_PHILIPS_SOFT = {"A", "B", "C", "CB", "UB", "UA"}
# Siemens: letter code (B body, Br body regular, Bl lung, Bf/Bv, I/Ir/Il iterative,
# Q/Qr/Ql ADMIRE, H/Hr head, D/Dr dual energy, U/Ur ultra-high-res) + 2-digit sharpness
# + optional suffix (f fast, s, d, u, ...). Sharpness >= 50 is sharp (B60f, B70f,
# Br59, Bl57, I70f); below is soft/standard (B30f, B31f, B35f, Br40, Qr40).
_SIEMENS_RE = re.compile(r"^(B|BR|BL|BF|BV|BS|I|IR|IL|IV|Q|QR|QL|H|HR|HC|D|DR|U|UR|C|T|S|J|JR)(\d{2})[A-Z]?$")
_SIEMENS_SHARP_FROM = 50
# Toshiba / Canon: FC01-FC18 body (soft), FC50-FC56 lung and FC80+ high-res (sharp),
# FL01-FL05 lung kernels (sharp). Others (FC20-FC49 head, FC60-FC79) -> unknown.
_TOSHIBA_RE = re.compile(r"^F([CL])(\d{2})$")


def _normalise(kernel: str) -> str:
    # First token only: Siemens writes e.g. "I70f\3" (kernel, strength), Philips may
    # append the iDose level. Our read_header joins multi-values with "/".
    first = re.split(r"[\\/,;]", str(kernel).strip())[0]
    return re.sub(r"[\s_\-]", "", first).upper()


_VENDOR_RE = (
    ("ge", re.compile(r"^GE\b|GENERAL ELECTRIC")),
    ("siemens", re.compile(r"SIEMENS")),
    ("philips", re.compile(r"PHILIPS|MARCONI|PICKER")),
    ("toshiba", re.compile(r"TOSHIBA|CANON")),
)


def _vendor(manufacturer: str | None) -> str | None:
    m = (manufacturer or "").strip().upper()
    for key, pattern in _VENDOR_RE:
        if pattern.search(m):
            return key
    return None


def _lookup(vendor: str, k: str) -> bool | None:
    if vendor == "ge":
        return True if k in _GE_SHARP else False if k in _GE_SOFT else None
    if vendor == "philips":
        return True if k in _PHILIPS_SHARP else False if k in _PHILIPS_SOFT else None
    if vendor == "siemens":
        m = _SIEMENS_RE.match(k)
        return None if m is None else int(m.group(2)) >= _SIEMENS_SHARP_FROM
    if vendor == "toshiba":
        m = _TOSHIBA_RE.match(k)
        if m is None:
            return None
        kind, n = m.group(1), int(m.group(2))
        if kind == "L":
            return True if 1 <= n <= 5 else None
        if 1 <= n <= 18:
            return False
        if 50 <= n <= 56 or n >= 80:
            return True
        return None
    return None


def is_sharp_kernel(kernel: str | None, manufacturer: str | None = None) -> bool | None:
    """Whether a reconstruction kernel is sharp (lung/bone/edge) rather than soft/standard.

    Parameters
    ----------
    kernel : str or None
        DICOM ConvolutionKernel (first value used if multi-valued).
    manufacturer : str, optional
        DICOM Manufacturer; picks the vendor table. Unknown or missing -> every table is
        tried and a unanimous answer is returned.

    Returns
    -------
    True (sharp), False (soft/standard) or None (kernel unknown to the tables).
    """
    if kernel is None or not str(kernel).strip():
        return None
    k = _normalise(kernel)
    vendor = _vendor(manufacturer)
    if vendor is not None:
        return _lookup(vendor, k)
    answers = {_lookup(v, k) for v in ("ge", "siemens", "philips", "toshiba")} - {None}
    return answers.pop() if len(answers) == 1 else None


def scan_metadata(header: dict, n_slices: int, spacing_zyx_mm) -> dict:
    """Publishable metadata of one series (no PHI; keys = ``PUBLIC_KEYS``).

    Parameters
    ----------
    header : dict
        ``read_header`` output of the first slice (only allow-listed fields are copied).
    n_slices : int
        Slices in the volume.
    spacing_zyx_mm : tuple of 3 float
        Voxel spacing (slice step, row, column), mm.
    """
    sz, sy, sx = (float(s) for s in spacing_zyx_mm)
    kernel = header.get("kernel")
    return {
        "manufacturer": header.get("manufacturer"),
        "model": header.get("model"),
        "kernel": kernel,
        "kernel_is_sharp": is_sharp_kernel(kernel, header.get("manufacturer")),
        "kvp": header.get("kvp"),
        "tube_current_ma": header.get("tube_current_ma"),
        "slice_thickness_mm": header.get("slice_thickness_mm"),
        "spacing_x_mm": sx,
        "spacing_y_mm": sy,
        "spacing_z_mm": sz,
        "n_slices": int(n_slices),
        "rows": header.get("rows"),
        "columns": header.get("columns"),
        "transfer_syntax": header.get("transfer_syntax_uid"),
        "series_uid": header.get("series_uid"),
        "study_uid": header.get("study_uid"),
        "series_number": header.get("series_number"),
        "series_description": header.get("series_description"),
    }
