"""Seconds per stage for full-size synthetic scans, one process, one thread, no Dask.

``python benchmarks/stage_times.py [N_PATIENTS] [--cohort DIR] [--repeats R]``: synthesises N
full-size patients (512x512, 250-350 slices; or reads the DICOM tree DIR, e.g. an ``emphy synth
--size full`` cohort's ``dicom/``), runs ``process_scan`` on the first scan once to load the model
(not counted), then on each scan R times, and prints per-stage seconds and the peak RSS of the
process. Run it with ``PYTHONPATH`` on another checkout to compare versions on the same scans.
Results are recorded in benchmarks/README.md.
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from emphy_dask.job.config import JobConfig
from emphy_dask.job.manifest import build_manifest
from emphy_dask.local import process_scan
from emphy_dask.scan_state import STAGES
from emphy_dask.synth import synth_patient


def run(dicom: Path, out: Path, repeats: int) -> list[dict]:
    _, tasks = build_manifest(dicom)
    process_scan(tasks[0], JobConfig(), out / "warm")          # torch import, model load
    rows = []
    for r in range(repeats):
        for task in tasks:
            scans = process_scan(task, JobConfig(), out / f"r{r}")["scans"]
            rows.append({"scan": task.scan_key, "status": scans["status"], "n_slices": scans.get("n_slices"),
                         **{s: scans[f"t_{s}_s"] for s in STAGES}, "total": scans["t_total_s"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=2)
    ap.add_argument("--cohort", type=Path, help="a DICOM tree of full-size scans (no synthesis)")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)        # per core, as on a one-thread Dask worker
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_s = None
        if a.cohort is None:
            t0 = time.perf_counter()
            for i in range(1, a.n + 1):
                synth_patient(tmp, i, ("centrilobular", "panlobular")[i % 2], 5.0 * i, seed=0, size="full")
            synth_s = round((time.perf_counter() - t0) / a.n, 1)
        rows = run(a.cohort or tmp / "dicom", tmp / "out", a.repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"synth_s_per_patient": synth_s, "peak_rss_mb": round(peak_mb), "scans": rows}))


if __name__ == "__main__":
    main()
