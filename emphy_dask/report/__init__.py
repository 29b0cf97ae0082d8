"""The static HTML report of a run (``emphy report``): cohort, exclusions, both protocols, maps."""
from .build import build_report

__all__ = ["build_report"]
