"""Anatomy of the synthetic chest: body, ribs, spine, heart, airways, lungs and vessel tree.

Coordinates (all anatomy is defined in mm, so it scales with the grid): array order (z, y, x);
+x towards the patient's LEFT, +y posterior, +z superior (index 0 the most inferior slice);
in-plane mm from the slice centre, z mm from slice 0 (see ``synth.phantom``). Craniocaudal
landmarks are fractions of the scanned range; in-plane sizes are mm times a per-patient scale.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Tissue codes -> structural HU (before blur/noise); lung parenchyma is set separately.
_AIR, _FAT, _MUSCLE, _SOFT, _HEART, _LUNG, _LUMEN, _WALL, _RIB, _CORTEX, _CANCEL, _CANAL, _LIVER = range(13)
TISSUE_HU = np.array([-1000, -100, 45, 35, 40, -860, -1000, 30, 1150, 1400, 250, 15, 55], np.float32)


class Geometry:
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
            m &= capsule_dist(x, y, z, a, b) > r + 4
        m &= (x < -16 * self.s) if side == 1 else (x > 20 * self.s)   # anterior/posterior junction lines
        return m


def capsule_dist(x, y, z, a, b):
    """Distance (mm) from points (broadcast x, y, z) to segment a-b."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)


def bbox(g: Geometry, a, b, r):
    """Index slices (z, y, x) of the box around capsule a-b grown by r mm, and the coords there."""
    lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
    sl = []
    for c, (l, h) in zip((g.z, g.y, g.x), ((lo[2], hi[2]), (lo[1], hi[1]), (lo[0], hi[0]))):
        i0, i1 = np.searchsorted(c, l), np.searchsorted(c, h, side="right")
        sl.append(slice(int(i0), int(i1)))
    return tuple(sl), g.z[sl[0], None, None], g.y[None, sl[1], None], g.x[None, None, sl[2]]


def tissue_codes(g: Geometry, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        sl, zz, yy, xx = bbox(g, np.array(a), np.array(b), r + 1)
        sub = tissue[sl]
        sub[(capsule_dist(xx, yy, zz, a, b) <= r) & (sub != _LUNG)] = _HEART   # blood pool
    airway = np.zeros(shape, bool)
    for a, b, r in g.airways:
        sl, zz, yy, xx = bbox(g, np.array(a), np.array(b), r + g.wall_mm + 1)
        d = capsule_dist(xx, yy, zz, a, b)
        wall = d <= r + g.wall_mm
        airway[sl] |= wall
        tissue[sl][wall & (tissue[sl] != _LUMEN)] = _WALL
        tissue[sl][d <= r] = _LUMEN
    # watertight wall at the voxel level: no lumen voxel may touch lung (26-neighbourhood),
    # otherwise coarse grids leak the trachea into the lungs at any air threshold
    pts = np.array([p for a, b, r in g.airways for p in (a, b)])
    sl, *_ = bbox(g, pts.min(0), pts.max(0), 15.0 + g.wall_mm + 2 * max(g.dx, g.dz))
    lumen = tissue[sl] == _LUMEN
    ring = ndi.binary_dilation(lumen, np.ones((3, 3, 3), bool)) & ~lumen
    tissue[sl][ring & (tissue[sl] == _LUNG)] = _WALL
    airway[sl] |= ring
    labels[airway] = 0
    return tissue, labels, airway


def vessel_tree(g: Geometry, labels: np.ndarray, rng) -> list:
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
