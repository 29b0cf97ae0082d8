"""``emphy fit``: every model of the paper and of the honest protocol, fitted on the driver.

Reads only the tables of an ``extract`` run and writes ``OUT/model/``:

- ``metrics.json``: ``paper_protocol`` and ``nested_cv`` (the paper's balanced subset, t-test top k
  + logistic regression, optimistic vs honest), ``full_cohort`` (both protocols, all ok scans,
  class weights), ``l1_logistic``, ``ridge_laa950``, ``phenotypes_only`` (circularity check),
  ``breakdown`` (kernel class, manufacturer), ``pca``, ``tsne``, ``cohort``, ``settings``, ``versions``.
- ``model.json``: the final models (JSON, see ``saved``), ``selected_features.parquet``,
  ``oof_predictions.parquet``, ``figures/*.png``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..jsonsafe import json_safe
from . import figures
from .cohort import (Cohort, RunTables, balanced_subset, check_classes, embedding_hu_source,
                     embedding_input_recipe, load_cohort)
from .metrics import pr_band, roc_band
from .covariates import join_covariates, read_covariates, resolve_groups
from .grouping import CONTROL_NOTE, inner_splits
from .pipelines import l1_pipeline, paper_pipeline, phenotype_pipeline, ridge_pipeline, student_t
from .protocols import (TUNED, breakdown, honest_protocol, l1_protocol, paper_protocol, phenotype_protocol,
                        ridge_protocol, shuffled_control, tuned_value)
from .saved import from_pipeline, save_models
from .settings import FitSettings

MODEL_DIR = "model"


def versions() -> dict:
    import scipy
    import sklearn

    from .. import __version__

    return {"emphy_dask": __version__, "scikit_learn": sklearn.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}


def _pheno_ok(c: Cohort, idx: np.ndarray) -> np.ndarray:
    return idx[np.isfinite(c.pheno[idx]).all(axis=1)]


def _tuned_fit(pipe, key: str, X, y, strat, groups, s: FitSettings):
    """``pipe`` with its ``TUNED[key]`` parameter chosen by grouped inner folds on all rows, fitted."""
    inner = inner_splits(strat, groups, s.inner_folds, s.seed)
    return pipe.set_params(**{TUNED[key][0]: tuned_value(pipe, key, X, y, inner)}).fit(X, y)


def final_models(c: Cohort, bal: np.ndarray, s: FitSettings, groups=None) -> dict:
    """The models refitted on all their scans (what ``emphy predict`` applies)."""
    info = lambda sub, idx: {"subset": sub, "n_train": int(len(idx)), "n_positive": int(c.y[idx].sum())}  # noqa: E731
    allidx = np.arange(len(c))
    out = {}
    for name, idx, cw in (("paper", bal, None), ("full_weighted", allidx, "balanced")):
        pipe = paper_pipeline(s.n_features, s.logistic_c, cw, s.seed).fit(c.X[idx], c.y[idx])
        out[name] = from_pipeline(pipe, c.feature_names, kind="logistic", inputs="embedding", target="label",
                                  info={**info("balanced" if cw is None else "full", idx), "class_weight": cw,
                                        "model": f"t-test top {s.n_features} + logistic regression"})
    gb = None if groups is None else groups[bal]
    pipe = _tuned_fit(l1_pipeline(1.0, None, s.seed), "l1", c.X[bal], c.y[bal], c.y[bal], gb, s)
    out["l1_logistic"] = from_pipeline(pipe, c.feature_names, kind="logistic", inputs="embedding", target="label",
                                       info={**info("balanced", bal), "C": float(pipe.named_steps["model"].C)})
    laa = c.scans["laa950_pct"].to_numpy(float)
    pipe = _tuned_fit(ridge_pipeline(), "ridge", c.X, laa, c.y, groups, s)
    out["ridge_laa950"] = from_pipeline(pipe, c.feature_names, kind="linear", inputs="embedding",
                                        target="laa950_pct", info={**info("full", allidx),
                                                                   "alpha": float(pipe.named_steps["model"].alpha)})
    pb = _pheno_ok(c, bal)
    if len(np.unique(c.y[pb])) == 2:
        pipe = phenotype_pipeline(None, s.seed).fit(c.pheno[pb], c.y[pb])
        out["phenotypes_only"] = from_pipeline(pipe, ["laa950_pct", "hu_mean", "perc15_hu"], kind="logistic",
                                               inputs="phenotypes", target="label", info=info("balanced", pb))
    return out


def fit_run(out_dir, s: FitSettings, *, figures_on: bool = True, log=None) -> dict:
    """Fit every model on the run in ``out_dir``; write ``out_dir/model/``; return metrics.json's dict.

    Every protocol splits by ``s.group_by`` (or by patient_key when a patient has several scans,
    see ``covariates.resolve_groups``) and is repeated with the embeddings shuffled across scans
    (``shuffled_control`` beside each score). Raises ``CohortError`` (no model) when a class has
    fewer than ``s.min_per_class`` scans. ``log``: where notes go (warnings about covariates).
    """
    from threadpoolctl import threadpool_limits

    # thousands of small fits on tens-of-rows matrices: BLAS threads only add synchronisation (on a
    # loaded 2-core machine each tiny product waited ~1000x longer with 2 threads than with 1)
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_run(Path(out_dir), s, figures_on, log)


def _fit_run(out_dir: Path, s: FitSettings, figures_on: bool, log) -> dict:
    out_dir = Path(out_dir)
    timing: dict = {}
    t0 = time.perf_counter()
    tables = RunTables(out_dir)           # each table read once, however often asked
    c = load_cohort(tables, s.zones, s.backbone)
    cov_info = None
    if s.covariates:
        cov_info = join_covariates(c, read_covariates(s.covariates), str(s.covariates))
        if cov_info["missing"] and log:
            log(f"covariates: {cov_info['missing']} of {len(c)} scans are not in {s.covariates} "
                f"(first: {', '.join(cov_info['missing_keys'][:5])})")
    groups, grouping = resolve_groups(c, s.group_by)
    check_classes(c.y, s.min_per_class, str(out_dir))
    bal = balanced_subset(c.y, s.seed)
    gb = None if groups is None else groups[bal]
    laa = c.scans["laa950_pct"].to_numpy(float)
    timing["load"] = time.perf_counter() - t0

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        res = fn(*a, **kw)
        timing[name] = round(time.perf_counter() - t, 3)
        return res

    Xb, yb = c.X[bal], c.y[bal]
    jobs = {"paper": (paper_protocol, (Xb, yb, s), {"groups": gb}),
            "honest": (honest_protocol, (Xb, yb, s), {"groups": gb}),
            "full_paper": (paper_protocol, (c.X, c.y, s, "balanced"), {"groups": groups}),
            "full_honest": (honest_protocol, (c.X, c.y, s, "balanced"), {"groups": groups}),
            "l1": (l1_protocol, (Xb, yb, s), {"groups": gb}),
            "ridge": (ridge_protocol, (c.X, c.y, laa, s), {"groups": groups})}
    pb = _pheno_ok(c, bal)
    if len(pb) >= 2 * s.min_per_class and min(np.bincount(c.y[pb], minlength=2)) >= s.min_per_class:
        jobs["pheno"] = (phenotype_protocol, (c.pheno[pb], c.y[pb], s),
                         {"groups": None if groups is None else groups[pb]})
    names = {"paper": "paper_protocol", "honest": "nested_cv", "full_paper": "full_paper_protocol",
             "full_honest": "full_nested_cv", "l1": "l1_logistic", "ridge": "ridge_laa950", "pheno": "phenotypes_only"}
    res = {}
    for key, (fn, args, kw) in jobs.items():
        res[key] = timed(names[key], fn, *args, **kw)
        res[key]["metrics"]["shuffled_control"] = timed(f"{names[key]}_control", shuffled_control, fn,
                                                        args[0], *args[1:], seed=s.seed, **kw)
    models = timed("final_models", final_models, c, bal, s, groups)
    target = None
    if s.target:
        from .target import fit_target

        target = timed("target", fit_target, out_dir, c, s.target, groups, s)
        models.update(target.pop("models"))

    model_dir = out_dir / MODEL_DIR
    (model_dir / "figures").mkdir(parents=True, exist_ok=True)
    run = {"backbone": c.backbone, "weights_sha256": c.weights_sha256, "zones": list(c.zones),
           "hu_source": embedding_hu_source(tables, c.backbone, c.weights_sha256),
           "input_recipe": embedding_input_recipe(tables, c.backbone, c.weights_sha256),
           "embedding_dim": int(c.X.shape[1] // len(c.zones)), "source_run": str(out_dir.resolve()),
           "grouping": grouping.get("by"),
           "settings": dataclasses.asdict(s), "versions": versions()}
    save_models(model_dir / "model.json", models, run)
    sel = _selected_table(c, bal, res, models["paper"])
    pq.write_table(pa.Table.from_pandas(sel, preserve_index=False), model_dir / "selected_features.parquet")
    oof = _oof_table(c, bal, res, pb)
    pq.write_table(pa.Table.from_pandas(oof, preserve_index=False), model_dir / "oof_predictions.parquet")
    if target is not None:
        pq.write_table(pa.Table.from_pandas(target["per_scan"], preserve_index=False),
                       model_dir / "target_predictions.parquet")
    else:                                   # a refit without --target must not leave the last one's table
        (model_dir / "target_predictions.parquet").unlink(missing_ok=True)
    explore = timed("pca_tsne", _embedding_views, c, s)
    corr = _correlations(c, bal, sel)
    if figures_on:
        timed("figures", _figures, c, bal, res, sel, explore, corr, model_dir / "figures", s)

    metrics = {
        "label": "paper_protocol is optimistic (its t-test selection saw the test folds); nested_cv is the "
                 "honest estimate of the same model",
        "paper_protocol": res["paper"]["metrics"], "nested_cv": res["honest"]["metrics"],
        "full_cohort": {"paper_protocol": res["full_paper"]["metrics"], "nested_cv": res["full_honest"]["metrics"],
                        "class_weight": "balanced"},
        "l1_logistic": res["l1"]["metrics"], "ridge_laa950": res["ridge"]["metrics"],
        "phenotypes_only": res["pheno"]["metrics"] if "pheno" in res else None,
        "breakdown": {col: breakdown(c.y, res["full_honest"]["P"], c.scans[col].to_numpy(object))
                      for col in ("kernel_class", "manufacturer") if col in c.scans},
        "pca": {"explained_variance_ratio": explore["ratio"].tolist()},
        "tsne": {"perplexity": explore["perplexity"], "seed": s.seed},
        "feature_correlation": corr["summary"],
        "cohort": _cohort_counts(tables, c, bal),
        "grouping": grouping, "covariates": cov_info, "shuffled_control_note": CONTROL_NOTE,
        "target": None if target is None else target["metrics"],
        "features": {"backbone": c.backbone, "weights_sha256": c.weights_sha256, "zones": list(c.zones),
                     "n_columns": int(c.X.shape[1]), "n_selected": int(min(s.n_features, c.X.shape[1]))},
        "settings": dataclasses.asdict(s),
        "seeds": {"balanced_subset": s.seed, "folds": s.seed, "bootstrap": s.seed, "tsne": s.seed,
                  "shuffled_control": [s.seed, 13]},
        "versions": versions(),
    }
    timing["total"] = round(time.perf_counter() - t0, 3)
    metrics["timing_s"] = timing
    (model_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    return metrics



def _cohort_counts(tables: RunTables, c: Cohort, bal: np.ndarray) -> dict:
    status = tables.scans["status"].value_counts()
    return {"scans_in_run": int(status.sum()), "by_status": {k: int(v) for k, v in status.items()},
            "with_embeddings": int(len(c)), "positive": int(c.y.sum()), "negative": int((c.y == 0).sum()),
            "balanced_subset": {"n": int(len(bal)), "positive": int(c.y[bal].sum())}}


def _selected_table(c: Cohort, bal: np.ndarray, res: dict, paper) -> pd.DataFrame:
    """The paper model's features: t, p (on the balanced subset), coefficient, correlation with LAA%."""
    idx = [c.feature_names.index(f) for f in paper.features]
    t, p = student_t(c.X[bal][:, idx], c.y[bal])
    laa = c.scans["laa950_pct"].to_numpy(float)[bal]
    r = [float(np.corrcoef(c.X[bal][:, i], laa)[0, 1]) if np.std(c.X[bal][:, i]) > 0 else np.nan for i in idx]
    raw, _ = paper.raw_weights()
    freq = res["honest"]["selection_frequency"][idx]
    return pd.DataFrame({
        "rank": np.arange(1, len(idx) + 1), "feature": paper.features,
        "zone": [f.split(":")[0] for f in paper.features], "channel": [int(f.split(":")[1]) for f in paper.features],
        "t": t, "p": p, "coef_standardised": paper.coef, "coef_raw": [raw[f] for f in paper.features],
        "corr_laa950": r, "honest_selection_frequency": freq})


def _oof_table(c: Cohort, bal: np.ndarray, res: dict, pb: np.ndarray) -> pd.DataFrame:
    """Long table: scan_key, model, subset, label, probability (mean over repeats), sd, laa950_pct."""
    rows = []
    for key, name, idx, subset in (("paper", "paper_protocol", bal, "balanced"),
                                   ("honest", "nested_cv", bal, "balanced"),
                                   ("full_paper", "paper_protocol", np.arange(len(c)), "full"),
                                   ("full_honest", "nested_cv", np.arange(len(c)), "full"),
                                   ("l1", "l1_logistic", bal, "balanced"),
                                   ("ridge", "ridge_laa950", np.arange(len(c)), "full"),
                                   ("pheno", "phenotypes_only", pb, "balanced")):
        if key not in res:
            continue
        P = res[key]["P"]
        rows.append(pd.DataFrame({
            "scan_key": c.keys[idx].astype(str), "model": name, "subset": subset,
            "label": c.y[idx].astype(np.int8), "laa950_pct": c.scans["laa950_pct"].to_numpy(float)[idx],
            "prediction": P.mean(0), "prediction_sd": P.std(0), "n_repeats": np.int16(P.shape[0]),
            "optimistic": bool(res[key]["metrics"].get("optimistic", False))}))
    return pd.concat(rows, ignore_index=True)


def _embedding_views(c: Cohort, s: FitSettings) -> dict:
    """PCA (explained variance, first components) and t-SNE (fixed seed) of the embeddings."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(c.X)
    k = int(min(10, Z.shape[0] - 1, Z.shape[1]))
    pca = PCA(n_components=min(50, Z.shape[0] - 1, Z.shape[1]), random_state=s.seed).fit(Z)
    scores = pca.transform(Z)
    # perplexity must stay below n; small cohorts get ~n/4 (sklearn's default 30 needs n > 90)
    perplexity = float(max(2.0, min(30.0, (len(c) - 1) / 4.0)))
    # exact gradients are faster than Barnes-Hut below a few hundred points (and exact)
    method = "exact" if len(c) <= 250 else "barnes_hut"
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=s.seed, method=method).fit_transform(scores)
    return {"ratio": pca.explained_variance_ratio_[:k], "scores": scores, "tsne": xy, "perplexity": perplexity}


def _correlations(c: Cohort, bal: np.ndarray, sel: pd.DataFrame) -> dict:
    """Correlation matrix of the selected features and LAA%-950 over the balanced subset."""
    idx = [c.feature_names.index(f) for f in sel["feature"]]
    M = np.column_stack([c.X[bal][:, idx], c.scans["laa950_pct"].to_numpy(float)[bal]])
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.corrcoef(M, rowvar=False)
    k = len(idx)
    off = np.abs(R[:k, :k][~np.eye(k, dtype=bool)]) if k > 1 else np.array([np.nan])
    return {"matrix": R, "names": list(sel["feature"]) + ["LAA%-950"],
            "summary": {"median_abs_inter_feature_r": float(np.nanmedian(off)),
                        "max_abs_inter_feature_r": float(np.nanmax(off)),
                        "median_abs_r_with_laa950": float(np.nanmedian(np.abs(R[:k, k])))}}


def _figures(c, bal, res, sel, explore, corr, fig_dir: Path, s: FitSettings) -> None:
    yb = c.y[bal]
    nb = min(s.n_bootstrap, 200)
    for kind, band in (("roc", roc_band), ("pr", pr_band)):
        bands = {"paper protocol (optimistic)": band(yb, res["paper"]["P"], nb, s.seed),
                 "honest (refit per fold)": band(yb, res["honest"]["P"], nb, s.seed)}
        if "pheno" in res:
            pb = _pheno_ok(c, bal)
            bands["phenotypes only (honest)"] = band(c.y[pb], res["pheno"]["P"], nb, s.seed)
        figures.curves_png(bands, fig_dir / f"{kind}.png", kind)
    figures.importance_png(list(sel["feature"]), sel["coef_standardised"].to_numpy(), sel["t"].to_numpy(),
                           sel["corr_laa950"].to_numpy(), fig_dir / "importance.png")
    figures.pca_png(explore["ratio"], explore["scores"], c.y, fig_dir / "pca.png")
    figures.tsne_png(explore["tsne"], c.y, explore["perplexity"], fig_dir / "tsne.png")
    figures.correlation_png(corr["matrix"], corr["names"], fig_dir / "correlation.png")
    laa = c.scans["laa950_pct"].to_numpy(float)
    figures.scatter_png(laa, res["ridge"]["P"].mean(0), fig_dir / "ridge_laa950.png",
                        "LAA%-950 (measured)", "LAA%-950 (ridge on embeddings, out of fold)")
