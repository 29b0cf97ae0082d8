"""Label images are not CT; lungs cut by the field of view are flagged; exclusions are told plainly."""
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from emphy_dask import tables
from emphy_dask.io.image_io import label_image_reason
from emphy_dask.job.summary import exclusion_lines, exclusion_report
from emphy_dask.phenotypes import fov_columns, lung_border_at_fov_edge_pct

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_label_image_reason_tells_masks_from_ct(tmp_path):
    rng = np.random.default_rng(0)
    ct = np.clip(rng.normal(-300, 500, (6, 20, 20)), -1024, 2000).astype(np.int16)
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[:, 4:10, 4:16] = 1
    mask[:, 12:18, 4:16] = 2
    cip = (mask.astype(np.uint16) + 11) * (mask > 0) + (2 << 8) * (mask == 0)
    for name, arr in (("ct.nii.gz", ct), ("mask.nii.gz", mask), ("lm.nrrd", cip.astype(np.uint16)),
                      ("float.nii.gz", mask.astype(np.float32))):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    assert label_image_reason(tmp_path / "ct.nii.gz") is None
    why = label_image_reason(tmp_path / "mask.nii.gz")
    assert why.startswith("a label map, not a CT") and "3 distinct value(s) (0, 1, 2)" in why
    assert "label map" in label_image_reason(tmp_path / "lm.nrrd")
    assert label_image_reason(tmp_path / "float.nii.gz") is None      # not integer data: may be a CT
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    assert label_image_reason(tmp_path / "broken.nii.gz") is None     # the scan fails later with the reason


def test_fov_edge_fraction_image_edge_and_scan_circle():
    lung = np.zeros((5, 40, 40), bool)
    lung[:, 10:20, 8:18] = True
    assert lung_border_at_fov_edge_pct(lung, None, EYE) == 0.0
    edge = lung.copy()
    edge[:, 10:20, 0:8] = True                         # runs into the image edge at x = 0
    # in-plane border of a 10 x 18 rectangle: 2*10 + 2*18 - 4 = 52 voxels per slice, 10 on the edge
    assert lung_border_at_fov_edge_pct(edge, None, EYE) == pytest.approx(100 * 10 / 52)
    y, x = np.indices((40, 40))
    fov = np.broadcast_to((y - 20) ** 2 + (x - 20) ** 2 <= 15 ** 2, lung.shape)
    inside = np.zeros_like(lung)
    inside[:, 12:28, 12:28] = True
    assert fov_columns(inside, fov, EYE) == {"fov_truncated": False, "lung_border_at_fov_edge_pct": 0.0}
    cut = fov & (x > 14)                               # the lung fills the scan circle on one side
    cols = fov_columns(cut, fov, EYE)
    assert cols["fov_truncated"] is True and cols["lung_border_at_fov_edge_pct"] > 50
    # head-feet along array axis 1: the "in-plane" axes are then 0 and 2
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
    col = np.zeros((40, 5, 40), bool)
    col[10:20, :, 0:18] = True                         # touches x = 0 in every axial plane (z, x)
    assert lung_border_at_fov_edge_pct(col, None, coronal) == pytest.approx(100 * 10 / 52)
    assert fov_columns(np.zeros_like(lung), None, EYE) == {"fov_truncated": None, "lung_border_at_fov_edge_pct": None}


def _scans(out, rows):
    base = {"config_hash": "h", "status": "ok", "qc_rule": None, "qc_max_hu": 900.0, "qc_std_hu": 300.0}
    tables.write_part("scans", [{**base, **r} for r in rows], out, "p1")


def test_exclusion_report_per_rule_with_range_job_key_and_warning(tmp_path):
    _scans(tmp_path, [
        {"scan_key": "a", "status": "excluded", "qc_rule": "max_hu>1600", "qc_max_hu": 3071.0},
        {"scan_key": "b", "status": "excluded", "qc_rule": "max_hu>1600", "qc_max_hu": 2400.0},
        {"scan_key": "c", "status": "excluded", "qc_rule": "max_hu>1600", "qc_max_hu": 1999.0},
        {"scan_key": "d", "status": "excluded", "qc_rule": "std_hu>600", "qc_std_hu": 640.5},
        {"scan_key": "e"},
    ])
    rep = exclusion_report(tmp_path)
    assert rep["n_scans"] == 5 and rep["n_excluded"] == 4
    first, second = rep["rules"]
    assert first == {"rule": "max_hu>1600", "n_excluded": 3, "fraction": 0.6, "value_column": "qc_max_hu",
                     "value_min": 1999.0, "value_max": 3071.0, "job_key": "[qc].max_hu"}
    assert second["rule"] == "std_hu>600" and second["job_key"] == "[qc].max_std_hu"
    assert second["value_min"] == second["value_max"] == 640.5
    assert len(rep["warnings"]) == 1 and "3 of 5 scans" in rep["warnings"][0] and "[qc].max_hu" in rep["warnings"][0]
    lines, warnings = exclusion_lines(rep)
    assert lines[0] == ("  excluded by max_hu>1600: 3 of 5 scans, max HU 1999-3071; change with [qc].max_hu "
                        "(e.g. --set qc.max_hu=3072)")
    assert lines[1] == "  excluded by std_hu>600: 1 of 5 scans, HU std 640-640; change with [qc].max_std_hu"
    assert warnings[0].startswith("warning: QC rule max_hu>1600 excluded 3 of 5 scans (60 %)")
    assert "rerun with --set qc.max_hu=3072 --overwrite" in warnings[0]         # the exact override
    json.dumps(rep)                                    # goes into run.json as is


def test_no_exclusions_no_lines(tmp_path):
    _scans(tmp_path, [{"scan_key": "a"}, {"scan_key": "b", "status": "failed"}])
    rep = exclusion_report(tmp_path)
    assert rep["rules"] == [] and rep["warnings"] == [] and exclusion_lines(rep) == ([], [])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("synth")
    truth = synth_cohort(root, 2, seed=5, size="small")
    job = root.parent / "job.toml"
    job.write_text('[cluster]\nworkers = 1\nmemory_limit = "3GiB"\ndashboard_address = "127.0.0.1:0"\n'
                   '[embed]\nbackbone = "none"\n')                # these tests are about what is a scan
    return root, truth, job


def test_extract_on_the_folder_synth_wrote_gives_the_patients(synth_root, tmp_path, capsys):
    from emphy_dask.cli import main

    root, truth, job = synth_root
    out = tmp_path / "out"
    assert main(["extract", str(root), "-o", str(out), "--job", str(job), "--no-progress"]) == 0
    scans = tables.read_frame(out, "scans")
    assert scans["scan_key"].tolist() == [f"dicom/{k}" for k in sorted(truth["scan_key"])]
    assert (scans["status"] == "ok").all() and (~scans["fov_truncated"]).all()
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("scan_key")
    skipped = manifest[manifest["kind"] == "skipped"]
    assert sorted(skipped.index) == [f"masks/{k}" for k in sorted(truth["scan_key"])]
    assert skipped["error"].str.startswith("a label map, not a CT").all()
    assert skipped["error_path"].str.endswith(".nii.gz").all()
    assert tables.read_frame(out, "errors").empty
    printed = capsys.readouterr().out
    assert "2 scans" in printed and "not scans, skipped: 2 file(s)" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["exclusions"]["skipped_files"]["n"] == 2 and run["exclusions"]["rules"] == []


def test_extract_says_which_rule_excluded_what(synth_root, tmp_path, capsys):
    from emphy_dask.cli import main

    root, truth, job = synth_root
    strict = tmp_path / "strict.toml"
    strict.write_text(job.read_text() + "[qc]\nmax_hu = 100.0\n")
    out = tmp_path / "out"
    assert main(["extract", str(root / "dicom"), "-o", str(out), "--job", str(strict), "--no-progress"]) == 0
    scans = tables.read_frame(out, "scans")
    assert (scans["status"] == "excluded").all()
    captured = capsys.readouterr()
    lo, hi = scans["qc_max_hu"].min(), scans["qc_max_hu"].max()
    assert f"excluded by max_hu>100: 2 of 2 scans, max HU {lo:.0f}-{hi:.0f}; change with [qc].max_hu" in captured.out
    assert "warning: QC rule max_hu>100 excluded 2 of 2 scans (100 %)" in captured.err
    run = json.loads((out / "run.json").read_text())
    assert run["exclusions"]["rules"][0]["n_excluded"] == 2 and run["exclusions"]["warnings"]
