"""The distributed job end to end: real clusters, real processes, tables read back."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import SimpleITK as sitk
from PIL import Image

from emphy_dask.job.config import load_job
from emphy_dask.job.runner import run_extract
from emphy_dask.phenotypes.regions import REGIONS
from emphy_dask.tables import TABLES, part_ids, read_frame

from .conftest import REPO, SHARED_DATA
from .jobutil import (DaskCLICluster, assert_readable, assert_same_tables, extract_cmd, holding, kill_group, popen,
                      wait_for)

N_PATIENTS = 6


JOB_TOML = ('name = "test"\n[cluster]\nworkers = 2\nmemory_limit = "3GiB"\n'
            'dashboard_address = "127.0.0.1:0"\n[output]\npart_size = 2\n')


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, random_resnet152_weights):
    """The job of the orchestration tests: the paper's 2.5D backbone (random weights from a file), so
    that a run of 6 scans costs seconds of network, not the 3D backbone's ~16 s per scan on a CPU
    without AMX. The default 3D backbone runs through the job in test_report, test_flow and
    test_embed_job."""
    f = tmp_path_factory.mktemp("job") / "test.toml"
    f.write_text(JOB_TOML + f'[embed]\nbackbone = "resnet152"\nweights = "{random_resnet152_weights}"\n')
    return f


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("cohort")
    truth = synth_cohort(root, N_PATIENTS, seed=11, size="small")
    return root / "dicom", truth


@pytest.fixture(scope="module")
def clean_run(cohort, job_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run_extract(cohort[0], out, load_job(job_file), progress=False, log=lambda *a: None)
    return out, summary


def test_local_cluster_run_writes_every_table(clean_run, cohort):
    out, summary = clean_run
    truth = cohort[1]
    assert summary.exit_code == 0 and summary.counts == {"ok": N_PATIENTS}
    scans = read_frame(out, "scans")
    assert scans["scan_key"].tolist() == sorted(truth["scan_key"])
    assert len(part_ids(out, "scans")) == N_PATIENTS // 2          # parts of many scans, not one per scan
    merged = scans.merge(truth, on="scan_key", suffixes=("", "_true"))
    assert (merged["label"] == merged["label_true"]).all()
    assert np.abs(merged["laa950_pct"] - merged["laa950_pct_true"]).max() < 0.5
    assert scans["worker"].nunique() == 2 and (scans["kernel"] == "STANDARD").all()
    assert (scans[["grid_1mm_z", "grid_1mm_y", "grid_1mm_x"]] > 0).all().all()
    pheno = read_frame(out, "phenotypes")
    assert len(pheno) == len(REGIONS) * N_PATIENTS and set(pheno["region"]) >= {"WholeLung", "UpperThird", "LeftLung"}
    assert len(read_frame(out, "slices")) > 10 * N_PATIENTS and read_frame(out, "errors").empty
    # the same tables through pyarrow.dataset and DuckDB
    assert ds.dataset(out / "phenotypes", format="parquet").count_rows() == len(pheno)
    con = duckdb.connect()
    n, = con.execute(f"select count(*) from read_parquet('{out}/scans/*.parquet') where status = 'ok'").fetchone()
    assert n == N_PATIENTS
    # artifacts read back
    row = scans.iloc[0]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["mask_path"])))
    assert set(np.unique(mask)) == {0, 1, 2}
    assert Image.open(out / row["qc_montage_path"]).size[0] > 100
    assert Image.open(out / row["qc_curve_path"]).format == "PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"ok": N_PATIENTS} and run["versions"]["dask"] == "2026.7.1"
    assert run["worker_seconds_per_stage"]["t_segment_s"] > 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == N_PATIENTS and (manifest["n_candidate_series"] == 2).all()   # thin + thick


def test_rerun_resumes_and_writes_nothing_twice(clean_run, cohort, job_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    summary = run_extract(cohort[0], out, load_job(job_file), progress=False, log=lambda *a: None)
    assert summary.n_skipped == N_PATIENTS
    assert json.loads((out / "run.json").read_text())["processed_this_run"] == {}
    assert_same_tables(out, clean_run[0])


def _poll(fn, timeout: float = 300, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    return None


def _no_duplicates(out) -> None:
    for table, key in (("scans", ["scan_key"]), ("phenotypes", ["scan_key", "region", "hu_source"]),
                       ("slices", ["scan_key", "slice_index"]), ("embeddings", ["scan_key", "zone"]),
                       ("errors", ["scan_key", "stage"])):
        assert not read_frame(out, table).duplicated(key).any(), table


def _same_feature_maps(out, clean) -> None:
    """Every scan's layer4 map identical, bit for bit, to the clean run's; no file beside them."""
    rows = read_frame(clean, "scans")
    assert rows["featuremap_path"].notna().all()
    for rel in rows["featuremap_path"]:
        with np.load(out / rel, allow_pickle=False) as a, np.load(clean / rel, allow_pickle=False) as b:
            assert np.array_equal(a["layer4"], b["layer4"]), rel
    on_disk = {p.relative_to(out).as_posix() for p in (out / "featuremaps").rglob("*") if p.is_file()}
    assert on_disk == set(rows["featuremap_path"])


def test_workers_killed_in_a_cpu_and_in_the_device_stage(clean_run, cohort, job_file, tmp_path):
    """Real processes: one worker SIGKILLed while it holds a scan to decode, another while it holds the
    backbone (the device stage, on CPU workers here); replacements join. The tables equal the
    undisturbed run's; the scheduler's Prometheus /metrics show the run; tasks group by stage."""
    from dask.utils import key_split
    from prometheus_client.parser import text_string_to_metric_families

    cluster = DaskCLICluster(n_workers=2)
    try:
        out = tmp_path / "out"
        job = popen(extract_cmd(cohort[0], out, "--job", str(job_file), "--scheduler", cluster.address))
        status, body = cluster.http("/health")
        assert status == 200 and body.strip() == "ok"
        with cluster.client() as watch:
            for prefix, replacement in (("prepare-", "cpu-2"), ("embed-", "cpu-3")):
                victim = _poll(lambda: holding(watch, prefix), every=0.05)
                assert victim, f"no {prefix} task seen running"
                cluster.kill_worker(victim)                        # the process and its nanny die
                cluster.add_worker(replacement)
            stdout, _ = job.communicate(timeout=900)
            assert job.returncode == 0, stdout
            prefixes = watch.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        status, body = cluster.http("/metrics")
    finally:
        cluster.close()
    assert_same_tables(out, clean_run[0])
    _same_feature_maps(out, clean_run[0])
    # the dashboard groups tasks by stage (one progress bar per stage, not per scan)
    assert set(prefixes) == {"index", "prepare", "embed"}
    assert key_split("prepare-12-3fa2b9c1-lidc-idri-slabs/LIDC-IDRI-0001") == "prepare"
    # the run on the scheduler's /metrics, beside Dask's own series
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    run = (("job", "test"), ("run", "out"))

    def value(name, **labels):
        return samples[(name, tuple(sorted(dict(run, **labels).items())))]

    assert value("emphy_scans_total", status="ok") == N_PATIENTS
    assert value("emphy_scans_total", status="failed") == 0
    assert value("emphy_stage_seconds_count", stage="embed") == N_PATIENTS
    assert value("emphy_stage_seconds_bucket", stage="segment", le="+Inf") == N_PATIENTS
    assert value("emphy_stage_seconds_sum", stage="total") > 0
    assert value("emphy_scans_in_manifest") == N_PATIENTS and value("emphy_scans_remaining") == 0
    assert value("emphy_run_active") == 0 and value("emphy_scans_in_flight") == 0
    assert any(name == "dask_scheduler_workers" for name, _ in samples)
    # every series the Grafana dashboard plots is one the scheduler serves
    dashboard = json.loads((REPO / "deploy" / "grafana" / "emphy-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b((?:emphy|dask)_[a-z_]+)", e)}
    served = {name for name, _ in samples}
    assert used and used <= served, used - served


def test_job_killed_mid_run_then_rerun(clean_run, cohort, job_file, tmp_path):
    out = tmp_path / "out"
    job = popen(extract_cmd(cohort[0], out, "--job", str(job_file)))
    assert wait_for(lambda: any((out / "_staging").glob("*.json")) or part_ids(out, "scans"), timeout=300)
    kill_group(job)                                                     # SIGKILL: no clean-up at all
    seen = assert_readable(out)            # what a reader sees after the crash: no partial file
    assert seen["npz"] >= 1 and seen["nii.gz"] >= 1
    rerun = subprocess.run(extract_cmd(cohort[0], out, "--job", str(job_file)), capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_same_tables(out, clean_run[0])
    _no_duplicates(out)
    _same_feature_maps(out, clean_run[0])
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert not (out / "_staging").exists()
    assert assert_readable(out)["npz"] == N_PATIENTS


def test_scheduler_lost_stops_the_job_and_a_rerun_resumes(clean_run, cohort, job_file, tmp_path):
    out = tmp_path / "out"
    cluster = DaskCLICluster(n_workers=2)
    try:
        job = popen(extract_cmd(cohort[0], out, "--job", str(job_file), "--scheduler", cluster.address))
        assert wait_for(lambda: any((out / "_staging").glob("*.json")) or part_ids(out, "scans"), timeout=300)
        kill_group(cluster.scheduler)
        stdout, _ = job.communicate(timeout=180)
    finally:
        cluster.close()
    assert job.returncode == 3, stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("emphy extract: lost the scheduler tcp://127.0.0.1:") and "rerun" in last, stdout
    written = read_frame(out, "scans")
    assert 1 <= len(written) < N_PATIENTS and (written["status"] == "ok").all()   # finished scans kept
    assert_readable(out)
    cluster = DaskCLICluster(n_workers=1)
    try:
        rerun = subprocess.run(extract_cmd(cohort[0], out, "--job", str(job_file), "--scheduler", cluster.address),
                               capture_output=True, text=True, timeout=900)
    finally:
        cluster.close()
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(written)} already done" in rerun.stdout
    assert_same_tables(out, clean_run[0])
    _no_duplicates(out)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_same_tables_and_feature_maps_with_1_2_and_3_workers(clean_run, cohort, job_file, tmp_path, n_workers):
    """Same inputs, settings and seed: every table (embeddings included) identical to the
    2-worker run, volatile columns (timings, workers) aside; feature maps bit for bit."""
    out = tmp_path / "out"
    summary = run_extract(cohort[0], out, load_job(job_file), workers=n_workers, progress=False, log=lambda *a: None)
    assert summary.counts == {"ok": N_PATIENTS}
    assert read_frame(out, "scans")["worker"].nunique() == n_workers
    assert_same_tables(out, clean_run[0], exact=True)
    _same_feature_maps(out, clean_run[0])


def _write_bad_scans(root):
    """Bad folders beside good ones: a series with a truncated slice, a non-CT series, a non-DICOM file."""
    from .dicom_factory import write_series

    trunc = root / "BAD-TRUNCATED" / "study" / "series"
    files = write_series(trunc, n=6)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 40])
    write_series(root / "BAD-MR" / "study" / "series", n=3, modality="MR")
    (root / "BAD-NOTDICOM").mkdir()
    (root / "BAD-NOTDICOM" / "scan.dcm").write_text("not a dicom file")


def test_bad_scans_get_reasons_and_good_rows_stay_the_same(clean_run, cohort, job_file, tmp_path):
    root = tmp_path / "archive"
    shutil.copytree(cohort[0], root)
    _write_bad_scans(root)
    out = tmp_path / "out"
    summary = run_extract(root, out, load_job(job_file), progress=False, log=lambda *a: None)
    assert summary.exit_code == 0
    scans = read_frame(out, "scans").set_index("scan_key")
    assert scans.loc["BAD-TRUNCATED", "status"] == "failed"
    assert "BAD-TRUNCATED" in scans.loc["BAD-TRUNCATED", "reason"]
    assert scans.loc["BAD-MR", "status"] == "failed" and "CT" in scans.loc["BAD-MR", "reason"]
    errors = read_frame(out, "errors")
    assert {"BAD-TRUNCATED", "BAD-MR"} <= set(errors["scan_key"])
    good = {t: df[~df["scan_key"].str.startswith("BAD-")].reset_index(drop=True)
            for t, df in ((t, read_frame(out, t, stable=True)) for t in TABLES)}
    clean = {t: read_frame(clean_run[0], t, stable=True) for t in TABLES}
    for t in ("scans", "phenotypes", "slices"):
        pd.testing.assert_frame_equal(good[t], clean[t], obj=t, check_dtype=False)
    # the run's manifest is a valid INPUT and reproduces the run, error rows included
    again = tmp_path / "again"
    run_extract(out / "manifest.parquet", again, load_job(job_file), progress=False, log=lambda *a: None)
    assert_same_tables(again, out)


@pytest.fixture(scope="module")
def no_backbone_job(job_file):
    """The test job without embeddings, for tests that are not about them (quicker)."""
    f = job_file.with_name("no-backbone.toml")
    f.write_text(JOB_TOML + '[embed]\nbackbone = "none"\n')
    return f


def test_cli_extract_over_the_real_shared_data(tmp_path, job_file, no_backbone_job):
    """Every real scan gets a row; the paper's max-HU rule excludes dense-bone/metal scans with the value."""
    out = tmp_path / "real"
    proc = subprocess.run(extract_cmd(SHARED_DATA, out, "--job", str(no_backbone_job)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scans = read_frame(out, "scans").set_index("scan_key")
    assert sorted(scans.index) == ["lidc-idri-full/LIDC-IDRI-0002", "lidc-idri-full/LIDC-IDRI-0013",
                                   "lidc-idri-slabs/LIDC-IDRI-0001", "lidc-idri-slabs/LIDC-IDRI-0002",
                                   "lidc-idri-slabs/LIDC-IDRI-0003", "lung-pet-ct-dx/Lung_Dx-A0001",
                                   "rider-lung-ct"]
    full = scans.loc["lidc-idri-full/LIDC-IDRI-0013"]        # saturated bone: the paper's rule excludes it
    assert full["status"] == "excluded" and full["qc_max_hu"] == 3071 and full["n_slices"] == 125
    assert set(scans["status"]) <= {"ok", "excluded"}
    excluded = scans[scans["status"] == "excluded"]
    assert (excluded["qc_max_hu"] > 1600).all() and excluded["reason"].str.startswith("QC rule max_hu>1600").all()
    dx = scans.loc["lung-pet-ct-dx/Lung_Dx-A0001"]
    assert dx["kernel"] == "B" and bool(dx["multi_kernel"]) and set(dx["kernels_in_study"].split(",")) == {"B", "L"}

    relaxed = tmp_path / "relaxed.toml"
    relaxed.write_text(job_file.read_text() + "[qc]\nmax_hu = 4000.0\n")
    out2 = tmp_path / "real-relaxed"
    proc = subprocess.run(extract_cmd(SHARED_DATA, out2, "--job", str(relaxed)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scans = read_frame(out2, "scans").set_index("scan_key")
    assert (scans["status"] == "ok").all(), scans["reason"].to_dict()
    assert 4.0 < scans.loc["lung-pet-ct-dx/Lung_Dx-A0001", "lung_volume_l"] < 7.5
    pheno = read_frame(out2, "phenotypes")
    dx = pheno[pheno["scan_key"] == "lung-pet-ct-dx/Lung_Dx-A0001"].set_index("region")
    assert dx.loc["RightLung", "volume_l"] > dx.loc["LeftLung", "volume_l"] > 1.0
    emb = read_frame(out2, "embeddings")     # every ok scan: 3 zones x 2048 finite, non-constant values
    assert set(emb["scan_key"]) == set(scans.index) and (emb.groupby("scan_key")["zone"].nunique() == 3).all()
    vectors = np.stack(emb["embedding"])
    assert vectors.shape[1] == 2048 and np.isfinite(vectors).all() and (vectors.std(axis=1) > 0).all()


PHI = {"PatientName": "DOE^JANE^Q", "PatientBirthDate": "19470312", "PatientID": "MRN-99887766",
       "InstitutionName": "SAINT ELSEWHERE HOSPITAL", "ReferringPhysicianName": "HOUSE^GREGORY"}


def test_no_patient_identifying_values_anywhere_in_out(tmp_path, job_file):
    """PHI planted in every DICOM header never reaches OUT (Parquet data + metadata, PNG, NIfTI, JSON)."""
    import pydicom

    from emphy_dask.synth import synth_patient

    synth_patient(tmp_path / "src", 1, "centrilobular", 10.0, seed=2, size="small")
    for f in (tmp_path / "src" / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        for k, v in PHI.items():
            setattr(ds, k, v)
        ds.save_as(f)
    out = tmp_path / "out"
    summary = run_extract(tmp_path / "src" / "dicom", out, load_job(job_file), workers=1, progress=False,
                          log=lambda *a: None)
    assert summary.counts == {"ok": 1}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".parquet", ".png", ".gz", ".json"}
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        for value in PHI.values():
            for needle in {value, value.replace("^", " ")}:
                assert needle.encode() not in data, f"{needle} found in {p}"


def test_cli_errors_before_any_work(tmp_path, capsys):
    from emphy_dask.cli import main

    assert main(["extract", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    assert "input not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[qc]\nmax_hux = 1\n")
    assert main(["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--job", str(bad)]) == 2
    assert "unknown key [qc].max_hux" in capsys.readouterr().err
    assert main(["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--segmenter", "magic"]) == 2
    assert "unknown segmenter 'magic' (known: threshold, lungmask)" in capsys.readouterr().err
    assert main(["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--backbone", "vgg"]) == 2
    assert "[embed].backbone 'vgg' is not a known backbone" in capsys.readouterr().err


def test_nifti_files_and_csv_manifest_as_input(cohort, clean_run, no_backbone_job, tmp_path):
    """INPUT may be a tree of image files or a CSV manifest; the same CT gives the same numbers."""
    import SimpleITK as sitk

    from emphy_dask.io import load_ct

    key = sorted(p.name for p in cohort[0].iterdir())[0]
    ct = load_ct(cohort[0] / key)
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(ct.to_sitk(), str(images / "case-a.nii.gz"))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"scan_key,path\nfrom-dicom,{cohort[0] / key}\nfrom-nifti,images/case-a.nii.gz\n"
                        "missing,nowhere/x.nii.gz\nfrom-nifti,images/case-a.nii.gz\n")
    out = tmp_path / "out"
    summary = run_extract(manifest, out, load_job(no_backbone_job), progress=False, log=lambda *a: None)
    assert summary.exit_code == 0
    scans = read_frame(out, "scans").set_index("scan_key")
    assert scans.loc["from-dicom", "status"] == "ok" and scans.loc["from-nifti", "status"] == "ok"
    assert scans.loc["from-nifti", "source_format"] == "nifti"
    assert scans.loc["from-nifti~2", "status"] == "ok"            # a key listed twice never makes 2 rows
    assert scans.loc["from-nifti", "mask_path"] != scans.loc["from-nifti~2", "mask_path"]
    assert scans.loc["missing", "status"] == "failed" and "not found" in scans.loc["missing", "reason"]
    pheno = read_frame(out, "phenotypes").set_index(["scan_key", "region"])
    clean = read_frame(clean_run[0], "phenotypes").set_index(["scan_key", "region"])
    for k in ("from-dicom", "from-nifti"):
        np.testing.assert_allclose(pheno.loc[k]["laa950_pct"].to_numpy(), clean.loc[key]["laa950_pct"].to_numpy())
    tree = run_extract(images, tmp_path / "out-tree", load_job(no_backbone_job), progress=False, log=lambda *a: None)
    assert tree.counts == {"ok": 1} and read_frame(tmp_path / "out-tree", "scans")["scan_key"].tolist() == ["case-a"]
