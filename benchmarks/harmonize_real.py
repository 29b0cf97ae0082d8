"""Harmonisation on the real chests in ../shared/data: the noise spectrum's mean frequency before
and after, and the one real pair's phenotypes.

    python benchmarks/harmonize_real.py

For each series: kernel, class, the fitted transfer's gain at 0.3 / 0.5 lp/mm, the NPS mean
frequency (fav) before, after as predicted (NPS T^2) and re-measured on the harmonised volume.
For Lung_Dx-A0001 (Philips L and B of one acquisition): LAA%-950, LAA%-910, Perc15 and MLD of
the lungs (the B series' threshold mask on both: same grid) raw and harmonised, both methods.
"""
from __future__ import annotations

import time

import numpy as np

from emphy_dask.io import load_ct
from emphy_dask.preprocess.harmonize import harmonize_volume
from emphy_dask.preprocess.kernel_estimate import estimate_kernel
from emphy_dask.segment import segment_lungs
from tests.conftest import DX_SHARP, DX_SOFT, SHARED_DATA

SERIES = {"Lung_Dx-A0001 L": DX_SHARP, "Lung_Dx-A0001 B": DX_SOFT,
          "RIDER-1225316081": SHARED_DATA / "rider-lung-ct" / "RIDER-1225316081",
          "LIDC-IDRI-0013": SHARED_DATA / "lidc-idri-full" / "LIDC-IDRI-0013",
          "LIDC-IDRI-0002": SHARED_DATA / "lidc-idri-full" / "LIDC-IDRI-0002"}


def stats(hu, lung) -> str:
    v = hu[lung].astype(np.float64)
    return (f"{100 * np.mean(v < -950):.2f} | {100 * np.mean(v < -910):.2f} | {np.percentile(v, 15):.0f} | "
            f"{v.mean():.1f}")


def main() -> None:
    print("| series | kernel (class) | applied | T(0.3) | T(0.5) | fav before | fav after (NPS T^2) | "
          "fav after (re-measured) | s |\n|---|---|---|---|---|---|---|---|---|")
    for name, path in SERIES.items():
        vol = load_ct(path)
        t0 = time.perf_counter()
        out, p = harmonize_volume(vol)
        dt = time.perf_counter() - t0
        after = estimate_kernel(out.hu, out.spacing_zyx_mm, 0, out.fov_mask).nps_fav_lpmm
        print(f"| {name} | {vol.meta.get('kernel')} ({p['kernel_class']}) | {p['applied']} | {p.get('gain_03', '-')} | "
              f"{p.get('gain_05', '-')} | {p['estimate_nps_fav_lpmm']} | {p.get('fav_after_lpmm', '-')} | "
              f"{after if p['applied'] else '-'} | {dt:.1f} |")
    sharp, soft = load_ct(DX_SHARP), load_ct(DX_SOFT)
    labels = segment_lungs(soft, "threshold")
    lung = np.asarray(labels[0] if isinstance(labels, tuple) else labels) > 0
    print("\n| Lung_Dx-A0001 | LAA%-950 | LAA%-910 | Perc15 (HU) | MLD (HU) |\n|---|---|---|---|---|")
    print(f"| B (standard), as is | {stats(soft.hu, lung)} |")
    print(f"| L (sharp), raw | {stats(sharp.hu, lung)} |")
    for method in ("nps_ratio", "nps_shape"):
        out, _ = harmonize_volume(sharp, method)
        print(f"| L harmonised, {method} | {stats(out.hu, lung)} |")


if __name__ == "__main__":
    main()
