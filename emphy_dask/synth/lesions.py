"""Where emphysema lesions go and how big they are: the four patterns' anatomy, on arrays.

A lesion is an irregular blob (a voxel template) at a centre. Sizes follow a truncated power
law in volume, P(V >= v) ~ v^-D (Mishima et al., PNAS 1999: D ~ 1.8-1.9 in normal lungs,
1.3-1.5 in emphysema; ``phenotypes/clusters.py`` measures it), between the pattern's
diameters. Centres are drawn on a coarse grid of cells (``CELL_MM``), weighted by the
pattern's zone (upper / lower predominance along the cranio-caudal axis), its distance to the
pleura (the lung mask's edge) and, for centrilobular lesions, the presence of small vessels
(the artery of the airway-artery bundle at the centre of the secondary lobule).

What is not modelled: fissures (the mask has no lobes, so paraseptal lesions follow the
costal and mediastinal pleura only), airway walls (airways stay as the base has them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Edge of a placement cell, mm: coarse enough to be cheap on a 512^2 x 300 grid, fine
#: enough for "within 5 mm of the pleura".
CELL_MM = 4.0
#: Parenchyma (not vessel, not wall): HU below this inside the lung mask.
VESSEL_MIN_HU = -600
#: Gap kept between lesion cores (weight >= 0.5) while lesions are placed apart, voxels (z, y, x):
#: their blurred fringes may overlap, the cores stay two voxels apart in-plane, so that the
#: scan's noise rarely bridges two lesions into one 6-connected LAA cluster.
CORE_GAP_VOX = (1, 2, 2)
#: A lesion's centre lies at least this fraction of its radius away from the lung mask's edge.
INSIDE_FRACTION = 0.8


@dataclass(frozen=True)
class PatternSpec:
    """One emphysema pattern.

    diameter_mm : (min, max) equivalent-sphere diameter of a lesion core, mm.
    d_aim : power-law exponent of lesion volumes (cumulative), dimensionless.
    target_hu : mean HU the lesion core is brought to (its noise stays on top).
    zone_power : weight (1 - rank)^p for upper (p > 0), rank^-p for lower (p < 0), rank 0 = apex.
    pleura_mm : (min, max) distance of a centre from the lung mask's edge, mm.
    vessel_bundle : True = centres favour cells with a small-vessel fraction (centrilobular).
    extra_blur_mm : added to the scan's point spread at the edges (panlobular: a graded fall).
    irregularity : relative amplitude of the radius modulation (0 = sphere).
    """

    name: str
    diameter_mm: tuple
    d_aim: float
    target_hu: float
    zone_power: float
    pleura_mm: tuple
    vessel_bundle: bool = False
    extra_blur_mm: float = 0.0
    irregularity: float = 0.3


PATTERNS: dict[str, PatternSpec] = {
    # Small lucencies around the lobular core, upper zones, spared subpleural rim.
    "centrilobular": PatternSpec("centrilobular", (3.0, 10.0), 1.5, -985.0, 2.0, (8.0, 1e9), vessel_bundle=True),
    # Whole lobules (10-25 mm), lower zones, merging, a graded fall rather than holes.
    "panlobular": PatternSpec("panlobular", (6.0, 25.0), 1.3, -975.0, -2.0, (0.0, 1e9), extra_blur_mm=2.0,
                              irregularity=0.45),
    # One row of subpleural lucencies, 5-20 mm, abutting the pleura.
    "paraseptal": PatternSpec("paraseptal", (5.0, 20.0), 1.5, -990.0, 0.5, (0.0, 5.0), irregularity=0.25),
    # Large thin-walled spaces (> 10 mm, up to 70 mm) among the smaller subpleural cysts they arise
    # from (5-10 mm), apical and subpleural. The small cysts are part of the pattern's size law:
    # without them the lesion mask's LAA clusters are a few hundred bullae plus the fragments the
    # scan's vessels and noise cut from their edges, and those fragments, far below the smallest
    # bulla, steer the fitted D to 0.3-0.5 whatever the bullae's own law (docs/real-anatomy.md).
    "bullous": PatternSpec("bullous", (5.0, 70.0), 1.1, -995.0, 1.5, (0.0, 20.0), irregularity=0.15),
}


def sample_volumes_mm3(n: int, d: float, diameter_mm: tuple, rng) -> np.ndarray:
    """``n`` lesion volumes (mm^3) from the truncated power law P(V >= v) ~ v^-d, shape (n,).

    Inverse-CDF sampling of a Pareto law with exponent ``d`` cut at the volumes of spheres of
    ``diameter_mm`` (min, max).
    """
    v_min, v_max = (np.pi / 6.0 * float(x) ** 3 for x in diameter_mm)
    u = rng.random(n)
    # CDF F(v) = (1 - (v_min/v)^d) / (1 - (v_min/v_max)^d), inverted.
    tail = 1.0 - u * (1.0 - (v_min / v_max) ** d)
    return v_min * tail ** (-1.0 / d)


def mean_volume_mm3(d: float, diameter_mm: tuple) -> float:
    """Mean of the truncated power law of ``sample_volumes_mm3``, mm^3."""
    v_min, v_max = (np.pi / 6.0 * float(x) ** 3 for x in diameter_mm)
    r = v_min / v_max
    if abs(d - 1.0) < 1e-9:
        return float(v_min * np.log(1 / r) / (1 - r))
    return float(d / (d - 1.0) * v_min * (1 - r ** (d - 1.0)) / (1 - r ** d))


def blob_template(radius_mm: float, spacing_zyx_mm, irregularity: float, sigma_mm, rng,
                  min_weight: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One irregular blob of equivalent radius ``radius_mm``, blurred by ``sigma_mm``.

    The radius is modulated by three random low-order waves of direction (amplitude
    ``irregularity``), so blobs are lumpy, not round. The indicator is then blurred with a
    Gaussian of ``sigma_mm`` (z, y, x): partial volume at the border.

    Returns
    -------
    offsets : ndarray int, shape (k, 3): voxel offsets (z, y, x) from the centre where the
        blurred weight >= ``min_weight``.
    weights : ndarray float32, shape (k,): the blurred indicator there, in (0, 1].
    halo : ndarray int, shape (h, 3): the core offsets (weight >= 0.5) grown by ``CORE_GAP_VOX``
        (an ellipsoid): a lesion whose halo holds no other lesion's core stays, noise apart, a
        separate 6-connected LAA cluster.
    """
    sp = np.asarray(spacing_zyx_mm, dtype=np.float64)
    sig = np.asarray(sigma_mm, dtype=np.float64)
    reach = radius_mm * (1.0 + irregularity) + 2.5 * sig + sp
    half = np.ceil(reach / sp).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, sp)]          # mm along z, y, x
    pz, py, px = np.ix_(*axes)
    r = np.sqrt(pz * pz + py * py + px * px)        # as np.linalg.norm sums them: (z^2 + y^2) + x^2
    # The waves move the radius by at most the irregularity (|mod| <= 3): inside the inner sphere
    # a voxel is in, outside the outer one out, and the waves are evaluated on the shell between
    # (a fifth to a half of the grid; the same blob as waves on every voxel).
    lo, hi = radius_mm * (1.0 - irregularity) * (1 - 1e-9), radius_mm * (1.0 + irregularity) * (1 + 1e-9)
    shell = np.nonzero((r > lo) & (r < hi))
    r_shell = r[shell]
    unit = (np.stack([a[i] for a, i in zip(axes, shell)], axis=-1)
            / np.maximum(r_shell, 1e-9)[:, None])
    mod = np.zeros(r_shell.shape)
    for _ in range(3):
        w = rng.normal(size=3)
        w *= rng.uniform(1.5, 3.0) / np.linalg.norm(w)
        mod += np.cos(unit @ w + rng.uniform(0, 2 * np.pi))
    inside = (r <= lo).astype(np.float32)
    inside[shell] = r_shell <= radius_mm * (1.0 + irregularity * mod / 3.0)
    inside[tuple(half)] = 1.0
    blurred = ndi.gaussian_filter(inside, sig / sp, truncate=2.5) if sig.any() else inside
    keep = blurred >= min_weight
    offsets = np.argwhere(keep) - half
    g = np.asarray(CORE_GAP_VOX)
    ball = sum((a / k) ** 2 for a, k in zip(np.ogrid[-g[0]:g[0] + 1, -g[1]:g[1] + 1, -g[2]:g[2] + 1], g)) <= 1.0
    core = np.pad(blurred >= 0.5, [(k, k) for k in g])
    core[tuple(half + g)] = True
    halo = np.argwhere(ndi.binary_dilation(core, ball)) - (half + g)
    return offsets, np.minimum(blurred[keep], 1.0).astype(np.float32), halo


@dataclass(frozen=True)
class CellGrid:
    """Placement cells over a lung mask.

    factor : cell size in voxels along (z, y, x).
    lung_frac, vessel_frac : ndarray float32 (cz, cy, cx): lung voxels / cell voxels, and
        vessel voxels / lung voxels.
    paren_mean_hu : ndarray float32: mean HU of the cell's parenchyma (NaN without any).
    pleura_mm : ndarray float32: distance of a cell to the nearest non-lung cell, mm.
    rank : ndarray float32: cranio-caudal rank of the cell's slab, 0 apex .. 1 base.
    """

    factor: tuple
    lung_frac: np.ndarray
    vessel_frac: np.ndarray
    paren_mean_hu: np.ndarray
    pleura_mm: np.ndarray
    rank: np.ndarray


def _block_sum(a: np.ndarray, f: tuple) -> np.ndarray:
    """Sums over blocks of ``f`` voxels (the array is cut to whole blocks), float64.

    Strided adds, one axis at a time, in the narrowest exact accumulator (bool: uint8 up to 255
    voxels a block; integers: int32): a numpy reduction over the short block axes of a 6-d
    reshape costs three times as much. Integer sums, so exact whatever the order."""
    cz, cy, cx = (n // k for n, k in zip(a.shape, f))
    a = a[:cz * f[0], :cy * f[1], :cx * f[2]]
    acc = np.uint8 if a.dtype == bool and np.prod(f) <= 255 else np.int64 if a.dtype == bool else np.int32
    if a.dtype == bool:
        a = a.view(np.uint8)
    for axis in (2, 1, 0):
        parts = [a[(slice(None),) * axis + (slice(i, None, f[axis]),)] for i in range(f[axis])]
        a = parts[0].astype(acc)
        for part in parts[1:]:
            a += part
    return a.astype(np.float64)


def cell_grid(hu: np.ndarray, lung: np.ndarray, spacing_zyx_mm, superior_is_high_index: bool,
              paren: np.ndarray | None = None) -> CellGrid:
    """Placement cells (``CELL_MM``) of a lung mask: see ``CellGrid``. ``paren``: the lung's
    parenchyma (``lung & (hu < VESSEL_MIN_HU)``) where the caller has it."""
    f = tuple(max(1, int(round(CELL_MM / s))) for s in spacing_zyx_mm)
    if paren is None:
        paren = lung & (hu < VESSEL_MIN_HU)
    n_cell = float(np.prod(f))
    n_lung = _block_sum(lung, f)
    n_paren = _block_sum(paren, f)
    # HU are integers: the int32 block sums equal the float sums, exactly
    sum_paren = _block_sum(np.multiply(hu, paren, dtype=np.int32), f)
    with np.errstate(invalid="ignore", divide="ignore"):
        vessel_frac = np.where(n_lung > 0, 1.0 - n_paren / n_lung, 0.0)
        paren_mean = np.where(n_paren > 0, sum_paren / n_paren, np.nan)
    inside = n_lung > 0.5 * n_cell
    cell_mm = tuple(k * s for k, s in zip(f, spacing_zyx_mm))
    pleura = ndi.distance_transform_edt(np.pad(inside, 1), sampling=cell_mm)[1:-1, 1:-1, 1:-1]
    per_slab = n_lung.sum(axis=(1, 2))
    sup_first = per_slab[::-1] if superior_is_high_index else per_slab
    r = (np.cumsum(sup_first) - sup_first / 2.0) / max(float(sup_first.sum()), 1.0)
    rank = r[::-1] if superior_is_high_index else r
    return CellGrid(f, (n_lung / n_cell).astype(np.float32), vessel_frac.astype(np.float32),
                    paren_mean.astype(np.float32), pleura.astype(np.float32), rank.astype(np.float32))


def placement_weights(grid: CellGrid, spec: PatternSpec, radius_mm: float = 0.0, reach: float = 1.0) -> np.ndarray:
    """Relative probability of a lesion centre per cell, shape of ``grid.lung_frac``.

    ``radius_mm``: the lesion's radius. Its centre lies at least ``INSIDE_FRACTION`` of it deep
    (the pleura does not cut the lesion, which would turn a lesion into a random cap and flatten
    the size law at its small end), and its near edge within the pattern's distance to the pleura
    (times ``reach``: deeper rows once the subpleural ones are full).
    """
    rank = grid.rank[:, None, None]
    zone = (1.0 - rank) ** spec.zone_power if spec.zone_power >= 0 else rank ** (-spec.zone_power)
    w = grid.lung_frac * (0.15 + zone)
    lo, hi = spec.pleura_mm
    lo, hi = max(lo, INSIDE_FRACTION * radius_mm), reach * hi + radius_mm
    w = w * ((grid.pleura_mm >= lo) & (grid.pleura_mm <= hi) & (grid.lung_frac > 0.5))
    if spec.vessel_bundle:
        # Lobular cores: cells holding a little vessel (the centrilobular artery), not hila.
        v = grid.vessel_frac
        w = w * np.where((v > 0.01) & (v < 0.2), 1.0, 0.1)
    return np.nan_to_num(w).astype(np.float64)


def centre_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells of non-zero weight (flat indices) and their cumulative weights, for
    ``sample_centres``: built once per weight array, not once per draw (a cumulative sum over
    every cell of the grid per pass and radius bin was a tenth of the insertion's time)."""
    p = np.asarray(weights, np.float64).ravel()
    cells = np.flatnonzero(p > 0)
    cdf = np.cumsum(p[cells])
    return cells, cdf / cdf[-1] if len(cells) else cdf


def sample_centres(grid: CellGrid, table: tuple, n: int, rng) -> np.ndarray:
    """``n`` voxel centres (n, 3) int, cells drawn by weight (``table`` from ``centre_table``),
    uniform within a cell. Draws as ``rng.choice(cells, n, p=weights / sum)`` would."""
    cells, cdf = table
    if n == 0 or not len(cells):
        return np.zeros((0, 3), int)
    u = rng.random(n)
    # searched in sorted order: the binary search starts from the last key's bracket (twice as
    # fast on 10^5 keys as in draw order); the result is the same, put back in draw order
    order = np.argsort(u)
    picked = np.empty(n, cells.dtype)
    picked[order] = cells[np.searchsorted(cdf, u[order], side="right")]
    cz, cy, cx = np.unravel_index(picked, grid.lung_frac.shape)
    f = np.asarray(grid.factor)
    jitter = (rng.random((n, 3)) * f).astype(int)
    return np.stack([cz, cy, cx], axis=1) * f + jitter
