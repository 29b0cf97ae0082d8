"""Binary and regression metrics with stratified-bootstrap 95 % intervals.

Predictions come as a matrix ``P`` (repeats, n): one probability per scan and repeat of the
cross-validation (one row for an in-sample model). A metric's point value is its mean over the
repeats; its interval is the 2.5-97.5 percentile of that same mean over bootstrap resamples of
the scans (stratified by label, so both classes stay present). AUC and AP are computed here in
numpy (thousands of resamples), checked against scikit-learn in the tests.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, rankdata

BINARY = ("auc", "ap", "accuracy", "sensitivity", "specificity")
REGRESSION = ("r2", "pearson_r", "mae")


def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count one half), as sklearn's roc_auc_score."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ap_score(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise, tied scores one threshold), as sklearn's average_precision_score."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ps, ys = np.asarray(p)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]   # end of each tie group
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall = tp / max(int(y.sum()), 1)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """auc, ap, accuracy, sensitivity, specificity of probabilities ``p`` (n,)."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    pos, neg = y == 1, y == 0
    return {"auc": auc_score(y, p), "ap": ap_score(y, p), "accuracy": float((pred == y).mean()),
            "sensitivity": float((pred[pos] == 1).mean()), "specificity": float((pred[neg] == 0).mean())}


def regression_metrics(t: np.ndarray, p: np.ndarray) -> dict:
    """r2 (1 - SSE/SST), Pearson r, mean absolute error of predictions ``p`` of targets ``t``."""
    t, p = np.asarray(t, float), np.asarray(p, float)
    sst = float(((t - t.mean()) ** 2).sum())
    r = float(pearsonr(t, p)[0]) if np.std(p) > 0 and np.std(t) > 0 else float("nan")
    return {"r2": 1.0 - float(((t - p) ** 2).sum()) / sst if sst > 0 else float("nan"),
            "pearson_r": r, "mae": float(np.abs(t - p).mean())}


def _stratified_draws(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    return np.stack([np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(n_boot)]) \
        if n_boot else np.zeros((0, len(y)), int)


def with_intervals(y: np.ndarray, P: np.ndarray, n_boot: int, seed: int, *, regression: bool = False) -> dict:
    """Metrics of predictions ``P`` (repeats, n) against ``y`` (n,): mean over repeats, 95 % intervals.

    Returns ``{metric: value, ..., "ci": {metric: [low, high]}, "repeat_sd": {metric: sd}, "ci_low",
    "ci_high"}``; ``ci_low``/``ci_high`` repeat the main metric's interval (AUC, or R^2).
    """
    P = np.atleast_2d(np.asarray(P, float))
    fn, names = (regression_metrics, REGRESSION) if regression else (binary_metrics, BINARY)
    per_repeat = [fn(y, p) for p in P]
    out = {m: float(np.mean([r[m] for r in per_repeat])) for m in names}
    out["repeat_sd"] = {m: float(np.std([r[m] for r in per_repeat])) for m in names} if len(P) > 1 else None
    strata = np.zeros(len(y), int) if regression else np.asarray(y)
    draws = _stratified_draws(strata, n_boot, seed)
    boot = {m: [] for m in names}
    for idx in draws:
        res = [fn(y[idx], p[idx]) for p in P]
        for m in names:
            boot[m].append(np.mean([r[m] for r in res]))
    out["ci"] = {m: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] if len(v) else None
                 for m, v in boot.items()}
    main = "r2" if regression else "auc"
    out["ci_low"], out["ci_high"] = out["ci"][main] if out["ci"][main] else (None, None)
    out["n"] = int(len(y))
    out["n_bootstrap"] = int(n_boot)
    return out


GRID = np.linspace(0.0, 1.0, 101)


def roc_band(y: np.ndarray, P: np.ndarray, n_boot: int, seed: int) -> dict:
    """ROC curve on a fixed false-positive-rate grid: mean TPR over repeats and its 95 % bootstrap band."""
    from sklearn.metrics import roc_curve

    def tpr(yy, PP):
        rows = []
        for p in PP:
            fpr, t, _ = roc_curve(yy, p)
            rows.append(np.interp(GRID, fpr, t))
        return np.mean(rows, axis=0)

    return _band(y, np.atleast_2d(P), n_boot, seed, tpr, "fpr", "tpr")


def pr_band(y: np.ndarray, P: np.ndarray, n_boot: int, seed: int) -> dict:
    """Precision-recall curve on a fixed recall grid (interpolated precision), mean and 95 % band."""
    from sklearn.metrics import precision_recall_curve

    def precision(yy, PP):
        rows = []
        for p in PP:
            pr, rc, _ = precision_recall_curve(yy, p)
            # interpolated precision: the best precision at recall >= r (recall falls along the arrays)
            env = np.maximum.accumulate(pr)
            rows.append(np.interp(GRID, rc[::-1], env[::-1]))
        return np.mean(rows, axis=0)

    return _band(y, np.atleast_2d(P), n_boot, seed, precision, "recall", "precision")


def _band(y, P, n_boot, seed, curve, xname, yname) -> dict:
    mean = curve(y, P)
    draws = _stratified_draws(np.asarray(y), min(n_boot, 200), seed)     # 200 resamples suffice for a band
    boots = np.array([curve(y[i], P[:, i]) for i in draws]) if len(draws) else mean[None]
    return {xname: GRID.tolist(), yname: mean.tolist(), "low": np.percentile(boots, 2.5, axis=0).tolist(),
            "high": np.percentile(boots, 97.5, axis=0).tolist()}
