"""What a user meets before and around a run, without a cluster: INPUT and OUT refused with one
line, --overwrite that removes only emphy's files, --set overrides and the settings diff, tables
that always exist, rows forgotten for a redo, input fingerprints, the end-of-run lines."""
from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from emphy_dask.cli import main
from emphy_dask.job.config import ConfigError, JobConfig, load_job
from emphy_dask.job.fingerprint import files_fingerprint, task_fingerprint
from emphy_dask.job.manifest import build_manifest
from emphy_dask.job.store import ConfigMismatch, RunStore, clean_out_dir
from emphy_dask.job.summary import end_of_run_lines
from emphy_dask.scan_state import ScanTask
from emphy_dask.tables import TABLES, read_frame, write_part

from .dicom_factory import write_series


def _refused(capsys, *argv) -> str:
    """Run ``emphy extract ARGV``; it must exit 2 with one line on stderr; returns that line."""
    assert main(["extract", *map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emphy extract: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("case", ["missing", "dicom-file", "label-image", "binary", "csv-columns"])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys, case):
    series = write_series(tmp_path / "P1" / "study" / "series", n=3)
    target = {"missing": tmp_path / "nowhere", "dicom-file": series[0], "label-image": tmp_path / "mask.nii.gz",
              "binary": tmp_path / "blob.bin", "csv-columns": tmp_path / "list.csv"}[case]
    if case == "label-image":
        sitk.WriteImage(sitk.GetImageFromArray(np.pad(np.ones((4, 6, 6), np.uint8), 1)), str(target))
    elif case == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    elif case == "csv-columns":
        target.write_text("patient,file\nA,x\n")
    out = tmp_path / "out"
    err = _refused(capsys, target, "-o", out)
    expected = {"missing": "input not found", "dicom-file": f"pass its series folder ({series[0].parent})",
                "label-image": "a label map, not a CT", "binary": "not a folder, an image or a CSV manifest",
                "csv-columns": "needs the columns scan_key,path (found: patient, file)"}[case]
    assert expected in err and str(target) in err
    assert not out.exists()                        # nothing left behind: no OUT, no _staging/


def test_out_inside_input_and_input_inside_out_are_refused(tmp_path, capsys):
    write_series(tmp_path / "archive" / "P1" / "study" / "series", n=3)
    err = _refused(capsys, tmp_path / "archive", "-o", tmp_path / "archive" / "results")
    assert "OUT is inside INPUT" in err and not (tmp_path / "archive" / "results").exists()
    err = _refused(capsys, tmp_path / "archive", "-o", tmp_path)
    assert "INPUT is inside OUT" in err
    err = _refused(capsys, tmp_path / "archive", "-o", tmp_path / "archive")
    assert "OUT is inside INPUT" in err


def _fake_run(out, hash_="h1", keys=("A", "B")):
    """A run folder with rows in every table for ``keys`` (scans, errors) and emphy's folders."""
    store = RunStore(out, part_size=1)
    for k in keys:
        store.add({"scans": {"scan_key": k, "config_hash": hash_, "status": "failed", "reason": "x",
                             "input_fingerprint": "f-" + k},
                   "phenotypes": [], "slices": [], "embeddings": [],
                   "errors": [{"scan_key": k, "config_hash": hash_, "stage": "ingest", "error_type": "ScanError",
                               "message": "x", "path": None}]})
    store.close()
    for d in ("masks", "qc"):
        (out / d / "ab").mkdir(parents=True)
        (out / d / "ab" / "A.png").write_bytes(b"x")
    (out / "run.json").write_text("{}")


def test_overwrite_removes_only_what_emphy_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    _fake_run(out)
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigMismatch, match=r"holds files emphy did not write \(notes.txt\).*--force"):
        clean_out_dir(out)
    assert (out / "scans").is_dir() and (out / "notes.txt").exists()      # refused: nothing removed
    # the CLI says the same in one line, exit 2, before any cluster starts
    write_series(tmp_path / "in" / "P1" / "study" / "series", n=3)
    err = _refused(capsys, tmp_path / "in", "-o", out, "--overwrite")
    assert "notes.txt" in err
    assert "--force goes with --overwrite" in _refused(capsys, tmp_path / "in", "-o", out, "--force")
    clean_out_dir(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]        # the user's file is kept
    assert (out / "notes.txt").read_text() == "my notes"
    _fake_run(tmp_path / "run-only")
    clean_out_dir(tmp_path / "run-only")
    assert not (tmp_path / "run-only").exists()


def test_every_table_exists_after_a_run_even_empty(tmp_path):
    RunStore(tmp_path / "out").close()              # a run that wrote no scan at all
    for table in TABLES:
        df = pd.read_parquet(tmp_path / "out" / table)
        assert df.empty and "scan_key" in df.columns
        n, = duckdb.connect().execute(f"select count(*) from read_parquet('{tmp_path}/out/{table}/*.parquet')"
                                      ).fetchone()
        assert n == 0
    _fake_run(tmp_path / "two")
    assert len(pd.read_parquet(tmp_path / "two" / "errors")) == 2
    assert pd.read_parquet(tmp_path / "two" / "embeddings").empty     # no embeddings rows: still a table


def test_forget_removes_a_scans_rows_from_every_table(tmp_path):
    _fake_run(tmp_path)
    store = RunStore(tmp_path)
    assert store.failed_fingerprints() == {"A": "f-A", "B": "f-B"}
    assert store.forget({"A"}) == 1
    assert read_frame(tmp_path, "scans")["scan_key"].tolist() == ["B"]
    assert read_frame(tmp_path, "errors")["scan_key"].tolist() == ["B"]
    assert store.repair()["orphan_parts_removed"] == 0                 # the emptied parts are no orphans
    assert read_frame(tmp_path, "errors")["scan_key"].tolist() == ["B"]


def test_fingerprint_changes_when_files_are_added_modified_or_removed(tmp_path):
    folder = tmp_path / "P1"
    folder.mkdir()
    (folder / "README.txt").write_text("no dicom here")
    task = ScanTask("P1", "error", error="no DICOM files found", error_path=str(folder))
    empty = task_fingerprint(task, tmp_path)
    assert task_fingerprint(task, tmp_path) == empty                    # stable
    files = write_series(folder / "series", n=3)
    added = task_fingerprint(task, tmp_path)
    assert added != empty
    picked = ScanTask("P1", "dicom", tuple(str(f) for f in files))
    before = task_fingerprint(picked, tmp_path)
    os.utime(files[1], ns=(1, 1))                                        # rewritten
    assert task_fingerprint(picked, tmp_path) != before
    files[2].unlink()
    assert files_fingerprint(files, tmp_path) != files_fingerprint(files[:2], tmp_path)
    # the manifest carries it, so the scans row can
    _, tasks = build_manifest(tmp_path)
    assert {t.scan_key: bool(t.selection.get("input_fingerprint")) for t in tasks} == {"P1": True}


def test_single_ct_image_file_is_one_scan(tmp_path):
    img = sitk.GetImageFromArray(np.full((6, 8, 8), -1000, np.int16))
    sitk.WriteImage(img, str(tmp_path / "chest.nii.gz"))
    root, tasks = build_manifest(tmp_path / "chest.nii.gz")
    assert root == tmp_path.resolve()
    assert [(t.scan_key, t.kind) for t in tasks] == [("chest", "image")]


def test_set_overrides_are_typed_and_checked_like_the_job_file(tmp_path):
    cfg = load_job(None, ["qc.max_hu=3072", "harmonize.enabled=true", "segment.name=threshold",
                          "resample.spacing_mm=[1, 1, 2]"])
    assert cfg.qc.max_hu == 3072.0 and isinstance(cfg.qc.max_hu, float) and cfg.harmonize.enabled
    assert cfg.resample.spacing_mm == (1.0, 1.0, 2.0)
    job = tmp_path / "job.toml"
    job.write_text("[qc]\nmax_hu = 2000.0\nmax_std_hu = 500.0\n")
    both = load_job(job, ["qc.max_hu=3072"])                           # --set wins, the file's other keys stay
    assert (both.qc.max_hu, both.qc.max_std_hu) == (3072.0, 500.0)
    for bad_set, bad_toml in (("qc.max_hu=lots", '[qc]\nmax_hu = "lots"\n'),
                              ("qc.max_hux=1", "[qc]\nmax_hux = 1\n"),
                              ("label.laa950_min_pct=true", "[label]\nlaa950_min_pct = true\n")):
        (tmp_path / "bad.toml").write_text(bad_toml)
        with pytest.raises(ConfigError) as from_file:
            load_job(tmp_path / "bad.toml")
        with pytest.raises(ConfigError) as from_set:
            load_job(None, [bad_set])
        # the same message, the source aside
        assert str(from_set.value).removeprefix("--set: ") == str(from_file.value).split(": ", 1)[1]
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_job(None, ["qc.max_hu"])


def test_changed_settings_refusal_names_each_key_old_and_new(tmp_path):
    old = load_job(None, ["qc.max_hu=3072"])
    _fake_run(tmp_path, hash_=old.config_hash)
    (tmp_path / "run.json").write_text(json.dumps({"config": old.to_dict()}))
    new = load_job(None, ["qc.max_std_hu=500", "label.mld_max_hu=-900"])
    with pytest.raises(ConfigMismatch) as exc:
        RunStore(tmp_path).check_config(new)
    msg = str(exc.value)
    assert "[qc].max_hu: 3072.0 -> 1600.0" in msg and "[qc].max_std_hu: 600.0 -> 500.0" in msg
    assert "[label].mld_max_hu: -850.0 -> -900.0" in msg and "config hash" not in msg
    RunStore(tmp_path).check_config(old)                                 # same settings: accepted
    (tmp_path / "run.json").write_text(json.dumps({"config": JobConfig().to_dict()}))   # not these rows'
    with pytest.raises(ConfigMismatch, match=f"config hash {old.config_hash}"):
        RunStore(tmp_path).check_config(new)


def test_end_of_run_lines_flag_kernels_fov_and_give_headlines_and_next_steps(tmp_path):
    rows = [{"scan_key": "A", "config_hash": "h", "status": "ok", "kernel": "B70f", "kernel_class": "very_sharp",
             "multi_kernel": True, "fov_truncated": False, "laa950_pct": 12.345, "hu_mean": -870.04, "label": 1},
            {"scan_key": "B", "config_hash": "h", "status": "ok", "kernel": "B30f", "kernel_class": "standard",
             "multi_kernel": False, "fov_truncated": True, "laa950_pct": 1.0, "hu_mean": -820.0, "label": 0},
            {"scan_key": "C", "config_hash": "h", "status": "excluded", "reason": "QC rule max_hu>1600: 3071",
             "qc_rule": "max_hu>1600", "qc_max_hu": 3071.0, "qc_std_hu": 300.0}]
    write_part("scans", rows, tmp_path, "p1")
    lines, warnings = end_of_run_lines(tmp_path)
    text = "\n".join(lines)
    assert "excluded by max_hu>1600: 1 of 3 scans, max HU 3071-3071; change with [qc].max_hu " \
           "(e.g. --set qc.max_hu=3072)" in text
    assert "sharp-kernel scans: 1 of 3" in text and "[harmonize] enabled = true" in text
    assert "multi-kernel studies: 1 of 3" in text and "FOV-truncated scans: 1 of 3" in text
    assert "A: ok, B70f (very_sharp), 12.35 %, -870.0 HU, emphysema" in text
    assert "B: ok, B30f (standard), 1.00 %, -820.0 HU, no emphysema" in text
    assert "C: excluded - QC rule max_hu>1600: 3071" in text
    assert lines[-1].startswith(f"next: emphy fit {tmp_path}") and f"emphy report {tmp_path}" in lines[-1]
    assert warnings == []
    harmonized = load_job(None, ["harmonize.enabled=true"])
    assert "sharp-kernel" not in "\n".join(end_of_run_lines(tmp_path, harmonized)[0])


def test_report_zones_in_anatomical_order():
    from emphy_dask.phenotypes.labelmaps import LOBES
    from emphy_dask.phenotypes.regions import REGIONS
    from emphy_dask.report.cohort import anatomical_order

    names = [*REGIONS, *LOBES]
    shuffled = list(np.random.default_rng(0).permutation(names))
    df = pd.DataFrame({"scan_key": ["b"] * len(names) + ["a"] * len(names), "region": shuffled + sorted(names)})
    ordered = anatomical_order(df)
    assert ordered["scan_key"].tolist() == ["a"] * len(names) + ["b"] * len(names)
    assert ordered["region"].tolist()[:len(names)] == names
    assert names[:6] == ["WholeLung", "RightLung", "LeftLung", "UpperThird", "MiddleThird", "LowerThird"]


@pytest.mark.parametrize("superior_up", [True, False])
def test_montage_titles_count_from_the_apex_like_the_curve(superior_up):
    from emphy_dask.phenotypes import laa_per_slice
    from emphy_dask.qc_images import _montage_levels

    labels = np.zeros((20, 8, 8), np.uint8)
    labels[4:15, 2:6, 2:6] = 1                   # lung on slices 4..14
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1 if superior_up else -1)
    axis, picks, from_apex = _montage_levels(labels, direction, n=5)
    curve = laa_per_slice(np.full(labels.shape, -900), labels, direction)
    lung = curve["n_lung_voxels"] > 0
    apex_rank = curve["rank_from_superior"][lung].min()
    rank_of = dict(zip(curve["slice_index"].tolist(), (curve["rank_from_superior"] - apex_rank).tolist()))
    assert axis == 0 and from_apex == [rank_of[k] for k in picks]
    assert from_apex[0] == 0 and from_apex[-1] == 10 and from_apex == sorted(from_apex)
