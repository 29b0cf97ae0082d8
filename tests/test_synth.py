"""Synthetic cohort: phantom anatomy, emphysema control, DICOM fidelity, determinism."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from emphy_dask.synth import (PADDING_HU_SYNTH, TRUTH_COLUMNS, make_phantom, synth_cohort, truth_from,
                              write_dicom_series, write_localizer)

SMALL = ((54, 96, 96), (5.0, 3.6, 3.6))


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for pattern, sev, seed in [("none", 0.0, 11), ("centrilobular", 10.0, 12), ("panlobular", 10.0, 13)]:
        out[pattern] = make_phantom(*SMALL, sev, pattern, np.random.default_rng(seed))
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    truth = synth_cohort(root, 6, seed=0, size="small")
    return root, truth


def _tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_series(folder: Path):
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss


# ---------------------------------------------------------------- phantom
def test_phantom_types_and_truth_recomputed(phantoms):
    for pattern, ph in phantoms.items():
        assert ph.hu.dtype == np.int16 and ph.hu.shape == SMALL[0]
        assert ph.lung_labels.dtype == np.uint8 and set(np.unique(ph.lung_labels)) == {0, 1, 2}
        lung = ph.lung_labels > 0
        laa = 100.0 * np.mean(ph.hu[lung] < -950)
        assert ph.truth["laa950_pct"] == pytest.approx(laa, abs=1e-9)
        assert ph.truth["hu_mean"] == pytest.approx(ph.hu[lung].mean(), abs=1e-6)
        assert ph.truth["lung_volume_l"] == pytest.approx(lung.sum() * np.prod(SMALL[1]) / 1e6)
        want = int(ph.truth["laa950_pct"] >= 6 and ph.truth["hu_mean"] < -850)
        assert ph.truth["label"] == want
        assert ph.truth["pattern"] == pattern
        assert truth_from(ph.hu, ph.lung_labels, SMALL[1], ph.truth["severity_pct"], pattern) == ph.truth


def test_phantom_anatomy(phantoms):
    ph = phantoms["none"]
    hu, lab = ph.hu, ph.lung_labels
    fov = ph.fov_mask_yx
    assert 1000 < hu.max() <= 1600
    assert np.count_nonzero(hu > 1000) > 500                      # ribs + spine
    assert np.count_nonzero((hu >= 1200) & (hu <= 1500)) > 100    # dense cortical bone
    assert np.all(hu[:, ~fov] == PADDING_HU_SYNTH) and fov.mean() > 0.7
    assert hu[:, fov].min() >= -1024
    # LPS: right lung at low x (patient right = -x), larger than the left
    xs = np.arange(hu.shape[2])
    cx_right = (lab == 1).sum(axis=(0, 1)) @ xs / (lab == 1).sum()
    cx_left = (lab == 2).sum(axis=(0, 1)) @ xs / (lab == 2).sum()
    assert cx_right < hu.shape[2] / 2 < cx_left
    assert ph.truth["lung_volume_right_l"] > ph.truth["lung_volume_left_l"] > 1.0
    # apex tapered: the top lung slice is much smaller than the widest one
    per_z = (lab > 0).sum(axis=(1, 2))
    zs = np.nonzero(per_z)[0]
    assert per_z[zs[-1]] < 0.25 * per_z.max()
    # healthy parenchyma: mean ~ -860 HU, noisy but not wild; heart / mediastinum soft tissue
    par = hu[(lab > 0) & (hu < -700)]
    assert -900 < ph.truth["hu_mean"] < -830 and 20 < par.std() < 45
    mid = hu[hu.shape[0] // 3, hu.shape[1] // 2 - 12: hu.shape[1] // 2, hu.shape[2] // 2: hu.shape[2] // 2 + 6]
    assert 0 < np.median(mid) < 80
    # trachea: air lumen reaching the top slice, outside the lung mask, 2+ voxels wide
    top_air = (hu[-1] < -900) & fov
    lab2d, n = ndi.label(top_air)
    central = lab2d[hu.shape[1] // 2 - 10: hu.shape[1] // 2 + 10, hu.shape[2] // 2 - 5: hu.shape[2] // 2 + 5]
    ids = np.unique(central[central > 0])
    assert len(ids) >= 1 and 4 <= max((lab2d == i).sum() for i in ids) < 60
    assert not (ph.airway_mask & (lab > 0)).any()
    # vessels inside the lung mask (soft tissue voxels labelled lung)
    assert np.count_nonzero((lab > 0) & (hu > -300)) > 30


def test_airways_do_not_leak_into_lungs(phantoms):
    for ph in phantoms.values():
        air = (ph.hu < -320) & ph.fov_mask_yx[None]
        comp, _ = ndi.label(air, np.ones((3, 3, 3), bool))
        trachea = np.unique(comp[-1][ph.airway_mask[-1] & air[-1]])
        trachea = trachea[trachea > 0]
        assert trachea.size and not np.isin(comp[ph.lung_labels > 0], trachea).any()


def _reference_segmenter(hu, fov):
    """Minimal classical segmenter: air threshold, drop outside air and the trachea
    (components touching the slice border / the top slice), keep two largest, fill holes."""
    air = (hu < -500) & fov[None]
    comp, n = ndi.label(air)
    sizes = ndi.sum_labels(np.ones_like(comp), comp, np.arange(1, n + 1))
    border = np.unique(np.concatenate([comp[:, 0].ravel(), comp[:, -1].ravel(), comp[:, :, 0].ravel(),
                                       comp[:, :, -1].ravel(), comp[-1].ravel(), comp[0].ravel()]))
    sizes[border[border > 0] - 1] = 0
    keep = np.argsort(sizes)[::-1][:2] + 1
    mask = np.isin(comp, keep)
    return np.stack([ndi.binary_fill_holes(s) for s in mask])


def test_reference_segmenter_recovers_lungs(phantoms):
    for ph in phantoms.values():
        seg = _reference_segmenter(ph.hu, ph.fov_mask_yx)
        true = ph.lung_labels > 0
        dice = 2 * (seg & true).sum() / (seg.sum() + true.sum())
        assert dice >= 0.97
        assert abs(100 * np.mean(ph.hu[seg] < -950) - ph.truth["laa950_pct"]) < 0.5


# ---------------------------------------------------------------- emphysema control
@pytest.mark.parametrize("pattern", ["centrilobular", "panlobular"])
@pytest.mark.parametrize("severity", [4.0, 12.0, 22.0])
def test_severity_realised(pattern, severity):
    ph = make_phantom(*SMALL, severity, pattern, np.random.default_rng(int(severity) * 7))
    assert abs(ph.truth["laa950_pct"] - severity) < 1.0
    assert ph.truth["severity_pct"] == severity


def test_emphysema_zones(phantoms):
    def shares(ph):
        lung = ph.lung_labels > 0
        zs = np.nonzero(lung.any(axis=(1, 2)))[0]
        lo, hi = zs.min(), zs.max() + 1
        third = (hi - lo) / 3
        z = np.nonzero((ph.hu < -950) & lung)[0]
        return np.mean(z >= hi - third), np.mean(z < lo + third)

    upper, lower = shares(phantoms["centrilobular"])
    assert upper > 0.6 and lower < 0.1
    upper, lower = shares(phantoms["panlobular"])
    assert lower > 0.6 and upper < 0.1
    assert phantoms["none"].truth["laa950_pct"] < 3.0


def test_centrilobular_is_many_small_blobs(phantoms):
    ph = phantoms["centrilobular"]
    laa = (ph.hu < -950) & (ph.lung_labels > 0)
    _, n = ndi.label(laa)
    assert n > 50


def test_bad_pattern():
    with pytest.raises(ValueError):
        make_phantom(*SMALL, 5, "paraseptal", 0)


# ---------------------------------------------------------------- DICOM
def test_dicom_roundtrip(tmp_path, phantoms):
    ph = phantoms["panlobular"]
    paths = write_dicom_series(ph.hu, ph.spacing_zyx_mm, tmp_path / "s", origin_xyz_mm=ph.origin_xyz_mm, seed=3,
                               kernel="STANDARD", series_number=7, series_description="T",
                               slice_thickness_mm=5.0, patient_name="SYNTH^0009", patient_id="SYNTH-0009")
    names = [p.name for p in paths]
    assert names != sorted(names)                                  # not listed in z order
    dss = _read_series(tmp_path / "s")
    assert len(dss) == ph.hu.shape[0]
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    assert np.all(np.diff(z) > 0) and np.allclose(np.diff(z), 5.0)
    assert z[0] == pytest.approx(ph.origin_xyz_mm[2])
    d0 = dss[0]
    assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert d0.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and d0.Modality == "CT"
    assert list(d0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in d0.PixelSpacing] == [3.6, 3.6] and float(d0.SliceThickness) == 5.0
    assert d0.ConvolutionKernel == "STANDARD" and d0.Manufacturer == "emphy-dask synth"
    assert d0.PixelPaddingValue == -2000 and d0.PixelRepresentation == 1 and d0.BitsAllocated == 16
    assert float(d0.RescaleIntercept) == -1024 and float(d0.RescaleSlope) == 1
    assert d0.SeriesNumber == 7 and str(d0.PatientName) == "SYNTH^0009"
    assert "InstanceCreationDate" not in d0
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    raw = np.stack([d.pixel_array for d in dss]).astype(np.int32)
    hu = raw * float(d0.RescaleSlope) + float(d0.RescaleIntercept)
    pad = raw == d0.PixelPaddingValue
    assert np.array_equal(pad, ph.hu == PADDING_HU_SYNTH)
    assert np.array_equal(hu[~pad], ph.hu[~pad])
    # SimpleITK reads the same geometry
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    img = sitk.ReadImage([str(p) for p in by_z])
    assert np.allclose(img.GetOrigin(), ph.origin_xyz_mm) and np.allclose(img.GetSpacing(), (3.6, 3.6, 5.0))


def test_localizer(tmp_path, phantoms):
    ph = phantoms["none"]
    p = write_localizer(ph.hu, ph.spacing_zyx_mm, tmp_path, origin_xyz_mm=ph.origin_xyz_mm, seed=1)
    ds = pydicom.dcmread(p)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert ds.pixel_array.shape == (ph.hu.shape[0], ph.hu.shape[2]) and ds.Modality == "CT"


# ---------------------------------------------------------------- cohort
def test_cohort_table(cohort):
    root, truth = cohort
    assert list(truth.columns) == TRUTH_COLUMNS and len(truth) == 6
    assert list(truth.scan_key) == [f"SYNTH-{i:04d}" for i in range(1, 7)]
    assert set(truth.label) == {0, 1}
    assert {"centrilobular", "panlobular"} <= set(truth.pattern)
    rule = ((truth.laa950_pct >= 6) & (truth.hu_mean < -850)).astype(int)
    assert (truth.label == rule).all()
    on_disk = pd.read_csv(root / "truth.csv")
    assert list(on_disk.scan_key) == list(truth.scan_key)
    assert np.allclose(on_disk.laa950_pct, truth.laa950_pct)
    emph = truth[truth.pattern != "none"]
    assert (abs(emph.laa950_pct - emph.severity_pct) < 1.0).all()


def test_cohort_files_match_truth(cohort):
    root, truth = cohort
    row = truth.iloc[1]
    study = root / "dicom" / row.scan_key / row.study_uid
    series = {p.name: p for p in study.iterdir()}
    assert len(series) == 3
    thin = _read_series(series[row.thin_series_uid])
    thick = _read_series(series[row.thick_series_uid])
    assert len(thin) == row.n_slices and len(thick) < len(thin)
    assert float(thick[0].SliceThickness) > float(thin[0].SliceThickness)
    assert thick[0].SeriesNumber != thin[0].SeriesNumber
    assert thin[0].StudyInstanceUID == thick[0].StudyInstanceUID == row.study_uid
    assert thin[0].FrameOfReferenceUID == thick[0].FrameOfReferenceUID
    assert float(thin[0].PixelSpacing[0]) == row.spacing_xy_mm
    raw = np.stack([d.pixel_array for d in thin]).astype(np.int32)
    hu = raw - 1024
    mask_img = sitk.ReadImage(str(root / "masks" / f"{row.scan_key}.nii.gz"))
    mask = sitk.GetArrayFromImage(mask_img)
    assert mask.shape == hu.shape
    assert np.allclose(mask_img.GetOrigin(), [float(v) for v in thin[0].ImagePositionPatient], atol=1e-3)
    assert np.allclose(mask_img.GetSpacing(), (row.spacing_xy_mm, row.spacing_xy_mm, row.spacing_z_mm))
    assert np.allclose(mask_img.GetDirection(), np.eye(3).ravel())
    lung = mask > 0
    assert 100 * np.mean(hu[lung] < -950) == pytest.approx(row.laa950_pct, abs=1e-9)
    assert hu[lung].mean() == pytest.approx(row.hu_mean, abs=1e-6)


def test_cohort_deterministic(cohort, tmp_path):
    root, _ = cohort
    synth_cohort(tmp_path / "again", 6, seed=0, size="small")
    first, second = _tree_hashes(root), _tree_hashes(tmp_path / "again")
    assert len(first) > 300 and first == second
    other = synth_cohort(tmp_path / "other", 2, seed=1, size="small")
    h_other = _tree_hashes(tmp_path / "other")
    assert not set(h_other.values()) & set(first.values())
    assert other.thin_series_uid.iloc[0] not in set(pd.read_csv(root / "truth.csv").thin_series_uid)
