"""Time of `insert_emphysema` on a full-size real chest, per pattern, on one core.

    OMP_NUM_THREADS=1 python benchmarks/insert_time.py [BASE_FOLDER] [--severity 20] [--repeats 2]

Reports wall and CPU seconds (``time.process_time``: less sensitive to a shared machine's load)
of the insertion alone (lesions with the closed loop on cluster D, change field, truth LAA and
thirds; the base is read and segmented once beforehand), and of the extra D measurements
(``measure_d``: base, lesions and whole lung) separately.
Target (issue 13): <= 3 s per full-size scan on one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT = REPO.parent / "shared" / "data" / "lidc-idri-full" / "LIDC-IDRI-0013"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", nargs="?", default=str(DEFAULT))
    ap.add_argument("--severity", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    from emphy_dask.segment import segment_lungs
    from emphy_dask.synth.insert import insert_emphysema, psf_sigma_mm
    from emphy_dask.synth.insert_cohort import load_base
    from emphy_dask.synth.lesions import PATTERNS

    vol, _ = load_base(a.base)
    labels = segment_lungs(vol)
    t0, c0 = time.perf_counter(), time.process_time()
    psf = psf_sigma_mm(vol.hu, vol.spacing_zyx_mm, vol.fov_mask)
    print(f"{Path(a.base).name}: {vol.shape} voxels, psf {psf:.2f} mm in {time.perf_counter() - t0:.2f} s wall "
          f"{time.process_time() - c0:.2f} s CPU; load {os.getloadavg()[0]:.1f}")
    print("| pattern | severity % | wall s (insert) | CPU s (insert) | CPU s (D read-back) | added % |")
    print("|---|---|---|---|---|---|")
    for p in PATTERNS:
        for r in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            new, lesion, truth = insert_emphysema(vol.hu, labels, vol.spacing_zyx_mm, p, a.severity, r,
                                                  psf_mm=psf, direction_xyz=vol.direction_xyz, measure_d=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            c0 = time.process_time()
            insert_emphysema(vol.hu, labels, vol.spacing_zyx_mm, p, a.severity, r, psf_mm=psf,
                             direction_xyz=vol.direction_xyz, measure_d=True)
            cpu_d = time.process_time() - c0 - cpu
            print(f"| {p} | {a.severity:g} | {wall:.2f} | {cpu:.2f} | {cpu_d:.2f} | {truth['added_laa950_pct']:.2f} |")
    print(f"load after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
