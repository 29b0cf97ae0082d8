"""Scan quality control (the paper's exclusion rules) and HU clipping for model inputs.

The rules exclude scans whose HU statistics say "not a usable chest CT": extreme
maxima (metal, contrast pooling, corrupt rescale) or an HU standard deviation too
large for a normal reconstruction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emphy_dask.volume import CTVolume


@dataclass(frozen=True)
class QCRules:
    """Thresholds of the quality rules, all in Hounsfield units.

    Attributes
    ----------
    max_hu : float
        Exclude the scan if its maximum HU is above this.
    max_std_hu : float
        Exclude the scan if the standard deviation of its HU is above this.
    clip_min_hu, clip_max_hu : float
        Window that ``clip_hu`` applies to model inputs (not to phenotypes).
    """

    max_hu: float = 1600.0
    max_std_hu: float = 600.0
    clip_min_hu: float = -1000
    clip_max_hu: float = 400


@dataclass
class QCResult:
    """Outcome of ``qc_check``.

    Attributes
    ----------
    passed : bool
        True if no rule failed.
    rule : str or None
        The first failing rule, e.g. ``"max_hu>1600"`` or ``"std_hu>600"``; None if passed.
    value : float or None
        The measured value that broke ``rule`` (HU); None if passed.
    max_hu, std_hu : float
        Maximum and standard deviation of HU inside the field of view.
    n_voxels : int
        Number of voxels the statistics were computed over.
    """

    passed: bool
    rule: str | None
    value: float | None
    max_hu: float
    std_hu: float
    n_voxels: int


def qc_check(volume: CTVolume, rules: QCRules = QCRules()) -> QCResult:
    """Apply the exclusion rules: max HU > ``rules.max_hu`` or HU std > ``rules.max_std_hu``.

    The statistics are computed over the voxels inside the scan field of view only
    (``volume.fov_mask``; all voxels when it is None). Padding outside the scan circle
    is not a measurement: its fill value (-1024 here, often -2000 or -3024 in the file)
    would inflate the standard deviation and let the reader's choice decide the rule.

    Rules are checked in the order max HU, then std; the first that fails is reported.

    Parameters
    ----------
    volume : CTVolume
        ``hu`` shape (n_z, n_y, n_x), Hounsfield units.
    rules : QCRules

    Returns
    -------
    QCResult
    """
    n, max_hu, std_hu = _fov_max_std(volume.hu, volume.fov_mask)
    if n == 0:
        return QCResult(False, "empty_fov", 0.0, float("nan"), float("nan"), 0)
    if max_hu > rules.max_hu:
        return QCResult(False, f"max_hu>{rules.max_hu:g}", max_hu, max_hu, std_hu, n)
    if std_hu > rules.max_std_hu:
        return QCResult(False, f"std_hu>{rules.max_std_hu:g}", std_hu, max_hu, std_hu, n)
    return QCResult(True, None, None, max_hu, std_hu, n)


def _fov_max_std(hu: np.ndarray, fov_mask, block: int = 16) -> tuple[int, float, float]:
    """(voxel count, max, population std) of ``hu`` inside ``fov_mask``, in blocks of slices.

    Integer sums of values and squares are exact, so the std is exact to float rounding,
    without the float64 copies of a 10^8-voxel scan that ``ndarray.std`` makes (seconds, GBs).
    """
    n = s1 = s2 = 0
    max_hu = None
    for z in range(0, hu.shape[0], block):
        v = hu[z:z + block]
        if fov_mask is not None:
            v = v[fov_mask[z:z + block]]
        if v.size == 0:
            continue
        v32 = v.astype(np.int32)
        n += int(v.size)
        s1 += int(v32.sum(dtype=np.int64))
        s2 += int(np.square(v32).sum(dtype=np.int64))
        m = int(v.max())
        max_hu = m if max_hu is None else max(max_hu, m)
    if n == 0:
        return 0, float("nan"), float("nan")
    return n, float(max_hu), math.sqrt((n * s2 - s1 * s1) / (n * n))


def clip_hu(hu: np.ndarray, rules: QCRules = QCRules()) -> np.ndarray:
    """HU clipped to [``clip_min_hu``, ``clip_max_hu``], for model inputs only.

    Phenotypes (LAA%, percentiles) must use the unclipped HU: clipping at -1000 would
    move every voxel below -1000 onto the threshold.

    Parameters
    ----------
    hu : ndarray, any shape, Hounsfield units.

    Returns
    -------
    ndarray, same shape: int16 for integer input, float32 otherwise.
    """
    hu = np.asarray(hu)
    dtype = np.int16 if np.issubdtype(hu.dtype, np.integer) else np.float32
    return np.clip(hu, rules.clip_min_hu, rules.clip_max_hu).astype(dtype)
