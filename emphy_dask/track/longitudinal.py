"""Per patient and pair of scans: change and annual rate of the lung phenotypes, PD15 adjusted
to a reference lung volume, whether the change exceeds repeatability, and the embeddings' drift.

``longitudinal_table`` is pure (DataFrames in, DataFrame out); ``track_run`` reads a run's
tables and writes ``longitudinal/`` (schema ``schemas/longitudinal.v1.json``) and ``track/``.

Repeatability (a change smaller than this is not told from measurement noise):

- PD15 volume-adjusted: a fall of more than 9.7 % of the baseline value. Diciotti et al., Acad
  Radiol 2011;18:1403 (ITALUNG and MILD screening low-dose CT repeated after 3 months): the
  95 % limits of agreement of volume-corrected Perc15 were -9.7 to +10.7 % (ITALUNG) and
  -14.7 to +17.3 % (MILD); the narrower bound is used.
- LAA%-950: 1.6 points. Chong et al., Proc SPIE 2011;7963:796339 (emphysema patients scanned
  twice a week apart): mean absolute difference 0.66 points; for normally distributed
  differences the 95 % limit is 1.96 x 0.66 / sqrt(2/pi) = 1.62.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..phenotypes.regions import REGIONS
from .adjust import pd15_g_l, regression_adjust, regression_slope, sponge_adjust
from .pairs import DAYS_PER_YEAR, make_pairs, order_scans, pair_flags

PD15_REPEATABILITY_FRACTION = 0.097
LAA950_REPEATABILITY_PCT = 1.62
#: Phenotype regions with a zone embedding of the same lung part.
REGION_ZONE = {"WholeLung": "whole", "UpperThird": "upper", "MiddleThird": "middle", "LowerThird": "lower"}
_PHENO = ["laa950_pct", "perc15_hu", "hu_mean", "volume_l"]
_SCAN_COLS = ["scan_key", "kernel", "kernel_class", "tube_current_ma", "kvp", "slice_thickness_mm"]


def _grids(pheno: pd.DataFrame, keys: np.ndarray, regions: np.ndarray, source: str) -> dict:
    """{column: (n scans, n regions) array} of one hu_source's phenotypes (NaN where absent): the
    pairs then read their values by position, which stays fast at millions of rows."""
    p = pheno[pheno["hu_source"] == source]
    si = pd.Index(keys).get_indexer(p["scan_key"])
    ri = pd.Index(regions).get_indexer(p["region"])
    ok = (si >= 0) & (ri >= 0)
    out = {}
    for col in _PHENO:
        grid = np.full((len(keys), len(regions)), np.nan)
        grid[si[ok], ri[ok]] = p[col].to_numpy(float)[ok]
        out[col] = grid
    return out


def longitudinal_table(scans: pd.DataFrame, pheno: pd.DataFrame, *, reference: str | float = "first",
                       embeddings: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per patient, pair of scans and region.

    Parameters
    ----------
    scans : the run's ``scans`` rows (scan_key, status, patient_key, study_date_shifted, kernel,
        kernel_class, tube_current_ma, kvp, slice_thickness_mm).
    pheno : the run's ``phenotypes`` rows (scan_key, region, hu_source, laa950_pct, perc15_hu,
        hu_mean, volume_l). Harmonised HU are used for a pair when both scans have them.
    reference : "first" (each patient's first scan's lung volume) or a whole-lung volume in
        litres (each region then at its share of the first scan's lungs).
    embeddings : optional {zone: {scan_key: (d,) vector}}; gives ``embedding_distance`` and
        ``embedding_cosine`` for the regions of ``REGION_ZONE``.

    Returns
    -------
    (table, summary): the table in ``longitudinal`` schema order, and counts, scans left out
    with their reason, the regression slopes per region.
    """
    placed, left_out = order_scans(scans)
    pairs = make_pairs(placed)
    regions = np.array(sorted(pheno["region"].unique(), key=_region_order)) if len(pheno) else np.array([], object)
    n_pairs, n_reg = len(pairs), len(regions)
    fi = np.repeat(pairs["from_index"].to_numpy(), n_reg)
    ti = np.repeat(pairs["to_index"].to_numpy(), n_reg)
    keys = placed["scan_key"].to_numpy(object)
    # repeated strings as categoricals (codes into the scans/regions): millions of rows stay cheap
    key_cat = pd.Categorical(keys)
    pk_codes, pk_uniques = pd.factorize(placed["patient_key"])
    dates = placed["date"].to_numpy()
    date_cat = pd.Categorical(pd.to_datetime(dates).strftime("%Y-%m-%d"))
    ri = np.tile(np.arange(n_reg), n_pairs)
    t = pd.DataFrame({"patient_key": pd.Categorical.from_codes(pk_codes[fi], pk_uniques.astype(str)),
                      "pair_kind": pd.Categorical(np.repeat(pairs["pair_kind"].to_numpy(object), n_reg)),
                      "scan_key_from": pd.Categorical.from_codes(key_cat.codes[fi], key_cat.categories),
                      "scan_key_to": pd.Categorical.from_codes(key_cat.codes[ti], key_cat.categories),
                      "region": pd.Categorical.from_codes(ri, regions.astype(str)) if n_reg else
                      pd.Categorical([]),
                      "date_from": pd.Categorical.from_codes(date_cat.codes[fi], date_cat.categories),
                      "date_to": pd.Categorical.from_codes(date_cat.codes[ti], date_cat.categories)})
    t["interval_days"] = ((dates[ti] - dates[fi]) / np.timedelta64(1, "D")).astype(np.int32)
    years = t["interval_days"].to_numpy(float) / DAYS_PER_YEAR
    years = np.where(years > 0, years, np.nan)             # same day: a change, no rate

    raw, har = _grids(pheno, keys, regions, "raw"), _grids(pheno, keys, regions, "harmonized")
    use_h = np.isfinite(har["perc15_hu"][fi, ri]) & np.isfinite(har["perc15_hu"][ti, ri])
    t["hu_source"] = pd.Categorical.from_codes(use_h.astype(np.int8), ["raw", "harmonized"])
    vf = {c: np.where(use_h, har[c][fi, ri], raw[c][fi, ri]) for c in _PHENO}
    vt = {c: np.where(use_h, har[c][ti, ri], raw[c][ti, ri]) for c in _PHENO}
    vf["volume_l"], vt["volume_l"] = raw["volume_l"][fi, ri], raw["volume_l"][ti, ri]   # the mask is the same

    for name, col, unit in (("laa950", "laa950_pct", "pct"), ("perc15", "perc15_hu", "hu"), ("mld", "hu_mean", "hu")):
        a, b = vf[col], vt[col]
        t[f"{name}_from_{unit}"], t[f"{name}_to_{unit}"], t[f"{name}_change_{unit}"] = a, b, b - a
        t[f"{name}_rate_{unit}_per_year"] = (b - a) / years
    vol_f, vol_t = vf["volume_l"], vt["volume_l"]
    t["volume_from_l"], t["volume_to_l"] = vol_f, vol_t
    t["volume_change_pct"] = 100.0 * (vol_t - vol_f) / vol_f

    t["reference_volume_l"] = _reference_grid(placed, raw["volume_l"], regions, reference)[fi, ri]
    pf, pt = pd15_g_l(t["perc15_from_hu"]), pd15_g_l(t["perc15_to_hu"])
    t["pd15_from_g_l"], t["pd15_to_g_l"] = pf, pt
    sf, st = sponge_adjust(pf, vol_f, t["reference_volume_l"]), sponge_adjust(pt, vol_t, t["reference_volume_l"])
    t["pd15_sponge_from_g_l"], t["pd15_sponge_to_g_l"], t["pd15_sponge_change_g_l"] = sf, st, st - sf
    t["pd15_sponge_rate_g_l_per_year"] = (st - sf) / years
    slopes = {r: regression_slope(pd15_g_l(raw["perc15_hu"][:, j]), raw["volume_l"][:, j], placed["years"],
                                  pk_codes) for j, r in enumerate(regions)}
    c = np.array([slopes[r][0] for r in regions])[ri] if n_reg else np.zeros(0)
    rf = regression_adjust(pf, vol_f, t["reference_volume_l"], c)
    rt = regression_adjust(pt, vol_t, t["reference_volume_l"], c)
    t["pd15_regression_change_g_l"] = rt - rf
    t["pd15_regression_rate_g_l_per_year"] = (rt - rf) / years
    t["regression_slope_g_l"] = c
    with np.errstate(invalid="ignore", divide="ignore"):
        t["pd15_exceeds_repeatability"] = np.abs(st - sf) / sf > PD15_REPEATABILITY_FRACTION
        t["laa950_exceeds_repeatability"] = np.abs(t["laa950_change_pct"].to_numpy(float)) > LAA950_REPEATABILITY_PCT
    sc = scans.drop_duplicates("scan_key").set_index("scan_key").reindex(columns=_SCAN_COLS[1:])
    pf_keys, pt_keys = keys[pairs["from_index"].to_numpy()], keys[pairs["to_index"].to_numpy()]
    flags = pair_flags(sc.reindex(pf_keys).reset_index(drop=True), sc.reindex(pt_keys).reset_index(drop=True))
    for col in flags:
        values = np.repeat(flags[col].to_numpy(), n_reg)
        t[col] = pd.Categorical(values) if col == "flags" else values
    t["embedding_distance"], t["embedding_cosine"] = _drift(embeddings, t)
    t["note"] = pd.Categorical.from_codes(np.where(t["interval_days"].to_numpy() == 0, 0, -1),
                                          ["same day: a repeat scan (its change is measurement noise); no rate"])
    summary = {"patients": int(placed["patient_key"].nunique()), "scans_placed": int(len(placed)),
               "patients_with_pairs": int(pairs["patient_key"].nunique()), "pairs": int(n_pairs),
               "same_day_pairs": int((t.drop_duplicates(["scan_key_from", "scan_key_to"])["interval_days"] == 0).sum()),
               "scans_left_out": left_out.to_dict("records"),
               "regression_slope_g_l": {r: {"slope": slopes[r][0], "patients": slopes[r][1]} for r in regions},
               "reference": reference}
    return t, summary


def _region_order(name: str) -> tuple:
    order = list(REGIONS) + ["RightUpperLobe", "RightMiddleLobe", "RightLowerLobe", "LeftUpperLobe", "LeftLowerLobe"]
    return (order.index(name) if name in order else len(order), name)


def _reference_grid(placed: pd.DataFrame, volume_grid: np.ndarray, regions: np.ndarray, reference) -> np.ndarray:
    """(n scans, n regions) reference volume of each scan's patient: its first scan's region
    volumes, or their shares of a stated whole-lung volume."""
    first = placed.groupby("patient_key", sort=False)["visit"].transform("idxmin").to_numpy()
    ref = volume_grid[first]
    if reference == "first":
        return ref
    if "WholeLung" not in list(regions):
        raise ValueError("a stated reference volume needs WholeLung phenotypes")
    whole = ref[:, list(regions).index("WholeLung")]
    return ref * (float(reference) / whole)[:, None]


def _drift(embeddings: dict | None, t: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and cosine similarity of the two scans' zone embeddings (NaN without)."""
    dist = np.full(len(t), np.nan)
    cos = np.full(len(t), np.nan)
    if not embeddings:
        return dist, cos
    for region, zone in REGION_ZONE.items():
        vecs = embeddings.get(zone) or {}
        rows = np.flatnonzero((t["region"] == region).to_numpy())
        for start in range(0, rows.size, 4096):               # bounded memory on large cohorts
            r = rows[start:start + 4096]
            have = np.array([a in vecs and b in vecs for a, b in zip(t["scan_key_from"].to_numpy()[r],
                                                                   t["scan_key_to"].to_numpy()[r])], bool)
            r = r[have]
            if r.size == 0:
                continue
            a = np.stack([vecs[k] for k in t["scan_key_from"].to_numpy()[r]]).astype(np.float64)
            b = np.stack([vecs[k] for k in t["scan_key_to"].to_numpy()[r]]).astype(np.float64)
            dist[r] = np.linalg.norm(a - b, axis=1)
            cos[r] = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return dist, cos
