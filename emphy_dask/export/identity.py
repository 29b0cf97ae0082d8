"""``--pseudonymize`` for DICOM outputs: the source's identity replaced by the run's pseudonyms.

A SEG or SR copies the patient and study module of its source (it belongs in the patient's
record). For a pseudonymised export every patient/study attribute that identifies is replaced
or emptied (PS3.15 basic profile style: names, IDs, accession, physicians, institution, and
every date and time but the object's own creation), PatientID and PatientName become the scan's pseudonym, and every UID taken from
the source (study, series, frame of reference, each referenced instance) is replaced by
``2.25.<keyed hash>``: consistent within and across objects of the same secret (the SR's
reference to the SEG and both references to the sources still agree), not reversible without it.
"""
from __future__ import annotations

import hashlib
import hmac

from pydicom.dataset import Dataset

#: emptied (type 2) or removed (type 3) when pseudonymising
IDENTIFYING = ("PatientBirthDate", "PatientSex", "PatientAge", "PatientBirthTime", "OtherPatientIDs",
               "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers",
               "PatientWeight", "PatientSize", "EthnicGroup", "PatientComments", "IssuerOfPatientID",
               "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "AcquisitionDateTime",
               "ReferringPhysicianName", "InstitutionName",
               "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "PerformingPhysicianName",
               "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician", "StudyDescription",
               "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID")
#: the object's own dates and times (when it was made) are not the source's: kept; every other
#: date or time (study, acquisition, the source's contributing equipment, ...) goes
OWN_TIMES = {"ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate", "InstanceCreationTime"}
_TYPE2 = {"PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
          "ReferringPhysicianName"}


def pseudo_uid(uid: str, secret: bytes) -> str:
    """``2.25.<int of 128 bits of HMAC-SHA256(secret, uid)>``: a valid UID, stable per secret."""
    return "2.25." + str(int(hmac.new(secret, b"uid/" + uid.encode(), hashlib.sha256).hexdigest()[:32], 16))


def pseudonymize_dataset(ds: Dataset, alias: str, uids: set[str], secret: bytes) -> Dataset:
    """``ds`` (in place, returned) with the source identity replaced (module doc)."""
    def walk(d: Dataset) -> None:
        for elem in list(d):
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                new = [pseudo_uid(str(v), secret) if str(v) in uids else v for v in values]
                elem.value = new if elem.VM > 1 else new[0]
            if elem.keyword in IDENTIFYING or (elem.VR in ("DA", "DT", "TM") and elem.keyword not in OWN_TIMES):
                if elem.keyword in _TYPE2 and d is ds:
                    elem.value = "" if elem.VR != "SQ" else []
                else:
                    del d[elem.tag]
    walk(ds)
    ds.PatientID = alias
    ds.PatientName = alias
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "emphy-dask --pseudonymize: keyed pseudonyms"
    return ds
