"""CIP-compatible parenchyma phenotypes (SlicerCIP ``CIP_ParenchymaAnalysis``).

Per region (see :mod:`.regions`) of the lung label map, on the CT's native grid:

=================  ===========================================================
n_voxels           lung voxels in the region
laa950_pct ...     100 * #(HU < T) / n for T = -950, -925, -910, -856 (strict <)
haa700_pct         100 * #(HU > -700) / n (strict >)
perc10_hu/15_hu    ``numpy.percentile`` (linear interpolation) at 10 / 15
hu_mean, hu_std    mean, population std (ddof=0)
hu_median          ``numpy.median``
hu_skewness        ``scipy.stats.skew(bias=True)`` (as SlicerCIP)
hu_kurtosis        ``scipy.stats.kurtosis(fisher=True, bias=False)`` (as cip_python)
volume_l           n * voxel volume (mm^3) / 1e6
mass_g             sum of voxel_ml * (HU + 1000) / 1000 g/ml
                   = volume_ml * (hu_mean + 1000) / 1000  (unclipped HU)
mass_schneider_g   cip_python's mass: piecewise Schneider HU->density curve,
                   HU clipped at -1000 first (see :func:`schneider_density_g_ml`)
=================  ===========================================================

``mass_g`` is the linear water-equivalent definition this project was asked for;
cip_python's ``ParenchymaPhenotypes`` uses the piecewise Schneider curve instead,
reported alongside as ``mass_schneider_g``. Regions with no voxels carry NaN.

Speed: integer HU (int16 range) go through one ``np.bincount`` over lung voxels,
keyed by (region code, HU); every metric, percentiles included, is then exact
arithmetic on 65 536-bin histograms, so a 30 M-voxel lung costs one pass.
Float HU fall back to direct computation on the values.
"""
from __future__ import annotations

import math

import numpy as np

from .regions import REGIONS, region_codes

#: Metric columns, in order (the job's Parquet schema is built from this).
PHENOTYPE_COLUMNS = (
    "n_voxels",
    "laa950_pct", "laa925_pct", "laa910_pct", "laa856_pct", "haa700_pct",
    "perc10_hu", "perc15_hu",
    "hu_mean", "hu_std", "hu_median", "hu_skewness", "hu_kurtosis",
    "volume_l", "mass_g", "mass_schneider_g",
)

LAA_THRESHOLDS_HU = {"laa950_pct": -950, "laa925_pct": -925, "laa910_pct": -910, "laa856_pct": -856}
HAA_THRESHOLD_HU = -700

_OFFSET = 32768          # int16 -> bin index
_NBINS = 65536
_HU_BINS = np.arange(-_OFFSET, _OFFSET, dtype=np.float64)


def schneider_density_g_ml(hu) -> np.ndarray:
    """Tissue density (g/ml) from HU, cip_python's piecewise Schneider curve.

    HU are clipped at -1000 (air). Below -98 HU: linear from air (1.21e-3 g/ml at
    -1000) to 0.93 g/ml at -98; [-98, 18]: 1.018 + 0.893 HU/1000;
    (18, 100]: 1.003 + 1.169 HU/1000; above 100: 1.017 + 0.592 HU/1000.
    """
    h = np.maximum(np.asarray(hu, dtype=np.float64), -1000.0)
    m = (1.21e-3 - 0.93) / (-1000.0 + 98.0)
    b = 1.21e-3 + 1000.0 * m
    return np.select(
        [h < -98, h <= 18, h <= 100],
        [m * h + b, 1.018 + 0.893 * h / 1000.0, 1.003 + 1.169 * h / 1000.0],
        1.017 + 0.592 * h / 1000.0,
    )


_SCHNEIDER_BINS = schneider_density_g_ml(_HU_BINS)


def _nan_metrics() -> dict:
    out = {c: math.nan for c in PHENOTYPE_COLUMNS}
    out["n_voxels"] = 0
    return out


def _shape_stats(n: int, m2: float, m3: float, m4: float) -> tuple[float, float]:
    """(skewness bias=True, Fisher kurtosis bias=False) from central moments, as scipy."""
    if m2 <= 0.0:
        return math.nan, math.nan        # constant data: scipy gives NaN too
    skew = m3 / m2 ** 1.5
    g2 = m4 / m2 ** 2
    if n > 3:
        kurt = ((n * n - 1.0) * g2 - 3.0 * (n - 1) ** 2) / ((n - 2) * (n - 3))
    else:
        kurt = g2 - 3.0                  # scipy leaves n <= 3 uncorrected
    return float(skew), float(kurt)


def metrics_from_histogram(counts: np.ndarray, voxel_volume_mm3: float) -> dict:
    """Phenotypes of one region from its int16 HU histogram.

    Parameters
    ----------
    counts : ndarray of int, shape (65536,)
        counts[i] = voxels with HU == i - 32768.
    voxel_volume_mm3 : float
        Volume of one voxel, mm^3.

    Returns
    -------
    dict with the :data:`PHENOTYPE_COLUMNS` keys.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return _nan_metrics()
    nz = np.flatnonzero(counts)                    # only occupied bins matter
    v = _HU_BINS[nz]
    c = counts[nz].astype(np.float64)
    cum = np.cumsum(counts[nz])

    out = {"n_voxels": n}
    for col, t in LAA_THRESHOLDS_HU.items():
        out[col] = 100.0 * float(c[v < t].sum()) / n
    out["haa700_pct"] = 100.0 * float(c[v > HAA_THRESHOLD_HU].sum()) / n

    def sorted_at(k):
        # k-th smallest value (0-based) of the region's HU
        return v[np.searchsorted(cum, k, side="right")]

    def percentile(q):
        # numpy 'linear': h = (n-1) q/100, a[lo] + (h-lo) (a[lo+1] - a[lo])
        h = (n - 1) * q / 100.0
        lo = int(math.floor(h))
        a_lo = sorted_at(lo)
        a_hi = sorted_at(min(lo + 1, n - 1))
        return float(a_lo + (h - lo) * (a_hi - a_lo))

    out["perc10_hu"] = percentile(10)
    out["perc15_hu"] = percentile(15)
    mean = float((c * v).sum() / n)
    d = v - mean
    m2 = float((c * d * d).sum() / n)
    m3 = float((c * d ** 3).sum() / n)
    m4 = float((c * d ** 4).sum() / n)
    out["hu_mean"] = mean
    out["hu_std"] = math.sqrt(m2)
    out["hu_median"] = percentile(50)
    out["hu_skewness"], out["hu_kurtosis"] = _shape_stats(n, m2, m3, m4)
    voxel_ml = voxel_volume_mm3 / 1000.0
    out["volume_l"] = n * voxel_volume_mm3 / 1e6
    out["mass_g"] = voxel_ml * float((c * (v + 1000.0)).sum()) / 1000.0
    out["mass_schneider_g"] = voxel_ml * float((c * _SCHNEIDER_BINS[nz]).sum())
    return {k: out[k] for k in PHENOTYPE_COLUMNS}


def metrics_from_values(values: np.ndarray, voxel_volume_mm3: float) -> dict:
    """Phenotypes of one region from its HU values (any dtype), computed directly.

    Parameters
    ----------
    values : ndarray, shape (n,)
        HU of the region's voxels.
    voxel_volume_mm3 : float
        Volume of one voxel, mm^3.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        return _nan_metrics()
    out = {"n_voxels": n}
    for col, t in LAA_THRESHOLDS_HU.items():
        out[col] = 100.0 * np.count_nonzero(x < t) / n
    out["haa700_pct"] = 100.0 * np.count_nonzero(x > HAA_THRESHOLD_HU) / n
    p10, p15, p50 = np.percentile(x, [10, 15, 50])
    mean = float(x.mean())
    d = x - mean
    d2 = d * d
    m2 = float(d2.mean())
    m3 = float((d2 * d).mean())
    m4 = float((d2 * d2).mean())
    out.update(perc10_hu=float(p10), perc15_hu=float(p15), hu_mean=mean,
               hu_std=math.sqrt(m2), hu_median=float(p50))
    out["hu_skewness"], out["hu_kurtosis"] = _shape_stats(n, m2, m3, m4)
    voxel_ml = voxel_volume_mm3 / 1000.0
    out["volume_l"] = n * voxel_volume_mm3 / 1e6
    out["mass_g"] = voxel_ml * float((x + 1000.0).sum()) / 1000.0
    out["mass_schneider_g"] = voxel_ml * float(schneider_density_g_ml(x).sum())
    return {k: out[k] for k in PHENOTYPE_COLUMNS}


def _int16_compatible(lung_hu: np.ndarray) -> bool:
    if np.issubdtype(lung_hu.dtype, np.integer):
        if lung_hu.dtype.itemsize <= 2 and lung_hu.dtype != np.uint16:
            return True
        return lung_hu.size == 0 or (lung_hu.min() >= -_OFFSET and lung_hu.max() < _OFFSET)
    return False


def parenchyma_phenotypes(hu, labels, spacing_zyx_mm, direction_xyz) -> list[dict]:
    """Phenotypes of every region in :data:`REGIONS` order.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units (int16 fast path; floats accepted).
    labels : ndarray, shape like ``hu``
        0 background, 1 right lung, 2 left lung; any other nonzero value = lung
        without sides (RightLung / LeftLung rows then NaN with n_voxels 0).
    spacing_zyx_mm : sequence of 3 float
        Voxel size along the numpy axes, mm.
    direction_xyz : sequence of 9 float
        ITK direction matrix (decides the head-feet axis for the thirds).

    Returns
    -------
    list of dict
        ``{"region": name, **metrics}`` per region; metric keys = PHENOTYPE_COLUMNS.
    """
    hu = np.asarray(hu)
    labels = np.asarray(labels)
    if hu.shape != labels.shape:
        raise ValueError(f"HU shape {hu.shape} and label shape {labels.shape} differ")
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx_mm, dtype=np.float64)))
    lung, code, sides = region_codes(labels, direction_xyz)
    lung_hu = hu[lung]

    # Region -> the codes (3 * side + third) it is made of.
    members = {"WholeLung": range(9), "RightLung": (3, 4, 5), "LeftLung": (6, 7, 8),
               "UpperThird": (0, 3, 6), "MiddleThird": (1, 4, 7), "LowerThird": (2, 5, 8)}
    rows = []
    if _int16_compatible(lung_hu):
        key = code.astype(np.int64) * _NBINS + (lung_hu.astype(np.int64) + _OFFSET)
        hist = np.bincount(key, minlength=9 * _NBINS).reshape(9, _NBINS)
        for name in REGIONS:
            if name in ("RightLung", "LeftLung") and not sides:
                m = _nan_metrics()
            else:
                m = metrics_from_histogram(hist[list(members[name])].sum(axis=0), voxel_mm3)
            rows.append({"region": name, **m})
        return rows
    for name in REGIONS:
        if name in ("RightLung", "LeftLung") and not sides:
            m = _nan_metrics()
        else:
            m = metrics_from_values(lung_hu[np.isin(code, members[name])], voxel_mm3)
        rows.append({"region": name, **m})
    return rows
