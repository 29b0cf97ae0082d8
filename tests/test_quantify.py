"""`emphy quantify`: files in, phenotype table / CSV / JSON out, clean failures."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from emphy_dask.phenotypes import PHENOTYPE_COLUMNS, REGIONS
from emphy_dask.quantify import quantify_path, quantify_volume, run_quantify_cli, scan_notes
from emphy_dask.volume import CTVolume

SPACING = (2.0, 0.8, 0.75)
# LPS with z pointing to the feet: exercises the direction handling end to end
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def phantom(seed=0, shape=(40, 64, 72), spacing=SPACING):
    """Chest-like CT: air outside, soft-tissue body, two lungs of noisy -860 HU with
    emphysematous (-980 HU) blobs in the upper lungs. Labels: 1 right (image left), 2 left.
    Ellipses scale with ``shape``."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000, np.int16)
    body = ((y - ny / 2) / (0.44 * ny)) ** 2 + ((x - nx / 2) / (0.46 * nx)) ** 2 < 1
    hu[body] = 40
    lab = np.zeros(shape, np.uint8)
    for side, cx in ((1, 0.29 * nx), (2, 0.71 * nx)):
        lung = (((y - ny / 2) / (0.31 * ny)) ** 2 + ((x - cx) / (0.17 * nx)) ** 2
                + ((z - nz / 2) / (0.42 * nz)) ** 2) < 1
        lab[lung] = side
    lung = lab > 0
    hu[lung] = np.clip(rng.normal(-860, 40, lung.sum()), -1024, 0).round()
    # z index grows towards the feet (DIRECTION), so small z = superior = upper lung
    holes = lung & (rng.random(shape) < 0.25) & (z < 0.35 * nz)
    hu[holes] = -980
    vol = CTVolume(hu=hu, spacing_zyx_mm=spacing, origin_xyz_mm=(-27.0, -25.6, 40.0),
                   direction_xyz=DIRECTION, meta={"kernel": "B30f", "kernel_class": "standard"})
    return vol, lab


def write_case(tmp_path, vol, lab):
    ct = tmp_path / "ct.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(vol.to_sitk(), str(ct))
    sitk.WriteImage(vol.to_sitk(lab), str(mask))
    return ct, mask


def test_quantify_volume_table():
    vol, lab = phantom()
    df = quantify_volume(vol, lab)
    assert list(df.columns) == ["region", "hu_source", *PHENOTYPE_COLUMNS] and set(df["hu_source"]) == {"raw"}
    assert list(df["region"]) == list(REGIONS)
    rows = df.set_index("region")
    assert rows.loc["WholeLung", "n_voxels"] == np.count_nonzero(lab)
    assert rows.loc["RightLung", "n_voxels"] == np.count_nonzero(lab == 1)
    vals = vol.hu[lab > 0]
    assert rows.loc["WholeLung", "laa950_pct"] == pytest.approx(100 * np.mean(vals < -950))
    assert rows.loc["WholeLung", "volume_l"] == pytest.approx(lab.astype(bool).sum() * 1.2 / 1e6)
    # holes were put in the superior slices: the upper third must be the emphysematous one
    assert rows.loc["UpperThird", "laa950_pct"] > 10 * max(rows.loc["LowerThird", "laa950_pct"], 0.1)


def test_quantify_volume_rejects_other_grid():
    vol, lab = phantom()
    with pytest.raises(ValueError):
        quantify_volume(vol, lab[:-1])


def test_quantify_path_with_mask_matches_volume(tmp_path):
    vol, lab = phantom()
    ct, mask = write_case(tmp_path, vol, lab)
    table, extras = quantify_path(ct, mask_path=mask, save_mask_path=tmp_path / "out" / "saved.nii.gz")
    pd.testing.assert_frame_equal(table, quantify_volume(vol, lab))
    assert extras["mask_source"] == "file"
    whole = table.iloc[0]
    want = int(whole["laa950_pct"] >= 6 and whole["hu_mean"] < -850)
    assert extras["label"] == want
    assert isinstance(extras["cluster_d"], float)
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "saved.nii.gz")))
    np.testing.assert_array_equal(saved, lab)


def test_quantify_path_binary_mask_is_split_into_sides(tmp_path, capsys):
    vol, lab = phantom()
    ct, mask = write_case(tmp_path, vol, np.where(lab > 0, 7, 0).astype(np.uint8))
    table, extras = quantify_path(ct, mask_path=mask, save_mask_path=tmp_path / "used.nii.gz")
    pd.testing.assert_frame_equal(table, quantify_volume(vol, lab))     # the same lungs, right and left
    assert extras["mask_encoding"] == "binary" and any("split" in n for n in extras["mask_notes"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "used.nii.gz"))), lab)
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask)]) == 0
    captured = capsys.readouterr()
    assert "note: mask read as binary lung mask" in captured.err and "(binary)" in captured.out


def test_quantify_path_cip_label_map_nrrd(tmp_path, capsys):
    """A CIP label map (uint16 NRRD: region | type << 8) with airway voxels outside the lung regions."""
    vol, lab = phantom()
    cip = np.zeros(lab.shape, np.uint16)
    cip[lab == 1] = 2                                  # RIGHTLUNG
    cip[lab == 2] = 3 | (3 << 8)                       # LEFTLUNG, type VESSEL: still lung
    z, y, x = np.indices(lab.shape)
    trachea = (lab == 0) & (abs(x - lab.shape[2] / 2) < 3) & (abs(y - lab.shape[1] / 2) < 3)
    cip[trachea] = 2 << 8                              # AIRWAY in no lung region: not lung
    ct = tmp_path / "ct.nrrd"
    mask = tmp_path / "lm.nrrd"
    sitk.WriteImage(vol.to_sitk(), str(ct))
    sitk.WriteImage(vol.to_sitk(cip), str(mask))
    table, extras = quantify_path(ct, mask_path=mask)
    pd.testing.assert_frame_equal(table, quantify_volume(vol, lab))
    assert extras["mask_encoding"] == "cip"
    assert any(f"{np.count_nonzero(trachea)} labelled voxels in no lung region" in n for n in extras["mask_notes"])
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask), "-o", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["mask_encoding"] == "cip" and doc["regions"][1]["region"] == "RightLung"
    assert doc["regions"][1]["n_voxels"] == np.count_nonzero(lab == 1)
    assert "CIP label map" in capsys.readouterr().err


def test_quantify_warns_when_the_lung_is_cut_by_the_field_of_view(tmp_path, capsys):
    vol, lab = phantom()
    cut = lab.copy()
    cut[:, :, :4] = 0
    cut[:, 10:50, :4] = 1                              # the right lung runs into the image edge
    ct, mask = write_case(tmp_path, vol, cut)
    _, extras = quantify_path(ct, mask_path=mask)
    assert extras["fov_truncated"] is True and extras["lung_border_at_fov_edge_pct"] > 1
    assert any("field of view" in w for w in extras["warnings"])
    _, ok = quantify_path(*write_case(tmp_path, vol, lab))
    assert ok["fov_truncated"] is False and ok["lung_border_at_fov_edge_pct"] == 0


def test_cli_csv_and_json(tmp_path, capsys):
    vol, lab = phantom()
    ct, mask = write_case(tmp_path, vol, lab)
    ref = quantify_volume(vol, lab)

    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask), "-o", str(tmp_path / "r.csv")]) == 0
    csv = pd.read_csv(tmp_path / "r.csv")
    assert list(csv["region"]) == list(REGIONS)
    np.testing.assert_allclose(csv["laa950_pct"], ref["laa950_pct"], equal_nan=True)

    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask), "-o", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["region"] for r in doc["regions"]] == list(REGIONS)
    assert doc["regions"][0]["hu_mean"] == pytest.approx(ref["hu_mean"][0])
    assert doc["label"] in (0, 1) and "kernel" in doc and isinstance(doc["warnings"], list)

    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask)]) == 0
    out = capsys.readouterr().out
    assert "WholeLung" in out and "LowerThird" in out and "laa950_pct" in out


def test_cli_output_rows_name_their_scan_and_a_summary_line_is_printed(tmp_path, capsys):
    """Scripted use: each CSV row carries the scan-level columns (so many scans' CSVs concatenate),
    and -o still prints one line with the headline values."""
    vol, lab = phantom()
    ct, mask = write_case(tmp_path, vol, lab)
    ref = quantify_volume(vol, lab)
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask), "-o", str(tmp_path / "r.csv")]) == 0
    csv = pd.read_csv(tmp_path / "r.csv")
    assert list(csv.columns[:8]) == ["scan_key", "input", "series_uid", "label", "kernel", "kernel_class",
                                     "warnings", "region"]
    assert (csv["scan_key"] == "ct").all() and (csv["input"] == str(ct)).all() and csv["series_uid"].isna().all()
    whole = ref[ref["region"] == "WholeLung"].iloc[0]
    label = int(whole["laa950_pct"] >= 6.0 and whole["hu_mean"] < -850.0)
    assert (csv["label"] == label).all() and csv["kernel"].isna().all()       # a NIfTI names no kernel
    assert (csv["kernel_class"] == "unknown").all()
    line = capsys.readouterr().out.strip()
    assert line == (f"{tmp_path / 'r.csv'}: 12 rows; WholeLung LAA%-950 {whole['laa950_pct']:.2f} %, "
                    f"MLD {whole['hu_mean']:.1f} HU, label {label} (raw HU), kernel ? [unknown]")
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(mask), "-o", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["scan_key"] == "ct" and doc["input"] == str(ct) and doc["label"] == label
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'r.json'}: 12 rows; WholeLung LAA%-950 ")


@pytest.mark.parametrize("make", ["missing", "text", "bad_mask"])
def test_cli_unreadable_input_exit_2(tmp_path, capsys, make):
    vol, lab = phantom()
    ct, mask = write_case(tmp_path, vol, lab)
    bad = tmp_path / "not_an_image.nii.gz"
    if make == "missing":
        argv, culprit = ["--ct", str(tmp_path / "nope.nii.gz")], tmp_path / "nope.nii.gz"
    elif make == "text":
        bad.write_text("this is not a CT\n")
        argv, culprit = ["--ct", str(bad)], bad
    else:
        bad.write_text("this is not a mask\n")
        argv, culprit = ["--ct", str(ct), "--mask", str(bad)], bad
    assert run_quantify_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(culprit) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_mask_on_other_grid_exit_2(tmp_path, capsys):
    vol, lab = phantom()
    ct, _ = write_case(tmp_path, vol, lab)
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(lab[:-2]), str(small))
    assert run_quantify_cli(["--ct", str(ct), "--mask", str(small)]) == 2
    assert str(small) in capsys.readouterr().err


def test_cli_bad_output_suffix(tmp_path, capsys):
    assert run_quantify_cli(["--ct", "x.nii.gz", "-o", str(tmp_path / "r.txt")]) == 2
    assert "r.txt" in capsys.readouterr().err


def test_scan_notes_sharp_and_multi_kernel():
    kernel, warnings = scan_notes({"kernel": "B70f", "kernel_class": "very_sharp",
                                   "multi_kernel_kernels": ("B70f", "B30f")})
    assert kernel == "B70f"
    assert any("sharp" in w for w in warnings)
    assert any("2 kernels" in w and "B30f" in w for w in warnings)
    assert scan_notes({"kernel": "B30f", "kernel_class": "standard", "multi_kernel_kernels": ()}) == ("B30f", [])


def test_quantify_path_segments_without_mask(tmp_path):
    """Needs emphy_dask.segment (threshold segmenter) to find both phantom lungs."""
    vol, lab = phantom(shape=(48, 96, 112), spacing=(4.0, 2.5, 2.5))   # ~0.5 L lungs
    ct, _ = write_case(tmp_path, vol, lab)
    table, extras = quantify_path(ct, save_mask_path=tmp_path / "seg.nii.gz")
    assert extras["mask_source"] == "segment:threshold"
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    rows = table.set_index("region")
    assert rows.loc["WholeLung", "n_voxels"] == np.count_nonzero(seg)
    # a reasonable segmenter recovers most of the known lungs
    overlap = np.count_nonzero((seg > 0) & (lab > 0)) / np.count_nonzero(lab)
    assert overlap > 0.8


def test_unknown_segmenter_exit_2(tmp_path, capsys):
    vol, lab = phantom()
    ct, _ = write_case(tmp_path, vol, lab)
    assert run_quantify_cli(["--ct", str(ct), "--segmenter", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def odd_dicom_series(folder, vol):
    """``vol`` as a DICOM series whose SeriesNumber is "1.5" (not a valid IS): pydicom warns on every file."""
    from emphy_dask.synth.dicom_write import write_dicom_series

    from .dicom_factory import invalidate_series_number

    invalidate_series_number(write_dicom_series(vol.hu, vol.spacing_zyx_mm, folder, seed=1, patient_id="P1"))


def test_cli_keeps_pydicom_warnings_off_the_terminal_and_records_them(tmp_path, capfd, monkeypatch):
    """pydicom's warnings on an odd header go into the output (each once) and OUT.log, never to
    the terminal; the phenotypes are those of the same CT read as NIfTI."""
    vol, _ = phantom(shape=(48, 96, 112), spacing=(4.0, 2.5, 2.5))
    folder = tmp_path / "P1"
    odd_dicom_series(folder, vol)
    out = tmp_path / "r.json"
    assert run_quantify_cli(["--ct", str(folder), "-o", str(out)]) == 0
    captured = capfd.readouterr()
    assert "VR IS" not in captured.out + captured.err and "Warning" not in captured.err
    assert captured.out.startswith(f"{out}: ") and "2 warning(s)" in captured.out
    doc = json.loads(out.read_text())
    assert doc["library_warnings"] == [
        "ingest: Invalid value for VR IS: '1.5'. Please see "
        "<https://dicom.nema.org/medical/dicom/current/output/html/part05.html#table_6.2-1> for allowed "
        "values for each VR.", 'ingest: Value "1.5" is not valid for elements with a VR of IS']
    log = (tmp_path / "r.log").read_text()
    assert log.count("scan P1: ingest: Invalid value for VR IS: '1.5'") == 1     # + pydicom's own records
    # the same voxels read from NIfTI, without the odd header: the same numbers
    from emphy_dask.io import load_ct

    ct = tmp_path / "ct.nii.gz"
    import warnings

    with warnings.catch_warnings(record=True) as caught:    # the library itself, outside the CLI, warns
        warnings.simplefilter("always")
        sitk.WriteImage(load_ct(folder).to_sitk(), str(ct))
    assert any("VR IS" in str(w.message) for w in caught)
    table, extras = quantify_path(ct)
    whole = table.set_index("region").loc["WholeLung"]
    got = next(r for r in doc["regions"] if r["region"] == "WholeLung")
    assert extras["library_warnings"] == [] and got["n_voxels"] == whole["n_voxels"] > 10_000
    assert got["laa950_pct"] == pytest.approx(whole["laa950_pct"], abs=1e-9)
    # without -o: the table on stdout, one note on stderr naming the log file (in the temporary folder)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert run_quantify_cli(["--ct", str(folder)]) == 0
    captured = capfd.readouterr()
    assert "WholeLung" in captured.out and "VR IS" not in captured.out + captured.err
    note = [line for line in captured.err.splitlines() if line]
    log = tmp_path / "tmp" / "emphy-logs" / "quantify-P1.log"
    assert note == [f"note: 2 warning(s) from reading the input, in {log}"]
    assert "scan P1: ingest: Invalid value for VR IS" in log.read_text()
