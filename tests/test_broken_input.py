"""Broken input, each with a reason a person understands.

Unit level (no Dask): what the io layer makes of each defect. Job level: one `emphy extract` over
the whole broken corpus (tests/broken_archive.py) and one over the clean cohort it derives from:
every case gets a status and a reason, the job exits 0, the good scans' rows are identical.
Cases already covered elsewhere are not repeated here: gap / duplicate / truncated slice /
JPEG 2000 on real data (test_io_read.py), non-CT / localizer / flat multi-patient folders
(test_io_index.py), text file as a mask (test_quantify.py).
"""
from __future__ import annotations

import gzip
import math
import os
import re
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, generate_uid

from emphy_dask.errors import ScanError
from emphy_dask.io import index_tree, read_dicom_series, read_header
from emphy_dask.io.dicom_read import MAX_VOXELS_ENV
from emphy_dask.tables import read_frame

from .broken_archive import (LIMIT_VOXELS, TILT_SHIFT_PX, linear_field, make_broken_archive, retag, truncate,
                             write_tilted_series)
from .dicom_factory import make_slice, write_series
from .jobutil import extract_cmd


def _ids():
    return dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())


# --- gantry tilt: resampled exactly, or refused with the angle -----------------------------------

@pytest.mark.parametrize("tilt_deg", [12.0, -20.0])
def test_tilted_gantry_is_resampled_onto_the_true_geometry(tmp_path, tilt_deg):
    """A linear HU field sampled on a sheared (tilted) grid. After resampling, each voxel holds the
    field's value at its own patient-space position up to a sub-pixel shift that is one constant
    per slice (slices move by whole pixels, values are never interpolated)."""
    n, rows, cols, px, step = 9, 20, 24, 0.8, 2.0
    files = write_tilted_series(tmp_path, linear_field, tilt_deg=tilt_deg, n=n, rows=rows, cols=cols,
                                spacing_mm=px, table_step_mm=step, center_xyz_mm=(5.0, -3.0, 40.0))
    vol = read_dicom_series(files[::-1])
    t = math.radians(tilt_deg)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(abs(tilt_deg), abs=0.01)
    # slices now stack along their normal, the in-plane spacing is kept, the matrix grows
    normal = np.array([0.0, -math.sin(t), math.cos(t)])
    np.testing.assert_allclose(np.asarray(vol.direction_xyz).reshape(3, 3)[:, 2], normal, atol=1e-6)
    assert vol.spacing_zyx_mm == pytest.approx((step * math.cos(t), px, px), abs=1e-6)
    drift_rows = (n - 1) * step * abs(math.sin(t)) / px
    assert vol.shape == (n, rows + round(drift_rows), cols)
    # every voxel's position from the volume's geometry -> the field there
    d = np.asarray(vol.direction_xyz).reshape(3, 3)
    k, i, j = np.indices(vol.shape)
    idx = np.stack([j.ravel() * px, i.ravel() * px, k.ravel() * vol.spacing_zyx_mm[0]])
    pts = np.asarray(vol.origin_xyz_mm) + (d @ idx).T
    err = (vol.hu.astype(float) - linear_field(pts).reshape(vol.shape))
    gradient_uv = np.array([2.0, -3.0 * math.cos(t) + 1.5 * math.sin(t)])       # HU/mm along row, column
    half_pixel = 0.5 * px * np.abs(gradient_uv).sum() + 1.0                      # + stored-value rounding
    for z in range(n):
        e = err[z][vol.fov_mask[z]]
        assert np.abs(e).max() <= half_pixel
        assert np.ptp(e) <= 2.0                       # one shift per slice: geometry otherwise exact
    # nothing lost or invented: each slice keeps all its pixels, the grown margins are padding
    assert (vol.fov_mask.sum(axis=(1, 2)) == rows * cols).all()
    assert (vol.hu[~vol.fov_mask] == -1024).all()


def test_tilt_beyond_a_gantry_or_irregular_drift_is_refused(tmp_path):
    files = write_tilted_series(tmp_path / "a", linear_field, tilt_deg=35.0, n=4, rows=8, cols=8, spacing_mm=1.0,
                                table_step_mm=2.0)
    with pytest.raises(ScanError, match=r"gantry tilt 35\.0 degrees .*exceeds 30 degrees"):
        read_dicom_series(files)
    files = write_series(tmp_path / "b", n=5)
    ipp = [float(v) for v in pydicom.dcmread(files[2]).ImagePositionPatient]
    retag(files[2], ImagePositionPatient=[ipp[0] + 1.5, ipp[1], ipp[2]])   # one slice shifted sideways
    with pytest.raises(ScanError, match=r"drift in-plane irregularly \(1\.\d\d mm off a straight line\)"):
        read_dicom_series(files)


# --- rescale, modality, DICOMDIR, truncation, empty folders ---------------------------------------

def test_missing_rescale_tags_hu_kept_raw_refused(tmp_path):
    ids = _ids()
    raw = np.full((8, 8), 40, np.int16)
    raw[2:6, 2:6] = -1000                                  # air: the stored values are HU
    hu_files = [make_slice(tmp_path / "hu" / f"{i}.dcm", z_mm=i, raw=raw, intercept=0.0, **ids) for i in range(3)]
    for f in hu_files:
        retag(f, RescaleIntercept=None, RescaleSlope=None)
    assert read_header(hu_files[0])["rescale_intercept"] is None
    vol = read_dicom_series(hu_files)
    assert (vol.hu == raw).all()
    raw_files = write_series(tmp_path / "raw", n=3)        # scanner values 1024.. (water), no air
    for f in raw_files:
        retag(f, RescaleIntercept=None)
    with pytest.raises(ScanError, match=r"no RescaleIntercept/RescaleSlope in s000\.dcm and 2 more files, and the "
                                        r"stored values \(1024 to 1044\) hold no air below -900 HU"):
        read_dicom_series(raw_files)


def test_missing_modality_ct_by_sop_class_other_objects_named(tmp_path):
    ct = write_series(tmp_path / "P1" / "ct", n=3)
    for f in ct:
        retag(f, Modality=None)
    assert index_tree(tmp_path)["P1"].picked.modality == "CT"
    mr = write_series(tmp_path / "P2" / "mr", n=2, modality="MR")
    for f in mr:
        retag(f, Modality=None)
    err = index_tree(tmp_path)["P2"]
    assert isinstance(err, ScanError) and "modalities missing" in str(err)


def test_dicomdir_is_not_an_image_and_a_header_cut_short_is_broken(tmp_path):
    from .broken_archive import _dicomdir

    files = write_series(tmp_path / "P1" / "st" / "se", n=3)
    _dicomdir(tmp_path / "P1", files[0])
    assert pydicom.dcmread(tmp_path / "P1" / "DICOMDIR").file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert read_header(tmp_path / "P1" / "DICOMDIR") is None
    assert index_tree(tmp_path)["P1"].picked.n_slices == 3
    # a copy cut before its SeriesInstanceUID must fail the scan, not drop out of the series
    truncate(files[0], 400)
    h = read_header(files[0])
    assert h["read_error"].startswith("truncated or incomplete DICOM header")
    err = index_tree(tmp_path)["P1"]
    assert isinstance(err, ScanError) and "unreadable DICOM file s000.dcm" in str(err)


def test_empty_folders_beside_scans_get_a_reason(tmp_path):
    write_series(tmp_path / "coll" / "P1" / "st" / "se", n=2)
    (tmp_path / "coll" / "P2" / "st" / "se").mkdir(parents=True)      # only empty folders inside
    (tmp_path / "coll" / "P1" / "st" / "empty-series").mkdir()        # inside a patient: not a scan
    res = index_tree(tmp_path)
    assert sorted(res) == ["coll/P1", "coll/P2"]
    assert isinstance(res["coll/P2"], ScanError) and str(res["coll/P2"]).endswith("P2: empty folder: no files at all")
    only_empty = tmp_path / "nothing"
    (only_empty / "A").mkdir(parents=True)
    assert list(index_tree(only_empty)) == ["A"]


# --- size limit, mixed spacing, JPEG-LS ----------------------------------------------------------

def test_too_many_voxels_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    files = write_series(tmp_path, n=10)
    for f in files:
        truncate(f, -20)                                   # decoding would fail with another reason
    with pytest.raises(ScanError, match=r"series too large, not decoded: 10 slices of 8x8 = 0\.0 M voxels.*"
                                        r"over the limit of 0\.0 M voxels"):
        read_dicom_series(files, max_voxels_limit=500)
    monkeypatch.setenv(MAX_VOXELS_ENV, "639")
    with pytest.raises(ScanError, match="series too large"):
        read_dicom_series(files)
    monkeypatch.setenv(MAX_VOXELS_ENV, "640")              # exactly at the limit: read (and fails on pixels)
    with pytest.raises(ScanError, match="truncated pixel data"):
        read_dicom_series(files)


def test_mixed_slice_spacing_named(tmp_path):
    ids = _ids()
    files = [make_slice(tmp_path / f"m{i}.dcm", z_mm=z, **ids) for i, z in enumerate((0, 1, 2, 3, 4, 6, 8))]
    with pytest.raises(ScanError, match=r"steps of 1\.000 mm \(4x\), 2\.000 mm \(2x\); the step changes from "
                                        r"1\.000 to 2\.000 mm between positions 4\.00 mm and 6\.00 mm "
                                        r"\(files m4\.dcm, m5\.dcm\)"):
        read_dicom_series(files)


def test_jpegls_decodes_with_the_runtime_dependencies(tmp_path):
    """JPEG-LS is written with the test-only encoder (pyjpegls) but must decode with pylibjpeg, a
    runtime dependency, so an install without the test extra reads such archives too."""
    plain = write_series(tmp_path / "plain", n=3)
    for f in plain:
        ds = pydicom.dcmread(f)
        ds.compress(JPEGLSLossless)
        ds.save_as(tmp_path / f"jls-{f.name}")
        back = pydicom.dcmread(tmp_path / f"jls-{f.name}")
        back.pixel_array_options(decoding_plugin="pylibjpeg")
        np.testing.assert_array_equal(back.pixel_array, pydicom.dcmread(f).pixel_array)
    vol = read_dicom_series(sorted(tmp_path.glob("jls-*.dcm")))
    assert vol.meta["transfer_syntax"] == JPEGLSLossless
    np.testing.assert_array_equal(vol.hu, read_dicom_series(plain).hu)


# --- emphy quantify: an unreadable mask -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated_gzip", "empty_file", "png_2d", "folder"])
def test_quantify_unreadable_mask_one_line_naming_it(tmp_path, capsys, kind):
    from PIL import Image

    from emphy_dask.quantify import run_quantify_cli

    from .test_quantify import phantom, write_case

    ct, mask = write_case(tmp_path, *phantom())
    bad = tmp_path / "bad-mask.nii.gz"
    if kind == "truncated_gzip":
        data = mask.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
        assert gzip.decompress(data)                        # the original is fine
    elif kind == "empty_file":
        bad.write_bytes(b"")
    elif kind == "png_2d":
        bad = tmp_path / "mask.png"
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(bad)
    else:
        bad = tmp_path / "mask-folder"
        bad.mkdir()
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(bad) in err
    expected = {"truncated_gzip": "cannot read", "empty_file": "cannot read", "png_2d": "3-D",
                "folder": "not a file"}[kind]
    assert expected in err, err


# --- the job over the whole corpus ----------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory):
    """(cases, corpus root, clean OUT, corpus OUT, CLI outputs): one `emphy extract` each."""
    from emphy_dask.synth import synth_cohort

    base = tmp_path_factory.mktemp("broken")
    synth_cohort(base / "clean", 2, seed=21, size="small")
    clean = base / "clean" / "dicom"
    cases = make_broken_archive(base / "corpus", clean)
    job = base / "job.toml"
    # the embedding stage reads no DICOM: off, so the corpus runs in seconds on 2 CPU cores
    job.write_text('name = "broken"\n[cluster]\nworkers = 2\nmemory_limit = "3GiB"\n'
                   'dashboard_address = "127.0.0.1:0"\n[embed]\nbackbone = "none"\n')
    env = {**os.environ, MAX_VOXELS_ENV: str(LIMIT_VOXELS)}
    procs = {}
    for name, src in (("clean", clean), ("corpus", base / "corpus")):
        procs[name] = subprocess.run(extract_cmd(src, base / f"out-{name}", "--job", str(job)), env=env,
                                     capture_output=True, text=True, timeout=900)
    return cases, base / "corpus", base / "out-clean", base / "out-corpus", procs


def test_every_broken_case_gets_a_status_and_a_reason_and_the_job_exits_0(corpus_runs):
    cases, root, _, out, procs = corpus_runs
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
    scans = read_frame(out, "scans").set_index("scan_key")
    assert sorted(scans.index) == sorted(c.key for c in cases)            # no case vanished, none invented
    errors = read_frame(out, "errors").set_index("scan_key")
    for c in cases:
        row = scans.loc[c.key]
        assert row["status"] == c.status, (c.key, row["reason"])
        if c.status == "ok":
            assert pd.isna(row["reason"]) and c.key not in errors.index
            continue
        reason = row["reason"]
        assert re.search(c.reason, reason), (c.key, reason)
        # one line, naming the file or folder at fault inside the corpus
        assert "\n" not in reason and reason.startswith(str(root / c.key)), (c.key, reason)
        assert errors.loc[c.key, "message"] == reason and errors.loc[c.key, "path"].startswith(str(root / c.key))
    n_failed = sum(c.status == "failed" for c in cases)
    assert f"ok {len(cases) - n_failed}, excluded 0, failed {n_failed}" in procs["corpus"].stdout


def test_good_scans_rows_identical_with_and_without_the_broken_ones(corpus_runs):
    cases, _, clean_out, out, _ = corpus_runs
    clean_keys = [c.key for c in cases if c.same_as == c.key]
    assert len(clean_keys) == 2
    for table in ("scans", "phenotypes", "slices"):
        clean = read_frame(clean_out, table, stable=True)
        mixed = read_frame(out, table, stable=True)
        mixed = mixed[mixed["scan_key"].isin(clean_keys)].reset_index(drop=True)
        assert len(clean) > 0
        # dtypes aside: failed rows' nulls turn the mixed run's int columns into floats
        pd.testing.assert_frame_equal(mixed, clean, obj=table, check_dtype=False)


def test_decoded_retagged_and_tilted_variants_give_their_source_numbers(corpus_runs):
    """JPEG 2000, JPEG-LS, several series in one folder, no Modality, HU without rescale tags, a
    file copied twice: the same voxels, so exactly the same phenotype and slice rows. A gantry-tilted
    acquisition whose unsheared voxels are the source's: the same rows (voxel volume to rounding)."""
    cases, _, clean_out, out, _ = corpus_runs
    variants = [c for c in cases if c.same_as and c.same_as != c.key]
    assert len(variants) == 7
    for table in ("phenotypes", "slices"):
        clean = read_frame(clean_out, table, stable=True)
        mixed = read_frame(out, table, stable=True)
        for c in variants:
            got = mixed[mixed["scan_key"] == c.key].drop(columns="scan_key").reset_index(drop=True)
            want = clean[clean["scan_key"] == c.same_as].drop(columns="scan_key").reset_index(drop=True)
            assert len(want) > 0
            pd.testing.assert_frame_equal(got, want, obj=f"{table} {c.key}", check_exact=c.rtol == 0,
                                          rtol=c.rtol or 1e-5)
    scans = read_frame(out, "scans").set_index("scan_key")
    assert scans.loc["OK-JPEG2000", "transfer_syntax"] == pydicom.uid.JPEG2000Lossless
    assert scans.loc["OK-JPEGLS", "transfer_syntax"] == pydicom.uid.JPEGLSLossless
    # the tilted scan: slices now stack along their normal at the source's step; padding rows added
    (tc,) = [c for c in variants if c.key == "OK-TILTED-GANTRY"]
    source = read_frame(clean_out, "scans").set_index("scan_key").loc[tc.same_as]
    tilted = scans.loc[tc.key]
    assert tilted["spacing_z_mm"] == pytest.approx(source["spacing_z_mm"], abs=1e-4)
    assert tilted["n_slices"] == source["n_slices"]
    assert tilted["rows"] == source["rows"] + 2 * round(TILT_SHIFT_PX * (source["n_slices"] - 1))
