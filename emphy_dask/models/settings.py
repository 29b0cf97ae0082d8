"""Settings of ``emphy fit``: the ``[fit]`` section of a job file, or the defaults.

The fit runs on the driver after ``extract``; only ``[fit]`` matters to it (the other sections of
the same job file are validated as ``extract`` would, so one file serves both commands).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..job.config import ConfigError, config_from_dict

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
    if s.features not in ZONE_SETS:
        raise ConfigError(f"{source}: [fit].features must be one of {', '.join(ZONE_SETS)}, got {s.features!r}")
    if s.n_features < 1 or s.folds < 2 or s.repeats < 1 or s.inner_folds < 2 or s.n_bootstrap < 0:
        raise ConfigError(f"{source}: [fit] needs n_features >= 1, folds >= 2, repeats >= 1, inner_folds >= 2, "
                          f"n_bootstrap >= 0")
    if s.min_per_class < 2 or s.logistic_c <= 0:
        raise ConfigError(f"{source}: [fit].min_per_class must be >= 2 and logistic_c > 0")
    return s


def load_fit_settings(job_path=None, **overrides) -> FitSettings:
    """``[fit]`` of a job file (TOML) with command-line ``overrides`` (None values ignored)."""
    values: dict = {}
    source = "<defaults>"
    if job_path:
        source = str(job_path)
        try:
            data = tomllib.loads(Path(job_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read the job file: {exc}") from None
        fit = data.pop("fit", {})
        config_from_dict(data, source)          # the rest must be a valid extract job
        if not isinstance(fit, dict):
            raise ConfigError(f"{source}: [fit] must be a table")
        values.update(fit)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return fit_settings_from_table(values, source)


def fit_settings_from_table(values: dict, source: str) -> FitSettings:
    """Validate the keys of a ``[fit]`` table (also called by ``load_job``, so extract checks them)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [fit] must be a table")
    values = dict(values)
    defaults = {f.name: f.default for f in dataclasses.fields(FitSettings)}
    for k, v in values.items():
        if k not in defaults:
            raise ConfigError(f"{source}: unknown key [fit].{k} (known: {', '.join(defaults)})")
        want = type(defaults[k])
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            values[k] = v = float(v)
        if not isinstance(v, want) or isinstance(v, bool) != (want is bool):
            raise ConfigError(f"{source}: [fit].{k} must be {want.__name__}, got {v!r}")
    return check_settings(FitSettings(**values), source)
