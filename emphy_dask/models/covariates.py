"""Covariates joined to a cohort (``--covariates``) and the grouping of its folds (``--group-by``).

A covariates file (CSV or Parquet) holds one row per ``scan_key`` and any columns: a base
anatomy (``base_key``), an inserted ``pattern``, a site. They join the cohort's ``scans`` rows,
so ``--group-by`` and ``--target`` can name them like any ``scans/`` column. Scans of the cohort
the file does not list are reported (count and the first keys), never silently dropped.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .cohort import Cohort, CohortError

NO_GROUPING = ("scan_key", "none")
DEFAULT_GROUP = "patient_key"


class GroupingWarning(UserWarning):
    """Several scans per patient and no ``--group-by``: folds are grouped by patient_key."""


def read_covariates(path) -> pd.DataFrame:
    """The covariates table (CSV or Parquet) with a unique ``scan_key`` column; a one-line error otherwise."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, dtype={"scan_key": str})
    except (OSError, ValueError) as exc:
        raise CohortError(f"{path}: cannot read the covariates file ({type(exc).__name__}: {exc})") from None
    if "scan_key" not in df.columns:
        raise CohortError(f"{path}: the covariates file has no scan_key column (has {', '.join(map(str, df.columns))})")
    dup = df["scan_key"][df["scan_key"].duplicated()]
    if len(dup):
        raise CohortError(f"{path}: scan_key {dup.iloc[0]!r} appears {int((df['scan_key'] == dup.iloc[0]).sum())} "
                          "times in the covariates file (one row per scan)")
    df["scan_key"] = df["scan_key"].astype(str)
    return df


def join_covariates(c: Cohort, cov: pd.DataFrame, source: str = "covariates") -> dict:
    """Add ``cov``'s columns to ``c.scans`` (in place, by scan_key); return what happened.

    A covariate column that ``scans/`` already has replaces it (reported). Returns ``{"file",
    "columns", "replaced", "matched", "missing", "missing_keys" (first 20)}``.
    """
    cols = [col for col in cov.columns if col != "scan_key"]
    replaced = [col for col in cols if col in c.scans.columns]
    table = cov.set_index("scan_key")
    keys = pd.Index(c.keys.astype(str))
    found = keys.isin(table.index)
    joined = table.reindex(keys)
    scans = c.scans.drop(columns=replaced).reset_index(drop=True)
    for col in cols:
        scans[col] = joined[col].to_numpy()
    c.scans = scans
    missing = keys[~found].tolist()
    return {"file": source, "columns": cols, "replaced": replaced, "matched": int(found.sum()),
            "missing": len(missing), "missing_keys": missing[:20]}


def resolve_groups(c: Cohort, group_by: str = "", warn=True) -> tuple[np.ndarray | None, dict]:
    """The group of every scan (or None: ungrouped folds) and the grouping's description.

    ``group_by``: a column of ``c.scans`` (after covariates); ``""``: ``patient_key`` when some
    patient has several scans (with a ``GroupingWarning``), else ungrouped; ``"scan_key"`` or
    ``"none"``: ungrouped. A scan without a value is a group of its own (reported).
    """
    if group_by in NO_GROUPING:
        return None, {"by": None, "reason": f"--group-by {group_by}: every scan is its own group"}
    if not group_by:
        if DEFAULT_GROUP not in c.scans.columns or c.scans[DEFAULT_GROUP].isna().all():
            return None, {"by": None, "reason": "no --group-by and no patient_key: every scan is its own group"}
        pk = c.scans[DEFAULT_GROUP]
        if pk.dropna().duplicated().sum() == 0:
            return None, {"by": None, "reason": "no --group-by; one scan per patient_key: every scan is its own group"}
        group_by = DEFAULT_GROUP
        n_multi = int((pk.value_counts() > 1).sum())
        msg = (f"{n_multi} patients have several scans and no --group-by was given: folds are grouped by "
               f"{DEFAULT_GROUP} (pass --group-by to choose, --group-by scan_key to split scans freely)")
        if warn:
            warnings.warn(msg, GroupingWarning, stacklevel=2)
        default = True
    else:
        if group_by not in c.scans.columns:
            raise CohortError(f"--group-by {group_by}: no such column in scans/ or the covariates "
                              f"(scans columns include patient_key, kernel_class, manufacturer; add others with "
                              f"--covariates)")
        default = False
    values = c.scans[group_by]
    missing = values.isna().to_numpy()
    groups = np.where(missing, "scan:" + pd.Series(c.keys.astype(str)).to_numpy(object),
                      values.astype(str).to_numpy(object)).astype(str)
    sizes = pd.Series(groups).value_counts()
    info = {"by": group_by, "default": default, "n_groups": int(len(sizes)), "n_scans": int(len(groups)),
            "largest_group": int(sizes.max()), "scans_without_value": int(missing.sum())}
    if default:
        info["reason"] = msg
    return groups, info
