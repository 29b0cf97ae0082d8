"""Archive scale: indexing throughput and driver memory on a synthetic archive of tiny DICOM files.

    python benchmarks/archive_scale.py ROOT [--patients 500 2000] [--files 300] [--workers 2]

Writes ROOT/p<N>/ (N patients x F files of 8 x 8 pixels with full CT headers: patient, study,
series, geometry, rescale, kernel; LIDC layout patient/study/series/file), unless already there,
then for each N: the streamed manifest (``job.manifest.iter_manifest`` + ``ManifestWriter``, as
``emphy extract`` runs it) on a LocalCluster of W one-thread workers, and in one process without
Dask. Reports files per second (per core), and the driver's RSS (sampled every 20 ms) before,
at its peak and after; then reads the manifest back as the run does (``runner._todo``) and
reports the RSS again. The files are written by patching a serialised template (same length
UIDs, positions), so 600,000 files take about a minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from emphy_dask.synth.dicom_write import ct_dataset

UID_ROOT = "1.2.826.0.1.3680043.8.498."
SOP_PLACEHOLDER = UID_ROOT + "9" * 30               # 56 characters (even)
Z_PLACEHOLDER = "+9999.999"                          # 9 characters, DS of ImagePositionPatient z (odd: padded)
IN_PLACEHOLDER = "999999"                            # InstanceNumber, 6 characters


def _template(patient: int) -> bytes:
    """One slice of patient ``patient`` serialised with placeholders for the per-file values."""
    ds = ct_dataset(f"{UID_ROOT}1.{patient}", f"{UID_ROOT}2.{patient}", f"{UID_ROOT}3.{patient}", SOP_PLACEHOLDER,
                    2, "CHEST 1.0 B30f", f"SYNTH^{patient:06d}", f"P-{patient:06d}", ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.PatientBirthDate = "19500101"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20200101", "120000", f"A{patient:08d}", "1"
    ds.InstanceNumber = IN_PLACEHOLDER
    ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel = "SIEMENS", "Synthetic", "B30f"
    ds.KVP, ds.XRayTubeCurrent, ds.InstitutionName = 120, 200, "SYNTHETIC HOSPITAL"
    ds.ImagePositionPatient = ["-2.0", "-2.0", Z_PLACEHOLDER]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.Rows = ds.Columns = 8
    ds.PixelData = np.full((8, 8), 24, np.int16).tobytes()
    buf = DicomBytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_archive(root: Path, n_patients: int, n_files: int) -> None:
    """``n_patients`` x ``n_files`` tiny slices under ``root`` (skipped when a marker says done)."""
    marker = root / ".complete"
    if marker.exists():
        return
    t0 = time.perf_counter()
    for p in range(1, n_patients + 1):
        tpl = _template(p)
        folder = root / f"P-{p:06d}" / "20200101-CT CHEST" / "2.000000-CHEST 1.0 B30f"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_files):
            sop = f"{UID_ROOT}1{p:011d}{i:06d}".ljust(len(SOP_PLACEHOLDER), "0")
            data = (tpl.replace(SOP_PLACEHOLDER.encode(), sop.encode())
                    .replace(Z_PLACEHOLDER.encode(), f"{i * 1.0:+09.3f}".encode())
                    .replace(IN_PLACEHOLDER.encode(), f"{i + 1:06d}".encode()))
            (folder / f"1-{i + 1:03d}.dcm").write_bytes(data)
    marker.write_text(f"{n_patients} x {n_files} written in {time.perf_counter() - t0:.0f} s\n")


class RssSampler:
    """Peak RSS of this process, sampled every ``every_s`` in a thread."""

    def __init__(self, every_s: float = 0.02):
        self.proc, self.every_s, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.end = self.proc.memory_info().rss


def index_once(root: Path, out: Path, client) -> dict:
    from emphy_dask.job.manifest import MANIFEST_FILE, ManifestWriter, iter_manifest

    out.mkdir(parents=True, exist_ok=True)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        r, stream = iter_manifest(root, client)
        w = ManifestWriter(out / MANIFEST_FILE, r)
        n_scans = 0
        for task in stream:
            w.add(task)
            n_scans += 1
        w.close()
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "scans": n_scans, "rss_start_mb": rss.start / 2**20, "rss_peak_mb": rss.peak / 2**20,
            "rss_end_mb": rss.end / 2**20}


def read_back(out: Path) -> dict:
    from emphy_dask.job.manifest import MANIFEST_FILE
    from emphy_dask.job.runner import _todo

    with RssSampler() as rss:
        t0 = time.perf_counter()
        n = sum(1 for _ in _todo(out / MANIFEST_FILE, {}, 10**9))
        wall = time.perf_counter() - t0
    return {"tasks": n, "wall_s": wall, "rss_start_mb": rss.start / 2**20, "rss_peak_mb": rss.peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--patients", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-inprocess", action="store_true", help="skip the one-process (no Dask) indexing")
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}")
    for n in args.patients:
        tree = args.root / f"p{n}"
        t0 = time.perf_counter()
        write_archive(tree, n, args.files)
        print(f"archive {tree}: {n} x {args.files} files ({(tree / '.complete').read_text().strip()}; "
              f"this call {time.perf_counter() - t0:.0f} s)")
        n_files = n * args.files
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            r = index_once(tree, args.root / f"out-p{n}-dask", client)
        print(f"  Dask, {args.workers} workers: {n_files} files in {r['wall_s']:.1f} s = "
              f"{n_files / r['wall_s']:.0f} files/s, {n_files / r['wall_s'] / args.workers:.0f} files/s/core; "
              f"{r['scans']} scans; driver RSS {r['rss_start_mb']:.0f} -> peak {r['rss_peak_mb']:.0f} -> "
              f"{r['rss_end_mb']:.0f} MB (load {os.getloadavg()[0]:.1f})")
        if not args.no_inprocess:
            r = index_once(tree, args.root / f"out-p{n}-local", None)
            print(f"  one process, no Dask: {n_files / r['wall_s']:.0f} files/s; RSS {r['rss_start_mb']:.0f} -> "
                  f"peak {r['rss_peak_mb']:.0f} MB")
        b = read_back(args.root / f"out-p{n}-dask")
        print(f"  run phase reads the manifest back: {b['tasks']} tasks in {b['wall_s']:.1f} s; RSS "
              f"{b['rss_start_mb']:.0f} -> peak {b['rss_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
