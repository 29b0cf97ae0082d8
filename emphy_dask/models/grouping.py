"""Grouped cross-validation: no group (patient, base anatomy) is in a training fold and its test fold.

Scans of one patient (or variants inserted into one base anatomy) resemble each other far more than
scans of two people; when they fall on both sides of a split the model is scored on what it
memorised. Every outer and inner loop of ``emphy fit`` therefore splits by group:

- ``outer_splits``: ``StratifiedGroupKFold`` (classification) or ``GroupKFold`` (regression),
  repeated with other seeds; with few groups (fewer than 2 x folds) ``LeaveOneGroupOut`` (one repeat:
  it has no randomness). Without groups, the repeated stratified k-fold of the paper's protocol.
- ``inner_splits``: the same rules inside a training fold, for the loops that choose a penalty.
- ``tune``: picks a pipeline parameter (C, alpha) by the pooled out-of-fold score of the inner
  splits. Pooling (not averaging per fold) keeps AUC defined when a left-out group holds one class.

Grouped folds bias a null model *against* the held-out group (its mean target is missing from the
training rows), so a shuffled control reads below chance (AUC < 0.5, R^2 < 0): read it one-sided.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import (GroupKFold, KFold, LeaveOneGroupOut, RepeatedStratifiedKFold, StratifiedGroupKFold,
                                     StratifiedKFold)

from .pipelines import CommonScaler

CONTROL_NOTE = ("shuffled control: the same protocol with the embeddings permuted across scans (seeded); under "
                "grouped folds it reads below chance (AUC < 0.5, R2 < 0) because holding out a whole group biases "
                "a null model against it: read it one-sided (a score is real only well above its control)")


def group_codes(groups) -> np.ndarray | None:
    """Integer code per scan of its group (None stays None: ungrouped)."""
    if groups is None:
        return None
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return codes


def _few_groups(groups: np.ndarray, folds: int) -> bool:
    return len(np.unique(groups)) < 2 * folds


def outer_splits(y: np.ndarray, groups, folds: int, repeats: int, seed: int, *,
                 stratify: bool = True) -> tuple[list, int, str]:
    """(train, test) index pairs, the number of folds per repeat, and the scheme's name.

    ``y`` (n,): the stratification label (class labels; a regression target is stratified by the
    caller's label or not at all with ``stratify=False``); ``groups`` (n,) or None.
    """
    y = np.asarray(y)
    if groups is None:
        if not stratify:
            splits = [s for r in range(repeats)
                      for s in KFold(folds, shuffle=True, random_state=seed + r).split(y)]
            return splits, folds, f"repeated k-fold ({folds} x {repeats})"
        k = max(2, min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min())))
        rskf = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
        return list(rskf.split(np.zeros(len(y)), y)), k, f"repeated stratified k-fold ({k} x {repeats})"
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"grouped folds need at least 2 groups, got {n_groups}")
    if _few_groups(groups, folds):
        splits = list(LeaveOneGroupOut().split(y, y, groups))
        return splits, len(splits), f"leave-one-group-out ({n_groups} groups)"
    k = min(folds, n_groups)
    splits = []
    with warnings.catch_warnings():     # "least populated class < n_splits": expected with groups, told by the scores
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for r in range(repeats):
            cv = (StratifiedGroupKFold(k, shuffle=True, random_state=seed + r) if stratify
                  else GroupKFold(k, shuffle=True, random_state=seed + r))
            splits += list(cv.split(y, y, groups))
    name = "stratified group k-fold" if stratify else "group k-fold"
    return splits, k, f"{name} ({k} x {repeats}, {n_groups} groups)"


def inner_splits(y: np.ndarray, groups, folds: int, seed: int, *, stratify: bool = True) -> list:
    """Inner (train, test) pairs of one training fold (indices into it), grouped like the outer ones."""
    y = np.asarray(y)
    if groups is None:
        if stratify:
            k = max(2, min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min())))
            return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y))
        return list(KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(y))
    groups = np.asarray(groups)
    if _few_groups(groups, folds):
        return list(LeaveOneGroupOut().split(y, y, groups))
    k = min(folds, len(np.unique(groups)))
    cv = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if stratify
          else GroupKFold(k, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(cv.split(y, y, groups))


def tune(pipe, param: str, grid, X: np.ndarray, y: np.ndarray, splits: list, score) -> float:
    """The value of ``param`` in ``grid`` with the best ``score(y, pooled out-of-fold prediction)``.

    ``pipe`` is cloned per fit; classifiers are scored on the positive class's probability,
    regressors on their prediction. Ties go to the first (strongest-penalty) value of ``grid``.
    """
    best, best_score = grid[0], -np.inf
    for value in grid:
        pred = np.full(len(y), np.nan)
        for tr, te in splits:
            if hasattr(pipe, "predict_proba") and len(np.unique(y[tr])) < 2:
                continue                # an inner training split of one class (a group holds a whole class)
            m = clone(pipe).set_params(**{param: value}).fit(X[tr], y[tr])
            pred[te] = m.predict_proba(X[te])[:, 1] if hasattr(m, "predict_proba") else m.predict(X[te])
        done = np.isfinite(pred)
        if not done.any() or (hasattr(pipe, "predict_proba") and len(np.unique(y[done])) < 2):
            continue
        sc = score(y[done], pred[done])
        if np.isfinite(sc) and sc > best_score:
            best, best_score = value, sc
    return float(best)


def ridge_path_predictions(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, alphas) -> np.ndarray:
    """Predictions (len(alphas), n_test) of ``ridge_pipeline(alpha)`` for every alpha at once.

    The same numbers as fitting the scikit-learn pipeline once per alpha (tested), from one
    eigendecomposition of the training rows' Gram matrix K = Z Z^T = U diag(w) U^T (Z: training
    rows through the pipeline's ``CommonScaler``): prediction(alpha) = Z_test Z^T U diag(1 / (w + alpha)) U^T (y - mean y) + mean y
    (ridge's dual form). With thousands of embedding columns and tens of scans the n x n Gram
    matrix is tiny: far faster than refitting, or than an SVD of the wide Z.
    """
    scaler = CommonScaler().fit(X_train)
    Z, Zt = scaler.transform(X_train), scaler.transform(X_test)
    y_mean = y_train.mean()
    w, U = np.linalg.eigh(Z @ Z.T)                          # (n,), (n, n)
    w = np.clip(w, 0.0, None)                               # rounding below 0 on the centring's null direction
    uty = U.T @ (y_train - y_mean)                          # (n,)
    proj = (Zt @ Z.T) @ U                                   # (n_test, n)
    shrink = 1.0 / (w[None, :] + np.asarray(alphas, float)[:, None])                  # (alphas, n)
    return (shrink * uty[None, :]) @ proj.T + y_mean


def tune_ridge(X: np.ndarray, y: np.ndarray, splits: list, alphas) -> float:
    """The alpha with the smallest pooled out-of-fold squared error over ``splits`` (ties: the first)."""
    pred = np.full((len(alphas), len(y)), np.nan)
    for tr, te in splits:
        pred[:, te] = ridge_path_predictions(X[tr], y[tr], X[te], alphas)
    done = np.isfinite(pred[0])
    mse = ((pred[:, done] - y[done]) ** 2).mean(1)
    return float(np.asarray(alphas, float)[int(np.argmin(mse))])


def shared_groups(splits: list, groups) -> int:
    """How many (train, test) pairs share a group between their sides (0 = properly grouped)."""
    if groups is None:
        return 0
    groups = np.asarray(groups)
    return sum(bool(set(groups[tr]) & set(groups[te])) for tr, te in splits)
