"""Seconds of the kernel estimate and of the harmonisation on a full-size volume.

    python benchmarks/harmonize_time.py [N_SLICES]

A synthetic 512 x 512 x N (default 300) chest at 0.7 mm x 1 mm, rendered with a GE LUNG-like
kernel (clipped at -1024 like a Philips/Siemens series, so the clipped-voxel fill runs too) and
with the standard kernel, then ``estimate_kernel`` and ``harmonize_kernel`` (given the
estimate) with each method side by side, best of 3. Run it with ``OMP_NUM_THREADS=1``.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from emphy_dask.preprocess.harmonize import harmonize_kernel
from emphy_dask.preprocess.kernel_estimate import estimate_kernel
from emphy_dask.synth.kernels import render_kernel
from emphy_dask.synth.phantom import make_phantom


def best_of(n, fn):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main(n_slices: int = 300) -> None:
    ph = make_phantom((n_slices, 512, 512), (1.0, 0.7, 0.7), 15.0, "centrilobular", 7, scanner=False)
    fov = np.broadcast_to(ph.fov_mask_yx, ph.hu.shape)
    for kernel in ("ge_lung", "standard"):
        hu = render_kernel(ph.hu, ph.spacing_zyx_mm, kernel, noise_sd_hu=20.0, seed=1, fov_mask_yx=ph.fov_mask_yx)
        t_est, est = best_of(3, lambda: estimate_kernel(hu, ph.spacing_zyx_mm, fov_mask=fov))
        for method in ("nps_shape", "nps_ratio"):
            t_harm, (_, params) = best_of(3, lambda: harmonize_kernel(hu, ph.spacing_zyx_mm, "unknown", fov_mask=fov,
                                                                      estimate=est, method=method))
            print(f"{kernel:8s} {hu.shape} {method}: estimate {t_est:.2f} s ({est.n_rois} ROIs, class "
                  f"{est.kernel_class}), harmonize {t_harm:.2f} s, total {t_est + t_harm:.2f} s "
                  f"(applied {params['applied']}, {params.get('clipped_n_clipped', 0)} clipped voxels filled)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
