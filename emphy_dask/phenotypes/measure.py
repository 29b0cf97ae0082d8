"""All lung measurements of one scan in one call: what ``emphy quantify`` prints and the job stores."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clusters import laa_cluster_exponent_d
from .label import LabelRule, emphysema_label
from .parenchyma import parenchyma_phenotypes
from .slices import laa_per_slice


@dataclass
class LungMeasurements:
    """regions: one dict per region (REGIONS order); curve: ``laa_per_slice`` arrays;
    cluster_d: Mishima D of the whole lung (NaN when too few clusters); label: 1/0/None."""

    regions: list
    curve: dict
    cluster_d: float
    label: int | None

    @property
    def whole(self) -> dict:
        return self.regions[0]


def measure_lungs(hu: np.ndarray, labels: np.ndarray, spacing_zyx_mm, direction_xyz,
                  rule: LabelRule = LabelRule()) -> LungMeasurements:
    """Parenchyma phenotypes per region, per-slice LAA curve, cluster D and the weak label.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x), HU (unclipped)
    labels : ndarray of uint8, same shape; 0 background, 1 right, 2 left (other nonzero: lung)
    spacing_zyx_mm : 3 floats, mm
    direction_xyz : 9 floats, ITK direction
    rule : LabelRule
    """
    regions = parenchyma_phenotypes(hu, labels, spacing_zyx_mm, direction_xyz)
    whole = regions[0]
    return LungMeasurements(
        regions=regions,
        curve=laa_per_slice(hu, labels, direction_xyz, spacing_zyx_mm=spacing_zyx_mm),
        cluster_d=laa_cluster_exponent_d(hu, labels > 0, spacing_zyx_mm),
        label=emphysema_label(whole["laa950_pct"], whole["hu_mean"], rule),
    )
