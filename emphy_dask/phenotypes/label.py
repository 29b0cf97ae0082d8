"""Rule-based emphysema label from whole-lung phenotypes."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelRule:
    """Emphysema iff LAA950 >= ``laa950_min_pct`` (%) AND mean lung density
    (MLD, ``hu_mean``) < ``mld_max_hu`` (HU)."""

    laa950_min_pct: float = 6.0
    mld_max_hu: float = -850.0


def _missing(x) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def emphysema_label(laa950_pct, hu_mean, rule: LabelRule = LabelRule()) -> int | None:
    """1 (emphysema) / 0 (not) by ``rule``; None when either input is missing.

    Parameters
    ----------
    laa950_pct : float
        Whole-lung % of voxels below -950 HU.
    hu_mean : float
        Whole-lung mean HU.
    rule : LabelRule

    Returns
    -------
    int or None
        None (not a guess) when an input is None / NaN, e.g. an empty lung mask.
    """
    if _missing(laa950_pct) or _missing(hu_mean):
        return None
    return int(float(laa950_pct) >= rule.laa950_min_pct and float(hu_mean) < rule.mld_max_hu)
