"""All lung measurements of one scan in one call: what ``emphy quantify`` prints and the job stores."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clusters import laa_cluster_exponent_d
from .label import LabelRule, emphysema_label
from .labelmaps import LungRegions, decode_label_map
from .parenchyma import region_phenotypes
from .slices import laa_per_slice


@dataclass
class LungMeasurements:
    """regions: one dict per region (``region_selectors`` order); curve: ``laa_per_slice`` arrays;
    cluster_d: Mishima D of the whole lung (NaN when too few clusters); label: 1/0/None;
    mask: the decoded label map (encoding, notes, lung voxels)."""

    regions: list
    curve: dict
    cluster_d: float
    label: int | None
    mask: LungRegions

    @property
    def whole(self) -> dict:
        return self.regions[0]

    @property
    def lung(self) -> np.ndarray:
        return self.mask.lung


def measure_lungs(hu: np.ndarray, labels: np.ndarray, spacing_zyx_mm, direction_xyz,
                  rule: LabelRule = LabelRule(), encoding: str | None = None) -> LungMeasurements:
    """Parenchyma phenotypes per region, per-slice LAA curve, cluster D and the weak label.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x), HU (unclipped)
    labels : ndarray, same shape; a lung label map in any encoding of ``labelmaps``
        (0 background, 1 right, 2 left; binary; CIP; LTRCLobes)
    spacing_zyx_mm : 3 floats, mm
    direction_xyz : 9 floats, ITK direction
    rule : LabelRule
    encoding : str, optional
        Force the label encoding instead of detecting it.
    """
    hu = np.asarray(hu)
    if hu.shape != np.shape(labels):
        raise ValueError(f"HU shape {hu.shape} and label shape {np.shape(labels)} differ")
    mask = decode_label_map(labels, spacing_zyx_mm, direction_xyz, encoding)
    regions = region_phenotypes(hu, mask, spacing_zyx_mm)
    whole = regions[0]
    return LungMeasurements(
        regions=regions,
        curve=laa_per_slice(hu, mask.lung, direction_xyz, spacing_zyx_mm=spacing_zyx_mm),
        cluster_d=laa_cluster_exponent_d(hu, mask.lung, spacing_zyx_mm),
        label=emphysema_label(whole["laa950_pct"], whole["hu_mean"], rule),
        mask=mask,
    )
