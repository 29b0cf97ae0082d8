"""QC rules, HU clipping and resampling (emphy_dask.preprocess)."""
import numpy as np
import pytest

from emphy_dask.preprocess import QCResult, QCRules, clip_hu, qc_check, resample_labels, resample_volume
from emphy_dask.volume import PADDING_HU, CTVolume


def _vol(hu, spacing=(2.0, 1.0, 1.0), fov=None, **kw):
    return CTVolume(hu=np.asarray(hu, np.int16), spacing_zyx_mm=spacing, fov_mask=fov, **kw)


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_qc_passes_normal_scan():
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 400, (8, 32, 32)).clip(-1024, 1500)
    r = qc_check(_vol(hu))
    assert isinstance(r, QCResult)
    assert r.passed and r.rule is None and r.value is None
    assert r.max_hu <= 1500 and 350 < r.std_hu < 450 and r.n_voxels == 8 * 32 * 32


def test_qc_fails_max_hu_and_records_value():
    hu = np.zeros((4, 16, 16))
    hu[2, 5, 5] = 3000  # metal
    r = qc_check(_vol(hu))
    assert not r.passed and r.rule == "max_hu>1600" and r.value == pytest.approx(3000)
    assert r.max_hu == pytest.approx(3000)


def test_qc_fails_std_and_records_value():
    hu = np.zeros((4, 16, 16))
    hu[:2] = -1000
    hu[2:] = 1500  # std 1250 HU, max still allowed
    r = qc_check(_vol(hu))
    assert not r.passed and r.rule == "std_hu>600"
    assert r.value == pytest.approx(1250.0) and r.std_hu == pytest.approx(1250.0)


def test_qc_first_failing_rule_is_reported():
    hu = np.zeros((4, 16, 16))
    hu[:2] = -1000
    hu[2:] = 2000
    assert qc_check(_vol(hu)).rule == "max_hu>1600"
    assert qc_check(_vol(hu), QCRules(max_hu=5000)).rule == "std_hu>600"


def test_qc_excludes_padding_outside_fov():
    # a uniform tissue disc inside the FOV, padding outside: std must be 0
    hu = np.full((4, 32, 32), 40)
    yy, xx = np.mgrid[:32, :32]
    fov = np.broadcast_to((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 14 ** 2, hu.shape).copy()
    hu[~fov] = PADDING_HU
    with_fov = qc_check(_vol(hu, fov=fov))
    assert with_fov.passed and with_fov.std_hu == 0.0 and with_fov.n_voxels == int(fov.sum())
    without = qc_check(_vol(hu))
    assert without.std_hu > 300  # what the padding would have done


def test_clip_hu():
    hu = np.array([-3024, -1000, -950, 0, 400, 3000], np.int16)
    c = clip_hu(hu)
    assert c.dtype == np.int16 and c.tolist() == [-1000, -1000, -950, 0, 400, 400]
    cf = clip_hu(hu.astype(np.float64), QCRules(clip_min_hu=-1024, clip_max_hu=600))
    assert cf.dtype == np.float32 and cf.min() == -1024 and cf.max() == 600


def _block_volume():
    """(10, 40, 46) volume at 5 x 0.8 x 0.7 mm with a uniform 100 HU block in -900 HU."""
    hu = np.full((10, 40, 46), -900, np.int16)
    hu[2:8, 10:30, 12:36] = 100
    d = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return CTVolume(hu=hu, spacing_zyx_mm=(5.0, 0.8, 0.7), origin_xyz_mm=(-10.0, 20.0, -300.0),
                    direction_xyz=d)


def test_resample_preserves_extent_and_mean_hu():
    v = _block_volume()
    r = resample_volume(v, (1.0, 1.0, 1.0))
    assert r.hu.dtype == np.int16 and r.spacing_zyx_mm == (1.0, 1.0, 1.0)
    assert r.shape == (50, 32, 33)  # ceil(50/1), ceil(32/1), ceil(32.2/1)
    # first voxel's outer face stays where it was: origin - spacing / 2 per axis
    for ax_xyz in range(3):
        old_face = v.origin_xyz_mm[ax_xyz] - v.spacing_zyx_mm[2 - ax_xyz] / 2
        new_face = r.origin_xyz_mm[ax_xyz] - r.spacing_zyx_mm[2 - ax_xyz] / 2
        assert new_face == pytest.approx(old_face)
    # physical extent along z/y identical, x within one new voxel
    assert r.shape[0] * 1.0 == pytest.approx(v.shape[0] * 5.0)
    assert 0 <= r.shape[2] * 1.0 - v.shape[2] * 0.7 < 1.0
    # mean HU of the block interior (away from its blurred faces) is kept
    core = r.hu[15:35, 12:20, 14:20]
    assert core.mean() == pytest.approx(100, abs=1) and core.std() < 1
    # the last x column's centre (32.5 mm) lies past the old extent (32.2 mm): padding, and flagged outside the FOV
    assert r.fov_mask is not None and not r.fov_mask[:, :, -1].any()
    assert (r.hu[:, :, -1] == PADDING_HU).all()


def test_resample_keeps_fov_mask():
    v = _block_volume()
    fov = np.ones(v.shape, bool)
    fov[:, :, :6] = False
    hu = v.hu.copy()
    hu[~fov] = PADDING_HU
    r = resample_volume(v.with_hu(hu, fov_mask=fov), (1.0, 1.0, 1.0))
    assert not r.fov_mask[:, :, :3].any() and r.fov_mask[5:45, 5:25, 6:30].all()
    assert (r.hu[~r.fov_mask] == PADDING_HU).all()


def test_resample_labels_nearest_and_round_trip():
    # two lung-like ellipsoids (mm) on a 5 x 0.8 x 0.7 mm grid
    v = CTVolume(hu=np.zeros((30, 120, 150), np.int16), spacing_zyx_mm=(5.0, 0.8, 0.7))
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(v.shape, v.spacing_zyx_mm)), indexing="ij")
    labels = np.zeros(v.shape, np.uint8)
    for k, cx in ((1, 28.0), (2, 77.0)):
        labels[((zz - 75) / 60) ** 2 + ((yy - 48) / 35) ** 2 + ((xx - cx) / 22) ** 2 <= 1] = k
    iso = resample_volume(v, (1.0, 1.0, 1.0))
    up = resample_labels(labels, v, iso)
    assert up.dtype == np.uint8 and up.shape == iso.shape
    assert set(np.unique(up)) == {0, 1, 2}  # nearest: no in-between labels
    back = resample_labels(up, iso, v)
    assert back.shape == v.shape
    for k in (1, 2):
        assert _dice(back == k, labels == k) > 0.95
    with pytest.raises(ValueError):
        resample_labels(labels[:-1], v, iso)


def test_resampling_a_region_of_interest_equals_that_part_of_the_whole():
    """The lung box alone on the 1 mm grid: the same voxels, labels and geometry as cutting it out
    of the whole resampled scan, whatever the direction cosines."""
    from emphy_dask.preprocess import resample_labels, resample_volume, resampled_shape, roi_on_grid
    from emphy_dask.synth.phantom import make_phantom

    ph = make_phantom((30, 64, 64), (5.0, 4.0, 4.0), 10.0, "centrilobular", np.random.default_rng(1))
    for direction in [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1), (0, 1, 0, 1, 0, 0, 0, 0, 1)]:
        vol = CTVolume(hu=np.maximum(ph.hu, -1024).astype(np.int16), spacing_zyx_mm=ph.spacing_zyx_mm,
                       origin_xyz_mm=(3.0, -7.0, 11.0), direction_xyz=direction)
        full = resample_volume(vol)
        assert full.shape == resampled_shape(vol)
        labels = resample_labels(ph.lung_labels, vol, full)
        roi = roi_on_grid(vol, ph.lung_labels > 0, (1.0, 1.0, 1.0), margin_mm=10.0, square_axes=(1, 2))
        part = resample_volume(vol, roi=roi)
        box = tuple(slice(a, b) for a, b in roi)
        assert np.array_equal(part.hu, full.hu[box])
        assert np.array_equal(resample_labels(ph.lung_labels, vol, part), labels[box])
        assert labels[box].sum() == labels.sum()                        # every lung voxel is inside
        clamped = any(roi[a][0] == 0 or roi[a][1] == full.shape[a] for a in (1, 2))
        assert clamped or roi[1][1] - roi[1][0] == roi[2][1] - roi[2][0]                   # in-plane square
        assert part.hu.size < 0.7 * full.hu.size
