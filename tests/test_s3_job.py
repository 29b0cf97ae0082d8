"""The job against a real S3-compatible server on 127.0.0.1 (moto, ``tests/servers/s3.py``) holding a
copy of the shared LIDC slabs: read from the store, written to the store, equal to a local run;
the store going away mid-run; a bad URL or a refused credential stopped before any work."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from emphy_dask.cli import main
from emphy_dask.errors import ScanError
from emphy_dask.io import storage
from emphy_dask.job import runner
from emphy_dask.job.config import load_job
from emphy_dask.job.runner import run_extract
from emphy_dask.tables import TABLES, read_frame

from .conftest import SHARED_DATA
from .jobutil import assert_same_tables
from .servers.s3 import SECRET, refuse_credentials, s3_server, s3_slabs  # noqa: F401 - fixtures


def _job(path, s3, extra: str = "") -> str:
    o = s3.options()
    path.write_text(
        'name = "s3-test"\n[qc]\nmax_hu = 4000\n[embed]\nbackbone = "none"\n'
        '[cluster]\nworkers = 2\nmemory_limit = "2GiB"\ndashboard_address = "127.0.0.1:0"\n'
        f'[output]\npart_size = 2\nwrite_qc_png = false\n{extra}'
        f'[storage.s3]\nendpoint_url = "{o["endpoint_url"]}"\nkey = "{o["key"]}"\nsecret = "{o["secret"]}"\n')
    return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3_server):
    return _job(tmp_path_factory.mktemp("job") / "s3.toml", s3_server)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, job):
    """The same series from the local disk: the reference."""
    out = tmp_path_factory.mktemp("local") / "run"
    summary = run_extract(SHARED_DATA / "lidc-idri-slabs", out, load_job(job), progress=False, log=lambda *a: None)
    assert summary.counts["ok"] == 3
    return out


def test_s3_in_s3_out_equals_local_resumes_from_the_store_and_leaks_no_secret(s3_slabs, job, local_run, capsys):
    s3, src = s3_slabs
    out = f"s3://{src.split('/')[2]}/runs/first"
    lines: list[str] = []
    summary = run_extract(src, out, load_job(job), progress=False, log=lines.append)
    assert summary.counts["ok"] == 3 and summary.exit_code == 0 and not summary.unavailable
    # every table equal to the local run (volatile columns aside), read back from the store
    assert_same_tables(local_run, out)
    # artifacts written by the workers straight into the store, voxel for voxel the local ones
    key = "LIDC-IDRI-0002"
    mask_rel = read_frame(local_run, "scans").set_index("scan_key").loc[key, "mask_path"]
    remote = storage.read_bytes(f"{out}/{mask_rel}")
    local_img = sitk.GetArrayFromImage(sitk.ReadImage(str(local_run / mask_rel)))
    tmp = local_run.parent / "from-s3.nii.gz"
    tmp.write_bytes(remote)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))), local_img)
    run_json = storage.read_bytes(f"{out}/run.json").decode()
    assert json.loads(run_json)["input"] == src
    assert storage.exists(f"{out}/manifest.parquet") and storage.glob(f"{out}/_staging/*") == []
    # a rerun resumes from the store: nothing done twice
    again = run_extract(src, out, load_job(job), progress=False, log=lines.append)
    assert again.n_skipped == 3 and sum(again.counts.values()) == 3
    assert len(read_frame(out, "scans")) == 3
    # the planted secret is nowhere: not in run.json, a table, the manifest, a log line or the terminal
    assert SECRET not in run_json and "***" in run_json
    for table in TABLES:
        assert SECRET not in read_frame(out, table).astype(str).to_csv()
    manifest = storage.read_bytes(f"{out}/manifest.parquet")
    assert SECRET.encode() not in manifest
    printed = capsys.readouterr()
    assert SECRET not in "\n".join(lines) + printed.out + printed.err


def test_store_going_away_mid_run_leaves_scans_for_a_rerun(s3_slabs, job, local_run, tmp_path, monkeypatch):
    """The input store stops answering after the first scan is written: the scans still to read
    are reported with the reason and not written (exit 1); with the store back, a rerun completes
    them and the tables equal the local run."""
    s3, src = s3_slabs
    one_by_one = _job(tmp_path / "serial.toml", s3, extra="")
    cfg = load_job(one_by_one)
    import dataclasses

    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, workers=1, max_in_flight=1))

    class StoreThatLosesTheArchive(runner.RunStore):
        def add(self, result):
            super().add(result)
            if s3.server is not None and self.out_dir.exists():
                s3.stop()                     # the archive goes away after the first written scan
                s3.server = None

    out = tmp_path / "run"
    monkeypatch.setattr(runner, "RunStore", StoreThatLosesTheArchive)
    try:
        first = run_extract(src, out, cfg, progress=False, log=lambda *a: None)
    finally:
        if s3.server is None:
            s3.start()
    monkeypatch.undo()
    assert first.unavailable and first.exit_code == 1
    done = set(read_frame(out, "scans")["scan_key"])
    assert done and done.isdisjoint(k for k, _ in first.unavailable) and len(done) + len(first.unavailable) == 3
    for _, reason in first.unavailable:
        assert "object store unreachable" in reason and "rerun" in reason
    assert json.loads((out / "run.json").read_text())["unavailable"]
    rerun = run_extract(src, out, cfg, progress=False, log=lambda *a: None)
    assert rerun.exit_code == 0 and not rerun.unavailable and rerun.counts["ok"] == 3
    assert_same_tables(local_run, out)


def test_output_store_going_away_stops_in_one_line_and_a_rerun_resumes(s3_slabs, job, local_run, monkeypatch):
    """The store holding OUT stops answering after the first scan is staged there: the job stops with
    one line (ScanError, exit 2 at the CLI), what was staged stays, and a rerun completes the run."""
    s3, src = s3_slabs
    cfg = load_job(job)
    import dataclasses

    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, workers=1, max_in_flight=1))
    out = f"s3://{src.split('/')[2]}/runs/output-lost"

    class StoreThatGoesAway(runner.RunStore):
        def add(self, result):
            super().add(result)
            if s3.server is not None:
                s3.stop()
                s3.server = None

    monkeypatch.setattr(runner, "RunStore", StoreThatGoesAway)
    try:
        with pytest.raises(ScanError, match="output store could not be reached.*rerun the same command"):
            run_extract(SHARED_DATA / "lidc-idri-slabs", out, cfg, progress=False, log=lambda *a: None)
    finally:
        if s3.server is None:
            s3.start()
    monkeypatch.undo()
    assert len(storage.glob(f"{out}/_staging/*.json")) == 1      # the first scan, staged in the store
    rerun = run_extract(SHARED_DATA / "lidc-idri-slabs", out, cfg, progress=False, log=lambda *a: None)
    assert rerun.counts["ok"] == 3 and rerun.exit_code == 0
    assert json.loads(storage.read_bytes(f"{out}/run.json"))["repair"]["staged_scans_recovered"] == 1
    assert_same_tables(local_run, out)


def _cli_refusal(args, capsys) -> str:
    assert main(["extract", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert SECRET not in err
    return err


def test_bad_url_is_refused_in_one_line_before_any_work(s3_slabs, job, tmp_path, capsys):
    s3, src = s3_slabs
    bucket = src.split("/")[2]
    err = _cli_refusal([f"s3://{bucket}-missing/lidc", "-o", str(tmp_path / "out"), "--job", job], capsys)
    assert "cannot read the input" in err and "no such bucket" in err
    err = _cli_refusal([f"{src}/no-such-prefix", "-o", str(tmp_path / "out"), "--job", job], capsys)
    assert "no such bucket, prefix or file" in err
    assert not (tmp_path / "out").exists()


def test_refused_credential_is_one_line_before_any_work(s3_slabs, job, tmp_path, capsys, refuse_credentials):
    s3, src = s3_slabs
    err = _cli_refusal([src, "-o", str(tmp_path / "out"), "--job", job], capsys)
    assert "access refused" in err
    assert not (tmp_path / "out").exists()


def test_csv_and_idc_manifests_of_series_urls(s3_slabs, job, local_run):
    """A CSV ``scan_key,url`` and an IDC-style s5cmd manifest name series folders in the store:
    the tasks list each series' files from the store, the same files the folder tree gives."""
    from emphy_dask.job.inputs import iter_input

    s3, src = s3_slabs
    storage.configure({"s3": s3.options()})
    man = pq.read_table(local_run / "manifest.parquet").to_pylist()
    series = {r["scan_key"]: "/".join(r["paths"][0].split("/")[:-1]) for r in man if r["kind"] == "dicom"}
    csv = "scan_key,url\n" + "".join(f"{k},{src}/{d}/\n" for k, d in sorted(series.items()))
    idc = "# s5cmd --no-sign-request --endpoint-url https://s3.amazonaws.com run x.s5cmd\n" + "".join(
        f"cp {src}/{d}/* .\n" for d in sorted(series.values()))
    bucket = src.split("/")[2]
    storage.write_bytes(f"s3://{bucket}/lists/series.csv", csv.encode())
    storage.write_bytes(f"s3://{bucket}/lists/cohort.s5cmd", idc.encode())
    _, tasks = iter_input(f"s3://{bucket}/lists/series.csv")
    by_key = {t.scan_key: t for t in tasks}
    assert set(by_key) == set(series)
    for r in man:
        if r["kind"] == "dicom":
            assert sorted(p.rsplit("/", 1)[1] for p in by_key[r["scan_key"]].paths) == \
                sorted(p.rsplit("/", 1)[1] for p in r["paths"])
            assert all(storage.as_url(p).startswith(src) for p in by_key[r["scan_key"]].paths)
    _, tasks = iter_input(f"s3://{bucket}/lists/cohort.s5cmd")
    tasks = list(tasks)
    assert sorted(t.scan_key for t in tasks) == sorted(d.rsplit("/", 1)[1] for d in series.values())
    assert all(t.kind == "dicom" for t in tasks)
    assert sum(len(t.paths) for t in tasks) == sum(len(r["paths"]) for r in man if r["kind"] == "dicom")
