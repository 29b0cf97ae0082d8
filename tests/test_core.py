"""The single-scan core end to end: DICOM on disk -> series pick -> HU -> lungs -> phenotypes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from emphy_dask.phenotypes.regions import REGIONS
from emphy_dask.cli import main
from emphy_dask.io import load_ct, read_label_image
from emphy_dask.quantify import quantify_path
from emphy_dask.synth import synth_patient

from .conftest import DX, DX_SHARP, DX_SOFT
from .dicom_factory import write_series


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("index, pattern, severity", [(1, "none", 0.0), (2, "centrilobular", 9.0),
                                                      (3, "panlobular", 20.0), (4, "centrilobular", 4.0)])
def test_phantom_through_dicom_recovers_truth(tmp_path, index, pattern, severity):
    truth = synth_patient(tmp_path, index, pattern, severity, seed=5, size="small")
    patient = tmp_path / "dicom" / truth["scan_key"]
    df, extras = quantify_path(patient, save_mask_path=tmp_path / "mask.nii.gz")
    whole = df.set_index("region").loc["WholeLung"]
    assert abs(whole["laa950_pct"] - truth["laa950_pct"]) < 0.5
    assert extras["label"] == truth["label"]
    ct = load_ct(patient)
    assert ct.meta["series_uid"] == truth["thin_series_uid"]            # most slices: the thin series
    ours = read_label_image(tmp_path / "mask.nii.gz", ct)
    ref = read_label_image(tmp_path / "masks" / f"{truth['scan_key']}.nii.gz", ct)
    assert dice(ours > 0, ref > 0) >= 0.97
    for side in (1, 2):
        assert dice(ours == side, ref == side) >= 0.97


def test_two_kernel_reconstructions_are_reported_with_different_laa():
    sharp, sharp_x = quantify_path(DX_SHARP)
    soft, soft_x = quantify_path(DX_SOFT)
    laa_sharp = sharp.set_index("region").loc["WholeLung", "laa950_pct"]
    laa_soft = soft.set_index("region").loc["WholeLung", "laa950_pct"]
    assert laa_sharp - laa_soft > 5.0                    # measured 13.2 vs 0.1
    assert sharp_x["kernel_class"] == "sharp" and any("sharp" in w for w in sharp_x["warnings"])
    assert soft_x["kernel_class"] == "standard"
    vol_sharp = sharp.set_index("region").loc["WholeLung", "volume_l"]
    vol_soft = soft.set_index("region").loc["WholeLung", "volume_l"]
    assert abs(vol_sharp - vol_soft) / vol_soft < 0.02   # same lungs, same mask size
    whole, extras = quantify_path(DX)                    # the study folder: both series, B picked
    assert extras["kernel"] == "B" and any("2 kernels" in w for w in extras["warnings"])


def test_cli_quantify_json_on_real_patient(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["quantify", "--ct", str(DX_SOFT), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    regions = {r["region"]: r for r in doc["regions"]}
    assert set(regions) == set(REGIONS)          # no lobes in a right/left mask
    thirds = sum(regions[k]["n_voxels"] for k in ("UpperThird", "MiddleThird", "LowerThird"))
    assert thirds == regions["WholeLung"]["n_voxels"]
    assert 4.0 < regions["WholeLung"]["volume_l"] < 7.5 and doc["kernel"] == "B"


@pytest.mark.parametrize("case", ["truncated", "non-ct", "empty"])
def test_cli_bad_input_one_line_reason(tmp_path, capsys, case):
    folder = tmp_path / case
    folder.mkdir()
    if case == "truncated":
        files = write_series(folder, n=5)
        files[2].write_bytes(files[2].read_bytes()[:-30])
        expect = files[2].name
    elif case == "non-ct":
        write_series(folder, n=3, modality="MR")
        expect = "no CT series"
    else:
        expect = "no DICOM"
    assert main(["quantify", "--ct", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err
