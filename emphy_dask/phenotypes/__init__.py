"""CIP-compatible lung phenotypes: label maps, regions, parenchyma metrics, LAA curve, cluster D, label."""
from .clusters import cluster_sizes_mm3, laa_cluster_exponent_d, power_law_exponent
from .fov import FOV_TRUNCATED_MIN_PCT, fov_columns, lung_border_at_fov_edge_pct
from .label import LabelRule, emphysema_label
from .labelmaps import LOBES, LungRegions, decode_label_map, detect_encoding, region_masks, region_selectors
from .measure import LungMeasurements, measure_lungs
from .parenchyma import (
    PHENOTYPE_COLUMNS,
    cli_percentile_hu,
    metrics_from_histogram,
    metrics_from_values,
    parenchyma_phenotypes,
    region_phenotypes,
    schneider_density_g_ml,
)
from .regions import REGIONS, THIRDS, has_sides, slice_thirds
from .slices import laa_per_slice

__all__ = [
    "REGIONS", "THIRDS", "LOBES", "PHENOTYPE_COLUMNS", "FOV_TRUNCATED_MIN_PCT", "LabelRule", "LungMeasurements",
    "LungRegions", "measure_lungs", "cluster_sizes_mm3", "cli_percentile_hu", "decode_label_map",
    "detect_encoding", "emphysema_label", "fov_columns", "has_sides", "laa_cluster_exponent_d",
    "laa_per_slice", "lung_border_at_fov_edge_pct", "metrics_from_histogram", "metrics_from_values",
    "parenchyma_phenotypes", "power_law_exponent", "region_masks", "region_phenotypes", "region_selectors",
    "schneider_density_g_ml", "slice_thirds",
]
