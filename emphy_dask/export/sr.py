"""A scan's measurements as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

One measurement group per measured region (raw HU rows of the phenotype table, ``n_voxels`` > 0):
a volumetric group referencing the region's segment of the Segmentation when it has one (lung,
sides, lobes), a plain TID 1501 group for the thirds. Each group holds LAA%-950, Perc15, MLD
(mean HU) and volume as the tables store them (float64, kept exactly in FloatingPointValue); the
whole-lung group adds the paper's weak label and, when the run was scored, each model's score.

Codes: SNOMED CT / DICOM where a concept exists (Volume 118565006, Attenuation Coefficient
112031 with derivation Mean 373098007, Present/Absent), UCUM units (``%``, ``[hnsf'U]``, ``l``,
``1``); the quantities that have no standard concept (LAA%-950, 15th percentile, the weak label,
a model score) use the local coding scheme ``99EMPHY`` (a "99" prefix marks private schemes).
"""
from __future__ import annotations

import hashlib
import math

from .. import __version__
from .seg import MANUFACTURER

PRIVATE_SCHEME = "99EMPHY"
HU_UNIT = ("[hnsf'U]", "UCUM", "Hounsfield unit")

#: phenotype column -> (concept (value, scheme, meaning), UCUM unit (value, meaning), derivation or None)
MEASURES = {
    "laa950_pct": (("LAA950", PRIVATE_SCHEME, "Percent of region volume below -950 HU"), ("%", "percent"), None),
    "perc15_hu": (("112031", "DCM", "Attenuation Coefficient"), HU_UNIT[::2],
                  ("PERC15", PRIVATE_SCHEME, "15th percentile")),
    "hu_mean": (("112031", "DCM", "Attenuation Coefficient"), HU_UNIT[::2], ("373098007", "SCT", "Mean")),
    "volume_l": (("118565006", "SCT", "Volume"), ("l", "liter"), None),
}
LABEL_CONCEPT = ("PAPERLABEL", PRIVATE_SCHEME, "Emphysema weak label, LAA950 >= 6 % and MLD < -850 HU")
SCORE_CONCEPT = ("MODELSCORE", PRIVATE_SCHEME, "Emphysema model probability")
PROCEDURE = ("24627-2", "LN", "CT Chest")


def _code(triple):
    from pydicom.sr.coding import Code

    value, scheme, meaning = triple
    return Code(value, scheme, meaning)


def _measurements(row: dict) -> list:
    import highdicom as hd
    from pydicom.sr.coding import Code

    out = []
    for column, (concept, unit, derivation) in MEASURES.items():
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out.append(hd.sr.Measurement(name=_code(concept), value=float(value), unit=Code(unit[0], "UCUM", unit[1]),
                                     derivation=_code(derivation) if derivation else None))
    return out


def build_report(seg, sources: list, phenotype_rows: list[dict], scan_row: dict, scores: dict[str, float]):
    """The TID 1500 report of one scan.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The scan's Segmentation (``seg.build_segmentation``); groups reference its segments.
    sources : list of pydicom.Dataset
        The source series (evidence; patient and study attributes come from them).
    phenotype_rows : list of dict
        The scan's rows of the phenotype table, ``hu_source`` raw.
    scan_row : dict
        Its scans row (``label``, ``segmenter``).
    scores : dict of str -> float
        Model name -> probability from ``OUT/predictions/`` (empty when the run was not scored).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segments = {seg.get_segment_description(n).tracking_id: n for n in seg.segment_numbers}
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="emphy-dask", manufacturer_name=MANUFACTURER, model_name=__version__))
    algorithm = hd.sr.AlgorithmIdentification(name=f"emphy-dask {scan_row.get('segmenter') or ''}".strip(),
                                              version=__version__)
    groups = []
    for row in phenotype_rows:
        region = row["region"]
        if row.get("hu_source", "raw") != "raw" or not row.get("n_voxels"):
            continue
        tracking = hd.sr.TrackingIdentifier(identifier=region, uid=hd.UID())
        measurements = _measurements(row)
        evaluations = []
        if region == "WholeLung":
            label = scan_row.get("label")
            if label is not None and not (isinstance(label, float) and math.isnan(label)):
                evaluations.append(hd.sr.QualitativeEvaluation(
                    _code(LABEL_CONCEPT), codes.SCT.Present if int(label) == 1 else codes.SCT.Absent))
            from pydicom.sr.coding import Code

            for model, probability in sorted(scores.items()):
                # the model is the measurement's method: a code per model name (SH holds 16 characters)
                method = Code(hashlib.sha256(model.encode()).hexdigest()[:12], PRIVATE_SCHEME, model)
                measurements.append(hd.sr.Measurement(
                    name=_code(SCORE_CONCEPT), value=float(probability), unit=Code("1", "UCUM", "no units"),
                    method=method))
        kw = dict(tracking_identifier=tracking, finding_type=codes.SCT.Lung, algorithm_id=algorithm,
                  measurements=measurements, qualitative_evaluations=evaluations or None)
        if region in segments:
            ref = hd.sr.ReferencedSegment.from_segmentation(seg, segments[region])
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **kw))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**kw))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(PROCEDURE), imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report, series_instance_uid=hd.UID(), series_number=9002,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="emphy-dask emphysema measurements")


def read_measurements(sr) -> dict[str, dict]:
    """Viewer-style read of a report: ``{region: {column: value}}`` (plus ``label`` and
    ``score:<model>`` in WholeLung), the inverse of ``build_report``."""
    import highdicom as hd

    sr = sr if isinstance(sr, hd.sr.Comprehensive3DSR) else hd.sr.Comprehensive3DSR.from_dataset(sr)
    by_concept = {(c[0][0], (c[2] or ("",))[0]): col for col, c in MEASURES.items()}
    out: dict[str, dict] = {}
    content = sr.content
    groups = [*content.get_volumetric_roi_measurement_groups(), *_plain_groups(content)]
    for group in groups:
        region = group.tracking_identifier
        values = out.setdefault(region, {})
        for m in group.get_measurements():
            if m.name.value == SCORE_CONCEPT[0]:
                values[f"score:{m.method.meaning}"] = m.value
                continue
            derivation = m.derivation.value if m.derivation is not None else ""
            values[by_concept[(m.name.value, derivation)]] = m.value
        for q in group.get_qualitative_evaluations():
            if q.name.value == LABEL_CONCEPT[0]:
                values["label"] = 1 if q.value.value == "52101004" else 0
    return out


def _plain_groups(content):
    """TID 1501 groups (measurements without an image region) of a MeasurementReport."""
    import highdicom as hd

    for item in content[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":      # Imaging Measurements
            continue
        for group in item.ContentSequence:
            try:
                yield hd.sr.MeasurementsAndQualitativeEvaluations.from_sequence([group])
            except (ValueError, AttributeError):
                continue   # volumetric groups are read by get_volumetric_roi_measurement_groups
