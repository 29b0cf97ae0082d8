"""Reading real and synthetic series into CTVolume: HU, sorting, geometry, failures, NIfTI."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from .conftest import DX, DX_SHARP, DX_SOFT, LIDC
from .dicom_factory import make_slice, write_series
from pydicom.uid import generate_uid

from emphy_dask.errors import ScanError
from emphy_dask.io import (find_files, index_tree, load_ct, read_dicom_series, read_image,
                           read_label_image, write_label_image)
from emphy_dask.volume import PADDING_HU, CTVolume

from .test_io_index import PHI

LIDC_STEP = {"LIDC-IDRI-0001": 2.5, "LIDC-IDRI-0002": 1.25, "LIDC-IDRI-0003": 2.5}


@pytest.fixture(scope="module")
def dx_soft():
    return load_ct(DX_SOFT)


def test_every_real_series_loads(shared_data):
    for case, step in LIDC_STEP.items():
        vol = load_ct(LIDC / case)
        assert vol.hu.dtype == np.int16 and vol.fov_mask.dtype == bool
        assert vol.hu.shape[1:] == (512, 512) and vol.spacing_zyx_mm[0] == pytest.approx(step)
        assert vol.meta["kernel"] == "STANDARD" and vol.meta["kernel_class"] == "standard"
        # LIDC stores a padding code outside the scan circle -> masked, set to PADDING_HU
        assert not vol.fov_mask[:, 0, 0].any() and vol.fov_mask[:, 256, 256].all()
        assert (vol.hu[~vol.fov_mask] == PADDING_HU).all()
        assert vol.hu[vol.fov_mask].min() > -1100
        # rescale applied: air above the body (inside the circle) ~ -1000 HU, not ~ +24
        air = vol.hu[vol.hu.shape[0] // 2, 30:50, 236:276]
        assert -1030 <= np.median(air) <= -960
    for folder, kernel in ((DX_SOFT, "B"), (DX_SHARP, "L")):
        vol = load_ct(folder)
        assert vol.shape == (64, 512, 512) and vol.meta["kernel"] == kernel
        assert vol.spacing_zyx_mm == pytest.approx((5.0, 0.841796875, 0.841796875))


def test_lung_dx_hu_values(dx_soft):
    h = dx_soft.hu
    # outside-body air in front of the chest, three levels
    for z in (10, 30, 50):
        assert -1030 <= np.median(h[z, 20:60, 230:290]) <= -960
    # trachea lumen near the apex (5 mm partial volume keeps it slightly above -1000)
    assert -1000 <= np.median(h[55, 276:285, 255:264]) <= -900
    # soft tissue: liver (slice 8) and heart (slice 20) in the soft-tissue window
    assert 20 <= np.median(h[8, 160:200, 180:220]) <= 90
    assert -100 <= np.median(h[20, 210:250, 270:310]) <= 100
    assert h.min() >= -1024 and h.max() <= 4000


def test_matches_simpleitk_gdcm_reader(dx_soft):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DX_SOFT)))
    img = reader.Execute()
    assert dx_soft.origin_xyz_mm == pytest.approx(img.GetOrigin())
    assert dx_soft.direction_xyz == pytest.approx(img.GetDirection())
    assert dx_soft.spacing_zyx_mm == pytest.approx(img.GetSpacing()[::-1])
    assert np.array_equal(sitk.GetArrayFromImage(img).astype(np.int16), dx_soft.hu)


def test_geometry_origin_is_most_inferior(shared_data, dx_soft):
    for vol, folder in ((dx_soft, DX_SOFT), (load_ct(LIDC / "LIDC-IDRI-0002"), LIDC / "LIDC-IDRI-0002")):
        zs = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                    for f in find_files(folder))
        assert vol.origin_xyz_mm[2] == pytest.approx(zs[0])
        assert vol.direction_xyz[8] == pytest.approx(1.0)  # array z increases towards the head (+S)
        assert vol.spacing_zyx_mm[0] == pytest.approx(np.diff(zs).mean())
    assert dx_soft.origin_xyz_mm[2] == pytest.approx(-439.0)


def test_shuffled_file_names_sort_by_position(tmp_path, shared_data):
    src = find_files(LIDC / "LIDC-IDRI-0003")
    rng = np.random.default_rng(0)
    names = rng.permutation(len(src))
    for f, n in zip(src, names):
        shutil.copy(f, tmp_path / f"{n:04d}.dcm")  # tmp copy: names now unrelated to z
    vol = read_dicom_series(sorted(tmp_path.iterdir()))
    ref = load_ct(LIDC / "LIDC-IDRI-0003")
    assert np.array_equal(vol.hu, ref.hu) and vol.origin_xyz_mm == ref.origin_xyz_mm
    # synthetic: slice i has HU 10*i; reversed names and instance numbers do not matter
    paths = write_series(tmp_path / "syn", n=5, step_mm=1.5, names=[f"{c}.dcm" for c in "edcba"])
    syn = read_dicom_series(paths[::-1])
    assert [int(syn.hu[k, 0, 0]) for k in range(5)] == [0, 10, 20, 30, 40]
    assert syn.spacing_zyx_mm[0] == pytest.approx(1.5) and syn.origin_xyz_mm[2] == 0.0


def test_duplicate_slice_position(tmp_path):
    uids = dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())
    paths = write_series(tmp_path, n=4, step_mm=2.0, **uids)
    make_slice(tmp_path / "dup.dcm", z_mm=4.0, **uids)
    with pytest.raises(ScanError, match=r"duplicate.*4\.00 mm") as e:
        read_dicom_series(paths + [tmp_path / "dup.dcm"])
    assert "dup.dcm" in str(e.value) and "s002.dcm" in str(e.value)
    with pytest.raises(ScanError, match="duplicate"):
        load_ct(tmp_path)


def test_missing_middle_slice_is_gap(tmp_path):
    paths = write_series(tmp_path, n=6, step_mm=2.5)
    (tmp_path / "s003.dcm").unlink()
    with pytest.raises(ScanError, match=r"gap.*5\.000 mm.*s002\.dcm, s004\.dcm.*2\.500 mm"):
        read_dicom_series([p for p in paths if p.exists()])


def test_truncated_file_named(tmp_path, shared_data):
    src = find_files(DX_SOFT)[:4]
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    victim = tmp_path / src[2].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    with pytest.raises(ScanError, match=src[2].name) as e:
        load_ct(tmp_path)
    assert "truncated" in str(e.value)
    victim.write_bytes(data[:1000])  # cut inside the header: still named, never skipped
    with pytest.raises(ScanError, match=src[2].name):
        load_ct(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="no DICOM files found"):
        load_ct(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(ScanError, match="no DICOM files found"):
        load_ct(tmp_path / "junk")
    with pytest.raises(ScanError, match="does not exist"):
        load_ct(tmp_path / "nope")


def test_archive_root_is_refused(shared_data):
    with pytest.raises(ScanError, match="3 scan folders"):
        load_ct(LIDC)


def test_padding_value_and_rescale(tmp_path):
    raw = np.full((8, 8), 500, np.int16)
    raw[0, :] = -2000  # PixelPaddingValue, stored raw
    raw[1, :] = -600   # HU -1624 after rescale: below the padding threshold
    raw[2, :] = 0      # -1024 HU: real air, kept
    uids = dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())
    paths = [make_slice(tmp_path / f"{i}.dcm", z_mm=i, raw=raw, padding_value=-2000, slope=2.0,
                        intercept=-1024, **uids) for i in range(2)]
    vol = read_dicom_series(paths)
    assert not vol.fov_mask[:, :2].any() and vol.fov_mask[:, 2:].all()
    assert (vol.hu[:, :2] == PADDING_HU).all()
    assert (vol.hu[:, 2] == -1024).all() and (vol.hu[:, 3:] == 2 * 500 - 1024).all()


def test_compressed_jpeg2000_decodes(tmp_path, shared_data):
    src = find_files(LIDC / "LIDC-IDRI-0002")[:3]
    for f in src:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.JPEG2000Lossless)
        ds.save_as(tmp_path / f.name)
    vol = read_dicom_series(sorted(tmp_path.iterdir()))
    ref = read_dicom_series(src)
    assert vol.meta["transfer_syntax"] == pydicom.uid.JPEG2000Lossless
    assert np.array_equal(vol.hu, ref.hu)


def test_no_phi_in_volume_meta(tmp_path):
    paths = write_series(tmp_path, n=3, phi=PHI)
    vol = load_ct(tmp_path)
    text = str(vol.meta)
    assert not any(secret in text for secret in PHI.values())


def test_nifti_roundtrip(tmp_path, dx_soft):
    small = CTVolume(hu=dx_soft.hu[20:24, ::8, ::8].copy(), spacing_zyx_mm=(5.0, 6.7, 6.7),
                     origin_xyz_mm=dx_soft.origin_xyz_mm, direction_xyz=dx_soft.direction_xyz)
    sitk.WriteImage(small.to_sitk(), str(tmp_path / "ct.nii.gz"))
    ct = load_ct(tmp_path / "ct.nii.gz")
    assert np.array_equal(ct.hu, small.hu) and ct.hu.dtype == np.int16
    assert ct.spacing_zyx_mm == pytest.approx(small.spacing_zyx_mm)
    assert ct.origin_xyz_mm == pytest.approx(small.origin_xyz_mm, abs=1e-4)
    assert ct.fov_mask is None and ct.meta["source_format"] == "nifti"
    assert read_image(tmp_path / "ct.nii.gz").shape == small.shape

    labels = np.zeros(small.shape, np.uint8)
    labels[:, 10:30, 10:30] = 1
    labels[:, 10:30, 35:55] = 2
    write_label_image(labels, small, tmp_path / "lab.nii.gz")
    back = read_label_image(tmp_path / "lab.nii.gz", small)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    # other labellings are binarised to "lung" = 1
    write_label_image(labels * 3, small, tmp_path / "lab3.nii.gz")
    assert np.array_equal(read_label_image(tmp_path / "lab3.nii.gz", small), (labels > 0).astype(np.uint8))


def test_label_grid_mismatch(tmp_path, dx_soft):
    small = CTVolume(hu=np.zeros((3, 4, 5), np.int16), spacing_zyx_mm=(5.0, 1.0, 1.0))
    write_label_image(np.ones((3, 4, 5), np.uint8), small, tmp_path / "lab.nii.gz")
    shifted = CTVolume(hu=small.hu, spacing_zyx_mm=(5.0, 1.0, 1.0), origin_xyz_mm=(0.0, 0.0, 1.0))
    with pytest.raises(ScanError, match="does not match.*origin"):
        read_label_image(tmp_path / "lab.nii.gz", shifted)
    other = CTVolume(hu=np.zeros((3, 4, 6), np.int16), spacing_zyx_mm=(5.0, 1.0, 1.0))
    with pytest.raises(ScanError, match=r"size \(5, 4, 3\).*size \(6, 4, 3\)"):
        read_label_image(tmp_path / "lab.nii.gz", other)


def test_index_tree_then_read_all(shared_data):
    for root in (LIDC, DX.parent.parent):
        for key, choice in index_tree(root).items():
            vol = read_dicom_series(choice.picked.files)
            assert vol.shape[0] == choice.picked.n_slices


def test_label_image_with_axes_stored_differently_is_reindexed_exactly(tmp_path):
    """Same voxel centres, x axis stored flipped and axes permuted (as another converter may write)."""
    import SimpleITK as sitk

    from emphy_dask.io import read_label_image
    from emphy_dask.volume import CTVolume

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    ct = CTVolume(hu=np.zeros((5, 6, 7), np.int16), spacing_zyx_mm=(2.0, 0.5, 0.7), origin_xyz_mm=(10.0, -3.0, 4.0))
    img = ct.to_sitk(labels)
    flipped = sitk.PermuteAxes(sitk.Flip(img, [True, False, False]), [1, 0, 2])   # x flipped, x/y swapped
    assert flipped.GetSize() != img.GetSize()
    sitk.WriteImage(flipped, str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(read_label_image(tmp_path / "m.nii.gz", ct), labels)
    shifted = sitk.Image(img)
    shifted.SetOrigin((10.3, -3.0, 4.0))                                           # half a voxel off: refused
    sitk.WriteImage(shifted, str(tmp_path / "s.nii.gz"))
    with pytest.raises(ScanError, match="label grid does not match"):
        read_label_image(tmp_path / "s.nii.gz", ct)


def test_padding_value_also_used_inside_the_body_only_pads_the_edge(tmp_path):
    """PixelPaddingValue = raw 0 (-1024 HU): the border region is padding, enclosed air is not."""
    from emphy_dask.io import read_dicom_series

    raw = np.full((12, 12), 1024, np.int16)      # 0 HU body
    raw[0, :] = raw[-1, :] = raw[:, 0] = raw[:, -1] = 0
    raw[5:7, 5:7] = 0                            # air enclosed by the body, same raw value
    files = [make_slice(tmp_path / f"{i}.dcm", z_mm=2.0 * i, series_uid="1.2.3", study_uid="1.2",
                        for_uid="1.2.4", raw=raw, rows=12, cols=12, padding_value=0, instance_number=i + 1)
             for i in range(3)]
    vol = read_dicom_series(files)
    assert not vol.fov_mask[:, 0, :].any()
    assert vol.fov_mask[:, 5:7, 5:7].all() and (vol.hu[:, 5:7, 5:7] == -1024).all()
