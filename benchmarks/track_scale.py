"""emphy track at archive scale: a fabricated run of 100,000 scans of 30,000 patients (scans/ and
phenotypes/ tables as extract writes them: every region, raw HU), then `emphy track` timed.

    python benchmarks/track_scale.py [--scans 100000] [--patients 30000] [--out DIR]

Fabricated values are random (the point is time and memory); embeddings are left out (the drift
columns stay null), which `emphy track` handles like a run made with `--backbone none`.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from emphy_dask.phenotypes.regions import REGIONS
from emphy_dask.tables import column_names, write_frame


def fabricate(out: Path, n_scans: int, n_patients: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, n_patients, n_scans))
    start = pd.Timestamp("2002-01-01") + pd.to_timedelta(rng.integers(0, 3000, n_patients), unit="D")
    visit = pd.Series(patient).groupby(patient).cumcount().to_numpy()
    dates = start[patient] + pd.to_timedelta(visit * 365 + rng.integers(-40, 40, n_scans), unit="D")
    keys = np.array([f"NLST-{p:06d}/T{v}" for p, v in zip(patient, visit)], dtype=object)
    scans = pd.DataFrame({c: None for c in column_names("scans")}, index=range(n_scans))
    scans = scans.assign(scan_key=keys, config_hash="fab", status="ok", patient_key=[f"pt-{p:016x}" for p in patient],
                         study_date_shifted=dates.strftime("%Y-%m-%d"), kernel="STANDARD", kernel_class="standard",
                         tube_current_ma=rng.choice([40.0, 80.0], n_scans), kvp=120.0, slice_thickness_mm=1.25)
    for i in range(0, n_scans, 20_000):
        write_frame("scans", scans.iloc[i:i + 20_000], out, f"{i // 20_000:04d}")
    regions = list(REGIONS)
    n = n_scans * len(regions)
    pheno = pd.DataFrame({"scan_key": np.repeat(keys, len(regions)), "config_hash": "fab",
                          "region": np.tile(regions, n_scans), "hu_source": "raw",
                          "n_voxels": rng.integers(10**5, 10**7, n), "laa950_pct": rng.uniform(0, 30, n),
                          "perc15_hu": rng.normal(-920, 25, n), "hu_mean": rng.normal(-850, 20, n),
                          "volume_l": rng.uniform(0.5, 7.0, n)})
    rows_per = 20_000 * len(regions)
    for i in range(0, n, rows_per):
        write_frame("phenotypes", pheno.iloc[i:i + rows_per], out, f"{i // rows_per:04d}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=100_000)
    ap.add_argument("--patients", type=int, default=30_000)
    ap.add_argument("--out")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="track-scale-"))
    t0 = time.perf_counter()
    fabricate(out, a.scans, a.patients)
    print(f"fabricated {a.scans} scans of {a.patients} patients in {time.perf_counter() - t0:.1f} s: {out}")
    for figures in (False, True):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "emphy_dask.cli", "track", str(out)] + ([] if figures else ["--no-figures"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"emphy track {'(with page and figures)' if figures else '(tables only)'}: exit {proc.returncode}, "
              f"{wall:.1f} s wall, peak RSS so far {peak:.0f} MB")
        print("  " + proc.stdout.strip().replace("\n", "\n  "))
    t = pd.read_parquet(out / "longitudinal")
    print(f"longitudinal/: {len(t)} rows, {t['patient_key'].nunique()} patients")


if __name__ == "__main__":
    main()
