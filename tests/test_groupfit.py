"""Grouped evaluation (``emphy fit --group-by``), shuffled controls, covariates, a categorical
``--target`` and ``scans.patient_key``. Fabricated runs whose groups carry signal that leaks
when folds are not grouped."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from emphy_dask.cli import main
from emphy_dask.models.cohort import CohortError, load_cohort
from emphy_dask.models.covariates import GroupingWarning, join_covariates, read_covariates, resolve_groups
from emphy_dask.models.fabricate import fabricate_run
from emphy_dask.models.grouping import inner_splits, outer_splits, ridge_path_predictions, shared_groups, tune_ridge
from emphy_dask.models.pipelines import ridge_pipeline
from emphy_dask.models.protocols import honest_protocol, ridge_protocol, shuffled_control
from emphy_dask.models.settings import FitSettings
from emphy_dask.models.target import fit_target

QUICK = FitSettings(n_bootstrap=0, repeats=1, folds=4)


@pytest.mark.parametrize("n_groups, stratify", [(30, True), (5, True), (30, False)])
def test_grouped_folds_never_share_a_group_outer_or_inner(n_groups, stratify):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(n_groups), 3)[rng.permutation(3 * n_groups)]
    y = rng.integers(0, 2, len(groups))
    splits, k, name = outer_splits(y, groups, 5, 3, seed=1, stratify=stratify)
    assert shared_groups(splits, groups) == 0
    assert ("leave-one-group-out" in name) == (n_groups < 10)
    covered = np.zeros(len(y), int)
    for tr, te in splits:
        covered[te] += 1
        inner = inner_splits(y[tr], groups[tr], 3, seed=2, stratify=stratify)
        assert len(inner) >= 2 and shared_groups(inner, groups[tr]) == 0
    assert (covered == len(splits) // k).all()          # every scan tested once per repeat
    # the control: ungrouped folds do put one group on both sides
    plain, _, _ = outer_splits(y, None, 5, 1, seed=1)
    assert shared_groups(plain, groups) > 0


def test_ridge_path_equals_refitting_the_pipeline_per_alpha():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 300)), rng.normal(size=30)
    X[:, 5] = 3.0                                             # a constant column
    X[:, :40] *= 5.0                                          # columns of unequal spread: the common scale keeps it
    alphas = [0.1, 10.0, 1e4]
    P = ridge_path_predictions(X[:22], y[:22], X[22:], alphas)
    for a, p in zip(alphas, P):
        np.testing.assert_allclose(p, ridge_pipeline(a).fit(X[:22], y[:22]).predict(X[22:]), atol=1e-10)
    # y = a strong linear signal: the smallest penalty wins; pure noise: the largest
    few = X[:, :8]                                            # fewer columns than scans: a penalty can win
    splits, _, _ = outer_splits(np.zeros(30), None, 3, 1, 0, stratify=False)
    assert tune_ridge(few, few[:, :3].sum(1), splits, alphas) == 0.1
    assert tune_ridge(few, rng.normal(size=30), splits, alphas) == 1e4


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """40 scans of 10 base anatomies; the label belongs to the anatomy, nothing else carries it."""
    out = fabricate_run(tmp_path_factory.mktemp("leaky") / "run", 40, seed=4, n_groups=10, group_signal=3.0,
                        n_classes=4, class_signal=0.0)
    c = load_cohort(out, ("middle",))
    info = join_covariates(c, read_covariates(out / "covariates.csv"))
    return out, c, info


def test_a_leaky_split_scores_high_and_the_grouped_one_does_not(leaky):
    _, c, info = leaky
    assert info["matched"] == 40 and info["missing"] == 0
    groups, g = resolve_groups(c, "base_key")
    assert g["by"] == "base_key" and g["n_groups"] == 10
    leak = honest_protocol(c.X, c.y, QUICK)["metrics"]
    fair = honest_protocol(c.X, c.y, QUICK, groups=groups)["metrics"]
    assert leak["auc"] >= 0.9                      # test scans' anatomies were in training: memorised
    assert fair["auc"] <= 0.65                     # no anatomy seen: nothing to find
    assert "group" in fair["cv"] and "group" not in leak["cv"]
    ctrl = shuffled_control(honest_protocol, c.X, c.y, QUICK, groups=groups, seed=0)
    assert ctrl["auc"] <= 0.65 and ctrl["permutation_seed"] == [0, 13]
    # a per-anatomy value (the label as a number) leaks into ridge's R2 the same way
    r_leak = ridge_protocol(c.X, c.y, c.y * 10.0, QUICK)["metrics"]
    r_fair = ridge_protocol(c.X, c.y, c.y * 10.0, QUICK, groups=groups)["metrics"]
    assert r_leak["r2"] >= 0.5 and r_fair["r2"] <= 0.05


def test_covariates_join_reports_missing_keys_and_refuses_bad_files(leaky, tmp_path):
    out, _, _ = leaky
    cov = pd.read_csv(out / "covariates.csv")
    cov.iloc[5:].to_parquet(tmp_path / "cov.parquet")
    c = load_cohort(out, ("middle",))
    info = join_covariates(c, read_covariates(tmp_path / "cov.parquet"), "cov.parquet")
    assert info["missing"] == 5 and info["missing_keys"] == [f"FAB-{i:05d}" for i in range(5)]
    assert c.scans["base_key"].isna().sum() == 5
    groups, g = resolve_groups(c, "base_key")
    assert g["scans_without_value"] == 5 and len(set(groups[:5])) == 5        # each its own group
    pd.concat([cov, cov.iloc[:1]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(CohortError, match="FAB-00000' appears 2 times"):
        read_covariates(tmp_path / "dup.csv")
    cov.drop(columns="scan_key").to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(CohortError, match="no scan_key column"):
        read_covariates(tmp_path / "nokey.csv")
    with pytest.raises(CohortError, match="--group-by site: no such column"):
        resolve_groups(c, "site")


def test_target_pattern_from_embeddings_beats_density_and_its_control(tmp_path):
    out = fabricate_run(tmp_path / "run", 48, seed=6, signal=1.0, n_groups=12, group_signal=0.5, n_classes=4,
                        class_signal=3.0)
    c = load_cohort(out, ("upper", "middle", "lower"))
    join_covariates(c, read_covariates(out / "covariates.csv"))
    groups, _ = resolve_groups(c, "base_key")
    res = fit_target(out, c, "pattern", groups, FitSettings(n_bootstrap=50, repeats=1, folds=4))
    m = res["metrics"]
    assert m["classes"] == ["bullous", "centrilobular", "panlobular", "paraseptal"]
    emb, dens = m["embeddings"], m["density_baseline"]
    assert emb["accuracy"] >= 0.8 and emb["balanced_accuracy"] >= 0.8
    assert emb["shuffled_control"]["accuracy"] <= 0.45
    assert dens["accuracy"] <= 0.5                 # density phenotypes carry no pattern here
    assert np.asarray(emb["confusion"]).sum() == 48 and np.trace(emb["confusion"]) >= 0.8 * 48
    assert emb["ci"]["accuracy"][0] <= emb["accuracy"] <= emb["ci"]["accuracy"][1]
    # per scan: the zones' contributions to the predicted class sum (with the bias) to its score
    per = res["per_scan"].set_index("scan_key")
    model_of = res["models"]
    assert len(model_of) == 4
    for i in (0, 17):
        key = c.keys[i]
        m_cls = model_of[f"target:pattern={per.at[key, 'final_predicted_class']}"]
        score = m_cls.score(c.X[i:i + 1], c.feature_names)[0]
        zones = sum(per.at[key, f"zone_contribution_{z}"] for z in c.zones)
        assert zones + m_cls.raw_weights()[1] == pytest.approx(score, abs=1e-8)
        scores = {n: mm.score(c.X[i:i + 1], c.feature_names)[0] for n, mm in model_of.items()}
        assert max(scores, key=scores.get).endswith(per.at[key, "final_predicted_class"])


def test_fit_warns_and_groups_by_patient_key_by_default(tmp_path, capsys):
    out = fabricate_run(tmp_path / "run", 24, seed=7, signal=1.0, n_groups=8, group_signal=0.5, n_classes=3,
                        class_signal=3.0)
    c = load_cohort(out, ("middle",))
    with pytest.warns(GroupingWarning, match="8 patients have several scans"):
        groups, g = resolve_groups(c, "")
    assert g["by"] == "patient_key" and g["default"] and g["n_groups"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupingWarning)
        assert resolve_groups(c, "scan_key")[0] is None          # asked for: no warning, no grouping
    rc = main(["fit", str(out), "--repeats", "1", "--folds", "3", "--bootstrap", "20", "--features", "zones",
               "--covariates", str(out / "covariates.csv"), "--target", "pattern"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "warning: 8 patients have several scans" in cap.err and "folds grouped by patient_key (8 groups)" in cap.out
    assert "target pattern (3 classes" in cap.out
    m = json.loads((out / "model" / "metrics.json").read_text())
    assert m["grouping"]["by"] == "patient_key"
    for name in ("paper_protocol", "nested_cv", "l1_logistic", "phenotypes_only"):
        assert "auc" in m[name]["shuffled_control"] and "group k-fold" in m[name]["cv"]
    assert "r2" in m["ridge_laa950"]["shuffled_control"]
    assert "shuffled control" in cap.out
    assert m["target"]["classes"] == ["centrilobular", "panlobular", "paraseptal"]
    assert m["target"]["embeddings"]["cv"].startswith("stratified group k-fold")
    # the report: grouping, controls, the target's table and, per scan, the zones behind its prediction
    from emphy_dask.report import build_report

    index = build_report(out).read_text()
    assert "folds grouped by <code>patient_key</code> (8 groups" in index
    assert "AUC, shuffled control" in index and "Target: pattern (3 classes" in index
    per = pd.read_parquet(out / "model" / "target_predictions.parquet")
    assert len(per) == 24 and {"zone_contribution_upper", "zone_contribution_lower"} <= set(per.columns)
    from emphy_dask.report.scan_pages import scan_page_path

    page = scan_page_path(out / "report", "FAB-00003").read_text()
    assert "pattern: predicted" in page and "contribution to the predicted class" in page


def test_patient_key_is_a_pseudonym_of_patient_id_shared_by_its_scans(tmp_path, monkeypatch):
    from emphy_dask.io import find_files, index_files
    from emphy_dask.io.dicom_index import patient_ref
    from emphy_dask.job.manifest import ManifestWriter, iter_manifest_file, tasks_from_index
    from emphy_dask.job.pseudonym import Pseudonymizer

    from .dicom_factory import write_series

    write_series(tmp_path / "in" / "A1" / "st" / "s", n=3, phi={"PatientID": "MRN-4711"})
    write_series(tmp_path / "in" / "A2" / "st" / "s", n=3, phi={"PatientID": "MRN-4711"})
    write_series(tmp_path / "in" / "B1" / "st" / "s", n=3, phi={"PatientID": "MRN-0815"})
    root = tmp_path / "in"
    files = find_files(root)
    tasks = {t.scan_key: t for t in tasks_from_index(files, index_files(files, root), root)}
    keys = {k: t.selection["patient_key"] for k, t in tasks.items()}
    assert keys["A1"] == keys["A2"] == patient_ref("MRN-4711") != keys["B1"]
    assert "4711" not in keys["A1"] and len(keys["A1"]) == 16
    w = ManifestWriter(tmp_path / "manifest.parquet", root)
    for t in tasks.values():
        w.add(t)
    w.close()
    back = {t.scan_key: t.selection["patient_key"] for t in iter_manifest_file(tmp_path / "manifest.parquet")}
    assert back == keys
    pseudo = Pseudonymizer(b"x" * 32, root)
    anon = [pseudo.task(tasks[k]).selection["patient_key"] for k in ("A1", "A2", "B1")]
    assert anon[0] == anon[1] != anon[2] and anon[0].startswith("anon-") and keys["A1"] not in anon[0]
    assert Pseudonymizer(b"y" * 32, root).task(tasks["A1"]).selection["patient_key"] != anon[0]


def test_tuning_skips_an_inner_split_whose_training_rows_hold_one_class():
    from emphy_dask.models.grouping import tune
    from emphy_dask.models.metrics import auc_score
    from emphy_dask.models.pipelines import L1_CS, l1_pipeline

    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(6, int), np.ones(6, int)]
    X = rng.normal(size=(12, 5)) + y[:, None]
    one_class = (np.arange(6), np.arange(6, 12))              # trains on negatives only: skipped
    halves = (np.r_[0:3, 6:9], np.r_[3:6, 9:12])
    C = tune(l1_pipeline(), "model__C", L1_CS, X, y, [one_class, halves, halves[::-1]], auc_score)
    assert C in L1_CS
