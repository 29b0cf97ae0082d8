"""CIP-compatible lung phenotypes: regions, parenchyma metrics, LAA curve, cluster D, label."""
from .clusters import cluster_sizes_mm3, laa_cluster_exponent_d, power_law_exponent
from .label import LabelRule, emphysema_label
from .measure import LungMeasurements, measure_lungs
from .parenchyma import (
    PHENOTYPE_COLUMNS,
    metrics_from_histogram,
    metrics_from_values,
    parenchyma_phenotypes,
    schneider_density_g_ml,
)
from .regions import REGIONS, THIRDS, has_sides, region_masks, slice_thirds
from .slices import laa_per_slice

__all__ = [
    "REGIONS", "THIRDS", "PHENOTYPE_COLUMNS", "LabelRule", "LungMeasurements", "measure_lungs",
    "cluster_sizes_mm3", "emphysema_label", "has_sides", "laa_cluster_exponent_d",
    "laa_per_slice", "metrics_from_histogram", "metrics_from_values",
    "parenchyma_phenotypes", "power_law_exponent", "region_masks",
    "schneider_density_g_ml", "slice_thirds",
]
