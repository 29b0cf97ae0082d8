"""Does volume adjustment recover true progression? Synthetic patients scanned yearly with growing
emphysema at +-15 % inspiration (``synth.progression``), through `emphy extract` and `emphy track`;
per interval, the measured PD15 change (raw, sponge model, regression method) against the true
change at a fixed inspiration.

    python benchmarks/track_progression.py [--patients 12] [--timepoints 3] [--size small] [--out DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from emphy_dask.synth.progression import synth_progression


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--timepoints", type=int, default=3)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out")
    a = ap.parse_args()
    base = Path(a.out or tempfile.mkdtemp(prefix="track-prog-"))
    t0 = time.perf_counter()
    truth = synth_progression(base / "cohort", a.patients, a.timepoints, seed=a.seed, size=a.size)
    print(f"synthesised {len(truth)} scans in {time.perf_counter() - t0:.0f} s; volume factors "
          f"{truth['volume_factor'].min():.2f}-{truth['volume_factor'].max():.2f}")
    job = base / "job.toml"
    job.write_text('[qc]\nmax_hu = 4000.0\n[embed]\nbackbone = "none"\n[cluster]\nworkers = 2\n'
                   'memory_limit = "4GiB"\ndashboard_address = "127.0.0.1:0"\n')
    t0 = time.perf_counter()
    run = base / "run"
    subprocess.run([sys.executable, "-m", "emphy_dask.cli", "extract", str(base / "cohort" / "dicom"), "-o", str(run),
                    "--job", str(job), "--no-progress"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "emphy_dask.cli", "track", str(run)], check=True)
    print(f"extract + track: {time.perf_counter() - t0:.0f} s")
    t = pd.read_parquet(run / "longitudinal")
    w = t[(t["region"] == "WholeLung") & (t["pair_kind"] == "interval")]
    tr = truth.set_index("scan_key")
    true = tr.loc[w["scan_key_to"], "true_perc15_ref_hu"].to_numpy() - tr.loc[w["scan_key_from"],
                                                                            "true_perc15_ref_hu"].to_numpy()
    # the sponge model's change is at the first scan's volume: the truth at k = 1 scaled to it
    k0 = truth.groupby("patient_id")["volume_factor"].first()
    pid = tr.loc[w["scan_key_from"], "patient_id"].to_numpy()
    rows = []
    for name, col, target in (("raw (unadjusted)", "perc15_change_hu", true),
                              ("sponge model", "pd15_sponge_change_g_l", true / k0.loc[pid].to_numpy()),
                              ("regression method", "pd15_regression_change_g_l", true)):
        err = w[col].to_numpy(float) - target
        rows.append({"change": name, "mean |error| (HU)": np.abs(err).mean(), "max |error|": np.abs(err).max(),
                     "intervals within 2 HU": f"{int((np.abs(err) <= 2).sum())}/{err.size}",
                     "mean error": err.mean()})
    print(pd.DataFrame(rows).round(2).to_string(index=False))
    print(f"true change per interval: {np.round(true, 1).tolist()}")
    print(f"inspiration change per interval (%): {np.round(w['volume_change_pct'].to_numpy(), 1).tolist()}")
    print(f"regression slope (g/L per log volume): {w['regression_slope_g_l'].iloc[0]:.1f}")


if __name__ == "__main__":
    main()
