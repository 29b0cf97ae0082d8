"""CIP-compatible parenchyma phenotypes (SlicerCIP ``CIP_ParenchymaAnalysis``, CIP's CLI).

Per region (see :mod:`.labelmaps`) of the lung label map, on the CT's native grid:

===================  =========================================================
n_voxels             lung voxels in the region
laa950_pct ...       100 * #(HU < T) / n for T = -950, -925, -910, -905, -900,
                     -875, -856 (strict <; CIP's %Below-T)
haa700_pct ...       100 * #(HU > T) / n for T = -700, -600, -250, 0 (strict >;
                     CIP's %Above-T)
perc10_hu/15_hu      ``numpy.percentile`` (linear interpolation) at 10 / 15
perc10/15_cli_hu     CIP CLI's rule: the HU of the last integer histogram bin
                     whose cumulative fraction does not exceed p (integers)
hu_mean, hu_std      mean, population std (ddof=0)
hu_median            ``numpy.median``; hu_median_cli: the CLI's rule at p = 0.5
hu_mode              most frequent HU (the lowest one on ties, as the CLI)
hu_skewness          ``scipy.stats.skew(bias=True)`` (as SlicerCIP and the CLI)
hu_kurtosis          ``scipy.stats.kurtosis(fisher=True, bias=False)`` (cip_python)
hu_kurtosis_pearson  m4 / m2^2 (biased Pearson, what the CLI prints: ~ Fisher + 3)
volume_l             n * voxel volume (mm^3) / 1e6
mass_g               sum of voxel_ml * (HU + 1000) / 1000 g/ml (= the CLI's mass)
mass_schneider_g     cip_python's mass: piecewise Schneider HU->density curve,
                     HU clipped at -1000 first (see :func:`schneider_density_g_ml`)
===================  =========================================================

Regions with no voxels carry NaN (never a stale or uninitialised value).

Speed: integer HU go through one ``np.bincount`` over lung voxels, keyed by (region code,
HU - min HU); every metric, percentiles included, is then exact arithmetic on the
histograms, so a 30 M-voxel lung costs one pass. Float HU fall back to the values.
"""
from __future__ import annotations

import math

import numpy as np

from .labelmaps import N_CODES, LungRegions, decode_label_map, region_selectors

#: Metric columns, in order (schemas/phenotypes.v1.json lists the same, a test checks).
PHENOTYPE_COLUMNS = (
    "n_voxels",
    "laa950_pct", "laa925_pct", "laa910_pct", "laa905_pct", "laa900_pct", "laa875_pct", "laa856_pct",
    "haa700_pct", "haa600_pct", "haa250_pct", "haa0_pct",
    "perc10_hu", "perc15_hu", "perc10_cli_hu", "perc15_cli_hu",
    "hu_mean", "hu_std", "hu_median", "hu_median_cli", "hu_mode",
    "hu_skewness", "hu_kurtosis", "hu_kurtosis_pearson",
    "volume_l", "mass_g", "mass_schneider_g",
)

LAA_THRESHOLDS_HU = {"laa950_pct": -950, "laa925_pct": -925, "laa910_pct": -910, "laa905_pct": -905,
                     "laa900_pct": -900, "laa875_pct": -875, "laa856_pct": -856}
HAA_THRESHOLDS_HU = {"haa700_pct": -700, "haa600_pct": -600, "haa250_pct": -250, "haa0_pct": 0}
HAA_THRESHOLD_HU = -700

_OFFSET = 32768          # int16 -> bin index of a full int16 histogram
_NBINS = 65536


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


def _nan_metrics() -> dict:
    out = {c: math.nan for c in PHENOTYPE_COLUMNS}
    out["n_voxels"] = 0
    return out


def _shape_stats(n: int, m2: float, m3: float, m4: float) -> tuple[float, float, float]:
    """(skewness bias=True, Fisher kurtosis bias=False as scipy, Pearson kurtosis m4/m2^2)."""
    if m2 <= 0.0:
        return math.nan, math.nan, math.nan   # constant data: scipy gives NaN too
    skew = m3 / m2 ** 1.5
    g2 = m4 / m2 ** 2
    if n > 3:
        kurt = ((n * n - 1.0) * g2 - 3.0 * (n - 1) ** 2) / ((n - 2) * (n - 3))
    else:
        kurt = g2 - 3.0                       # scipy leaves n <= 3 uncorrected
    return float(skew), float(kurt), float(g2)


def cli_percentile_hu(hu_bins, counts, p: float) -> float:
    """CIP CLI's histogram percentile: the last integer HU whose cumulative fraction <= p.

    GenerateParenchymaPhenotypes walks the integer bins upwards and keeps the last bin ``i``
    with ``cum(i) / n <= p`` (empty bins included), i.e. one below the first occupied bin
    whose cumulative fraction exceeds p. The same double division is used here, so a
    fraction exactly at p compares as in the CLI.

    Parameters
    ----------
    hu_bins : ndarray of int, shape (k,)
        Occupied integer HU bins, ascending.
    counts : ndarray of int, shape (k,)
        Voxels per bin (> 0).
    p : float
        Fraction in [0, 1).

    Returns
    -------
    float
        Integer HU (as float); NaN for no voxels.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return math.nan
    frac = np.cumsum(counts).astype(np.float64) / float(n)
    j = int(np.argmax(frac > p))
    return float(np.asarray(hu_bins)[j] - 1)


def _histogram_metrics(v: np.ndarray, c: np.ndarray, voxel_volume_mm3: float) -> dict:
    """All metrics from occupied bins ``v`` (integer HU, ascending) with counts ``c`` (> 0)."""
    n = int(c.sum())
    cf = c.astype(np.float64)
    cum = np.cumsum(c)
    out = {"n_voxels": n}
    for col, t in LAA_THRESHOLDS_HU.items():
        out[col] = 100.0 * float(cf[v < t].sum()) / n
    for col, t in HAA_THRESHOLDS_HU.items():
        out[col] = 100.0 * float(cf[v > t].sum()) / n

    def sorted_at(k):
        # k-th smallest value (0-based) of the region's HU
        return v[np.searchsorted(cum, k, side="right")]

    def percentile(q):
        # numpy 'linear': h = (n-1) q/100, a[lo] + (h-lo) (a[lo+1] - a[lo])
        h = (n - 1) * q / 100.0
        lo = int(math.floor(h))
        a_lo = float(sorted_at(lo))
        a_hi = float(sorted_at(min(lo + 1, n - 1)))
        return a_lo + (h - lo) * (a_hi - a_lo)

    out["perc10_hu"] = percentile(10)
    out["perc15_hu"] = percentile(15)
    out["perc10_cli_hu"] = cli_percentile_hu(v, c, 0.10)
    out["perc15_cli_hu"] = cli_percentile_hu(v, c, 0.15)
    vf = v.astype(np.float64)
    mean = float((cf * vf).sum() / n)
    d = vf - mean
    m2 = float((cf * d * d).sum() / n)
    m3 = float((cf * d ** 3).sum() / n)
    m4 = float((cf * d ** 4).sum() / n)
    out["hu_mean"] = mean
    out["hu_std"] = math.sqrt(m2)
    out["hu_median"] = percentile(50)
    out["hu_median_cli"] = cli_percentile_hu(v, c, 0.5)
    out["hu_mode"] = float(v[int(np.argmax(c))])         # first maximum: the lowest HU on ties
    out["hu_skewness"], out["hu_kurtosis"], out["hu_kurtosis_pearson"] = _shape_stats(n, m2, m3, m4)
    voxel_ml = voxel_volume_mm3 / 1000.0
    out["volume_l"] = n * voxel_volume_mm3 / 1e6
    out["mass_g"] = voxel_ml * float((cf * (vf + 1000.0)).sum()) / 1000.0
    out["mass_schneider_g"] = voxel_ml * float((cf * schneider_density_g_ml(vf)).sum())
    return {k: out[k] for k in PHENOTYPE_COLUMNS}


def metrics_from_histogram(counts: np.ndarray, voxel_volume_mm3: float, first_hu: int = -_OFFSET) -> dict:
    """Phenotypes of one region from its integer HU histogram.

    Parameters
    ----------
    counts : ndarray of int, shape (n_bins,)
        counts[i] = voxels with HU == first_hu + i (default: a full int16 histogram,
        65 536 bins from -32768).
    voxel_volume_mm3 : float
        Volume of one voxel, mm^3.
    first_hu : int
        HU of bin 0.

    Returns
    -------
    dict with the :data:`PHENOTYPE_COLUMNS` keys.
    """
    counts = np.asarray(counts, dtype=np.int64)
    nz = np.flatnonzero(counts)                    # only occupied bins matter
    if nz.size == 0:
        return _nan_metrics()
    return _histogram_metrics(nz.astype(np.int64) + int(first_hu), counts[nz], voxel_volume_mm3)


def metrics_from_values(values: np.ndarray, voxel_volume_mm3: float) -> dict:
    """Phenotypes of one region from its HU values (any dtype), computed directly.

    The CLI-rule columns and the mode use the values rounded to integer HU (the CLI reads
    CT as 16-bit integers).

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
    for col, t in HAA_THRESHOLDS_HU.items():
        out[col] = 100.0 * np.count_nonzero(x > t) / n
    p10, p15, p50 = np.percentile(x, [10, 15, 50])
    mean = float(x.mean())
    d = x - mean
    d2 = d * d
    m2 = float(d2.mean())
    m3 = float((d2 * d).mean())
    m4 = float((d2 * d2).mean())
    bins, counts = np.unique(np.rint(x).astype(np.int64), return_counts=True)
    out.update(perc10_hu=float(p10), perc15_hu=float(p15), hu_mean=mean,
               hu_std=math.sqrt(m2), hu_median=float(p50),
               perc10_cli_hu=cli_percentile_hu(bins, counts, 0.10),
               perc15_cli_hu=cli_percentile_hu(bins, counts, 0.15),
               hu_median_cli=cli_percentile_hu(bins, counts, 0.5),
               hu_mode=float(bins[int(np.argmax(counts))]))
    out["hu_skewness"], out["hu_kurtosis"], out["hu_kurtosis_pearson"] = _shape_stats(n, m2, m3, m4)
    voxel_ml = voxel_volume_mm3 / 1000.0
    out["volume_l"] = n * voxel_volume_mm3 / 1e6
    out["mass_g"] = voxel_ml * float((x + 1000.0).sum()) / 1000.0
    out["mass_schneider_g"] = voxel_ml * float(schneider_density_g_ml(x).sum())
    return {k: out[k] for k in PHENOTYPE_COLUMNS}


def region_phenotypes(hu, regions: LungRegions, spacing_zyx_mm) -> list[dict]:
    """Phenotypes of every region of a decoded label map (:func:`.labelmaps.region_selectors` order).

    Parameters
    ----------
    hu : ndarray, shape like ``regions.lung``
        Hounsfield units (integer fast path; floats accepted).
    regions : LungRegions
        From :func:`.labelmaps.decode_label_map`.
    spacing_zyx_mm : sequence of 3 float
        Voxel size along the numpy axes, mm.

    Returns
    -------
    list of dict
        ``{"region": name, **metrics}``; regions the map cannot give (no sides) are NaN rows
        with n_voxels 0.
    """
    hu = np.asarray(hu)
    if hu.shape != regions.lung.shape:
        raise ValueError(f"HU shape {hu.shape} and label shape {regions.lung.shape} differ")
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx_mm, dtype=np.float64)))
    lung_hu = hu[regions.lung]
    selectors = region_selectors(regions)
    rows = []
    if np.issubdtype(lung_hu.dtype, np.integer) and lung_hu.size:
        lo, hi = int(lung_hu.min()), int(lung_hu.max())
        width = hi - lo + 1
        # key = code * width + (hu - lo), built in place in int32 (N_CODES * 65536 fits) and
        # counted in slices: bincount widens its input to int64, a copy per slice only
        key = regions.code.astype(np.int32)
        key *= width
        key += lung_hu
        key -= lo
        hist = np.zeros(N_CODES * width, np.int64)
        for i in range(0, key.size, 1 << 22):
            hist += np.bincount(key[i:i + (1 << 22)], minlength=N_CODES * width)
        hist = hist.reshape(N_CODES, width)
        for name, sel in selectors:
            m = _nan_metrics() if sel is None else metrics_from_histogram(hist[sel].sum(axis=0), voxel_mm3, lo)
            rows.append({"region": name, **m})
        return rows
    for name, sel in selectors:
        m = _nan_metrics() if sel is None else metrics_from_values(lung_hu[sel[regions.code]], voxel_mm3)
        rows.append({"region": name, **m})
    return rows


def parenchyma_phenotypes(hu, labels, spacing_zyx_mm, direction_xyz, encoding: str | None = None) -> list[dict]:
    """Phenotypes of every region of a lung label map.

    Parameters
    ----------
    hu : ndarray, shape (n_z, n_y, n_x)
        Hounsfield units (integer fast path; floats accepted).
    labels : ndarray, shape like ``hu``
        Lung label map in any encoding of :mod:`.labelmaps` (0/1 right/2 left, binary,
        CIP, LTRCLobes), detected unless ``encoding`` is given.
    spacing_zyx_mm : sequence of 3 float
        Voxel size along the numpy axes, mm.
    direction_xyz : sequence of 9 float
        ITK direction matrix (head-feet axis for the thirds, left-right for sides).

    Returns
    -------
    list of dict
        ``{"region": name, **metrics}`` per region: :data:`.regions.REGIONS`, then
        :data:`.labelmaps.LOBES` when the map has lobes; metric keys = PHENOTYPE_COLUMNS.
    """
    hu = np.asarray(hu)
    labels = np.asarray(labels)
    if hu.shape != labels.shape:
        raise ValueError(f"HU shape {hu.shape} and label shape {labels.shape} differ")
    return region_phenotypes(hu, decode_label_map(labels, spacing_zyx_mm, direction_xyz, encoding), spacing_zyx_mm)
