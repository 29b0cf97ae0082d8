"""A run's scans grouped by patient, ordered in time, and paired: pure pandas, no I/O.

A patient is ``scans.patient_key`` (a one-way pseudonym of PatientID made at indexing, never
the raw ID); the order is ``scans.study_date_shifted`` (every scan of a patient is shifted by
the same number of days, so intervals are exact). Scans that cannot be placed are returned
with a reason, never dropped silently: no patient key (no PatientID in the headers), no date.
Two scans of one patient on one day are paired too (``same_day``): their difference is the
measurement's repeatability, and they get no annual rate.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

DAYS_PER_YEAR = 365.25
#: A tube current change above this fraction, or any kVp change, flags a pair (noise differs).
DOSE_CHANGE_FRACTION = 0.2
#: A slice thickness change above this (mm) flags a pair (partial volume differs).
THICKNESS_CHANGE_MM = 0.1


def order_scans(scans: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ok scans that can be tracked, ordered, and those that cannot (with a reason).

    Parameters
    ----------
    scans : DataFrame with scan_key, status, patient_key, study_date_shifted (ISO date string).

    Returns
    -------
    placed : DataFrame sorted by (patient_key, date, scan_key) with ``date`` (datetime64),
        ``visit`` (0-based order within the patient), ``n_scans`` (the patient's count) and
        ``years`` (years since the patient's first scan).
    left_out : DataFrame with scan_key and reason.
    """
    ok = scans[scans["status"] == "ok"].copy()
    ok["date"] = pd.to_datetime(ok["study_date_shifted"], errors="coerce", format="%Y-%m-%d")
    reasons = np.where(ok["patient_key"].isna(), "no PatientID in its headers: cannot be paired with other scans",
                       np.where(ok["date"].isna(), "no study date in its headers: cannot be ordered in time", ""))
    left_out = pd.DataFrame({"scan_key": ok["scan_key"].to_numpy(), "reason": reasons})
    left_out = left_out[left_out["reason"] != ""].reset_index(drop=True)
    placed = ok[reasons == ""].sort_values(["patient_key", "date", "scan_key"], kind="stable").reset_index(drop=True)
    grp = placed.groupby("patient_key", sort=False)
    placed["visit"] = grp.cumcount()
    placed["n_scans"] = grp["scan_key"].transform("size")
    first = grp["date"].transform("min")
    placed["years"] = (placed["date"] - first).dt.days / DAYS_PER_YEAR
    return placed, left_out


def make_pairs(placed: pd.DataFrame) -> pd.DataFrame:
    """Consecutive pairs of each patient's scans (``interval``), plus first -> last when a
    patient has 3 or more (``overall``). Columns: patient_key, pair_kind, from_index, to_index
    (row positions in ``placed``)."""
    idx = np.arange(len(placed))
    same_next = placed["patient_key"].to_numpy()[1:] == placed["patient_key"].to_numpy()[:-1]
    cons = pd.DataFrame({"from_index": idx[:-1][same_next], "to_index": idx[1:][same_next], "pair_kind": "interval"})
    many = placed[placed["n_scans"] >= 3]
    g = many.reset_index().groupby("patient_key", sort=False)["index"]
    over = pd.DataFrame({"from_index": g.min().to_numpy(), "to_index": g.max().to_numpy(), "pair_kind": "overall"})
    pairs = pd.concat([cons, over], ignore_index=True)
    pairs["patient_key"] = placed["patient_key"].to_numpy()[pairs["from_index"].to_numpy()]
    return pairs.sort_values(["patient_key", "pair_kind", "from_index"], kind="stable").reset_index(drop=True)


def pair_flags(frm: pd.DataFrame, to: pd.DataFrame) -> pd.DataFrame:
    """What differs between the two scans of each pair beyond the lungs (row-aligned frames of
    scans columns): kernel, dose (kVp, tube current), slice thickness; ``flags`` lists them."""
    def differs(a, b):
        a, b = a.to_numpy(object), b.to_numpy(object)
        return np.array([(x != y) and not (pd.isna(x) and pd.isna(y)) for x, y in zip(a, b)], dtype=bool)

    kernel = differs(frm["kernel"], to["kernel"]) | differs(frm["kernel_class"], to["kernel_class"])
    ma_f, ma_t = frm["tube_current_ma"].to_numpy(float), to["tube_current_ma"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        dose = (np.abs(ma_t - ma_f) / np.maximum(ma_f, ma_t) > DOSE_CHANGE_FRACTION) | \
            (np.abs(frm["kvp"].to_numpy(float) - to["kvp"].to_numpy(float)) > 0.5)
        thick = np.abs(frm["slice_thickness_mm"].to_numpy(float) - to["slice_thickness_mm"].to_numpy(float)) \
            > THICKNESS_CHANGE_MM
    out = pd.DataFrame({"kernel_changed": kernel, "dose_changed": np.nan_to_num(dose).astype(bool),
                        "thickness_changed": np.nan_to_num(thick).astype(bool)})
    names = np.array(["kernel", "dose", "slice thickness"])
    out["flags"] = [",".join(names[np.array(r)]) or None for r in out[["kernel_changed", "dose_changed",
                                                                      "thickness_changed"]].to_numpy()]
    return out
