"""Seconds per stage for full-size synthetic scans, one process, one thread, no Dask.

``python benchmarks/stage_times.py [N_PATIENTS]``: synthesises N full-size patients
(512x512, 250-350 slices), runs ``process_scan`` on each and prints per-stage seconds and
the peak RSS of the process. Results are recorded in benchmarks/README.md.
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from emphy_dask.job.config import JobConfig
from emphy_dask.job.manifest import build_manifest
from emphy_dask.local import process_scan
from emphy_dask.scan_state import STAGES
from emphy_dask.synth import synth_patient


def main(n: int) -> None:
    import torch

    torch.set_num_threads(1)        # per core, as on a one-thread Dask worker
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            synth_patient(tmp, i, ("centrilobular", "panlobular")[i % 2], 5.0 * i, seed=0, size="full")
        synth_s = time.perf_counter() - t0
        _, tasks = build_manifest(tmp / "dicom")
        rows = []
        for task in tasks:
            scans = process_scan(task, JobConfig(), tmp / "out")["scans"]
            rows.append({"scan": task.scan_key, "status": scans["status"], "n_slices": scans.get("n_slices"),
                         **{s: scans[f"t_{s}_s"] for s in STAGES}, "total": scans["t_total_s"]})
            print(json.dumps(rows[-1]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"synth_s_per_patient": round(synth_s / n, 1), "peak_rss_mb": round(peak_mb), "scans": rows},
                     indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
