"""A run's lung mask as a DICOM Segmentation (highdicom) on the source series' geometry.

Segments (BINARY, overlapping): WholeLung, RightLung, LeftLung, each lobe when the mask has
lobes (lungmask LTRCLobes, CIP maps), and ``LAA950``: the lung voxels strictly below -950 HU,
i.e. the voxels ``laa950_pct`` counts. Regions come from ``phenotypes.region_masks``, the very
masks the phenotype table was measured on, so a viewer's read of a segment recovers the voxels
behind the numbers. Segment numbers follow ``SEGMENT_ORDER``; empty regions are left out.
"""
from __future__ import annotations

import numpy as np

from .. import __version__
from ..phenotypes.labelmaps import LOBES

LAA_SEGMENT = "LAA950"
LAA_THRESHOLD_HU = -950
SEGMENT_ORDER = ("WholeLung", "RightLung", "LeftLung", *LOBES, LAA_SEGMENT)
MANUFACTURER = "emphy-dask"

#: region -> (SNOMED CT code, meaning) of the segmented property type (anatomy: category
#: "Anatomical Structure"); the LAA segment is a "Morphologically Abnormal Structure".
ANATOMY_CODES = {
    "WholeLung": ("39607008", "Lung"),
    "RightLung": ("3341006", "Right lung"),
    "LeftLung": ("44029006", "Left lung"),
    "RightUpperLobe": ("42400003", "Upper lobe of right lung"),
    "RightMiddleLobe": ("72481006", "Middle lobe of right lung"),
    "RightLowerLobe": ("266005", "Lower lobe of right lung"),
    "LeftUpperLobe": ("44714003", "Upper lobe of left lung"),
    "LeftLowerLobe": ("41224006", "Lower lobe of left lung"),
}
EMPHYSEMA_CODE = ("87433001", "Pulmonary emphysema")


def segment_masks(labels: np.ndarray, hu: np.ndarray, direction_xyz, spacing_zyx_mm) -> dict[str, np.ndarray]:
    """The segments' boolean masks, in ``SEGMENT_ORDER``, empty ones left out.

    Parameters
    ----------
    labels : ndarray (z, y, x) of uint8
        The run's mask on the native grid (``masks/<scan>.nii.gz``).
    hu : ndarray (z, y, x) of int16
        The CT in HU on the same grid (``read_dicom_series`` of the source).
    direction_xyz, spacing_zyx_mm
        The grid's direction cosines and spacing (mm), as the phenotypes used them.
    """
    from ..phenotypes.labelmaps import region_masks

    regions = region_masks(labels, direction_xyz, spacing_zyx_mm)
    out = {name: regions[name] for name in SEGMENT_ORDER[:-1] if name in regions and regions[name].any()}
    if "WholeLung" in out:
        out[LAA_SEGMENT] = out["WholeLung"] & (hu < LAA_THRESHOLD_HU)
    return out


def _description(name: str, number: int, algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if name == LAA_SEGMENT:
        category, prop = codes.SCT.MorphologicallyAbnormalStructure, Code(EMPHYSEMA_CODE[0], "SCT", EMPHYSEMA_CODE[1])
        label = "LAA below -950 HU"
    else:
        category, prop = codes.SCT.AnatomicalStructure, Code(ANATOMY_CODES[name][0], "SCT", ANATOMY_CODES[name][1])
        label = name
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=name, tracking_uid=hd.UID())


def build_segmentation(sources: list, masks: dict[str, np.ndarray], segmenter: str, series_number: int = 9001):
    """A BINARY DICOM Segmentation of ``masks`` on the geometry of ``sources``.

    Parameters
    ----------
    sources : list of pydicom.Dataset
        The source series' instances in the masks' slice order (array index z = ``sources[z]``).
    masks : dict of str -> ndarray (z, y, x) of bool
        ``segment_masks`` output; segment numbers follow its order (1, 2, ...).
    segmenter : str
        The run's segmenter (``scans.segmenter``), named as the algorithm.

    Returns
    -------
    highdicom.seg.Segmentation
        Patient and study attributes copied from ``sources`` (for the patient's record).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=f"emphy-dask {segmenter}", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    names = list(masks)
    pixels = np.stack([masks[n] for n in names], axis=-1).astype(np.uint8)   # (frames, rows, cols, segments)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, i + 1, algorithm) for i, n in enumerate(names)],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="emphy-dask", software_versions=__version__,
        device_serial_number="0", series_description="emphy-dask lung segmentation")


def read_segments(seg) -> dict[str, np.ndarray]:
    """Viewer-style read of a Segmentation: ``{tracking id: mask (z, y, x) bool}`` in the order
    of its source instances (as referenced), for tests and users checking a file."""
    import highdicom as hd

    seg = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    sources = [(s.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    out = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[number],
                                                assert_missing_frames_are_empty=True)
        out[desc.tracking_id] = arr[..., 0].astype(bool)
    return out

