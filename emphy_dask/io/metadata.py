"""Publishable scan metadata, with the reconstruction kernel's sharpness class.

Everything here is safe to write into results tables: scanner, kernel, dose-ish
settings and geometry. Patient-identifying DICOM attributes (``PHI_TAGS``) are never
read into these dicts; the header reader picks fields by name (an allow-list), so PHI
cannot leak by accident when a new tag shows up in an archive.

Why the kernel matters: sharp (lung/bone/edge) kernels add high-frequency noise that
pushes lung voxels below -950 HU, raising LAA%-950 by several percentage points on the
same lungs. So series selection prefers soft kernels and the result records the kernel and
its class (``kernels.py``: soft / standard / sharp / very_sharp / unknown).
"""
from __future__ import annotations

from .kernels import is_sharp_class, kernel_class

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
    "manufacturer", "model", "kernel", "kernel_class", "kvp", "tube_current_ma",
    "slice_thickness_mm", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "n_slices",
    "rows", "columns", "transfer_syntax", "series_uid", "study_uid", "series_number",
    "series_description",
)


def is_sharp_kernel(kernel: str | None, manufacturer: str | None = None) -> bool | None:
    """Whether a kernel's class (``kernels.kernel_class``) is sharp / very sharp.

    True (sharp, very sharp), False (soft, standard) or None (unknown to the tables). Kept
    for series selection's tie-break; results record the class itself.
    """
    return is_sharp_class(kernel_class(kernel, manufacturer))


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
        "kernel_class": kernel_class(kernel, header.get("manufacturer")),
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
