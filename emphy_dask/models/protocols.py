"""Evaluation protocols: the paper's (selection on all scans, optimistic) and the honest one.

Both use the same repeated stratified k-fold splits, so the only difference between them is
where the t-test selection happens:

- ``paper_protocol``: Student's t-test on the whole subset picks the top k features, then the
  logistic regression is cross-validated on those k. The test folds took part in the selection:
  the estimate is optimistic (on pure noise it reads far above 0.5).
- ``honest_protocol``: standardisation, t-test selection and logistic regression are one
  Pipeline refitted inside each training fold; the test fold is never seen before scoring.

Each returns the metrics with 95 % intervals and the out-of-fold probabilities ``P``
(repeats, n).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.base import clone

from .grouping import inner_splits, outer_splits, tune, tune_ridge
from .metrics import auc_score, binary_metrics, with_intervals
from .pipelines import (L1_CS, RIDGE_ALPHAS, TTestSelector, l1_pipeline, paper_pipeline, phenotype_pipeline,
                        ridge_pipeline)

OPTIMISTIC = ("optimistic: the t-test selection saw every scan, test folds included "
              "(the protocol as published)")
HONEST = "honest: scaling, t-test selection and model refitted inside each training fold"


def splits(y: np.ndarray, folds: int, repeats: int, seed: int, groups=None) -> tuple[list, int]:
    """Repeated (group-)stratified k-fold (train, test) index pairs and folds per repeat
    (``grouping.outer_splits``; without groups, folds capped by the smaller class)."""
    sp, k, _ = outer_splits(y, groups, folds, repeats, seed)
    return sp, k


def _neg_mse(t, p) -> float:
    return -float(np.mean((np.asarray(t) - np.asarray(p)) ** 2))


#: what each tuned model's inner loop chooses: (pipeline parameter, grid, score of pooled predictions)
TUNED = {"l1": ("model__C", L1_CS, auc_score), "ridge": ("model__alpha", RIDGE_ALPHAS, _neg_mse)}


def tuned_value(pipe, tuned: str, X, y, inner: list) -> float:
    """The ``TUNED[tuned]`` parameter chosen on ``inner`` splits (ridge: all alphas from one SVD per split)."""
    param, grid, score = TUNED[tuned]
    if tuned == "ridge":
        return tune_ridge(X, y, inner, grid)
    return tune(pipe, param, grid, X, y, inner, score)


def out_of_fold(model, X: np.ndarray, target: np.ndarray, folds: list, k: int, *,
                regression: bool = False, fit_target=None, groups=None, tuned: str | None = None,
                inner_folds: int = 3, seed: int = 0) -> tuple[np.ndarray, list]:
    """Out-of-fold predictions (repeats, n) of ``model`` refitted on every training fold.

    ``fit_target``: what the model is fitted on when it differs from the stratification label.
    ``tuned``: a key of ``TUNED``: its parameter is chosen inside every training fold by inner
    folds grouped like the outer ones (``groups``). Returns (P, fitted models).
    """
    n_rep = len(folds) // k
    P = np.full((n_rep, len(target)), np.nan)
    fitted = []
    tgt = target if fit_target is None else fit_target
    for i, (tr, te) in enumerate(folds):
        m = clone(model)
        if tuned:
            m.set_params(**{TUNED[tuned][0]: tuned_value(
                m, tuned, X[tr], tgt[tr], inner_splits(target[tr], None if groups is None else np.asarray(groups)[tr],
                                                       inner_folds, seed + i))})
        m.fit(X[tr], tgt[tr])
        P[i // k, te] = m.predict(X[te]) if regression else m.predict_proba(X[te])[:, 1]
        fitted.append(m)
    return P, fitted


def _scheme(y, groups, s) -> dict:
    _, k, name = outer_splits(y, groups, s.folds, s.repeats, s.seed)
    return {"folds": k, "repeats": s.repeats if "leave-one" not in name else 1, "cv": name}


def paper_protocol(X, y, s, class_weight=None, groups=None) -> dict:
    """t-test top k on all of (X, y), then cross-validated logistic regression on those columns."""
    sel = TTestSelector(s.n_features).fit(X, y)
    folds, k = splits(y, s.folds, s.repeats, s.seed, groups)
    model = paper_pipeline(s.n_features, s.logistic_c, class_weight, s.seed)
    P, _ = out_of_fold(model, X[:, sel.selected_], y, folds, k)
    res = with_intervals(y, P, s.n_bootstrap, s.seed)
    in_sample = clone(model).fit(X[:, sel.selected_], y).predict_proba(X[:, sel.selected_])[:, 1]
    res.update(protocol=OPTIMISTIC, optimistic=True, **_scheme(y, groups, s),
               in_sample={m: round(v, 6) for m, v in binary_metrics(y, in_sample).items()})
    return {"metrics": res, "P": P, "selected": sel.selected_, "t": sel.t_, "p": sel.p_}


def honest_protocol(X, y, s, class_weight=None, groups=None) -> dict:
    """The paper's pipeline refitted per training fold; selection frequency of every feature."""
    folds, k = splits(y, s.folds, s.repeats, s.seed, groups)
    model = paper_pipeline(s.n_features, s.logistic_c, class_weight, s.seed)
    P, fitted = out_of_fold(model, X, y, folds, k)
    freq = np.zeros(X.shape[1])
    for m in fitted:
        freq[m.named_steps["select"].selected_] += 1
    res = with_intervals(y, P, s.n_bootstrap, s.seed)
    res.update(protocol=HONEST, optimistic=False, **_scheme(y, groups, s))
    return {"metrics": res, "P": P, "selection_frequency": freq / len(fitted)}


def l1_protocol(X, y, s, class_weight=None, groups=None) -> dict:
    """L1 logistic regression, C by grouped inner folds inside each training fold."""
    folds, k = splits(y, s.folds, s.repeats, s.seed, groups)
    P, fitted = out_of_fold(l1_pipeline(1.0, class_weight, s.seed), X, y, folds, k, groups=groups, tuned="l1",
                            inner_folds=s.inner_folds, seed=s.seed)
    res = with_intervals(y, P, s.n_bootstrap, s.seed)
    n_nonzero = [int(np.count_nonzero(m.named_steps["model"].coef_)) for m in fitted]
    res.update(protocol=HONEST, optimistic=False, **_scheme(y, groups, s),
               chosen_C=sorted({float(m.named_steps["model"].C) for m in fitted}),
               nonzero_coefficients_median=float(np.median(n_nonzero)))
    return {"metrics": res, "P": P}


def ridge_protocol(X, y, laa_pct, s, groups=None) -> dict:
    """Ridge regression of laa950_pct (%), out of fold (folds stratified by the label), alpha by
    grouped inner folds."""
    folds, k = splits(y, s.folds, s.repeats, s.seed, groups)
    P, fitted = out_of_fold(ridge_pipeline(), X, y, folds, k, regression=True, fit_target=laa_pct, groups=groups,
                            tuned="ridge", inner_folds=s.inner_folds, seed=s.seed)
    res = with_intervals(laa_pct, P, s.n_bootstrap, s.seed, regression=True)
    res.update(protocol=HONEST, target="laa950_pct", **_scheme(y, groups, s),
               chosen_alpha=sorted({float(m.named_steps["model"].alpha) for m in fitted}))
    return {"metrics": res, "P": P}


def phenotype_protocol(pheno, y, s, class_weight=None, groups=None) -> dict:
    """The honest protocol with laa950_pct, hu_mean, perc15_hu as the only features (the label is
    a threshold on the first two: this is the ceiling a density model reaches)."""
    folds, k = splits(y, s.folds, s.repeats, s.seed, groups)
    P, _ = out_of_fold(phenotype_pipeline(class_weight, s.seed), pheno, y, folds, k)
    res = with_intervals(y, P, s.n_bootstrap, s.seed)
    res.update(protocol=HONEST, optimistic=False, **_scheme(y, groups, s),
               features=["laa950_pct", "hu_mean", "perc15_hu"],
               note="circularity check: the weak label is a threshold on laa950_pct and hu_mean")
    return {"metrics": res, "P": P}


def shuffled_control(protocol, X, *args, seed: int = 0, **kw) -> dict:
    """``protocol`` re-run with the rows of ``X`` permuted across scans (seeded), no bootstrap.

    The folds, the target and the groups stay; only the link between a scan and its embedding is
    broken. Returns the control's metrics (without intervals) and the permutation's seed.
    """
    perm = np.random.default_rng([seed, 13]).permutation(len(X))
    # the settings (wherever they sit among the arguments) without bootstrap: a control needs no interval
    args = tuple(dataclasses.replace(a, n_bootstrap=0) if hasattr(a, "n_bootstrap") else a for a in args)
    res = protocol(X[perm], *args, **kw)["metrics"]
    keep = ("auc", "ap", "accuracy", "sensitivity", "specificity", "r2", "pearson_r", "mae", "balanced_accuracy",
            "repeat_sd", "cv", "folds", "repeats")
    return {**{k: v for k, v in res.items() if k in keep}, "permutation_seed": [seed, 13]}


def breakdown(y: np.ndarray, P: np.ndarray, groups, min_scans: int = 4) -> dict | None:
    """Honest metrics per group value (kernel class, manufacturer); None when only one group.

    AUC/AP need both classes in the group; groups with fewer than ``min_scans`` scans report
    counts only.
    """
    groups = np.asarray([("unknown" if g is None or g != g else str(g)) for g in groups], dtype=object)
    values = sorted(set(groups))
    if len(values) < 2:
        return None
    out = {}
    for g in values:
        m = groups == g
        yy, PP = y[m], P[:, m]
        row = {"n": int(m.sum()), "n_positive": int(yy.sum())}
        if m.sum() >= min_scans:
            pred = (PP.mean(0) >= 0.5).astype(int)
            row["accuracy"] = float((pred == yy).mean())
            if 0 < yy.sum() < len(yy):
                met = [binary_metrics(yy, p) for p in PP]
                row.update({k: float(np.mean([r[k] for r in met])) for k in ("auc", "ap", "sensitivity",
                                                                            "specificity")})
        out[g] = row
    return out
