"""A real PACS (Orthanc with its DICOMweb plugin, loaded with the LIDC slabs): DICOMweb in, DICOM out.

In: the job reads the PACS end to end (QIDO-RS, WADO-RS metadata, WADO-RS per worker) and its
tables equal a local-folder run on the same series; the PACS going away fails the affected scans
with a reason and a rerun completes them; a bad URL stops before any work with one line (exit 2).
Out (``emphy export``): every SEG and SR passes dciodvfy without errors, reads back (highdicom,
as a viewer would) to each region's mask voxel for voxel and to the tables' numbers exactly,
goes to the PACS by STOW-RS and comes back equal; a pseudonymised export holds no source identity.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest

from emphy_dask.errors import ScanError
from emphy_dask.io.dicomweb import TRANSFER_FAILED, pacs_scan_key, parse_source
from emphy_dask.job.config import load_job
from emphy_dask.job.runner import run_extract
from emphy_dask.scan_state import artifact_stem
from emphy_dask.tables import TABLES, read_frame
from tests.servers.orthanc import free_port, orthanc  # noqa: F401 - the fixture

# paths written from the key (masks/<shard>/<key>.nii.gz ...): compared through the key mapping
_KEYED_PATHS = ("mask_path", "qc_montage_path", "qc_curve_path", "featuremap_path")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("job") / "pacs.toml"
    # the literal max-HU rule would exclude two of the three slabs (bone at 3071 HU): all three are measured
    f.write_text('name = "pacs"\n[cluster]\nworkers = 2\nmemory_limit = "3GiB"\n'
                 'dashboard_address = "127.0.0.1:0"\n[embed]\nbackbone = "none"\n[qc]\nmax_hu = 4000\n')
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
    assert pacs.counts == local.counts == {"ok": 3}
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


# -- DICOM out -------------------------------------------------------------------------------------

def _dciodvfy_errors(path) -> list[str]:
    """dciodvfy's error lines for one file (Debian package dicom3tools)."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def _expected_segments(out, scan_row, source_files) -> dict:
    """What the SEG must hold: the run's mask decoded into regions, and its lung voxels below -950 HU."""
    from emphy_dask.io import read_dicom_series, read_label_image
    from emphy_dask.phenotypes.labelmaps import region_masks

    volume = read_dicom_series(source_files)
    labels = read_label_image(out / scan_row["mask_path"], volume)
    regions = region_masks(labels, volume.direction_xyz, volume.spacing_zyx_mm)
    want = {k: regions[k] for k in ("WholeLung", "RightLung", "LeftLung")}
    want["LAA950"] = want["WholeLung"] & (volume.hu < -950)
    return want


@pytest.fixture(scope="module")
def scored_run(runs, tmp_path_factory):
    """The local run, copied, with a predictions table (one model's probability per scan), as
    ``emphy predict`` writes it: the SR must carry each score exactly."""
    from emphy_dask.tables import write_part

    out = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(runs[1].out_dir, out)
    keys = sorted(read_frame(out, "scans")["scan_key"])
    write_part("predictions", [{"scan_key": k, "model": "paper", "model_sha256": "0" * 64, "probability": 0.1 + i / 7}
                               for i, k in enumerate(keys)], out, "model-paper")
    return out


def test_export_passes_dciodvfy_and_reads_back_to_the_masks_and_tables(scored_run, shared_data, tmp_path):
    from emphy_dask.export.run import export_run
    from emphy_dask.export.seg import read_segments
    from emphy_dask.export.sr import MEASURES, read_measurements
    from emphy_dask.job.manifest import iter_manifest_file

    summary = export_run(scored_run, dicom_dir=tmp_path / "dcm", log=lambda *a: None)
    assert summary.failed == {} and len(summary.written) == 6
    scans = read_frame(scored_run, "scans").set_index("scan_key")
    pheno = read_frame(scored_run, "phenotypes")
    preds = read_frame(scored_run, "predictions").set_index("scan_key")
    tasks = {t.scan_key: t for t in iter_manifest_file(scored_run / "manifest.parquet")}
    for key, row in scans.iterrows():
        folder = tmp_path / "dcm" / artifact_stem(key)
        for name in ("seg.dcm", "sr.dcm"):
            assert _dciodvfy_errors(folder / name) == [], (key, name)
        seg, sr = pydicom.dcmread(folder / "seg.dcm"), pydicom.dcmread(folder / "sr.dcm")
        # identity comes from the source (these objects are for the patient's record)
        assert seg.PatientID == sr.PatientID == key and seg.StudyInstanceUID == row["study_uid"]
        got = read_segments(seg)
        want = _expected_segments(scored_run, row.to_dict(), tasks[key].paths)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{key} {name}")
        mine = pheno[(pheno.scan_key == key) & (pheno.hu_source == "raw") & (pheno.n_voxels > 0)]
        assert int(got["WholeLung"].sum()) == int(mine.set_index("region").loc["WholeLung", "n_voxels"])
        measured = read_measurements(sr)
        assert set(measured) == set(mine["region"])
        for _, prow in mine.iterrows():
            for column in MEASURES:
                assert measured[prow["region"]][column] == prow[column], (key, prow["region"], column)
        assert measured["WholeLung"]["label"] == row["label"]
        assert measured["WholeLung"]["score:paper"] == preds.loc[key, "probability"]
        assert sr.ContentSequence  # and the SR references the SEG it was written with
        refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert seg.SOPInstanceUID in refs


def test_export_of_a_pacs_run_is_stored_back_and_reads_back_equal(runs, loaded, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    from emphy_dask.export.run import export_run

    server = loaded[0]
    pacs = runs[0]
    before = server.series_count()
    summary = export_run(pacs.out_dir, dicom_dir=tmp_path / "dcm", stow_url=server.dicomweb, log=lambda *a: None)
    assert summary.failed == {} and summary.stored == 3
    assert server.series_count() == before + 6           # one SEG and one SR series per scan
    dw = DICOMwebClient(server.dicomweb)
    for path in summary.written:
        local = pydicom.dcmread(path)
        back = dw.retrieve_instance(local.StudyInstanceUID, local.SeriesInstanceUID, local.SOPInstanceUID)
        for elem in local:                                  # every attribute written comes back equal
            assert back[elem.tag] == elem, (path.name, elem.keyword)
    # identity only in the DICOM objects, taken from the PACS's own series
    patients = {pydicom.dcmread(p).PatientID for p in summary.written}
    assert patients == {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"}


def test_pseudonymized_export_carries_no_source_identity(runs, shared_data, tmp_path, monkeypatch):
    from emphy_dask.export.run import export_run
    from emphy_dask.job.pseudonym import pseudonym

    secret = "a-test-secret-of-32-characters!!"
    monkeypatch.setenv("EMPHY_PSEUDONYM_KEY", secret)
    local = runs[1].out_dir
    summary = export_run(local, dicom_dir=tmp_path / "dcm", pseudonymize=True, log=lambda *a: None)
    assert summary.failed == {} and len(summary.written) == 6
    identity = set()
    for f in (shared_data / "lidc-idri-slabs").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        identity |= {str(ds.get(k)) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                              "FrameOfReferenceUID", "StudyDate", "AccessionNumber")
                     if ds.get(k)}
    aliases = {pseudonym(k, secret.encode()) for k in read_frame(local, "scans")["scan_key"]}
    for path in summary.written:
        ds = pydicom.dcmread(path)
        assert _dciodvfy_errors(path) == [], path
        assert ds.PatientID in aliases and str(ds.PatientName) == ds.PatientID
        text = " ".join(str(v.value) for v in ds.iterall() if v.VR not in ("OB", "OW", "SQ"))
        leaked = [v for v in identity if v in text]
        assert leaked == [] and "LIDC" not in text, (path, leaked[:3])


def test_forget_removes_every_row_of_the_transient_failures_and_keeps_the_rest(tmp_path):
    """A rerun's first step for scans whose PACS transfer failed: their rows leave every table
    (parts rewritten), the other scans of the same parts stay, nothing is written twice."""
    from emphy_dask.job.store import RunStore

    store = RunStore(tmp_path, part_size=2)
    for i, status in enumerate(("ok", "failed", "ok", "failed")):
        key = f"pt-{i}"
        reason = f"http://pacs/studies/1/series/{i}: {TRANSFER_FAILED} after 3 attempts: x" if status == "failed" else None
        store.add({"scans": {"scan_key": key, "config_hash": "h", "status": status, "reason": reason},
                   "phenotypes": [{"scan_key": key, "config_hash": "h", "region": "WholeLung", "hu_source": "raw",
                                   "laa950_pct": float(i)}] if status == "ok" else [],
                   "errors": [{"scan_key": key, "config_hash": "h", "stage": "ingest", "error_type": "ScanError",
                               "message": reason}] if status == "failed" else []})
    store.close()
    assert store.failed_keys(TRANSFER_FAILED) == {"pt-1", "pt-3"}
    assert store.forget({"pt-1", "pt-3"}) == 2                       # both parts held one
    assert sorted(read_frame(tmp_path, "scans")["scan_key"]) == ["pt-0", "pt-2"]
    assert read_frame(tmp_path, "errors").empty
    assert list(read_frame(tmp_path, "phenotypes")["laa950_pct"]) == [0.0, 2.0]
    assert store.repair() == {"orphan_parts_removed": 0, "staged_scans_recovered": 0}


def test_export_tells_a_scan_whose_source_is_gone_and_exports_the_others(runs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from emphy_dask.export.run import export_run

    out = tmp_path / "run"
    shutil.copytree(runs[1].out_dir, out)
    manifest = pq.read_table(out / "manifest.parquet")
    rows = manifest.to_pylist()
    rows[0]["paths"] = [p.replace(".dcm", "-moved.dcm") for p in rows[0]["paths"]]   # the archive lost it
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest.schema), out / "manifest.parquet")
    summary = export_run(out, dicom_dir=tmp_path / "dcm", log=lambda *a: None)
    assert list(summary.failed) == [rows[0]["scan_key"]] and len(summary.written) == 4
    assert "-moved.dcm: source file not found" in summary.failed[rows[0]["scan_key"]] and summary.exit_code == 1
