"""The scikit-learn pipelines of the models: every fitted step sees only its training rows.

- ``paper_pipeline``: standardise -> Student's t-test top k -> logistic regression (the paper's
  model; fitted inside each training fold in the honest protocol).
- ``l1_pipeline``: standardise -> L1 logistic regression; its C is chosen per training fold by
  grouped inner folds (``grouping.tune``, ``L1_CS``).
- ``ridge_pipeline``: centre, one common scale (``CommonScaler``) -> ridge regression of
  laa950_pct; alpha chosen per training
  fold by grouped inner folds (``RIDGE_ALPHAS``). Not RidgeCV's leave-one-out: it leaves one
  *scan* out, so scans of the same patient or base anatomy stay in the inner training rows and
  the weakest penalty always wins.
- ``target_pipeline``: standardise -> ANOVA-F top k -> multinomial logistic regression (a
  categorical ``--target``).
- ``phenotype_pipeline``: standardise -> logistic regression on laa950_pct, hu_mean, perc15_hu.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import ttest_ind
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.feature_selection import SelectorMixin
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

L1_CS = np.logspace(-2, 2, 9)
RIDGE_ALPHAS = np.logspace(-1, 5, 13)


def student_t(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Student's two-sample t statistic (equal variances; positives minus negatives) and p per column.

    Constant columns get t = 0, p = 1 (no evidence), not NaN. Columns nearly constant within a
    class (bf16 embeddings round small differences away) make scipy warn of precision loss once
    per call; their statistic is kept and the warning not printed (it named no column, and a run
    of many folds printed it a hundred times).
    """
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation", RuntimeWarning)
        t, p = ttest_ind(X[y == 1], X[y == 0], axis=0, equal_var=True)
    bad = ~np.isfinite(t)
    return np.where(bad, 0.0, t), np.where(bad, 1.0, p)


class TTestSelector(SelectorMixin, BaseEstimator):
    """Keep the ``k`` columns with the largest |t| (Student's t-test between the two labels).

    Ties in |t| go to the lower column index, so the selection is deterministic.
    Attributes after fit: ``t_`` (n_features,), ``p_`` (n_features,), ``selected_`` (k,) column
    indices in decreasing |t|.
    """

    def __init__(self, k: int = 20):
        self.k = k

    def fit(self, X, y):
        X, y = np.asarray(X, float), np.asarray(y)
        self.t_, self.p_ = student_t(X, y)
        k = min(self.k, X.shape[1])
        self.selected_ = np.lexsort((np.arange(X.shape[1]), -np.abs(self.t_)))[:k]
        self.n_features_in_ = X.shape[1]
        return self

    def _get_support_mask(self):
        mask = np.zeros(self.n_features_in_, bool)
        mask[self.selected_] = True
        return mask


class CommonScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Centre every column, then divide all by one common scale: the root mean column variance.

    Ridge on embeddings: pooled activations that barely vary (a channel that fires on a few
    scans) carry mostly noise; standardising blows them up to the variance of the informative
    ones and ridge then spreads its weight over them. A common scale keeps the columns' relative
    variances and still puts the penalty on a scale that does not depend on the backbone
    (the mean column variance is 1 after it, as after ``StandardScaler``). On the real-anatomy
    benchmark (6 runs: 3 input recipes x raw/harmonised HU) it raised the out-of-anatomy R² of
    LAA%-950 in every run (benchmarks/README.md).

    Attributes after fit: ``mean_`` (n_features,), ``scale_`` (n_features,), every entry the same
    common scale, so a saved model keeps the ``(x - mean) / scale`` form of ``StandardScaler``.
    """

    def fit(self, X, y=None):
        X = np.asarray(X, float)
        self.mean_ = X.mean(axis=0)
        common = float(np.sqrt(X.var(axis=0).mean()))
        self.scale_ = np.full(X.shape[1], common if common > 0 else 1.0)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        return (np.asarray(X, float) - self.mean_) / self.scale_


def paper_pipeline(k: int = 20, C: float = 1.0, class_weight=None, seed: int = 0) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("select", TTestSelector(k)),
                     ("model", LogisticRegression(C=C, class_weight=class_weight, max_iter=5000,
                                                  random_state=seed))])


def l1_pipeline(C: float = 1.0, class_weight=None, seed: int = 0) -> Pipeline:
    """L1 logistic regression; ``C`` is set per training fold by ``grouping.tune`` over ``L1_CS``."""
    model = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", class_weight=class_weight, max_iter=5000,
                               random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("model", model)])


def ridge_pipeline(alpha: float = 1.0) -> Pipeline:
    """Ridge regression on commonly scaled columns (``CommonScaler``); ``alpha`` is set per training
    fold by ``grouping.tune`` over ``RIDGE_ALPHAS``."""
    return Pipeline([("scale", CommonScaler()), ("model", Ridge(alpha=alpha))])


def target_pipeline(k: int = 20, C: float = 1.0, seed: int = 0) -> Pipeline:
    """Standardise -> ANOVA-F top k (the t-test's multiclass form) -> multinomial logistic regression."""
    return Pipeline([("scale", StandardScaler()), ("select", SelectKBest(f_classif, k=k)),
                     ("model", LogisticRegression(C=C, max_iter=5000, random_state=seed))])


def phenotype_pipeline(class_weight=None, seed: int = 0) -> Pipeline:
    return Pipeline([("scale", StandardScaler()),
                     ("model", LogisticRegression(C=1.0, class_weight=class_weight, max_iter=5000,
                                                  random_state=seed))])


def inner_folds_for(y: np.ndarray, wanted: int) -> int:
    """Inner folds a training fold can hold: at most the smaller class's count (>= 2)."""
    return max(2, min(wanted, int(np.bincount(np.asarray(y, int)).min())))
