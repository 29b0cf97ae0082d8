"""A full chest through a real PACS: DICOMweb run vs local-folder run, then SEG + SR export.

Starts Orthanc (tests/servers/orthanc.py) on localhost, uploads one full LIDC chest, runs
``emphy extract`` on the DICOMweb URL and on the folder (same job, one LocalCluster each, the two
runs one after the other), compares the tables (keys mapped), exports a SEG and an SR of the
PACS run (sources retrieved by WADO-RS) and STOWs them back, runs dciodvfy, and prints wall times
and sizes. Record the numbers in benchmarks/README.md with the machine's load (``uptime``).

    python benchmarks/pacs_bench.py [PATIENT_FOLDER]   (default ../shared/data/lidc-idri-full/LIDC-IDRI-0013)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emphy_dask.export.run import export_run  # noqa: E402
from emphy_dask.io.dicomweb import pacs_scan_key  # noqa: E402
from emphy_dask.job.config import load_job  # noqa: E402
from emphy_dask.job.runner import run_extract  # noqa: E402
from emphy_dask.tables import TABLES, read_frame  # noqa: E402
from tests.servers.orthanc import OrthancServer  # noqa: E402

JOB = ('name = "pacs-bench"\n[cluster]\nworkers = 2\nmemory_limit = "4GiB"\ndashboard_address = "127.0.0.1:0"\n'
       '[embed]\nbackbone = "none"\n[qc]\nmax_hu = 4000\n')
KEYED = ("mask_path", "qc_montage_path", "qc_curve_path", "featuremap_path")


def main() -> None:
    patient = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared/data/lidc-idri-full/LIDC-IDRI-0013"
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "job.toml").write_text(JOB)
        # a CSV manifest names the one patient folder (the folder beside it holds other patients)
        (tmp / "in.csv").write_text(f"scan_key,path\n{patient.name},{patient.resolve()}\n")
        server = OrthancServer(tmp / "orthanc").start()
        try:
            t = time.perf_counter()
            n = server.upload(patient)
            print(f"uploaded {n} instances in {time.perf_counter() - t:.1f} s")
            quiet = {"progress": False, "log": lambda *a: None}
            t = time.perf_counter()
            pacs = run_extract(f"dicomweb+{server.dicomweb}?ModalitiesInStudy=CT", tmp / "pacs",
                               load_job(tmp / "job.toml"), **quiet)
            t_pacs = time.perf_counter() - t
            t = time.perf_counter()
            local = run_extract(tmp / "in.csv", tmp / "local", load_job(tmp / "job.toml"), **quiet)
            t_local = time.perf_counter() - t
            print(f"extract wall: DICOMweb {t_pacs:.1f} s, local folder {t_local:.1f} s; counts {dict(pacs.counts)} "
                  f"vs {dict(local.counts)}")
            ingest = [read_frame(o.out_dir, "scans")["t_ingest_s"].iloc[0] for o in (pacs, local)]
            print(f"t_ingest_s (worker): DICOMweb {ingest[0]:.2f} s (WADO-RS + read), local {ingest[1]:.2f} s")
            keys = {pacs_scan_key(patient.name, ""): patient.name}
            same = True
            for table in TABLES:
                a = read_frame(pacs.out_dir, table, stable=True).drop(columns=list(KEYED), errors="ignore")
                b = read_frame(local.out_dir, table, stable=True).drop(columns=list(KEYED), errors="ignore")
                a["scan_key"] = a["scan_key"].map(keys)
                same &= a.reset_index(drop=True).equals(b.reset_index(drop=True))
            print(f"tables equal (keys mapped, volatile columns aside): {same}")
            t = time.perf_counter()
            out = export_run(pacs.out_dir, dicom_dir=tmp / "dcm", stow_url=server.dicomweb, log=lambda *a: None)
            print(f"export (WADO-RS sources, SEG + SR, STOW-RS) {time.perf_counter() - t:.1f} s; failed {out.failed}")
            for path in out.written:
                r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
                errors = sum(ln.startswith("Error") for ln in (r.stdout + r.stderr).splitlines())
                print(f"  {path.name}: {path.stat().st_size / 2**20:.1f} MiB, dciodvfy errors {errors}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
