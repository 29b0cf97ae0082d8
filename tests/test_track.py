"""emphy track: dates, patients, pairs, volume adjustment, and a synthetic progression end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from emphy_dask.io.dicom_index import shifted_date
from emphy_dask.tables import read_frame
from emphy_dask.track import longitudinal_table, order_scans, regression_slope, sponge_adjust
from emphy_dask.track.adjust import pd15_g_l, regression_adjust
from tests.jobutil import extract_cmd


def _scans(rows):
    base = {"status": "ok", "kernel": "STANDARD", "kernel_class": "standard", "tube_current_ma": 100.0,
            "kvp": 120.0, "slice_thickness_mm": 1.0}
    return pd.DataFrame([{**base, **r} for r in rows])


def _pheno(key, laa, perc15, mld, vol, source="raw", region="WholeLung"):
    return {"scan_key": key, "region": region, "hu_source": source, "laa950_pct": laa, "perc15_hu": perc15,
            "hu_mean": mld, "volume_l": vol}


def test_shifted_dates_keep_intervals_within_a_patient_and_hide_the_day():
    a, b = shifted_date("20100301", "PAT-1"), shifted_date("20110301", "PAT-1")
    assert (pd.Timestamp(b) - pd.Timestamp(a)).days == 365                 # interval exact
    assert a != "2010-03-01" and pd.Timestamp("2009-03-01") <= pd.Timestamp(a) <= pd.Timestamp("2010-03-01")
    offsets = {(pd.Timestamp("2010-03-01") - pd.Timestamp(shifted_date("20100301", f"P{i}"))).days for i in range(50)}
    assert len(offsets) > 40                                                # patients get their own offsets
    assert shifted_date("2010.03.01", "PAT-1") == a                          # ACR-NEMA spelling
    assert shifted_date("", "PAT-1") is None and shifted_date("20101399", "PAT-1") is None


def test_sponge_and_regression_adjustments():
    assert float(pd15_g_l(-910)) == 90.0
    assert float(sponge_adjust(100.0, 5.5, 5.0)) == pytest.approx(110.0)
    rng = np.random.default_rng(3)
    n_pat, c_true = 40, -80.0
    patient = np.repeat(np.arange(n_pat), 3)
    years = np.tile([0.0, 1.0, 2.0], n_pat) + rng.uniform(-0.1, 0.1, patient.size)
    vol = rng.uniform(4.0, 6.5, patient.size)
    pd15 = rng.normal(90, 10, n_pat)[patient] - 2.0 * years + c_true * np.log(vol) + rng.normal(0, 0.3, patient.size)
    c, n = regression_slope(pd15, vol, years, patient)
    assert n == n_pat and c == pytest.approx(c_true, abs=2.0)
    adj = regression_adjust(pd15, vol, 5.0, c)
    # adjusted to one volume, each patient's series is its own level minus 2 g/L per year
    resid = adj - pd.Series(adj).groupby(patient).transform("mean") + 2.0 * (years - pd.Series(years).groupby(patient)
                                                                            .transform("mean"))
    assert np.abs(resid).max() < 2.0
    assert np.isnan(regression_slope(pd15[:6], vol[:6], years[:6], patient[:6])[0])   # 2 patients: not estimable


def test_patients_are_never_mixed_and_odd_scans_get_a_reason():
    scans = _scans([
        {"scan_key": "P1/a", "patient_key": "pt-1", "study_date_shifted": "2010-01-01"},
        {"scan_key": "P1/b", "patient_key": "pt-1", "study_date_shifted": "2011-01-01"},
        {"scan_key": "P10/a", "patient_key": "pt-10", "study_date_shifted": "2010-06-01"},   # same key prefix
        {"scan_key": "P10/b", "patient_key": "pt-10", "study_date_shifted": "2010-06-01"},   # same day
        {"scan_key": "P10/c", "patient_key": "pt-10", "study_date_shifted": None},           # no date
        {"scan_key": "X", "patient_key": None, "study_date_shifted": "2010-01-01"},           # no PatientID
        {"scan_key": "F", "patient_key": "pt-1", "study_date_shifted": "2012-01-01", "status": "failed"},
    ])
    pheno = pd.DataFrame([_pheno(k, 5.0 + i, -920.0 - i, -860.0, 5.0) for i, k in
                          enumerate(["P1/a", "P1/b", "P10/a", "P10/b", "P10/c", "X"])])
    placed, left = order_scans(scans)
    assert dict(zip(left["scan_key"], left["reason"])) == {
        "P10/c": "no study date in its headers: cannot be ordered in time",
        "X": "no PatientID in its headers: cannot be paired with other scans"}
    t, s = longitudinal_table(scans, pheno)
    pairs = set(zip(t["scan_key_from"], t["scan_key_to"]))
    assert pairs == {("P1/a", "P1/b"), ("P10/a", "P10/b")}
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in pairs)
    same = t[t["scan_key_from"] == "P10/a"].iloc[0]
    assert same["interval_days"] == 0 and np.isnan(same["laa950_rate_pct_per_year"]) and "same day" in same["note"]
    assert s["same_day_pairs"] == 1 and s["patients"] == 2 and len(s["scans_left_out"]) == 2


def test_changes_rates_adjustment_flags_and_harmonised_hu():
    scans = _scans([
        {"scan_key": "a", "patient_key": "pt", "study_date_shifted": "2010-01-01"},
        {"scan_key": "b", "patient_key": "pt", "study_date_shifted": "2012-01-01", "kernel": "LUNG",
         "kernel_class": "sharp", "tube_current_ma": 40.0},
        {"scan_key": "c", "patient_key": "pt", "study_date_shifted": "2014-01-01"},
    ])
    pheno = pd.DataFrame([
        _pheno("a", 4.0, -910.0, -850.0, 5.0), _pheno("b", 9.0, -930.0, -870.0, 5.5),
        _pheno("c", 8.0, -925.0, -860.0, 4.5),
        _pheno("b", 6.0, -915.0, -865.0, 5.5, source="harmonized"),      # only b has harmonised rows
        _pheno("c", 7.5, -920.0, -861.0, 4.5, source="harmonized"),
    ])
    t, _ = longitudinal_table(scans, pheno)
    ab = t[(t["scan_key_from"] == "a") & (t["pair_kind"] == "interval")].iloc[0]
    assert ab["hu_source"] == "raw" and ab["interval_days"] == 730
    assert ab["laa950_change_pct"] == pytest.approx(5.0) and ab["laa950_rate_pct_per_year"] == pytest.approx(5 / 1.9986,
                                                                                                            rel=1e-3)
    assert ab["perc15_change_hu"] == pytest.approx(-20.0) and ab["mld_change_hu"] == pytest.approx(-20.0)
    assert ab["volume_change_pct"] == pytest.approx(10.0)
    # sponge: b's 70 g/L at 5.5 L is 77 g/L at the first scan's 5.0 L
    assert ab["reference_volume_l"] == 5.0 and ab["pd15_sponge_to_g_l"] == pytest.approx(77.0)
    assert ab["pd15_sponge_change_g_l"] == pytest.approx(-13.0)
    assert bool(ab["pd15_exceeds_repeatability"]) and bool(ab["laa950_exceeds_repeatability"])
    assert ab["kernel_changed"] and ab["dose_changed"] and not ab["thickness_changed"] and ab["flags"] == "kernel,dose"
    bc = t[t["scan_key_from"] == "b"].iloc[0]
    assert bc["hu_source"] == "harmonized" and bc["laa950_change_pct"] == pytest.approx(1.5)
    over = t[t["pair_kind"] == "overall"]
    assert list(zip(over["scan_key_from"], over["scan_key_to"])) == [("a", "c")]
    stated, _ = longitudinal_table(scans, pheno, reference=6.0)
    assert stated.loc[stated["scan_key_from"] == "a", "pd15_sponge_from_g_l"].iloc[0] == pytest.approx(90 * 5 / 6)


@pytest.fixture(scope="module")
def progression_run(tmp_path_factory):
    """3 patients x 3 yearly scans of growing emphysema at +-15 % inspiration, through extract."""
    from emphy_dask.synth.progression import synth_progression

    base = tmp_path_factory.mktemp("prog")
    truth = synth_progression(base / "cohort", 3, 3, seed=4, size="small")
    job = base / "job.toml"
    job.write_text('[embed]\nbackbone = "none"\n[cluster]\nworkers = 2\nmemory_limit = "3GiB"\n'
                   'dashboard_address = "127.0.0.1:0"\n')
    out = base / "out"
    proc = subprocess.run(extract_cmd(base / "cohort" / "dicom", out, "--job", str(job)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return truth, out


def test_track_a_synthetic_progression_end_to_end(progression_run, tmp_path):
    truth, out = progression_run
    scans = read_frame(out, "scans").set_index("scan_key")
    assert (scans["status"] == "ok").all()
    # one patient key per synthetic patient, never the raw PatientID
    by_patient = scans.groupby(truth.set_index("scan_key").loc[scans.index, "patient_id"].to_numpy())["patient_key"]
    assert by_patient.nunique().eq(1).all() and scans["patient_key"].nunique() == 3
    assert not scans["patient_key"].str.contains("PROG").any()
    proc = subprocess.run([sys.executable, "-m", "emphy_dask.cli", "track", str(out), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 patients, 3 with 2+ scans, 9 pairs" in proc.stdout
    t = read_frame(tmp_path, "longitudinal")
    whole = t[(t["region"] == "WholeLung") & (t["pair_kind"] == "interval")]
    tr = truth.set_index("scan_key")
    dates = pd.to_datetime(tr["study_date"])
    assert list(whole["interval_days"]) == [(dates[b] - dates[a]).days for a, b in
                                            zip(whole["scan_key_from"], whole["scan_key_to"])]
    true_change = tr.loc[whole["scan_key_to"], "true_perc15_ref_hu"].to_numpy() - \
        tr.loc[whole["scan_key_from"], "true_perc15_ref_hu"].to_numpy()
    raw_err = np.abs(whole["perc15_change_hu"].to_numpy() - true_change)
    reg_err = np.abs(whole["pd15_regression_change_g_l"].to_numpy() - true_change)
    assert reg_err.mean() < raw_err.mean() / 2, (reg_err, raw_err)           # adjustment removes inspiration
    summary = json.loads((tmp_path / "track" / "track.json").read_text())
    assert summary["pairs"] == 9 and (tmp_path / "track" / "index.html").read_text().count("<img") >= 4


def test_track_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "emphy_dask.cli", "track", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "not an extract run" in proc.stderr and "Traceback" not in proc.stderr
