"""The fit's figures as small PNGs (matplotlib, Agg): ROC/PR with bands, importance, PCA, t-SNE,
correlations. Each function takes plain arrays/dicts and a path, returns the path."""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {0: "#2b83ba", 1: "#d7191c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def curves_png(bands: dict, path, kind: str = "roc") -> Path:
    """ROC (kind="roc": x fpr, y tpr) or PR (x recall, y precision) curves with 95 % bands.

    ``bands``: {legend label: band dict from metrics.roc_band / pr_band}.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    xk, yk = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
    for (label, b), colour in zip(bands.items(), ("#d95f02", "#1b9e77", "#7570b3", "#e7298a")):
        ax.plot(b[xk], b[yk], color=colour, label=label)
        ax.fill_between(b[xk], b["low"], b["high"], color=colour, alpha=0.18, linewidth=0)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate" if kind == "roc" else "recall")
    ax.set_ylabel("true-positive rate" if kind == "roc" else "precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    ax.set_title(("ROC" if kind == "roc" else "precision-recall") + " (shaded: 95 % bootstrap band)", fontsize=9)
    return _save(fig, path)


def importance_png(names: list, coef: np.ndarray, t: np.ndarray, corr_laa: np.ndarray, path) -> Path:
    """Standardised coefficient, t statistic and correlation with LAA%-950 of the selected features."""
    plt = _plt()
    n = len(names)
    fig, axes = plt.subplots(1, 3, figsize=(9, 0.25 * n + 1.2), sharey=True)
    y = np.arange(n)[::-1]
    for ax, vals, title in zip(axes, (coef, t, corr_laa), ("coefficient (standardised)", "t statistic",
                                                            "Pearson r with LAA%-950")):
        ax.barh(y, vals, color=np.where(np.asarray(vals) >= 0, COLOURS[1], COLOURS[0]))
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    return _save(fig, path)


def pca_png(ratio: np.ndarray, scores: np.ndarray, y: np.ndarray, path) -> Path:
    """Explained-variance ratio (first components) and the scans on PC1/PC2 coloured by label."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.6))
    k = len(ratio)
    a.bar(np.arange(1, k + 1), ratio, color="#777777")
    a.plot(np.arange(1, k + 1), np.cumsum(ratio), color="black", marker=".", linewidth=1)
    a.set_xlabel("component")
    a.set_ylabel("explained variance ratio (bars), cumulative (line)")
    a.yaxis.label.set_size(8)
    _scatter(b, scores[:, :2], y)
    b.set_xlabel("PC1")
    b.set_ylabel("PC2")
    return _save(fig, path)


def tsne_png(xy: np.ndarray, y: np.ndarray, perplexity: float, path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    _scatter(ax, xy, y)
    ax.set_title(f"t-SNE (perplexity {perplexity:g}, fixed seed)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def _scatter(ax, xy, y) -> None:
    for c, name in ((0, "label 0"), (1, "label 1 (emphysema)")):
        m = np.asarray(y) == c
        ax.scatter(xy[m, 0], xy[m, 1], s=12, color=COLOURS[c], label=f"{name} (n={int(m.sum())})", alpha=0.8)
    ax.legend(fontsize=7)


def correlation_png(corr: np.ndarray, names: list, path) -> Path:
    """Heatmap of a correlation matrix (selected features and LAA%-950)."""
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(0.28 * n + 2.2, 0.28 * n + 1.6))
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yticklabels(names, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, label="Pearson r")
    return _save(fig, path)


def scatter_png(truth: np.ndarray, pred: np.ndarray, path, xlabel: str, ylabel: str) -> Path:
    """Out-of-fold prediction against truth (ridge regression of LAA%-950)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.0, 3.8))
    ax.scatter(truth, pred, s=10, color="#555555")
    lo, hi = float(np.nanmin([truth.min(), pred.min()])), float(np.nanmax([truth.max(), pred.max()]))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)
