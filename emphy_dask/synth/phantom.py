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

#: HU of voxels outside the scan circle: raw -2000 with intercept -1024 (PixelPaddingValue).
PADDING_HU_SYNTH = -3024
#: Cap on any tissue HU (dense cortical bone); keeps the image inside the QC range.
MAX_HU = 1600
PATTERNS = ("none", "centrilobular", "panlobular")
#: Tissue codes -> structural HU (before blur/noise); lung parenchyma is set separately.
_AIR, _FAT, _MUSCLE, _SOFT, _HEART, _LUNG, _LUMEN, _WALL, _RIB, _CORTEX, _CANCEL, _CANAL, _LIVER = range(13)
_LUT_HU = np.array([-1000, -100, 45, 35, 40, -860, -1000, 30, 1150, 1400, 250, 15, 55], np.float32)
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


class _Geom:
    """Per-patient anatomy parameters, mm (see module docstring for the frame)."""

    def __init__(self, shape, spacing, rng):
        nz, ny, nx = shape
        self.dz, self.dy, self.dx = spacing
        self.x = ((np.arange(nx) - (nx - 1) / 2) * self.dx).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2) * self.dy).astype(np.float32)
        self.z = (np.arange(nz) * self.dz).astype(np.float32)
        self.r_fov = min(nx * self.dx, ny * self.dy) / 2
        lz = (nz - 1) * self.dz
        s = float(rng.uniform(0.9, 1.0))
        s = min(s, 0.93 * self.r_fov / 160.0)             # body stays inside the scan circle
        self.s = s
        self.body = (160 * s, 130 * s)                    # skin ellipse semi-axes (x, y)
        self.cavity = (self.body[0] - 26, self.body[1] - 24)  # inner thoracic wall
        self.zlo, self.zhi = 0.07 * lz, 0.93 * lz         # costophrenic recess .. apex
        self.h = self.zhi - self.zlo
        # right lung: wider, diaphragm slightly higher (liver) -> still the larger lung
        self.lungs = {1: dict(cx=-72 * s, cy=5 * s, ax=60 * s, ay=82 * s, zlo=self.zlo + 0.02 * self.h),
                      2: dict(cx=76 * s, cy=5 * s, ax=55 * s, ay=82 * s, zlo=self.zlo)}
        self.dome_h = 0.13 * self.h
        self.heart = (22 * s, -30 * s, self.zlo + 0.25 * self.h, 58 * s, 48 * s, 0.2 * self.h)
        self.vert = (0.0, 58 * s, 17 * s)                 # vertebral body centre x, y, radius
        za = self.zhi - 0.3 * self.h                      # aortic arch level
        self.aorta = [((5 * s, -20 * s, self.heart[2]), (5 * s, -20 * s, za), 13 * s),
                      ((5 * s, -20 * s, za), (24 * s, 34 * s, za), 12 * s),
                      ((24 * s, 34 * s, za), (24 * s, 34 * s, -50.0), 11 * s)]
        # airways: trachea from above the scan to the carina, main bronchi to the hila
        self.wall_mm = max(2.0, 0.9 * min(self.dx, self.dy))  # wall >= ~1 voxel so it survives blur
        zc = self.zhi - 0.28 * self.h
        carina = (0.0, 8 * s, zc)
        self.airways = [((0.0, 8 * s, lz + 60.0), carina, 9.0),
                        (carina, (-40 * s, 8 * s, zc - 0.09 * self.h), 7.0),
                        (carina, (48 * s, 12 * s, zc - 0.14 * self.h), 6.0)]
        # vessel roots: just below/anterior to each main bronchus end
        self.hila = {k: np.array(self.airways[k][1]) + (0, -6 * s, -12) for k in (1, 2)}

    def lung(self, x, y, z, side):
        """Bool (broadcast of x, y, z in mm): inside lung ``side`` envelope (before airways)."""
        p = self.lungs[side]
        u = np.clip((z - p["zlo"]) / (self.zhi - p["zlo"]), 0, 1)
        taper = np.sqrt(np.clip(1 - u ** 2.2, 0, 1)) + 1e-6   # apex narrows to a dome
        m = ((x - p["cx"]) / (p["ax"] * taper)) ** 2 + ((y - p["cy"]) / (p["ay"] * taper)) ** 2 <= 1
        rho2 = ((x - p["cx"]) / p["ax"]) ** 2 + ((y - p["cy"] + 0.3 * p["ay"]) / p["ay"]) ** 2
        m &= z >= p["zlo"] + self.dome_h * np.clip(1 - rho2, 0, 1)   # diaphragm dome; deep posterior recess
        m &= (x / self.cavity[0]) ** 2 + (y / self.cavity[1]) ** 2 <= 1
        hx, hy, hz, hax, hay, haz = self.heart
        m &= ((x - hx) / (hax + 4)) ** 2 + ((y - hy) / (hay + 4)) ** 2 + ((z - hz) / (haz + 4)) ** 2 > 1
        vx, vy, vr = self.vert
        m &= (x - vx) ** 2 + (y - vy) ** 2 > (vr + 12) ** 2
        for a, b, r in self.aorta:
            if np.ndim(z) == 0 and not min(a[2], b[2]) - r - 4 <= z <= max(a[2], b[2]) + r + 4:
                continue  # this aorta segment is not on this slice
            m &= _capsule_dist(x, y, z, a, b) > r + 4
        m &= (x < -16 * self.s) if side == 1 else (x > 20 * self.s)   # anterior/posterior junction lines
        return m


def _capsule_dist(x, y, z, a, b):
    """Distance (mm) from points (broadcast x, y, z) to segment a-b."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)


def _bbox(g: _Geom, a, b, r):
    """Index slices (z, y, x) of the box around capsule a-b grown by r mm, and the coords there."""
    lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
    sl = []
    for c, (l, h) in zip((g.z, g.y, g.x), ((lo[2], hi[2]), (lo[1], hi[1]), (lo[0], hi[0]))):
        i0, i1 = np.searchsorted(c, l), np.searchsorted(c, h, side="right")
        sl.append(slice(int(i0), int(i1)))
    return tuple(sl), g.z[sl[0], None, None], g.y[None, sl[1], None], g.x[None, None, sl[2]]


def _tissue(g: _Geom, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue codes (z,y,x) uint8, true lung labels uint8, airway bool, all noise-free."""
    nz, ny, nx = shape
    X, Y = g.x[None, :], g.y[:, None]
    bx, by = g.body
    rb = (X / bx) ** 2 + (Y / by) ** 2
    slice2d = np.full((ny, nx), _AIR, np.uint8)
    slice2d[rb <= 1] = _FAT                                          # subcutaneous fat
    # patient table under the back: real scans have one, and it keeps the HU std of the
    # field of view (the paper's QC rule) in the range of real chest CT
    slice2d[(Y > by + 6) & (Y < by + 30) & (np.abs(X) < 0.8 * g.r_fov)] = _FAT
    slice2d[(X / (bx - 14)) ** 2 + (Y / (by - 12)) ** 2 <= 1] = _MUSCLE  # chest-wall muscle
    rc = np.sqrt((X / g.cavity[0]) ** 2 + (Y / g.cavity[1]) ** 2)
    slice2d[rc <= 1] = _SOFT                                         # mediastinum / abdomen
    vx, vy, vr = g.vert
    dv = np.sqrt((X - vx) ** 2 + (Y - vy) ** 2)
    slice2d[dv <= vr] = _CORTEX
    slice2d[dv <= vr - max(2.5, g.dx)] = _CANCEL
    canal_y = vy + vr + 9 * g.s
    slice2d[(np.abs(X) <= 5 * g.s) & (Y > canal_y) & (Y < canal_y + 30 * g.s)] = _CORTEX  # spinous process
    slice2d[(np.abs(X) <= 32 * g.s) & (np.abs(Y - canal_y) <= 4 * g.s)] = _CORTEX         # laminae / transverse
    slice2d[np.sqrt(X ** 2 + (Y - canal_y) ** 2) <= 8 * g.s] = _CANAL
    # rib ring just outside the cavity; ribs slope down anteriorly (phase depends on y)
    r_mm = np.sqrt(X ** 2 + Y ** 2) * (1 - 1 / np.maximum(rc, 1e-3))
    ring = (r_mm > 1.5) & (r_mm < 10.5) & (np.abs(np.arctan2(X, -Y)) > np.radians(28))
    ring_idx = np.nonzero(ring)
    ring_y = Y[ring_idx[0], 0]
    pitch, rib_h = g.h / 10.5, 0.42 * g.h / 10.5
    sternum = (np.abs(X) <= 16 * g.s) & (r_mm > 1.5) & (r_mm < 11) & (Y < 0)

    crops = {}  # per-lung in-plane box (the lung never leaves its widest ellipse)
    for side, p in g.lungs.items():
        sx = slice(*np.searchsorted(g.x, [p["cx"] - p["ax"] - 1, p["cx"] + p["ax"] + 1]))
        sy = slice(*np.searchsorted(g.y, [p["cy"] - p["ay"] - 1, p["cy"] + p["ay"] + 1]))
        crops[side] = (sy, sx)
    tissue = np.empty(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    hx, hy, hz, hax, hay, haz = g.heart
    for k in range(nz):
        z = g.z[k]
        t = slice2d.copy()
        if g.zlo - 25 < z < g.zhi + 15:
            rib = np.mod(z - 0.5 * ring_y, pitch) < rib_h
            t[ring_idx[0][rib], ring_idx[1][rib]] = _RIB
            if z > g.zlo + 0.35 * g.h:
                t[sternum] = _CORTEX
        in_lung = np.zeros((ny, nx), np.uint8)
        for side, (sy, sx) in crops.items():
            if g.lungs[side]["zlo"] <= z <= g.zhi:
                in_lung[sy, sx][g.lung(X[:, sx], Y[sy], z, side)] = side
        # below the diaphragm, the cavity is liver / abdomen
        dome = g.zlo + g.dome_h * np.clip(1 - (X / 120) ** 2 - ((Y + 20) / 90) ** 2, 0, 1) + 0.05 * g.h
        below = (t == _SOFT) & (z < dome)
        t[below] = _LIVER
        t[((X - hx) / hax) ** 2 + ((Y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 <= 1] = _HEART
        t[in_lung > 0] = _LUNG
        tissue[k], labels[k] = t, in_lung
    for a, b, r in g.aorta:
        sl, zz, yy, xx = _bbox(g, np.array(a), np.array(b), r + 1)
        sub = tissue[sl]
        sub[(_capsule_dist(xx, yy, zz, a, b) <= r) & (sub != _LUNG)] = _HEART   # blood pool
    airway = np.zeros(shape, bool)
    for a, b, r in g.airways:
        sl, zz, yy, xx = _bbox(g, np.array(a), np.array(b), r + g.wall_mm + 1)
        d = _capsule_dist(xx, yy, zz, a, b)
        wall = d <= r + g.wall_mm
        airway[sl] |= wall
        tissue[sl][wall & (tissue[sl] != _LUMEN)] = _WALL
        tissue[sl][d <= r] = _LUMEN
    # watertight wall at the voxel level: no lumen voxel may touch lung (26-neighbourhood),
    # otherwise coarse grids leak the trachea into the lungs at any air threshold
    pts = np.array([p for a, b, r in g.airways for p in (a, b)])
    sl, *_ = _bbox(g, pts.min(0), pts.max(0), 15.0 + g.wall_mm + 2 * max(g.dx, g.dz))
    lumen = tissue[sl] == _LUMEN
    ring = ndi.binary_dilation(lumen, np.ones((3, 3, 3), bool)) & ~lumen
    tissue[sl][ring & (tissue[sl] == _LUNG)] = _WALL
    airway[sl] |= ring
    labels[airway] = 0
    return tissue, labels, airway


def _vessel_tree(g: _Geom, labels: np.ndarray, rng) -> list:
    """Branching vessel segments [(a, b, radius_mm)] grown from each hilum, kept inside the lung.

    Bifurcating tree: radius x ~0.8 per generation (Murray's law), length ~6-10 radii,
    branching angle 20-40 deg; a branch that would leave the lung retries a few bent/shorter
    directions before it stops, so the tree fills the lung out to the periphery. Inside-lung
    checks look up the rasterised ``labels`` (z,y,x) at the nearest voxel (fast).
    """
    hi = np.array(labels.shape) - 1

    def inside(pts, side):
        idx = np.rint((pts[:, ::-1] - (0.0, g.y[0], g.x[0])) / (g.dz, g.dy, g.dx)).astype(int)
        if (idx < 0).any() or (idx > hi).any():
            return False
        return bool((labels[idx[:, 0], idx[:, 1], idx[:, 2]] == side).all())

    dirs = {1: [(-0.4, 0, 0.9), (-0.9, -0.4, 0.3), (-0.8, -0.5, -0.1), (-0.5, 0.6, -0.5), (-0.4, 0.45, -0.8),
                (-0.3, -0.45, -0.85)],
            2: [(0.4, 0, 0.9), (0.9, -0.3, 0.3), (0.85, -0.35, 0.0), (0.5, 0.6, -0.5), (0.4, 0.45, -0.8)]}
    segs, r_min = [], max(0.7, 0.25 * g.dx)
    for side, ds in dirs.items():
        stack = [(g.hila[side].astype(float), np.array(d, float) / np.linalg.norm(d), 4.5 * g.s) for d in ds]
        while stack:
            a, d, r = stack.pop()
            if r < r_min:
                continue
            for attempt in range(5):
                dd = d + 0.25 * attempt * rng.normal(size=3)
                dd /= np.linalg.norm(dd)
                b = a + dd * r * rng.uniform(6, 10) * (1.0 - 0.15 * attempt)
                pts = a + np.outer(np.linspace(0.3, 1, 4), b - a)
                if inside(pts, side):
                    break
            else:
                continue
            segs.append((a, b, r))
            perp = np.cross(dd, rng.normal(size=3))
            perp /= np.linalg.norm(perp) + 1e-9
            for sgn in (1, -1):
                ang = np.radians(rng.uniform(20, 40))
                dc = dd + sgn * np.tan(ang) * perp + 0.15 * rng.normal(size=3)
                stack.append((b, dc / np.linalg.norm(dc), r * rng.uniform(0.76, 0.86)))
    return segs


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
    g = _Geom(shape, spacing, rng)
    tissue, labels, airway = _tissue(g, shape)
    lung = labels > 0

    lung_flat = np.flatnonzero(lung)                     # lung voxels, C order
    pts = np.unravel_index(lung_flat, shape)

    # vessels: anti-aliased tubes; sub-voxel ones weighted by their area fraction (partial volume)
    vfrac = np.zeros(shape, np.float32)
    for a, b, r in _vessel_tree(g, labels, rng):
        sl, zz, yy, xx = _bbox(g, a, b, r + 1.5 * g.dx)
        f = np.clip((r - _capsule_dist(xx, yy, zz, a, b)) / g.dx + 0.5, 0, 1) * min(1.0, 2 * r / g.dx) ** 2
        np.maximum(vfrac[sl], f, out=vfrac[sl])
    vl = vfrac.reshape(-1)[lung_flat]
    del vfrac

    # parenchyma: patient-specific mean, posterior (dependent) gradient; vessels mixed in
    img = _LUT_HU[tissue]
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


def _add_emphysema(flat, lung_flat, pts, vl, g: _Geom, shape, pattern, severity_pct, rng) -> None:
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
