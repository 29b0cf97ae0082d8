"""Lung-volume adjustment of the 15th percentile density (PD15): pure functions on arrays.

Lung density falls as the lung inflates: the same tissue fills a larger volume. A change of
PD15 between two scans mixes progression with the depth of inspiration, so trials (RAPID,
EXACTLE) report PD15 adjusted to a reference volume. Two published adjustments:

- **sponge model** (physiological; Shaker et al., Acta Radiol 2004; Stolk et al., Respir Res
  2007): the lung's mass is conserved when it inflates, so density x volume is constant and
  ``PD15_adj = PD15 x V / V_ref`` (PD15 in g/L = HU + 1000).
- **regression method** (Parr et al., Respir Res 2008;9:21; the Leiden group's comparison,
  Proc Am Thorac Soc 2008;5:919): PD15 regressed on log lung volume, within patients, with
  time as a covariate; the fitted slope ``c`` (g/L per unit log volume) moves each PD15 to the
  reference volume: ``PD15_adj = PD15 - c (log V - log V_ref)``. Here ``c`` is pooled over the
  cohort's patients (one common time slope and one common volume slope, each patient its own
  intercept), so two scans per patient suffice when inspiration varies across the cohort.
"""
from __future__ import annotations

import numpy as np

#: g/L of water-equivalent density per HU above air (PD15 [g/L] = Perc15 [HU] + 1000).
AIR_HU = -1000.0


def pd15_g_l(perc15_hu):
    """15th percentile density in g/L from the 15th percentile in HU (``HU + 1000``).

    Examples
    --------
    >>> float(pd15_g_l(-910.0))
    90.0
    """
    return np.asarray(perc15_hu, dtype=float) - AIR_HU


def sponge_adjust(pd15, volume_l, reference_volume_l):
    """PD15 at ``reference_volume_l`` by mass conservation: ``pd15 * volume_l / reference_volume_l``.

    Parameters
    ----------
    pd15 : array_like, g/L
    volume_l, reference_volume_l : array_like, litres (broadcast against ``pd15``)

    Examples
    --------
    >>> float(sponge_adjust(100.0, 5.5, 5.0))   # 10 % deeper breath: density read 10 % lower
    110.0
    """
    return np.asarray(pd15, float) * np.asarray(volume_l, float) / np.asarray(reference_volume_l, float)


def regression_slope(pd15, volume_l, years, patient) -> tuple[float, int]:
    """Pooled within-patient slope of PD15 on log lung volume (g/L per unit log volume).

    Fits ``pd15_ij = a_i + b * years_ij + c * log(volume_ij)`` by least squares on the
    deviations from each patient's means (the fixed-effects estimator), and returns ``c``
    with the number of patients that contributed (those with >= 2 scans). NaN when the
    design cannot separate volume from time (fewer than 3 such patients, or no variation).

    Parameters
    ----------
    pd15 : (n,) g/L; volume_l : (n,) litres; years : (n,) time since any origin, years;
    patient : (n,) group labels.
    """
    d = np.column_stack([np.asarray(pd15, float), np.asarray(years, float), np.log(np.asarray(volume_l, float))])
    patient = np.asarray(patient)
    ok = np.isfinite(d).all(axis=1)
    d, patient = d[ok], patient[ok]
    _, inv, counts = np.unique(patient, return_inverse=True, return_counts=True)
    keep = counts[inv] >= 2
    d, inv = d[keep], inv[keep]
    n_patients = int(np.unique(inv).size)
    if n_patients < 3:
        return float("nan"), n_patients
    sums = np.zeros((inv.max() + 1, 3))
    np.add.at(sums, inv, d)
    means = sums / np.maximum(np.bincount(inv, minlength=sums.shape[0]), 1)[:, None]
    dev = d - means[inv]
    X = dev[:, 1:]
    if np.linalg.matrix_rank(X, tol=1e-9) < 2:
        return float("nan"), n_patients
    coef, *_ = np.linalg.lstsq(X, dev[:, 0], rcond=None)
    return float(coef[1]), n_patients


def regression_adjust(pd15, volume_l, reference_volume_l, slope):
    """PD15 moved along the fitted log-volume slope to ``reference_volume_l`` (g/L)."""
    return np.asarray(pd15, float) - slope * (np.log(np.asarray(volume_l, float))
                                              - np.log(np.asarray(reference_volume_l, float)))
