"""DICOMweb in, against a real PACS: Orthanc with its DICOMweb plugin, loaded with the LIDC slabs.

The job reads the PACS end to end (QIDO-RS, WADO-RS metadata, WADO-RS per worker) and its tables
equal a local-folder run on the same series; the PACS going away fails the affected scans with a
reason and a rerun completes them; a bad URL stops before any work with one line (exit 2).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from emphy_dask.errors import ScanError
from emphy_dask.io.dicomweb import TRANSFER_FAILED, pacs_scan_key, parse_source
from emphy_dask.job.config import load_job
from emphy_dask.job.runner import run_extract
from emphy_dask.tables import TABLES, read_frame
from tests.servers.orthanc import free_port, orthanc  # noqa: F401 - the fixture

# paths written from the key (masks/<shard>/<key>.nii.gz ...): compared through the key mapping
_KEYED_PATHS = ("mask_path", "qc_montage_path", "qc_curve_path", "featuremap_path")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("job") / "pacs.toml"
    f.write_text('name = "pacs"\n[cluster]\nworkers = 2\nmemory_limit = "3GiB"\n'
                 'dashboard_address = "127.0.0.1:0"\n[embed]\nbackbone = "none"\n')
    return f


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster (2 worker processes) for every run of the module: starting one per run
    costs more than the runs. Its workers retry a transfer twice, 0.1 s apart (environment
    read when they import ``io.dicomweb``)."""
    from distributed import LocalCluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMPHY_DICOMWEB_ATTEMPTS", "2")
        mp.setenv("EMPHY_DICOMWEB_PAUSE_S", "0.1")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"CPU": 1},
                          memory_limit="3GiB", dashboard_address="127.0.0.1:0", host="127.0.0.1") as lc:
            yield lc.scheduler_address


@pytest.fixture(scope="module")
def loaded(orthanc, shared_data):  # noqa: F811
    slabs = shared_data / "lidc-idri-slabs"
    assert orthanc.upload(slabs) == len([p for p in slabs.rglob("*.dcm")])
    return orthanc, slabs


@pytest.fixture(scope="module")
def runs(loaded, job_file, cluster, tmp_path_factory):
    """(PACS run, local-folder run) of the same three series."""
    server, slabs = loaded
    base = tmp_path_factory.mktemp("runs")
    quiet = {"progress": False, "log": lambda *a: None, "scheduler": cluster}
    pacs = run_extract(f"dicomweb+{server.dicomweb}?ModalitiesInStudy=CT", base / "pacs", load_job(job_file), **quiet)
    local = run_extract(slabs, base / "local", load_job(job_file), **quiet)
    return pacs, local


def _frames(out, keys: dict | None = None) -> dict[str, pd.DataFrame]:
    frames = {}
    for t in TABLES:
        df = read_frame(out, t, stable=True).drop(columns=[c for c in _KEYED_PATHS], errors="ignore")
        if keys is not None:
            df["scan_key"] = df["scan_key"].map(keys)
        frames[t] = df.sort_values([c for c in df.columns if c in ("scan_key", "hu_source", "region", "zone",
                                                                     "slice_index", "stage")],
                                   kind="stable").reset_index(drop=True)
    return frames


def test_parse_source_refuses_bad_urls_in_one_line():
    src = parse_source("dicomweb+https://pacs.example.org:8443/dicom-web/?ModalitiesInStudy=CT&StudyDate=2019-2020")
    assert src.base_url == "https://pacs.example.org:8443/dicom-web"
    assert dict(src.filters) == {"ModalitiesInStudy": "CT", "StudyDate": "2019-2020"}
    for url, why in (("dicomweb+http://user:secret@pacs/dicom-web", "credentials in the URL"),
                     ("dicomweb+http:///dicom-web", "no host"),
                     ("dicomweb+http://pacs:99999/dicom-web", "bad port"),
                     ("dicomweb+ftp://pacs/dicom-web", "not a DICOMweb URL")):
        with pytest.raises(ScanError, match=why) as err:
            parse_source(url)
        assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_pacs_run_equals_a_local_folder_run(runs, loaded):
    pacs, local = runs
    assert pacs.exit_code == 0 and local.exit_code == 0
    assert pacs.counts == local.counts and sum(pacs.counts.values()) == 3
    # the key is a hash of PatientID (LIDC folders are named by it), never the ID itself
    keys = {pacs_scan_key(p.name, ""): p.name for p in loaded[1].iterdir() if p.is_dir()}
    got, want = _frames(pacs.out_dir, keys), _frames(local.out_dir)
    for t in TABLES:
        pd.testing.assert_frame_equal(got[t], want[t], check_exact=True, obj=t)
    manifest = pd.read_parquet(pacs.out_dir / "manifest.parquet")
    assert set(manifest["kind"]) == {"dicomweb"}
    assert all(p.startswith(loaded[0].dicomweb + "/studies/") for paths in manifest["paths"] for p in paths)
    for t in TABLES:   # no PatientID reaches a table
        text = read_frame(pacs.out_dir, t).to_csv()
        assert "LIDC-IDRI" not in text, t
    assert json.loads((pacs.out_dir / "run.json").read_text())["input"].startswith("dicomweb+http://127.0.0.1:")


def test_pacs_away_fails_the_scans_with_a_reason_and_a_rerun_completes_them(runs, loaded, job_file, cluster,
                                                                             tmp_path):
    pacs, _ = runs
    server = loaded[0]
    out = tmp_path / "out"
    quiet = {"progress": False, "log": lambda *a: None, "scheduler": cluster}
    server.stop()                                        # the PACS goes away after indexing
    try:
        away = run_extract(pacs.out_dir / "manifest.parquet", out, load_job(job_file), **quiet)
        scans = read_frame(out, "scans")
        assert away.counts == {"failed": 3}
        assert all(TRANSFER_FAILED + " after 2 attempts: the PACS cannot be reached" in r for r in scans["reason"])
        assert all(r.startswith(server.dicomweb + "/studies/") for r in scans["reason"])
    finally:
        server.start()                                   # back, same storage and port
    back = run_extract(pacs.out_dir / "manifest.parquet", out, load_job(job_file), **quiet)
    assert back.counts == pacs.counts and back.n_skipped == 0
    got, want = _frames(out), _frames(pacs.out_dir)
    for t in TABLES:
        pd.testing.assert_frame_equal(got[t], want[t], check_exact=True, obj=t)   # no failed row left


def test_unreachable_pacs_or_bad_url_stops_before_any_work(tmp_path, job_file, capsys):
    from emphy_dask.cli import main

    port = free_port()   # nothing listens there
    for n, (url, why) in enumerate(((f"dicomweb+http://127.0.0.1:{port}/dicom-web?ModalitiesInStudy=CT",
                                     "the PACS cannot be reached"),
                                    ("dicomweb+http://admin:hunter2@127.0.0.1/dicom-web", "credentials in the URL"))):
        out = tmp_path / f"out-{n}"
        code = main(["extract", url, "-o", str(out), "--job", str(job_file), "--no-progress"])
        captured = capsys.readouterr()
        lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, lines
        assert why in lines[0] and "hunter2" not in lines[0], lines
        assert not out.exists()   # refused before OUT was even made
