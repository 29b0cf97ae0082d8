"""Figures of ``emphy track``: a patient's trajectory (raw and volume-adjusted PD15, LAA%) and
the cohort's annual decline. Matplotlib, Agg backend, PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trajectory_png(points: pd.DataFrame, path, title: str) -> Path:
    """One patient's whole-lung trajectory.

    ``points``: one row per scan with ``years`` (since the first scan), ``pd15_g_l`` (raw),
    ``pd15_adjusted_g_l`` (sponge model, at the reference volume), ``laa950_pct`` and
    ``volume_l``.
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=90)
    ax1.plot(points["years"], points["pd15_g_l"], "o--", color="0.55", label="PD15 raw")
    ax1.plot(points["years"], points["pd15_adjusted_g_l"], "o-", color="C0", label="PD15 volume-adjusted")
    for x, y, v in zip(points["years"], points["pd15_g_l"], points["volume_l"]):
        ax1.annotate(f"{v:.2f} L", (x, y), textcoords="offset points", xytext=(0, -12), fontsize=7, color="0.4",
                     ha="center")
    ax1.set_xlabel("years since first scan")
    ax1.set_ylabel("PD15 (g/L)")
    ax1.legend(fontsize=7, loc="best")
    ax2.plot(points["years"], points["laa950_pct"], "s-", color="C3")
    ax2.set_xlabel("years since first scan")
    ax2.set_ylabel("LAA%-950")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def decline_png(rates_g_l_per_year: np.ndarray, rates_raw: np.ndarray, path) -> Path:
    """Histogram of the cohort's annual PD15 change (volume-adjusted and raw), whole lung."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    both = np.concatenate([rates_g_l_per_year, rates_raw])
    both = both[np.isfinite(both)]
    bins = np.linspace(*(np.percentile(both, [1, 99]) if both.size else (-1, 1)), 31)
    ax.hist(rates_raw[np.isfinite(rates_raw)], bins=bins, color="0.7", label="raw PD15")
    ax.hist(rates_g_l_per_year[np.isfinite(rates_g_l_per_year)], bins=bins, histtype="step", lw=2, color="C0",
            label="volume-adjusted (sponge)")
    for x, name in ((-1.45, "RAPID treated"), (-2.19, "RAPID placebo")):
        ax.axvline(x, color="C3", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, name, rotation=90, fontsize=6, va="top", ha="right", color="C3")
    ax.set_xlabel("PD15 change (g/L per year)")
    ax.set_ylabel("pairs of scans")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path
