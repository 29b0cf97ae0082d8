"""``emphy fit --target COLUMN``: a categorical column (e.g. the inserted ``pattern``) from embeddings.

The same grouped honest protocol as the weak label's (``grouping.outer_splits``; scaling, ANOVA-F
top k and a multinomial logistic regression refitted inside every training fold), scored by
accuracy, balanced accuracy and the confusion matrix, each beside its shuffled control (embeddings
permuted across scans). Beside it a **density baseline** that knows location and size: per-third
LAA%-950, whole-lung Perc15 and the cluster exponent D (``phenotypes/`` and ``scans/``): the
embeddings earn their place only where they beat it.

Per scan, the final model's predicted class and how much each zone's embedding pushed toward it:
the sum over the zone's channels of (weight on raw channel x embedding). By the identity of
``cam.contribution_maps`` that is exactly the sum of the zone's contribution map for that class.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ..tables import read_frame
from .cohort import Cohort, CohortError
from .grouping import outer_splits
from .metrics import _stratified_draws
from .pipelines import target_pipeline
from .saved import LinearModel

DENSITY_FEATURES = ("laa950_pct_upper", "laa950_pct_middle", "laa950_pct_lower", "perc15_hu", "cluster_d")
MAX_CLASSES = 20


def target_labels(values, column: str) -> tuple[np.ndarray, list, np.ndarray]:
    """(codes (n,) int with -1 where missing, class names sorted, has-value mask) of a categorical column."""
    s = pd.Series(values)
    has = s.notna().to_numpy()
    names = sorted(set(s[has].astype(str)))
    if len(names) < 2:
        raise CohortError(f"--target {column}: needs at least 2 classes, found {names}")
    if len(names) > MAX_CLASSES:
        raise CohortError(f"--target {column}: {len(names)} distinct values; a categorical target has at most "
                          f"{MAX_CLASSES} (a continuous column is not a class)")
    codes = np.full(len(s), -1)
    codes[has] = [names.index(v) for v in s[has].astype(str)]
    return codes, names, has


def density_features(out_dir, c: Cohort) -> np.ndarray:
    """(n, 5) per-third LAA%-950 (%), whole-lung Perc15 (HU), cluster D of the cohort's scans (NaN if missing)."""
    ph = read_frame(out_dir, "phenotypes")
    if "hu_source" in ph.columns:
        ph = ph[ph["hu_source"].fillna("raw") == "raw"]
    keys = pd.Index(c.keys.astype(str))
    cols = []
    for region in ("UpperThird", "MiddleThird", "LowerThird"):
        r = ph[ph["region"] == region].drop_duplicates("scan_key").set_index("scan_key")["laa950_pct"]
        cols.append(r.reindex(keys).to_numpy(float))
    whole = ph[ph["region"] == "WholeLung"].drop_duplicates("scan_key").set_index("scan_key")["perc15_hu"]
    cols.append(whole.reindex(keys).to_numpy(float))
    d = c.scans["cluster_d"] if "cluster_d" in c.scans.columns else pd.Series(np.nan, index=range(len(c)))
    cols.append(pd.to_numeric(d, errors="coerce").to_numpy(float))
    return np.column_stack(cols)


def density_pipeline(C: float = 1.0, seed: int = 0) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("model", LogisticRegression(C=C, max_iter=5000, random_state=seed))])


def multiclass_metrics(y: np.ndarray, P: np.ndarray, n_classes: int, n_boot: int = 0, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy (mean over repeats, their sd), confusion matrix of the mean
    probabilities (rows: true class, columns: predicted), 95 % stratified-bootstrap intervals."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    def scores(idx):
        acc = [float((p[idx].argmax(1) == y[idx]).mean()) for p in P]
        bal = [float(balanced_accuracy_score(y[idx], p[idx].argmax(1))) for p in P]
        return acc, bal

    acc, bal = scores(np.arange(len(y)))
    out = {"accuracy": float(np.mean(acc)), "balanced_accuracy": float(np.mean(bal)),
           "repeat_sd": {"accuracy": float(np.std(acc)), "balanced_accuracy": float(np.std(bal))} if len(P) > 1
           else None,
           "confusion": confusion_matrix(y, P.mean(0).argmax(1), labels=np.arange(n_classes)).tolist(),
           "n": int(len(y))}
    draws = _stratified_draws(y, n_boot, seed)
    if len(draws):
        boot = np.array([[np.mean(v) for v in scores(idx)] for idx in draws])
        out["ci"] = {m: [float(np.percentile(boot[:, j], 2.5)), float(np.percentile(boot[:, j], 97.5))]
                     for j, m in enumerate(("accuracy", "balanced_accuracy"))}
    return out


def multiclass_protocol(pipe, X: np.ndarray, y: np.ndarray, groups, s, n_classes: int) -> dict:
    """Out-of-fold class probabilities (repeats, n, classes) of ``pipe`` refitted per training fold."""
    folds, k, name = outer_splits(y, groups, s.folds, s.repeats, s.seed)
    P = np.full((len(folds) // k, len(y), n_classes), np.nan)
    for i, (tr, te) in enumerate(folds):
        m = clone(pipe).fit(X[tr], y[tr])
        P[i // k][np.ix_(te, m.classes_)] = m.predict_proba(X[te])
    P = np.nan_to_num(P, nan=0.0)          # a class absent from a training fold gets probability 0 there
    res = multiclass_metrics(y, P, n_classes, s.n_bootstrap, s.seed)
    res.update(cv=name, folds=k, repeats=len(folds) // k)
    return {"metrics": res, "P": P}


def _control(pipe, X, y, groups, s, n_classes) -> dict:
    perm = np.random.default_rng([s.seed, 13]).permutation(len(X))
    m = multiclass_protocol(pipe, X[perm], y, groups, dataclasses.replace(s, n_bootstrap=0), n_classes)["metrics"]
    return {k: m[k] for k in ("accuracy", "balanced_accuracy", "repeat_sd", "cv")} | {"permutation_seed": [s.seed, 13]}


def class_models(pipe, feature_names: list, classes: list, column: str, info: dict) -> dict:
    """One LinearModel per class (``target:<column>=<class>``): the class's score, on raw columns via raw_weights."""
    scaler, head = pipe.named_steps["scale"], pipe.named_steps["model"]
    keep = (np.flatnonzero(pipe.named_steps["select"].get_support()) if "select" in pipe.named_steps
            else np.arange(len(feature_names)))
    coef, icpt = np.atleast_2d(head.coef_), np.ravel(head.intercept_)
    if len(classes) == 2:       # sklearn keeps one row for two classes: the same softmax as +-half of it
        coef, icpt = np.vstack([-coef[0] / 2, coef[0] / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    out = {}
    for ci, cls in enumerate(classes):
        out[f"target:{column}={cls}"] = LinearModel(
            "linear", "embedding", f"{column}={cls}", [feature_names[j] for j in keep], scaler.mean_[keep].tolist(),
            scaler.scale_[keep].tolist(), [float(v) for v in coef[ci]], float(icpt[ci]),
            {**info, "class": cls, "note": "class score of a multinomial logistic regression (softmax over classes)"})
    return out


def zone_contributions(models: dict, X: np.ndarray, names: list, zones) -> np.ndarray:
    """(n, classes, zones): per class, sum over each zone's channels of raw weight x embedding."""
    pos = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(X), len(models), len(zones)))
    for ci, m in enumerate(models.values()):
        raw, _ = m.raw_weights()
        for f, w in raw.items():
            out[:, ci, list(zones).index(f.split(":")[0])] += w * X[:, pos[f]]
    return out


def fit_target(out_dir, c: Cohort, column: str, groups, s) -> dict:
    """Embeddings and the density baseline for ``column``; metrics, per-class models, per-scan table."""
    if column not in c.scans.columns:
        raise CohortError(f"--target {column}: no such column in scans/ or the covariates (add it with --covariates)")
    codes, classes, has = target_labels(c.scans[column].to_numpy(object), column)
    idx = np.flatnonzero(has)
    y, X = codes[idx], c.X[idx]
    g = None if groups is None else np.asarray(groups)[idx]
    K = len(classes)
    pipe = target_pipeline(min(s.n_features, X.shape[1]), s.logistic_c, s.seed)
    emb = multiclass_protocol(pipe, X, y, g, s, K)
    emb["metrics"]["shuffled_control"] = _control(pipe, X, y, g, s, K)
    D = density_features(out_dir, c)[idx]
    ok = np.isfinite(D).all(1)
    dens = None
    if ok.sum() >= 2 * K and len(np.unique(y[ok])) == K:
        dp = density_pipeline(1.0, s.seed)
        gd = None if g is None else g[ok]
        dens = multiclass_protocol(dp, D[ok], y[ok], gd, s, K)["metrics"]
        dens["shuffled_control"] = _control(dp, D[ok], y[ok], gd, s, K)
        dens["features"] = list(DENSITY_FEATURES)
    final = clone(pipe).fit(X, y)
    info = {"n_train": int(len(y)), "classes": classes, "model": f"ANOVA-F top {pipe.named_steps['select'].k} + "
            "multinomial logistic regression"}
    models = class_models(final, c.feature_names, classes, column, info)
    contrib = zone_contributions(models, X, c.feature_names, c.zones)
    scores = contrib.sum(2) + np.array([m.raw_weights()[1] for m in models.values()])[None, :]
    final_pred = scores.argmax(1)
    oof = emb["P"].mean(0)
    per_scan = pd.DataFrame({"scan_key": c.keys[idx].astype(str), "target": column,
                             "true_class": [classes[i] for i in y],
                             "oof_predicted_class": [classes[i] for i in oof.argmax(1)],
                             "oof_probability": oof.max(1), "final_predicted_class": [classes[i] for i in final_pred]})
    for zi, z in enumerate(c.zones):
        per_scan[f"zone_contribution_{z}"] = contrib[np.arange(len(idx)), final_pred, zi]
    counts = {cl: int((y == i).sum()) for i, cl in enumerate(classes)}
    metrics = {"target": column, "classes": classes, "class_counts": counts,
               "chance_accuracy": float(max(counts.values()) / len(y)), "n_without_value": int((~has).sum()),
               "grouped_by": None if groups is None else "groups of the fit", "embeddings": emb["metrics"],
               "density_baseline": dens,
               "zone_contribution_note": "per scan, zone_contribution_<zone> = the exact sum of that zone's "
                                         "contribution map for the final model's predicted class"}
    return {"metrics": metrics, "models": models, "per_scan": per_scan}
