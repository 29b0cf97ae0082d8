"""Run folder at 100,000 scans: Parquet part sizes, the resume check, repair, files per folder.

    python benchmarks/store_scale.py OUT [--scans 100000] [--part-size 64 256 512]

Rows are those of a real scan: one small synthetic patient run through ``local.process_scan``
(default job: threshold segmenter, ct-i3resnet152 embeddings), its slices table stretched to 300
slices (a full-size chest CT), copied under N keys (``collection/PATIENT-000001`` ...). For each
part size: every table written as the job writes it (``RunStore.flush``: one part per
``part_size`` scans), part sizes, then the start-up of a rerun: ``RunStore.done_keys`` (the
resume check), ``repair`` (orphans + temporary files: a walk over OUT with an artifact per scan in
each of masks/, qc/ x2, featuremaps/), ``counts``, ``summary.exclusion_report``. Also the largest
folder and the driver memory of the pending results of one part.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil


def one_real_result(tmp: Path) -> dict:
    from emphy_dask.embed.weights import resolve_weights
    from emphy_dask.job.config import load_job
    from emphy_dask.job.manifest import build_manifest
    from emphy_dask.local import process_scan
    from emphy_dask.synth import synth_cohort

    synth_cohort(tmp / "c", 1, seed=1, size="small")
    _, tasks = build_manifest(tmp / "c" / "dicom")
    result = process_scan(tasks[0], resolve_weights(load_job(None)), tmp / "o")
    assert result["scans"]["status"] == "ok", result["scans"]["reason"]
    s0 = result["slices"][0]
    result["slices"] = [{**s0, "slice_index": i, "rank_from_superior": i, "depth_mm": float(i)} for i in range(300)]
    return result


def _jitter(row: dict, rng) -> dict:
    """Float values moved by ~0.1 % (real scans differ: identical rows would compress to nothing)."""
    return {k: (v * (1 + 1e-3 * rng.standard_normal()) if isinstance(v, float) else v) for k, v in row.items()}


def rekey(result: dict, key: str, rng) -> dict:
    r = copy.copy(result)
    r["scans"] = {**_jitter(result["scans"], rng), "scan_key": key}
    for t in ("phenotypes", "slices", "errors"):
        r[t] = [{**_jitter(row, rng), "scan_key": key} for row in result[t]]
    noise = rng.standard_normal((len(result["embeddings"]), 2048)).astype("float32")
    r["embeddings"] = [{**row, "scan_key": key, "embedding": (np.asarray(row["embedding"], "float32") + 0.05 * n).tolist()}
                       for row, n in zip(result["embeddings"], noise)]
    return r


def timed(fn, repeat: int = 3):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return value, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--scans", type=int, default=100_000)
    ap.add_argument("--part-size", type=int, nargs="+", default=[64, 256])
    args = ap.parse_args()
    from emphy_dask.job.store import RunStore
    from emphy_dask.job.summary import exclusion_report
    from emphy_dask.scan_state import artifact_stem
    from emphy_dask.tables import TABLES

    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}")
    base = one_real_result(args.out / "real")
    keys = [f"collection/PATIENT-{i:06d}" for i in range(1, args.scans + 1)]
    proc = psutil.Process()
    for part_size in args.part_size:
        out = args.out / f"run-{part_size}"
        shutil.rmtree(out, ignore_errors=True)
        store = RunStore(out, part_size)
        t0 = time.perf_counter()
        rss0 = proc.memory_info().rss
        peak_pending = 0
        rng = np.random.default_rng(0)
        for i, key in enumerate(keys):
            store._pending.append(rekey(base, key, rng))   # as RunStore.add, without the staging file
            if len(store._pending) >= part_size:
                peak_pending = max(peak_pending, proc.memory_info().rss - rss0)
                store.flush()
        store.close()
        t_write = time.perf_counter() - t0
        print(f"part_size {part_size}: {args.scans} scans written in {t_write:.0f} s ({1e3 * t_write / args.scans:.1f} ms "
              f"per scan, rows made + written); driver memory of one part's pending results ~{peak_pending / 2**20:.0f} MB")
        for t in TABLES:
            files = sorted((out / t).glob("part-*.parquet")) if (out / t).is_dir() else []
            if files:
                sizes = [f.stat().st_size for f in files]
                print(f"  {t:<11} {len(files):>5} parts, {sum(sizes) / len(sizes) / 2**20:7.2f} MB per part, "
                      f"{sum(sizes) / 2**30:6.2f} GB in all, {sum(sizes) / args.scans / 1024:6.1f} KB per scan")
        # artifacts as the workers name them (empty files: the walk, not the bytes, is what costs)
        t0 = time.perf_counter()
        for key in keys:
            stem = artifact_stem(key)
            for rel in (f"masks/{stem}.nii.gz", f"qc/{stem}_montage.png", f"qc/{stem}_laa_curve.png",
                        f"featuremaps/{stem}.npz"):
                p = out / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
        per_folder = Counter(str(p.parent.relative_to(out)) for p in out.rglob("*") if p.is_file())
        biggest = per_folder.most_common(1)[0]
        print(f"  artifacts: {sum(per_folder.values())} files in {len(per_folder)} folders (written in "
              f"{time.perf_counter() - t0:.0f} s); largest folder {biggest[0]}: {biggest[1]} files")
        fresh = RunStore(out, part_size)
        done, t_done = timed(fresh.done_keys)
        assert len(done) == args.scans
        _, t_repair = timed(fresh.repair)
        _, t_counts = timed(fresh.counts)
        _, t_excl = timed(lambda: exclusion_report(out))
        rss = proc.memory_info().rss
        todo = [k for k in keys if k not in done]
        print(f"  rerun start-up: done_keys {t_done:.2f} s ({len(done)} keys, set {sys.getsizeof(done) / 2**20:.1f} MB "
              f"+ strings), repair {t_repair:.2f} s, counts {t_counts:.2f} s, exclusion_report {t_excl:.2f} s; "
              f"{len(todo)} to do; RSS {rss / 2**20:.0f} MB (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
