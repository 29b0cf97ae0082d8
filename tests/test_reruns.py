"""Reruns that heal and runs that stop cleanly, on real LocalClusters: fail -> fix -> rerun -> ok
with the same exit codes on a first run and a rerun, ``--retry failed``, Ctrl-C and SIGTERM sent
to a running ``emphy extract``, a single series folder as INPUT with ``--set``, and the refusal
of a changed OUT naming the setting."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import duckdb
import pandas as pd
import pytest

from emphy_dask.cli import main
from emphy_dask.tables import TABLES, part_ids, read_frame

from .conftest import LIDC
from .jobutil import assert_readable, extract_cmd, kill_group, popen, wait_for


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    f = tmp_path_factory.mktemp("job") / "job.toml"
    f.write_text('[cluster]\nworkers = 1\nmemory_limit = "3GiB"\ndashboard_address = "127.0.0.1:0"\n'
                 '[output]\npart_size = 1\n[embed]\nbackbone = "none"\n')
    return f


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("cohort")
    synth_cohort(root, 4, seed=3, size="small")
    return root / "dicom"


#: Scans in the interrupted run's cohort: enough that the job is still busy when the signal lands
#: (with 4 small scans a quiet machine finished the rest between the first part and the signal).
N_INTERRUPTED = 12


@pytest.fixture(scope="module")
def long_cohort(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("long_cohort")
    synth_cohort(root, N_INTERRUPTED, seed=3, size="small")
    return root / "dicom"


def _extract(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["extract", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_failed_scan_heals_when_its_files_arrive(cohort, job, tmp_path, capsys):
    archive, out = tmp_path / "archive", tmp_path / "out"
    (archive / "P1").mkdir(parents=True)
    (archive / "P1" / "README.txt").write_text("DICOM to come")
    rc, stdout, _ = _extract(capsys, archive, "-o", out, "--job", job)
    scans = read_frame(out, "scans")
    assert rc == 1 and scans["status"].tolist() == ["failed"] and "no DICOM files" in scans["reason"][0]
    # unchanged input: resumed, the same exit code as the first run
    rc, stdout, _ = _extract(capsys, archive, "-o", out, "--job", job)
    assert rc == 1 and "1 scans (1 resumed)" in stdout
    # --retry failed redoes it even so; still one row per table
    rc, stdout, _ = _extract(capsys, archive, "-o", out, "--job", job, "--retry", "failed")
    assert rc == 1 and "redoing 1 failed scan(s) (1 --retry failed)" in stdout
    assert len(read_frame(out, "scans")) == 1 and len(read_frame(out, "errors")) == 1
    # the user adds the DICOM files: the rerun redoes the scan and heals it
    shutil.copytree(cohort / "SYNTH-0001", archive / "P1", dirs_exist_ok=True)
    rc, stdout, _ = _extract(capsys, archive, "-o", out, "--job", job)
    assert rc == 0, stdout
    assert "redoing 1 failed scan(s) (1 input changed)" in stdout and "ok 1, excluded 0, failed 0" in stdout
    scans = read_frame(out, "scans")
    assert scans["status"].tolist() == ["ok"] and scans["laa950_pct"][0] > 0
    assert read_frame(out, "errors").empty and len(read_frame(out, "phenotypes")) >= 12
    rc, stdout, _ = _extract(capsys, archive, "-o", out, "--job", job)      # and stays healed
    assert rc == 0 and "1 scans (1 resumed)" in stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_cleanly_and_a_rerun_resumes(long_cohort, job, tmp_path, sig):
    out, cohort = tmp_path / "out", long_cohort
    proc = popen(extract_cmd(cohort, out, "--job", str(job)))
    try:
        assert wait_for(lambda: bool(part_ids(out, "scans")), timeout=300)      # part_size = 1: the first scan
        # Ctrl-C in a terminal reaches the whole process group (the workers too); SIGTERM the job alone
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + sig, stdout
    assert "Traceback" not in stdout and "WARNING" not in stdout and "KeyboardInterrupt" not in stdout, stdout
    last = stdout.strip().splitlines()[-1]
    written = read_frame(out, "scans")
    assert last.startswith(f"emphy extract: interrupted: {len(written)} scans written, ") and \
        last.endswith("in flight dropped; rerun the same command to resume"), stdout
    assert 1 <= len(written) < N_INTERRUPTED
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "interrupted" and run["counts"] == {"ok": len(written)}
    seen = assert_readable(out)                       # no partial file, and no file without its row
    assert seen["nii.gz"] == len(written) and seen["png"] == 2 * len(written)
    assert not (out / "_staging").exists() and not list(out.rglob(".tmp-*"))
    if sig == signal.SIGTERM:
        return
    rerun = subprocess.run(extract_cmd(cohort, out, "--job", str(job)), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    scans = read_frame(out, "scans")
    assert len(scans) == N_INTERRUPTED and scans["scan_key"].is_unique and (scans["status"] == "ok").all()
    assert json.loads((out / "run.json").read_text())["state"] == "complete"


def test_series_folder_as_input_with_set_then_changed_settings_named(job, tmp_path, capsys):
    series = next(p for p in (LIDC / "LIDC-IDRI-0001").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    out = tmp_path / "out"
    rc, stdout, err = _extract(capsys, series, "-o", out, "--job", job, "--set", "qc.max_hu=3072")
    assert rc == 0, stdout + err
    scans = read_frame(out, "scans")
    assert scans["scan_key"].tolist() == [series.name] and scans["status"].tolist() == ["ok"]
    assert json.loads((out / "run.json").read_text())["config"]["qc"]["max_hu"] == 3072.0
    # every table reads, empty ones included (no errors, no embeddings in this run)
    for table in TABLES:
        df = pd.read_parquet(out / table)
        assert "scan_key" in df.columns
        duckdb.connect().execute(f"select count(*) from read_parquet('{out}/{table}/*.parquet')").fetchone()
    assert pd.read_parquet(out / "errors").empty and pd.read_parquet(out / "embeddings").empty
    # the end of the run: the scan's headline values and the next commands
    row = scans.iloc[0]
    assert f"{series.name}: ok, {row['kernel']} ({row['kernel_class']}), {row['laa950_pct']:.2f} %" in stdout
    assert f"next: emphy fit {out}" in stdout and f"emphy report {out}" in stdout
    # the same OUT without the override: refused, naming the setting, old and new
    rc, stdout, err = _extract(capsys, series, "-o", out, "--job", job)
    assert rc == 2 and "[qc].max_hu: 3072.0 -> 1600.0" in err and len(err.strip().splitlines()) == 1, err
    rc, stdout, err = _extract(capsys, series, "-o", out, "--job", job, "--set", "qc.max_hu=lots")
    assert rc == 2 and "--set: [qc].max_hu must be float, got 'lots'" in err
