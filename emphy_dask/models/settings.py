"""Settings of ``emphy fit``: the ``[fit]`` section of a job file, or the defaults.

The fit runs on the driver after ``extract``; only ``[fit]`` matters to it. ``jobfile`` reads a
job file once and checks its extract sections as ``extract`` would, so one file serves both
commands; this module knows nothing of them (the driver-side models never import ``job``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..settings_table import settings_from_table

ZONE_SETS = {"middle": ("middle",), "zones": ("upper", "middle", "lower"), "whole": ("whole",)}


@dataclass(frozen=True)
class FitSettings:
    backbone: str = ""              # "" = the run's only backbone; required when it holds several
    features: str = "middle"        # "middle" (paper: the middle zone's 2048-d embedding), "zones" (upper, middle,
    #                                 lower concatenated) or "whole" (ct-i3resnet152's whole-lung embedding)
    n_features: int = 20            # t-test top k (paper: 20)
    folds: int = 5                  # honest protocol: repeated stratified k-fold ...
    repeats: int = 5                # ... folds x repeats
    inner_folds: int = 3            # inner CV choosing C of the L1 model / alpha of the ridge
    n_bootstrap: int = 1000         # resamples of scans for the 95 % intervals
    seed: int = 0                   # balanced subset draw, folds, bootstrap, t-SNE
    min_per_class: int = 5          # fewer scans in a class: no model (exit code 2)
    logistic_c: float = 1.0         # inverse L2 strength of the paper's logistic regression
    group_by: str = ""              # column whose values never straddle a split (patient_key, base_key, ...);
    #                                 "" = patient_key when a patient has several scans, else none; "scan_key" = none
    covariates: str = ""            # CSV or Parquet keyed by scan_key: extra columns for group_by and target
    target: str = ""                # a categorical column to predict besides the weak label (e.g. pattern)

    @property
    def zones(self) -> tuple[str, ...]:
        return ZONE_SETS[self.features]


def check_settings(s: FitSettings, source: str = "<settings>") -> FitSettings:
    """``s`` itself when its choices and ranges are valid; else a ``ConfigError`` naming ``source``."""
    if s.features not in ZONE_SETS:
        raise ConfigError(f"{source}: [fit].features must be one of {', '.join(ZONE_SETS)}, got {s.features!r}")
    if s.n_features < 1 or s.folds < 2 or s.repeats < 1 or s.inner_folds < 2 or s.n_bootstrap < 0:
        raise ConfigError(f"{source}: [fit] needs n_features >= 1, folds >= 2, repeats >= 1, inner_folds >= 2, "
                          f"n_bootstrap >= 0")
    if s.min_per_class < 2 or s.logistic_c <= 0:
        raise ConfigError(f"{source}: [fit].min_per_class must be >= 2 and logistic_c > 0")
    return s


def fit_settings_from_table(values, source: str, **overrides) -> FitSettings:
    """Validated ``FitSettings`` from a ``[fit]`` table and command-line ``overrides`` (None values ignored).

    Raises
    ------
    ConfigError
        Naming ``source`` and the key: not a table, an unknown key, a wrong type or a value out of range.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [fit] must be a table")
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    return check_settings(settings_from_table(FitSettings, values, source, "fit"), source)
