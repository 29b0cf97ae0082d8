"""Airways out of the lung mask (emphy_dask.segment.airway): phantoms with a known airway tree,
a given mask that holds the trachea, a scan without trachea, and the real LIDC-IDRI-0013."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from emphy_dask.segment import airway_out, segment_lungs
from emphy_dask.volume import PADDING_HU, CTVolume


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _open_airways_into_lung(seed=0):
    """The project's phantom with its airway walls opened where they meet the lung.

    The phantom's trachea and main bronchi are walled off from the lung voxel-tight; on real CT
    (LIDC-IDRI-0013) the lumen touches the lung air through partial volume and the segmenter
    took the trachea for lung. Wall voxels within 3 voxels of the lung become air here, so the
    lumen and the lungs are one air region, as on that scan. Truth: the phantom's lungs, which
    exclude the airway (lumen and wall).
    """
    from emphy_dask.synth import phantom

    p = phantom.make_phantom((64, 160, 160), (4.0, 2.2, 2.2), 20.0, "centrilobular", np.random.default_rng(seed))
    fov = np.broadcast_to(p.fov_mask_yx, p.hu.shape).copy()
    hu = np.where(fov, p.hu, PADDING_HU).astype(np.int16)
    near_lung = ndi.binary_dilation(p.lung_labels > 0, iterations=3)
    opened = p.airway_mask & near_lung & (hu > -600)
    hu[opened] = -990
    vol = CTVolume(hu=hu, spacing_zyx_mm=p.spacing_zyx_mm, origin_xyz_mm=p.origin_xyz_mm, fov_mask=fov)
    lumen = p.airway_mask & (p.hu < -600)
    # the trachea: lumen above the carina (the last slice, from the top, with one lumen section)
    sections = np.array([ndi.label(s)[1] for s in lumen])
    trachea = lumen.copy()
    trachea[: np.nonzero(sections >= 2)[0].max() + 1] = False
    return vol, p.lung_labels, p.airway_mask, lumen, trachea, opened.sum()


@pytest.fixture(scope="module")
def opened_phantom():
    return _open_airways_into_lung()


def test_phantom_airway_tree_is_kept_out_of_the_lungs(opened_phantom):
    vol, truth, airway_true, lumen, trachea, n_opened = opened_phantom
    assert n_opened > 50 and trachea.sum() > 500             # the walls really were opened
    # without the airway step the lumen is lung air: it joins the lungs' air region
    air = (vol.hu < -320) & (vol.fov_mask)
    lab, _ = ndi.label(air)
    lung_ids = np.unique(lab[truth > 0])
    assert np.isin(lab[lumen], lung_ids[lung_ids > 0]).mean() > 0.9
    labels, airway = segment_lungs(vol, with_airway=True)
    inside = (labels > 0)[trachea].mean()
    assert inside <= 0.01, f"{inside:.1%} of the true trachea is labelled lung"       # measured 0
    assert airway[trachea].mean() > 0.9                       # and it is what was removed
    # main bronchi too, but for their ends, where the opened wall merges them with the lung
    assert (labels > 0)[lumen].mean() < 0.2                   # measured 0.12 (1.0 before)
    for k in (1, 2):
        assert _dice(labels == k, truth == k) >= 0.97        # lungs not cut away


def test_given_mask_holding_the_trachea_loses_it(opened_phantom):
    """A user's mask (or lungmask's) that labels the airway as lung: taken out, lungs kept."""
    vol, truth, airway_true, lumen, trachea, _ = opened_phantom
    given = truth.copy()
    given[airway_true] = 1                                     # trachea and bronchi marked as right lung
    labels, removed = airway_out(vol, given)
    assert (labels > 0)[trachea].mean() <= 0.01
    assert removed[trachea].mean() > 0.9 and (labels > 0)[lumen].mean() < 0.2
    assert labels.dtype == given.dtype
    kept = (labels > 0)[truth > 0].mean()
    assert kept > 0.98, f"only {kept:.1%} of the true lung kept"


def test_scan_starting_below_the_carina_loses_no_lung(opened_phantom):
    """No trachea in the scan: no seed, nothing removed, both lungs whole (given mask too)."""
    vol, truth, airway_true, lumen, trachea, _ = opened_phantom
    zl = np.nonzero((truth > 0).any(axis=(1, 2)))[0]
    stop = (zl[0] + zl[-1]) // 2                              # inferior half of the lungs: below the carina
    assert not airway_true[:stop].any()                        # no trachea, no main bronchus in it
    part = CTVolume(hu=np.ascontiguousarray(vol.hu[:stop]), spacing_zyx_mm=vol.spacing_zyx_mm,
                    fov_mask=np.ascontiguousarray(vol.fov_mask[:stop]))
    labels, airway = segment_lungs(part, with_airway=True)
    for side in (1, 2):
        assert (labels == side)[truth[:stop] == side].mean() > 0.95
    given, removed = airway_out(part, truth[:stop])
    assert (given > 0).sum() >= 0.99 * (truth[:stop] > 0).sum()


def test_no_visible_trachea_removes_nothing():
    """A body of soft tissue with two air lungs and no airway: nothing is taken out."""
    nz, ny, nx = 30, 120, 160
    z, y, x = np.mgrid[:nz, :ny, :nx]
    hu = np.full((nz, ny, nx), 40, np.int16)
    hu[((x - 80) / 75.0) ** 2 + ((y - 60) / 55.0) ** 2 > 1] = -1000             # air around the body
    for cx in (50, 110):
        hu[((x - cx) / 22.0) ** 2 + ((y - 60) / 30.0) ** 2 + ((z - 15) / 13.0) ** 2 <= 1] = -870
    vol = CTVolume(hu=hu, spacing_zyx_mm=(5.0, 2.0, 2.0))
    labels, airway = segment_lungs(vol, with_airway=True)
    assert not airway.any() and (labels > 0).sum() > 0
    given, removed = airway_out(vol, (hu == -870).astype(np.uint8))
    assert not removed.any()


def test_lidc_0013_trachea_and_main_bronchi_are_not_lung(shared_data):
    """The issue's case: one midline air component (z 52-103, 14,487 voxels below -950 HU) was
    labelled lung; without it whole-lung LAA%-950 reads 1.53 % (1.77 % with it)."""
    from emphy_dask.io import load_ct

    vol = load_ct(shared_data / "lidc-idri-full" / "LIDC-IDRI-0013")
    labels, airway = segment_lungs(vol, with_airway=True)
    hu = vol.hu
    lung = labels > 0
    laa_pct = 100.0 * (lung & (hu < -950)).sum() / lung.sum()
    assert abs(laa_pct - 1.53) <= 0.1, laa_pct
    # no low-attenuation component of the lung crosses the midline above the carina (z >= 87)
    mid_x = (ndi.center_of_mass(labels == 1)[2] + ndi.center_of_mass(labels == 2)[2]) / 2
    comp, _ = ndi.label(lung & (hu < -950))
    sizes = np.bincount(comp.ravel())
    for i, box in enumerate(ndi.find_objects(comp), 1):
        crosses = box[2].start < mid_x - 8 and box[2].stop > mid_x + 8
        assert not (crosses and box[0].stop > 87 and sizes[i] > 50), (i, sizes[i], box)
    # the trachea lumen at the level of the lung apices is in the removed airway
    ml = airway.sum() * vol.voxel_volume_mm3 / 1000.0
    assert 15.0 < ml < 80.0, ml
    assert airway[95].any() and not lung[95][airway[95]].any()


def test_scan_row_records_the_airway_and_the_montage_draws_it(tmp_path):
    """process_scan: ``airway_ml_removed`` in the scans row (schema column, read back) and the
    airway in its own colour in the QC montage."""
    from pathlib import Path

    from PIL import Image

    from .conftest import DX_SOFT
    from emphy_dask.job.config import config_from_dict
    from emphy_dask.local import process_scan
    from emphy_dask.scan_state import ScanTask
    from emphy_dask.qc_images import AIRWAY_RGB
    from emphy_dask.tables import read_frame, write_part

    cfg = config_from_dict({"qc": {"max_hu": 4000.0}, "embed": {"backbone": "none"},
                            "output": {"write_masks": False, "write_qc_png": True}})
    task = ScanTask("dx-soft", "dicom", tuple(str(p) for p in sorted(Path(DX_SOFT).glob("*.dcm"))))
    row = process_scan(task, cfg, tmp_path)["scans"]
    assert row["status"] == "ok", row.get("reason")
    assert 5.0 < row["airway_ml_removed"] < 80.0, row["airway_ml_removed"]
    write_part("scans", [row], tmp_path, "p")
    assert read_frame(tmp_path, "scans").loc[0, "airway_ml_removed"] == row["airway_ml_removed"]
    png = np.asarray(Image.open(tmp_path / row["qc_montage_path"]).convert("RGB"))
    assert (png == np.array(AIRWAY_RGB, np.uint8)).all(axis=2).sum() > 20
