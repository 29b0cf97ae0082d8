"""The Dask job against a plain one-process loop over the same stage functions, on full-size scans.

    python benchmarks/job_vs_loop.py WORK [--patients 4] [--repeats 2] [--backbone ct-i3resnet152]

Synthesises N full-size patients (``emphy synth --size full``: 512 x 512, 250-350 slices) into
WORK/cohort once, then, ``--repeats`` times, in turn:

- loop: a fresh process runs ``local.process_scan`` scan after scan (the job's own stage
  functions, indexing included), with the environment Dask gives its workers (OMP, MKL,
  OpenBLAS at 1 thread);
- dask-1, dask-2: ``job.runner.run_extract`` on a LocalCluster of 1 and 2 one-thread workers made
  by ``job.cluster.connect`` (as ``emphy extract`` makes it; cluster start-up timed apart);
- dask-1-trim (once): dask-1 with Dask's default MALLOC_TRIM_THRESHOLD_=65536 in the workers;
- loop-2 (optional): two loop processes side by side, every other scan each: what two cores give
  without Dask (the ceiling for dask-2 on this machine).

Per configuration: wall seconds (indexing to last row written), seconds per scan per stage
(means over scans), the peak RSS and minor page faults of every worker process (``getrusage``
inside it) or of the loop process. Prints one JSON line per run and a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from emphy_dask.scan_state import STAGES

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _job(work: Path, backbone: str, max_in_flight: int = 0):
    from emphy_dask.job.config import load_job

    f = work / "bench.toml"
    f.write_text(f'name = "bench"\n[cluster]\nmemory_limit = "6GiB"\ndashboard_address = "127.0.0.1:0"\n'
                 f'max_in_flight = {max_in_flight}\n[embed]\nbackbone = "{backbone}"\n')
    return load_job(f)


def run_loop(cohort: Path, out: Path, backbone: str, shard: tuple[int, int] = (0, 1)) -> dict:
    """In this (fresh) process: index, then process_scan on each scan. Timed from before torch is
    imported and the weights hashed, as the job pays both (workers import lazily, in their first task)."""
    t0 = time.perf_counter()
    import torch

    from emphy_dask.embed.weights import resolve_weights
    from emphy_dask.job.manifest import build_manifest
    from emphy_dask.local import process_scan

    torch.set_num_threads(1)
    cfg = resolve_weights(_job(out.parent, backbone))
    _, tasks = build_manifest(cohort)
    rows = [process_scan(t, cfg, out)["scans"] for t in tasks[shard[0]::shard[1]]]
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "rows": rows, "procs": [{"peak_rss_mb": ru.ru_maxrss / 1024, "minflt": ru.ru_minflt}]}


def _worker_usage():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": ru.ru_maxrss / 1024, "minflt": ru.ru_minflt,
            "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def run_dask(cohort: Path, out: Path, backbone: str, workers: int, trim: bool, max_in_flight: int = 0) -> dict:
    import dask

    from emphy_dask.job.cluster import connect
    from emphy_dask.job.runner import run_extract
    from emphy_dask.tables import read_frame

    cfg = _job(out.parent, backbone, max_in_flight)
    t0 = time.perf_counter()
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 65536} if trim else {}):
        if trim:    # connect() would unset it: build the same LocalCluster with Dask's default
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="6GiB",
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0", resources={"CPU": 1})
            client = Client(cluster)
            client.wait_for_workers(workers)
        else:
            conn = connect(cfg.cluster, workers=workers)
            cluster, client = conn.cluster, conn.client
    startup = time.perf_counter() - t0
    try:
        summary = run_extract(cohort, out, cfg, scheduler=cluster.scheduler_address, progress=False,
                              log=lambda *a: None)
        usage = client.run(_worker_usage)
    finally:
        client.close()
        cluster.close()
    rows = read_frame(out, "scans").to_dict("records")
    return {"wall_s": summary.wall_s, "startup_s": startup, "rows": rows, "procs": list(usage.values())}


def _summary(name: str, r: dict) -> dict:
    rows = [x for x in r["rows"] if x["status"] == "ok"]
    per_stage = {s: statistics.mean((x.get(f"t_{s}_s") or 0.0) for x in rows) for s in STAGES}
    return {"config": name, "wall_s": round(r["wall_s"], 1), "startup_s": round(r.get("startup_s", 0.0), 1),
            "n_ok": len(rows), "s_per_scan": round(r["wall_s"] / max(1, len(rows)), 2),
            "stage_s": {s: round(v, 2) for s, v in per_stage.items()},
            "worker_s_per_scan": round(statistics.mean(x["t_total_s"] for x in rows), 2),
            "peak_rss_mb": [round(p["peak_rss_mb"]) for p in r["procs"]],
            "minflt_per_scan": round(sum(p["minflt"] for p in r["procs"]) / max(1, len(rows))),
            "load": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backbone", default="ct-i3resnet152")
    ap.add_argument("--configs", nargs="+", default=["loop", "dask-1", "dask-2", "dask-1-trim"])
    ap.add_argument("--max-in-flight", type=int, default=0, help="[cluster].max_in_flight of the Dask runs")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cohort = args.work / "cohort" / "dicom"
    if args._one:                       # a child process running one configuration
        out = args.work / f"out-{args._one}"
        name = args._one.rsplit("-r", 1)[0]
        if name == "loop":
            r = run_loop(cohort, out, args.backbone)
        elif name.startswith("loop-2-"):               # one of two loops side by side, every other scan
            r = run_loop(cohort, out, args.backbone, (int(name[-1]), 2))
        else:
            r = run_dask(cohort, out, args.backbone, int(name.split("-")[1]), trim=name.endswith("trim"),
                         max_in_flight=args.max_in_flight)
        print("RESULT " + json.dumps(_summary(name, r)), flush=True)
        return
    if not (args.work / "cohort" / "truth.csv").exists():
        from emphy_dask.synth import synth_cohort

        t0 = time.perf_counter()
        synth_cohort(args.work / "cohort", args.patients, seed=3, size="full")
        print(f"synthesised {args.patients} full-size patients in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for rep in range(args.repeats):
        for name in args.configs:
            if name.endswith("trim") and rep > 0:
                continue
            parts = [f"{name}-{i}" for i in range(2)] if name == "loop-2" else [name]
            procs = []
            for part in parts:                  # loop-2: two loop processes at once
                tag = f"{part}-r{rep}"
                subprocess.run(["rm", "-rf", str(args.work / f"out-{tag}")], check=True)
                env = {**os.environ, **WORKER_ENV} if name.startswith("loop") else dict(os.environ)
                procs.append(subprocess.Popen([sys.executable, __file__, str(args.work), "--backbone", args.backbone,
                                               "--max-in-flight", str(args.max_in_flight), "--_one", tag],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            found = []
            for proc in procs:
                stdout, stderr = proc.communicate()
                line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(stdout[-3000:], stderr[-3000:])
                    raise SystemExit(f"{name} failed")
                found.append(json.loads(line[len("RESULT "):]))
            res = found[0]
            if len(found) > 1:                  # wall = the slower loop; stages over all scans
                n = [f["n_ok"] for f in found]
                res = {**res, "config": name, "wall_s": max(f["wall_s"] for f in found), "n_ok": sum(n),
                       "stage_s": {s_: round(sum(f["stage_s"][s_] * k for f, k in zip(found, n)) / sum(n), 2)
                                   for s_ in STAGES},
                       "worker_s_per_scan": round(sum(f["worker_s_per_scan"] * k for f, k in zip(found, n)) / sum(n), 2),
                       "peak_rss_mb": [f["peak_rss_mb"][0] for f in found],
                       "minflt_per_scan": round(sum(f["minflt_per_scan"] * k for f, k in zip(found, n)) / sum(n))}
                res["s_per_scan"] = round(res["wall_s"] / res["n_ok"], 2)
            res["repeat"] = rep
            results.append(res)
            print(json.dumps(res), flush=True)
    print("\nconfig        wall (s)  s/scan  vs loop  " + "  ".join(f"{s[:6]:>6}" for s in STAGES) + "  peak RSS (MB)  faults/scan")
    loops = [r["wall_s"] for r in results if r["config"] == "loop"]
    for r in results:
        ratio = statistics.mean(loops) / r["wall_s"] if loops else float("nan")
        print(f"{r['config'] + '-r' + str(r['repeat']):<13} {r['wall_s']:>8.1f} {r['s_per_scan']:>7.2f} {ratio:>7.2f}x  "
              + "  ".join(f"{r['stage_s'][s]:>6.2f}" for s in STAGES)
              + f"  {r['peak_rss_mb']}  {r['minflt_per_scan']}")


if __name__ == "__main__":
    main()
