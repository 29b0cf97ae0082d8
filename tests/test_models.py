"""Driver-side models: leakage detector, determinism, saved-model round trip, predict's refusal,
metrics against scikit-learn, settings. Runs on tables fabricated from random arrays."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from emphy_dask.cli import main
from emphy_dask.errors import ConfigError
from emphy_dask.jobfile import load_fit_settings, load_jobfile
from emphy_dask.models.cohort import CohortError, balanced_subset, load_cohort
from emphy_dask.models.fabricate import fabricate_run
from emphy_dask.models.fit import fit_run
from emphy_dask.models.metrics import ap_score, auc_score, with_intervals
from emphy_dask.models.pipelines import (RIDGE_ALPHAS, CommonScaler, TTestSelector, l1_pipeline, paper_pipeline,
                                        phenotype_pipeline, ridge_pipeline)
from emphy_dask.models.predict import RunMismatch, predict_run
from emphy_dask.models.saved import load_models
from emphy_dask.models.settings import FitSettings
from emphy_dask.tables import read_frame

FAST = FitSettings(n_bootstrap=200)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    """80 scans of pure noise: random labels, random embeddings; fitted once."""
    out = fabricate_run(tmp_path_factory.mktemp("noise") / "run", 80, seed=1, signal=0.0)
    metrics = fit_run(out, FAST, figures_on=False)
    return out, metrics


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory):
    """40 scans whose LAA%-950 (hence the label) moves 10 embedding channels."""
    out = fabricate_run(tmp_path_factory.mktemp("signal") / "run", 40, seed=2, signal=1.0, n_excluded=4)
    metrics = fit_run(out, FAST)
    return out, metrics


def test_leakage_detector_on_pure_noise(noise_run):
    _, m = noise_run
    honest, paper = m["nested_cv"], m["paper_protocol"]
    assert 0.35 <= honest["auc"] <= 0.65, honest["auc"]
    assert paper["auc"] >= 0.85 and paper["auc"] - honest["auc"] >= 0.25, (paper["auc"], honest["auc"])
    assert paper["optimistic"] is True and honest["optimistic"] is False
    assert "optimistic" in paper["protocol"]
    # the same holds on the full cohort and for the L1 model (no t-test, C chosen inside)
    assert 0.35 <= m["full_cohort"]["nested_cv"]["auc"] <= 0.65
    assert 0.3 <= m["l1_logistic"]["auc"] <= 0.7
    # noise explains no LAA%: out-of-fold R^2 at or below 0
    assert m["ridge_laa950"]["r2"] < 0.05


def test_real_signal_is_found_by_the_honest_protocol(signal_run):
    out, m = signal_run
    assert m["nested_cv"]["auc"] >= 0.85, m["nested_cv"]["auc"]
    assert m["nested_cv"]["ci_low"] > 0.7
    assert m["phenotypes_only"]["auc"] >= 0.95          # the label is a density threshold: circularity
    sel = pd.read_parquet(out / "model" / "selected_features.parquet")
    # the signal channels 0..9 lead the paper model's t-test ranking, and correlate with LAA%
    top = sel.head(10)
    assert set(top["channel"].head(3)) <= set(range(10)) and (top["channel"] < 10).sum() >= 7
    signal = top[top["channel"] < 10]
    assert (signal["corr_laa950"] > 0.5).all() and (signal["t"] > 0).all() and signal["p"].max() < 1e-3
    # channels a fold's own t-test keeps picking are the signal ones
    assert signal["honest_selection_frequency"].min() >= 0.5


def test_metrics_json_carries_both_protocols_with_intervals(signal_run):
    out, _ = signal_run
    m = json.loads((out / "model" / "metrics.json").read_text())
    for key in ("paper_protocol", "nested_cv"):
        for metric in ("auc", "ap", "accuracy"):
            lo, hi = m[key]["ci"][metric]
            assert lo <= m[key][metric] <= hi
        assert m[key]["ci_low"] <= m[key]["auc"] <= m[key]["ci_high"]
    for key in ("sensitivity", "specificity"):
        assert 0 <= m["nested_cv"][key] <= 1 and len(m["nested_cv"]["ci"][key]) == 2
    assert m["full_cohort"]["class_weight"] == "balanced"
    assert m["cohort"]["by_status"] == {"ok": 40, "excluded": 4}
    assert m["cohort"]["balanced_subset"]["n"] == 2 * min(m["cohort"]["positive"], m["cohort"]["negative"])
    # manufacturers vary in the fabricated run: a breakdown per manufacturer and per kernel class
    assert set(m["breakdown"]["manufacturer"]) == {"SIEMENS", "GE MEDICAL SYSTEMS", "Philips"}
    assert set(m["breakdown"]["kernel_class"]) == {"standard", "sharp", "soft"}
    assert len(m["pca"]["explained_variance_ratio"]) == 10 and m["tsne"]["perplexity"] <= (40 - 1) / 3
    assert m["versions"]["scikit_learn"] and m["seeds"]["folds"] == 0
    oof = pd.read_parquet(out / "model" / "oof_predictions.parquet")
    honest = oof[(oof["model"] == "nested_cv") & (oof["subset"] == "full")]
    assert len(honest) == 40 and honest["prediction"].between(0, 1).all()
    for f in ("roc.png", "pr.png", "importance.png", "pca.png", "tsne.png", "correlation.png"):
        assert (out / "model" / "figures" / f).stat().st_size > 5000


def test_fit_is_deterministic_with_a_fixed_seed(tmp_path):
    out = fabricate_run(tmp_path / "run", 30, seed=3, signal=0.7)
    s = FitSettings(n_bootstrap=100, repeats=2)
    first = fit_run(out, s, figures_on=False)
    model_a = (out / "model" / "model.json").read_text()
    oof_a = pd.read_parquet(out / "model" / "oof_predictions.parquet")
    second = fit_run(out, s, figures_on=False)
    for m in (first, second):
        m.pop("timing_s")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert (out / "model" / "model.json").read_text() == model_a
    pd.testing.assert_frame_equal(pd.read_parquet(out / "model" / "oof_predictions.parquet"), oof_a)
    other = fit_run(out, FitSettings(n_bootstrap=100, repeats=2, seed=1), figures_on=False)
    assert other["nested_cv"]["auc"] != first["nested_cv"]["auc"]      # the seed matters: folds change


def test_saved_models_round_trip_to_the_fitted_pipelines(signal_run):
    """model.json, read back (no pickle), predicts what the scikit-learn pipelines predict."""
    out, _ = signal_run
    models, run = load_models(out / "model")
    c = load_cohort(out, run["zones"])
    bal = balanced_subset(c.y, 0)
    pipes = {"paper": paper_pipeline().fit(c.X[bal], c.y[bal]),
             "full_weighted": paper_pipeline(class_weight="balanced").fit(c.X, c.y)}
    for name, pipe in pipes.items():
        np.testing.assert_allclose(models[name].predict(c.X, c.feature_names), pipe.predict_proba(c.X)[:, 1],
                                   rtol=1e-10, atol=1e-12)
        assert len(models[name].features) == 20
    ridge = ridge_pipeline(models["ridge_laa950"].info["alpha"]).fit(c.X, c.scans["laa950_pct"].to_numpy(float))
    np.testing.assert_allclose(models["ridge_laa950"].predict(c.X, c.feature_names), ridge.predict(c.X), rtol=1e-9)
    names = ["laa950_pct", "hu_mean", "perc15_hu"]
    pheno = phenotype_pipeline().fit(c.pheno[bal], c.y[bal])
    np.testing.assert_allclose(models["phenotypes_only"].predict(c.pheno, names), pheno.predict_proba(c.pheno)[:, 1],
                               rtol=1e-10)
    l1 = models["l1_logistic"]
    assert 0 < len(l1.features) < c.X.shape[1] and all(v != 0 for v in l1.coef)
    ref = l1_pipeline(l1.info["C"]).fit(c.X[bal], c.y[bal])
    np.testing.assert_allclose(l1.predict(c.X, c.feature_names), ref.predict_proba(c.X)[:, 1], rtol=1e-8)
    # contributions sum to score - intercept
    contrib = models["paper"].contributions(c.X, c.feature_names)
    np.testing.assert_allclose(contrib.sum(1) + models["paper"].intercept, models["paper"].score(c.X, c.feature_names))
    assert "pickle" not in (out / "model" / "model.json").read_text()


def test_predict_scores_a_matching_run_and_refuses_another_backbone_or_weights(signal_run, tmp_path):
    out, _ = signal_run
    models, run = load_models(out / "model")
    same = fabricate_run(tmp_path / "same", 12, seed=9, signal=1.0, weights_sha256=run["weights_sha256"])
    path, counts = predict_run(out / "model", same)
    assert counts == {"scored": 12, "without_inputs": 0} and path.parent.name == "predictions"
    pred = read_frame(same, "predictions")
    c = load_cohort(same, run["zones"])
    np.testing.assert_allclose(pred.set_index("scan_key").loc[c.keys, "probability"],
                               models["paper"].predict(c.X, c.feature_names), rtol=1e-9)
    first = json.loads(pred["contributions"][0])
    assert list(first) == models["paper"].features
    np.testing.assert_allclose(sum(first.values()) + models["paper"].intercept, pred["score"][0], atol=1e-4)
    assert set(pred["label"]) <= {0, 1} and pred["model_sha256"].nunique() == 1

    other_weights = fabricate_run(tmp_path / "weights", 12, seed=9, weights_sha256="0" * 64)
    with pytest.raises(RunMismatch, match="weights 000000000000.*the model needs ct-i3resnet152"):
        predict_run(out / "model", other_weights)
    assert run["hu_source"] == "raw"
    other_hu = fabricate_run(tmp_path / "hu", 12, seed=9, weights_sha256=run["weights_sha256"], hu_source="harmonized")
    with pytest.raises(RunMismatch, match="cut from harmonized HU; the model was fitted on raw HU"):
        predict_run(out / "model", other_hu)
    other_net = fabricate_run(tmp_path / "net", 12, seed=9, backbone="resnet152", weights_sha256=run["weights_sha256"])
    assert main(["predict", str(out / "model"), str(other_net)]) == 2
    assert not (other_net / "predictions").exists() and not (other_weights / "predictions").exists()


def test_predict_cli_message_is_one_line(signal_run, tmp_path, capsys):
    out, _ = signal_run
    other = fabricate_run(tmp_path / "net", 12, seed=9, backbone="resnet152")
    assert main(["predict", str(out / "model"), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emphy predict: ") and "\n" not in err and "resnet152" in err


def test_fit_refuses_too_few_scans_per_class(tmp_path, capsys):
    out = fabricate_run(tmp_path / "run", 9, seed=5, signal=0.0)      # labels alternate: 5 and 4
    assert sorted(read_frame(out, "scans")["label"].value_counts()) == [4, 5]
    assert main(["fit", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 emphysema-positive and 5 negative" in err and "at least 5 per class: no model fitted" in err
    assert not (out / "model" / "model.json").exists()


def test_fit_without_embeddings_or_with_an_unknown_zone_says_why(tmp_path):
    out = fabricate_run(tmp_path / "run", 12, seed=4, backbone="resnet152")
    with pytest.raises(CohortError, match="no embeddings of backbone 'ct-i3resnet152'"):
        fit_run(out, FitSettings(backbone="ct-i3resnet152"))


def test_ttest_selector_and_fast_metrics_match_references():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 30))
    y = np.r_[np.ones(25), np.zeros(25)].astype(int)
    X[y == 1, 7] += 2.0
    X[y == 1, 3] -= 1.5
    sel = TTestSelector(2).fit(X, y)
    assert list(sel.selected_) == [7, 3] and sel.t_[7] > 0 > sel.t_[3]
    from scipy.stats import ttest_ind

    assert sel.t_[7] == pytest.approx(ttest_ind(X[y == 1, 7], X[y == 0, 7]).statistic)
    p = np.round(rng.random(50), 1)                  # many ties
    assert auc_score(y, p) == pytest.approx(roc_auc_score(y, p))
    assert ap_score(y, p) == pytest.approx(average_precision_score(y, p))
    res = with_intervals(y, np.vstack([p, p[::-1]]), 300, 0)
    assert res["ci"]["auc"][0] <= res["auc"] <= res["ci"]["auc"][1]


def test_fit_settings_from_a_job_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\n[qc]\nmax_hu = 3072.0\n[fit]\nfeatures = "zones"\nfolds = 4\n')
    s = load_fit_settings(job, seed=3)
    assert s.zones == ("upper", "middle", "lower") and s.folds == 4 and s.seed == 3
    job.write_text('[fit]\nfolds = "five"\n')
    with pytest.raises(ConfigError, match=r"\[fit\].folds must be int"):
        load_fit_settings(job)
    job.write_text('[fit]\nfold = 5\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_fit_settings(job)
    job.write_text('fit = 5\n')
    with pytest.raises(ConfigError, match=r"\[fit\] must be a table"):
        load_fit_settings(job)
    with pytest.raises(ConfigError, match=r"\[fit\] must be a table"):
        load_jobfile(job)


def test_fit_reads_each_table_of_the_run_once(tmp_path, monkeypatch):
    """``emphy fit`` asks the run many questions (backbones, HU source, matrix, counts) but reads each
    Parquet table once; the counts match the tables read afresh."""
    import emphy_dask.models.cohort as cohort

    out = fabricate_run(tmp_path / "run", 24, seed=5, signal=1.0, n_excluded=2)
    s = FitSettings(n_bootstrap=20, repeats=1)
    reads = []
    for name in ("read_table", "read_frame"):
        real = getattr(cohort, name)
        monkeypatch.setattr(cohort, name, lambda d, table, *a, _real=real, **kw: reads.append(table) or _real(d, table, *a, **kw))
    m = fit_run(out, s, figures_on=False)
    assert sorted(reads) == ["embeddings", "phenotypes", "scans"]
    assert m["cohort"]["scans_in_run"] == 26 and m["cohort"]["by_status"] == {"ok": 24, "excluded": 2}
    c = load_cohort(out)
    assert m["cohort"]["with_embeddings"] == len(c) and m["cohort"]["positive"] == int(c.y.sum())


def test_student_t_is_silent_on_nearly_constant_columns_and_gives_constant_ones_no_evidence():
    import warnings

    from emphy_dask.models.pipelines import student_t

    X = np.full((6, 3), 0.1234)
    X[:, 1] = np.arange(6.0)                 # separates the classes
    X[0, 2] = 0.12340001                      # nearly constant: scipy warns of precision loss
    y = np.array([1, 1, 1, 0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # any warning fails the test
        t, p = student_t(X, y)
    assert t[0] == 0.0 and p[0] == 1.0        # constant: no evidence, not NaN
    assert t[1] == pytest.approx(-3 / np.sqrt(2 / 3)) and p[1] < 0.05    # means 1 vs 4, pooled variance 1
    assert np.isfinite(t[2]) and 0.0 <= p[2] <= 1.0


def test_common_scaler_keeps_relative_variance_and_ridge_ignores_low_variance_noise():
    """Ridge of LAA% on commonly scaled columns: 10 strong columns carry the target, 400 weak
    ones (1/60 of their spread) only noise. Standardising lifts the noise to the signal's variance
    and ridge spreads its weight there; the common scale leaves the noise small."""
    rng = np.random.default_rng(0)
    signal, noise = rng.normal(size=(120, 10)) * 3.0, rng.normal(size=(120, 400)) * 0.05
    X = np.hstack([signal, noise])
    y = signal @ rng.normal(size=10) + rng.normal(size=120)
    scaler = CommonScaler().fit(X[:60])
    Z = scaler.transform(X[:60])
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Z.var(0).mean(), 1.0)                              # the penalty's scale
    np.testing.assert_allclose(Z.var(0) / Z.var(0)[0], X[:60].var(0) / X[:60].var(0)[0])  # relative kept
    assert np.unique(scaler.scale_).size == 1 and scaler.scale_.shape == (410,)
    r2 = {}
    for name, pipe in (("common", ridge_pipeline()),
                       ("standardised", Pipeline([("scale", StandardScaler()), ("model", Ridge())]))):
        grid = GridSearchCV(pipe, {"model__alpha": RIDGE_ALPHAS}, cv=KFold(3)).fit(X[:60], y[:60])
        r2[name] = r2_score(y[60:], grid.predict(X[60:]))
    assert r2["common"] > 0.95 and r2["standardised"] < 0.5, r2
