"""QC pictures a reader checks at a glance: an axial montage and the per-slice LAA curve.

Both are written with matplotlib's Agg backend (no display) and carry no DICOM text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume import craniocaudal_axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def montage_slices(labels: np.ndarray, direction_xyz, n: int = 9) -> tuple[int, list[int]]:
    """Axial slice indices for the montage: ``n`` levels evenly spread over the lung, top first.

    Returns (cranio-caudal axis, indices along it).
    """
    axis, picks, _ = _montage_levels(labels, direction_xyz, n)
    return axis, picks


def _montage_levels(labels: np.ndarray, direction_xyz, n: int) -> tuple[int, list[int], list[int]]:
    """(axis, indices top first, each one's slice count below the lung apex): the montage's
    titles count like the LAA curve's x axis, from the most superior slice holding lung."""
    axis, up = craniocaudal_axis(direction_xyz)
    other = tuple(a for a in range(3) if a != axis)
    has_lung = np.flatnonzero(labels.any(axis=other))
    if has_lung.size == 0:
        has_lung = np.arange(labels.shape[axis])
    picks = np.unique(np.linspace(has_lung[0], has_lung[-1], num=min(n, has_lung.size)).round().astype(int))
    picks = sorted(picks.tolist(), reverse=up)
    apex = int(has_lung[-1] if up else has_lung[0])
    return axis, picks, [abs(k - apex) for k in picks]


def qc_montage_png(hu: np.ndarray, labels: np.ndarray, direction_xyz, path: str | Path,
                   threshold_hu: float = -950.0, n: int = 9) -> None:
    """Write an axial montage: lung window, lung outline (green), voxels below ``threshold_hu`` (red).

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
    labels : ndarray of uint8, same shape; 0 background, 1 right, 2 left lung
    direction_xyz : 9 floats, ITK direction
    path : output PNG
    """
    plt = _pyplot()
    axis, picks, from_apex = _montage_levels(labels, direction_xyz, n)
    cols = 3
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k, r in zip(axes.ravel(), picks, from_apex):
        img = np.take(hu, k, axis=axis)
        lab = np.take(labels, k, axis=axis)
        ax.imshow(img, cmap="gray", vmin=-1000, vmax=200, interpolation="nearest")
        if lab.any():
            ax.contour(lab > 0, levels=[0.5], colors="lime", linewidths=0.6)
            laa = np.ma.masked_where(~((lab > 0) & (img < threshold_hu)), np.ones(img.shape))
            ax.imshow(laa, cmap="autumn", alpha=0.8, interpolation="nearest")
        ax.set_title(f"slice {r} from apex", fontsize=8)
    fig.suptitle(f"lung outline (green), HU < {threshold_hu:g} (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72, format="png", metadata={"Software": "emphy-dask"})
    plt.close(fig)


def laa_curve_png(slice_rows: list[dict], path: str | Path, title: str = "") -> None:
    """Write the per-slice LAA%-950 curve, top of the lung on the left.

    ``slice_rows``: dicts with ``rank_from_superior`` and ``laa950_pct`` (as in the slices table),
    the slices holding lung; x counts from the top one (the apex), as the montage's titles do.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    if slice_rows:
        top = min(r["rank_from_superior"] for r in slice_rows)
        ranks = [r["rank_from_superior"] - top for r in slice_rows]
        laa = [r["laa950_pct"] for r in slice_rows]
        ax.plot(ranks, laa, color="firebrick", lw=1.2)
    ax.axhline(6.0, color="gray", ls="--", lw=0.8, label="6 % (label threshold)")
    ax.set_xlabel("slice from lung apex")
    ax.set_ylabel("LAA%-950 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=72, format="png", metadata={"Software": "emphy-dask"})
    plt.close(fig)
