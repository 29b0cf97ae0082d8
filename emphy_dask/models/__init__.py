"""Driver-side models on the tables of an extract run: fit, saved JSON models, predict, maps.

Nothing here reads images: ``fit``/``predict`` read ``scans/``, ``embeddings/``, ``phenotypes/``;
the contribution maps (``cam``) read the saved ``featuremaps/``.
"""
from .cohort import Cohort, CohortError, load_cohort
from .settings import FitSettings, load_fit_settings

__all__ = ["Cohort", "CohortError", "FitSettings", "load_cohort", "load_fit_settings"]
