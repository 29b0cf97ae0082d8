"""Analytic chest-CT phantom with a known lung mask and controlled emphysema.

Coordinates (all anatomy is defined in mm, so it scales with the grid):

* array order (z, y, x); identity direction, so LPS +x = array x = towards the patient's
  LEFT (the right lung sits at low x indices), +y = array y = posterior, +z = array z =
  superior (index 0 is the most inferior slice);
* in-plane mm are measured from the slice centre (body centre); z mm from slice 0.

The craniocaudal anatomy (lung apex, carina, heart, diaphragm) is placed as fractions of
the scanned range, as a chest-CT protocol prescribes the range to cover the lungs.
In-plane anatomy uses absolute mm times a per-patient body scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .anatomy import TISSUE_HU, Geometry, bbox, capsule_dist, tissue_codes, vessel_tree

#: HU of voxels outside the scan circle: raw -2000 with intercept -1024 (PixelPaddingValue).
PADDING_HU_SYNTH = -3024
#: Cap on any tissue HU (dense cortical bone); keeps the image inside the QC range.
MAX_HU = 1600
PATTERNS = ("none", "centrilobular", "panlobular")
_VESSEL_HU = 40.0
_PAREN_MIN_HU = -900.0    # darkest healthy parenchyma level (before noise)
_NOISE_SD_HU = 22.0        # quantum noise (white)
_TEXTURE_SD_HU = 10.0      # smooth lung texture (lobular structure), ~3-5 mm blobs
_EMPH_HU = {"centrilobular": (-985.0, 15.0), "panlobular": (-972.0, 14.0)}  # mean, sd of destroyed tissue


@dataclass
class Phantom:
    """One synthetic chest CT.

    Attributes
    ----------
    hu : ndarray int16 (n_z, n_y, n_x)
        Hounsfield units; ``PADDING_HU_SYNTH`` (-3024) outside the scan circle.
    lung_labels : ndarray uint8 (n_z, n_y, n_x)
        True lungs: 0 background, 1 right lung, 2 left lung. Includes intrapulmonary
        vessels; excludes trachea and main bronchi (lumen and wall).
    truth : dict
        laa950_pct, hu_mean, lung_volume_l, label, severity_pct, pattern, plus
        lung_volume_right_l / lung_volume_left_l.
    spacing_zyx_mm : tuple of 3 float
    origin_xyz_mm : tuple of 3 float
        LPS position of voxel (0, 0, 0) (the most inferior slice), mm.
    fov_mask_yx : ndarray bool (n_y, n_x)
        True inside the scan circle (same for every slice).
    airway_mask : ndarray bool (n_z, n_y, n_x)
        Trachea + main bronchi lumen and wall (handy for testing segmenters).
    """

    hu: np.ndarray
    lung_labels: np.ndarray
    truth: dict
    spacing_zyx_mm: tuple
    origin_xyz_mm: tuple
    fov_mask_yx: np.ndarray
    airway_mask: np.ndarray = field(repr=False, default=None)


def truth_from(hu: np.ndarray, lung_labels: np.ndarray, spacing_zyx_mm, severity_pct, pattern) -> dict:
    """Ground truth recomputed from an HU array and a true lung mask (the rule others test)."""
    lung = lung_labels > 0
    vals = hu[lung].astype(np.float64)
    vox_l = float(np.prod(spacing_zyx_mm)) / 1e6
    laa = 100.0 * float(np.count_nonzero(vals < -950)) / max(vals.size, 1)
    hu_mean = float(vals.mean()) if vals.size else float("nan")
    return {
        "laa950_pct": laa,
        "hu_mean": hu_mean,
        "lung_volume_l": vals.size * vox_l,
        "lung_volume_right_l": int(np.count_nonzero(lung_labels == 1)) * vox_l,
        "lung_volume_left_l": int(np.count_nonzero(lung_labels == 2)) * vox_l,
        "label": int(laa >= 6.0 and hu_mean < -850.0),
        "severity_pct": float(severity_pct),
        "pattern": pattern,
    }


def _coarse_noise(shape, spacing, sigma_mm, rng, coarse_mm) -> tuple[np.ndarray, list]:
    """Gaussian-filtered white noise with unit std on a coarse grid (factor ``f`` per axis,
    coarse sample i sits at fine index i*f). Returns (coarse array, f)."""
    f = [max(1, int(coarse_mm // s)) for s in spacing]
    cshape = [n // k + 2 for n, k in zip(shape, f)]
    c = ndi.gaussian_filter(rng.standard_normal(cshape, dtype=np.float32),
                            [max(sigma_mm / (s * k), 0.5) for s, k in zip(spacing, f)])
    return c / (c.std() + 1e-9), f


def _sample_coarse(c, f, pts) -> np.ndarray:
    """Trilinear value of coarse grid ``c`` at fine voxel indices ``pts`` = (iz, iy, ix) arrays.
    Sampling only the lung voxels is ~10x cheaper than upsampling the whole 512^2 x 300 grid."""
    i0, w = [], []
    for p, k in zip(pts, f):
        i0.append(p // k)
        w.append(((p % k) / k).astype(np.float32))
    out = np.zeros(pts[0].shape, np.float32)
    steps = [(0, 1) if k > 1 else (0,) for k in f]   # no interpolation along full-resolution axes
    for dz in steps[0]:
        for dy in steps[1]:
            for dx in steps[2]:
                wt = ((w[0] if dz else 1 - w[0]) * (w[1] if dy else 1 - w[1]) * (w[2] if dx else 1 - w[2]))
                out += wt * c[i0[0] + dz, i0[1] + dy, i0[2] + dx]
    return out


def _binomial_blur(img: np.ndarray, spacing) -> None:
    """In-place [1/8, 3/4, 1/8] blur (~Gaussian sigma 0.5 voxel) along the axes finer than 2 mm:
    the scanner PSF (~1 mm) is sub-voxel on coarser axes. Edges replicate. Much faster than
    ndimage on 512^2 x 300."""
    for ax in range(img.ndim):
        if spacing[ax] >= 2.0:
            continue
        a = np.moveaxis(img, ax, 0)
        q = a * np.float32(0.125)
        a *= np.float32(0.75)
        a[1:] += q[:-1]
        a[:-1] += q[1:]
        a[0] += q[0]
        a[-1] += q[-1]


def make_phantom(shape_zyx, spacing_zyx_mm, severity_pct: float, pattern: str, rng, scanner: bool = True) -> Phantom:
    """Build one synthetic chest CT.

    Parameters
    ----------
    shape_zyx : tuple of 3 int
        (n_slices, n_rows, n_cols). Lungs need ~30+ voxels across (e.g. >= 96 columns at <= 3.8 mm).
    spacing_zyx_mm : tuple of 3 float
        (slice spacing, row spacing, column spacing), mm.
    severity_pct : float
        Target LAA950 (% of lung voxels < -950 HU); realised approximately, exact value in truth.
    pattern : {"none", "centrilobular", "panlobular"}
        "none" adds no emphysema (severity ignored; the noise alone gives ~0.5 % LAA950).
    rng : numpy.random.Generator or int seed
    scanner : bool
        False: the noise-free object (no PSF blur, no quantum noise), for rendering with a
        reconstruction kernel (``synth.kernels.render_kernel``).

    Returns
    -------
    Phantom
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    rng = np.random.default_rng(rng)
    shape = tuple(int(n) for n in shape_zyx)
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    g = Geometry(shape, spacing, rng)
    tissue, labels, airway = tissue_codes(g, shape)
    lung = labels > 0

    lung_flat = np.flatnonzero(lung)                     # lung voxels, C order
    pts = np.unravel_index(lung_flat, shape)

    # vessels: anti-aliased tubes; sub-voxel ones weighted by their area fraction (partial volume)
    vfrac = np.zeros(shape, np.float32)
    for a, b, r in vessel_tree(g, labels, rng):
        sl, zz, yy, xx = bbox(g, a, b, r + 1.5 * g.dx)
        f = np.clip((r - capsule_dist(xx, yy, zz, a, b)) / g.dx + 0.5, 0, 1) * min(1.0, 2 * r / g.dx) ** 2
        np.maximum(vfrac[sl], f, out=vfrac[sl])
    vl = vfrac.reshape(-1)[lung_flat]
    del vfrac

    # parenchyma: patient-specific mean, posterior (dependent) gradient; vessels mixed in
    img = TISSUE_HU[tissue]
    flat = img.reshape(-1)
    target_mean = float(rng.normal(-860, 5))
    gl = 15.0 * g.y[pts[1]] / 80.0
    m_v = float(vl.mean())
    paren = (target_mean - _VESSEL_HU * m_v) / (1 - m_v)
    flat[lung_flat] = (paren + gl - gl.mean()) * (1 - vl) + _VESSEL_HU * vl
    del gl

    # scanner: PSF blur, smooth lung texture, white noise
    if scanner:
        _binomial_blur(img, spacing)
    vals = flat[lung_flat]
    # undo the chest-wall partial-volume bias on the lung mean, but keep the parenchyma
    # >= -900 HU so a healthy lung keeps a low LAA950 (a few %) at any resolution
    shift = max(target_mean - float(vals.mean()), _PAREN_MIN_HU - paren)
    vals += shift
    c, f = _coarse_noise(shape, spacing, 1.5, rng, coarse_mm=2.0)
    vals += _TEXTURE_SD_HU * _sample_coarse(c, f, pts)
    flat[lung_flat] = vals
    del vals
    if scanner:
        img += rng.standard_normal(shape, dtype=np.float32) * _NOISE_SD_HU

    if pattern != "none" and severity_pct > 0:
        _add_emphysema(flat, lung_flat, pts, vl, g, shape, pattern, float(severity_pct), rng)
    del vl, pts

    hu = np.clip(np.rint(img), -1024, MAX_HU).astype(np.int16)
    del img
    fov = (g.x[None, :] ** 2 + g.y[:, None] ** 2) <= g.r_fov ** 2
    hu[:, ~fov] = PADDING_HU_SYNTH
    nz, ny, nx = shape
    origin = (round(-(nx - 1) / 2 * spacing[2], 4), round(-(ny - 1) / 2 * spacing[1], 4),
              round(-(nz - 1) * spacing[0], 4))
    truth = truth_from(hu, labels, spacing, severity_pct if pattern != "none" else 0.0, pattern)
    return Phantom(hu, labels, truth, spacing, origin, fov, airway)


def _add_emphysema(flat, lung_flat, pts, vl, g: Geometry, shape, pattern, severity_pct, rng) -> None:
    """Replace the most 'emphysema-prone' parenchyma voxels by low attenuation, in place.

    ``flat`` is the raveled float32 image, ``lung_flat``/``pts`` the lung voxels (flat / zyx
    indices), ``vl`` their vessel fraction (vessels are spared). Propensity: centrilobular =
    sum of small Gaussian blobs (sigma ~2.5 mm) seeded densely in the upper zone; panlobular =
    smooth field (sigma ~8 mm) plus a strong lower-zone ramp. The cut-off is chosen so the
    lung's LAA950 after replacement is closest to ``severity_pct``.
    """
    spacing = (g.dz, g.dy, g.dx)
    cand = vl < 0.2
    idx = lung_flat[cand]
    u = np.clip((g.z[pts[0][cand]] - g.zlo) / g.h, 0, 1)        # 0 base .. 1 apex
    cpts = tuple(p[cand] for p in pts)
    if pattern == "centrilobular":
        f = [max(1, int(2.0 // s)) for s in spacing]
        cshape = [n // k + 2 for n, k in zip(shape, f)]
        cu = np.clip((np.arange(cshape[0]) * f[0] * g.dz - g.zlo) / g.h, 0, 1)[:, None, None]
        zone = np.clip((cu - 0.35) / 0.5, 0.02, 1) ** 1.5
        vox_mm3 = float(np.prod([s * k for s, k in zip(spacing, f)]))
        seeds = (rng.random(cshape, dtype=np.float32) < zone * vox_mm3 / 250.0).astype(np.float32)
        c = ndi.gaussian_filter(seeds, [max(2.5 / (s * k), 0.5) for s, k in zip(spacing, f)])
        p = _sample_coarse(c / (c.max() + 1e-9), f, cpts) * np.clip((u - 0.2) / 0.6, 0.05, 1)
        mu, sd = _EMPH_HU["centrilobular"]
    else:
        c, f = _coarse_noise(shape, spacing, 8.0, rng, coarse_mm=4.0)
        p = _sample_coarse(c, f, cpts) + 3.0 * (1 - u) ** 1.5
        mu, sd = _EMPH_HU["panlobular"]
    del cpts, u
    n_lung = lung_flat.size
    base_below = int(np.count_nonzero(flat[lung_flat] < -950))
    p += rng.random(p.size, dtype=np.float32) * 1e-6             # break ties
    new = (mu + sd * rng.standard_normal(p.size, dtype=np.float32)).astype(np.float32)
    delta = (new < -950).astype(np.int64) - (flat[idx] < -950)
    # equal-population bins of propensity from a subsample; pick the best cut-off bin
    sub = np.sort(p[rng.integers(0, p.size, min(p.size, 200_000))])
    edges = sub[np.linspace(0, sub.size - 1, 4097).astype(int)[1:-1]]
    b = np.searchsorted(edges, p)
    per_bin = np.bincount(b, weights=delta, minlength=edges.size + 1)
    gain = np.concatenate([[0.0], np.cumsum(per_bin[::-1])])    # gain[j]: top j bins replaced
    j = int(np.argmin(np.abs(base_below + gain - severity_pct / 100 * n_lung)))
    sel = b >= edges.size + 1 - j
    flat[idx[sel]] = new[sel]
