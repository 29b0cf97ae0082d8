"""Emphysema over time: pair a patient's scans, volume-adjust PD15, rate the change (``emphy track``)."""
from .adjust import pd15_g_l, regression_adjust, regression_slope, sponge_adjust
from .longitudinal import longitudinal_table
from .pairs import make_pairs, order_scans

__all__ = ["longitudinal_table", "make_pairs", "order_scans", "pd15_g_l", "regression_adjust", "regression_slope",
           "sponge_adjust"]
