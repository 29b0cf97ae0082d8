"""Throughput and worker memory of `emphy extract` reading from a local S3 server vs local disk.

The same real series (the shared LIDC slabs, copied COPIES times under different patient folder
names) are run from a local folder into a local folder, and from an S3-compatible server on
127.0.0.1 (moto's standalone server, a subprocess) into the same server, each on a fresh 2-worker
LocalCluster, alternating, REPEATS times. Prints scans/min per run and each worker's peak RSS
(``ru_maxrss``), so one can check that reading from the store costs < 15 % and that no worker
holds more than the series it processes (plus at most ``storage.FETCH_THREADS`` files in flight).

    python benchmarks/s3_throughput.py [COPIES=2] [REPEATS=2]
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SLABS = REPO.parent / "shared" / "data" / "lidc-idri-slabs"
KEY, SECRET = "bench-key", "bench-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(src, out, cfg) -> tuple[float, list[float], int]:
    from distributed import Client, LocalCluster

    from emphy_dask.job.runner import run_extract

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GiB",
                           resources={"CPU": 1}, dashboard_address=":0")
    client = Client(cluster)
    try:
        t0 = time.perf_counter()
        summary = run_extract(src, out, cfg, scheduler=cluster.scheduler_address, progress=False,
                              log=lambda *a: None)
        wall = time.perf_counter() - t0
        rss = sorted(client.run(_peak_rss_mb).values())
    finally:
        client.close()
        try:
            cluster.close(timeout=120)
        except Exception as exc:  # noqa: BLE001 - a slow shutdown on a loaded machine is not a result
            print(f"  (cluster close: {type(exc).__name__})")
    from emphy_dask.io import storage

    info = json.loads(storage.read_bytes(storage.join(out, "run.json")))
    stages = {k[2:-2]: v for k, v in info["worker_seconds_per_stage"].items() if v}
    return wall, rss, summary.counts.get("ok", 0), {"index": info["index_s"], **stages}


def main(copies: int = 2, repeats: int = 2) -> None:
    import s3fs

    from emphy_dask.job.config import config_from_dict

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="emphy-s3-bench-"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        archive = tmp / "archive"
        for c in range(copies):
            for patient in sorted(p for p in SLABS.iterdir() if p.is_dir()):
                shutil.copytree(patient, archive / f"{patient.name}-copy{c}")
        fs.put(str(archive) + "/", "bench/archive/", recursive=True)
        n = sum(1 for p in archive.rglob("*.dcm"))
        cfg = config_from_dict({"qc": {"max_hu": 4000}, "embed": {"backbone": "none"},
                                "storage": {"s3": options}}, "benchmark")
        mib = sum(p.stat().st_size for p in archive.rglob("*.dcm")) / 2**20
        print(f"{copies * 3} scans ({n} files, {mib:.0f} MiB); "
              f"load {os.getloadavg()[0]:.1f}")
        rows = {"local": [], "s3": []}
        for r in range(repeats):
            for where in ("local", "s3"):
                if where == "local":
                    wall, rss, ok, stages = _run(archive, tmp / f"run-{r}", cfg)
                else:
                    wall, rss, ok, stages = _run("s3://bench/archive", f"s3://bench/run-{r}", cfg)
                rows[where].append(wall)
                print(f"  {where:5s} repeat {r + 1}: {wall:6.1f} s, {ok} ok, {60 * ok / wall:5.2f} scans/min, "
                      f"worker peak RSS {', '.join(f'{m:.0f}' for m in rss)} MB; load {os.getloadavg()[0]:.1f}; "
                      f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in stages.items())}")
        local, remote = statistics.median(rows["local"]), statistics.median(rows["s3"])
        print(f"median wall: local {local:.1f} s, s3 {remote:.1f} s: s3 / local = {remote / local:.3f}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
