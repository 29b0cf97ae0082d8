"""Driver-side models on the tables of an extract run: fit, saved JSON models, predict, maps.

Nothing here reads images: ``fit``/``predict`` read ``scans/``, ``embeddings/``, ``phenotypes/``;
the contribution maps (``cam``) read the saved ``featuremaps/``.
"""
from .cohort import Cohort, CohortError, load_cohort
from .settings import FitSettings, fit_settings_from_table

__all__ = ["Cohort", "CohortError", "FitSettings", "fit_settings_from_table", "load_cohort"]
