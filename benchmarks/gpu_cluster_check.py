"""Device check: the extract job on a machine with GPUs (LocalCUDACluster + CPU workers).

Run on a GPU machine: ``python benchmarks/gpu_cluster_check.py OUTDIR``. It synthesises a
small cohort, runs ``emphy extract`` with the default cluster (one dask-cuda ``GPU=1``
worker per GPU beside ``CPU=1`` workers), checks that CPU stages ran only on CPU workers and
that a ``GPU=1`` task lands on a GPU worker that sees a CUDA device, then reruns on a CPU-only
LocalCluster and compares the tables. Results: benchmarks/README.md.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path


def gpu_probe():
    import os

    import torch

    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def worker_name(_):
    from distributed import get_worker

    return get_worker().name


def main(out: Path) -> int:
    import pandas as pd

    from emphy_dask.job.cluster import connect, count_gpus
    from emphy_dask.job.config import JobConfig
    from emphy_dask.job.runner import run_extract
    from emphy_dask.synth import synth_cohort
    from emphy_dask.tables import TABLES, read_frame

    report = {"gpus": count_gpus()}
    t0 = time.perf_counter()
    synth_cohort(out / "cohort", 8, seed=1, size="small")
    report["synth_s"] = round(time.perf_counter() - t0, 1)
    base = JobConfig()
    cfg = dataclasses.replace(base, cluster=dataclasses.replace(base.cluster, workers=4, dashboard_address="127.0.0.1:0"))

    conn = connect(cfg.cluster)
    info = conn.client.scheduler_info()["workers"].values()
    report["workers"] = sorted((str(w["name"]), w.get("resources")) for w in info)
    report["gpu_task"] = conn.client.submit(gpu_probe, resources={"GPU": 1}, pure=False).result()
    names = conn.client.gather(conn.client.map(worker_name, range(16), resources=conn.cpu_resources, pure=False))
    report["cpu_tasks_ran_on"] = sorted(set(map(str, names)))
    conn.close()

    gpu_run = run_extract(out / "cohort" / "dicom", out / "with-gpu", cfg, progress=False)
    scans = read_frame(out / "with-gpu", "scans")
    report["with_gpu"] = {"counts": dict(gpu_run.counts), "wall_s": round(gpu_run.wall_s, 1),
                          "n_workers_used": int(scans["worker"].nunique())}
    cpu_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, gpu_workers="0"))
    cpu_run = run_extract(out / "cohort" / "dicom", out / "cpu-only", cpu_cfg, progress=False)
    report["cpu_only"] = {"counts": dict(cpu_run.counts), "wall_s": round(cpu_run.wall_s, 1)}
    same = True
    for t in TABLES:
        try:
            pd.testing.assert_frame_equal(read_frame(out / "with-gpu", t, stable=True),
                                          read_frame(out / "cpu-only", t, stable=True))
        except AssertionError:
            same = False
    report["tables_identical"] = same
    print(json.dumps(report, indent=1, default=str))
    ok = same and report["gpu_task"]["device"] and all(n.startswith("cpu-") for n in report["cpu_tasks_ran_on"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check-out")))
