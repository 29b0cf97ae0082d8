"""Seconds of the phenotype stage on a full-size grid, per mask encoding.

Usage: python benchmarks/phenotypes_time.py [n_slices]

A 300 x 512 x 512 int16 HU volume with two ellipsoidal lungs (about 25 % of the voxels), given
as 1/2 right/left labels, as a binary mask (sides split by components) and as a CIP partial-lung
label map (uint16, per-lung thirds, airway voxels outside the lung regions). Best of 3 runs.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from emphy_dask.phenotypes import parenchyma_phenotypes

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def case(nz: int):
    rng = np.random.default_rng(0)
    shape = (nz, 512, 512)
    z = np.arange(nz)[:, None, None]
    y = np.arange(512)[None, :, None]
    x = np.arange(512)[None, None, :]
    hu = rng.normal(-850, 90, shape).clip(-1024, 3000).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    for side, cx in ((1, 160), (2, 352)):
        lab[((y - 256) / 170) ** 2 + ((x - cx) / 95) ** 2 + ((z - nz / 2) / (0.48 * nz)) ** 2 < 1] = side
    third = np.minimum(3 * (nz - 1 - z) // nz, 2)                      # larger z = superior
    cip = np.zeros(shape, np.uint16)
    cip[lab == 1] = (12 + np.broadcast_to(third, shape))[lab == 1]    # RIGHTUPPER/MIDDLE/LOWERTHIRD
    cip[lab == 2] = (9 + np.broadcast_to(third, shape))[lab == 2]     # LEFT...
    cip[(lab == 0) & (abs(x - 256) < 8) & (abs(y - 256) < 8)] = 2 << 8  # airway, no lung region
    return hu, lab, cip


def best_of(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


if __name__ == "__main__":
    nz = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    hu, lab, cip = case(nz)
    print(f"grid {hu.shape}, lung voxels {np.count_nonzero(lab):,}")
    for name, labels in (("right-left 1/2", lab), ("binary (split)", (lab > 0).astype(np.uint8)),
                         ("CIP uint16", cip)):
        s = best_of(lambda: parenchyma_phenotypes(hu, labels, (1.0, 0.7, 0.7), EYE))
        print(f"{name:16s} {s:.2f} s")
