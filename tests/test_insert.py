"""Emphysema inserted into a CT (emphy insert): voxel-exact truth, nothing outside the lung
changed, the patterns' anatomy, the power law, the DICOM written, and the bases refused."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from emphy_dask.io.dicom_index import find_files, index_files
from emphy_dask.io.image_io import load_ct
from emphy_dask.io.metadata import PHI_TAGS
from emphy_dask.phenotypes.clusters import laa_cluster_exponent_d, power_law_exponent
from emphy_dask.phenotypes.parenchyma import parenchyma_phenotypes
from emphy_dask.synth import make_phantom, synth_patient
from emphy_dask.synth.insert import insert_emphysema
from emphy_dask.synth.insert_cohort import base_id, insert_cohort, load_base
from emphy_dask.synth.lesions import PATTERNS, VESSEL_MIN_HU, sample_volumes_mm3

SPACING = (5.0, 3.6, 3.6)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def base():
    ph = make_phantom((56, 96, 96), SPACING, 0.0, "none", np.random.default_rng(5))
    return ph.hu, ph.lung_labels


@pytest.fixture(scope="module")
def inserted(base):
    hu, labels = base
    return {p: insert_emphysema(hu, labels, SPACING, p, 12.0, 3) for p in PATTERNS}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_truth_is_voxel_exact_and_only_parenchyma_changes(base, inserted, pattern):
    hu, labels = base
    new, lesion, truth = inserted[pattern]
    lung = labels > 0
    assert np.array_equal(lesion, new != hu)                       # the mask is exactly what changed
    assert np.array_equal(new[~lung], hu[~lung])                   # nothing outside the lungs
    assert (hu[lesion] < VESSEL_MIN_HU).all()                      # vessels and walls are spared
    assert (new[lesion] < hu[lesion]).all()                        # lesions only ever lower density
    n = lung.sum()
    laa_new = 100.0 * np.count_nonzero(lung & (new < -950)) / n
    laa_base = 100.0 * np.count_nonzero(lung & (hu < -950)) / n
    assert truth["expected_laa950_pct"] == laa_new
    assert truth["base_laa950_pct"] == laa_base
    assert truth["added_laa950_pct"] == pytest.approx(laa_new - laa_base, abs=1e-9)
    assert 12.0 - 0.25 <= truth["added_laa950_pct"] <= 12.0 + 2.0   # from below, within 0.25 points
    # The project's own measurement of the result agrees with the truth to the voxel.
    whole = next(r for r in parenchyma_phenotypes(new, labels, SPACING, IDENTITY) if r["region"] == "WholeLung")
    assert whole["laa950_pct"] == pytest.approx(laa_new, abs=1e-9)
    zones = [truth[f"added_laa950_{z}_pct"] for z in ("upper", "middle", "lower")]
    assert all(z >= 0 for z in zones)


def test_zones_and_pleura_follow_the_pattern(base, inserted):
    hu, labels = base
    lung = labels > 0
    cle, pan = inserted["centrilobular"][2], inserted["panlobular"][2]
    assert cle["added_laa950_upper_pct"] > cle["added_laa950_lower_pct"]          # upper-zone predominant
    assert pan["added_laa950_lower_pct"] > pan["added_laa950_upper_pct"]          # lower-zone predominant
    depth_mm = ndi.distance_transform_edt(np.pad(lung, 1), sampling=SPACING)[1:-1, 1:-1, 1:-1]
    para = inserted["paraseptal"][1]
    centri = inserted["centrilobular"][1]
    assert np.median(depth_mm[para]) < np.median(depth_mm[lung])                  # subpleural
    assert np.median(depth_mm[centri]) > np.median(depth_mm[para]) + 3.0          # away from the pleura
    bullous = inserted["bullous"][2]
    # Large spaces: the bullous lesions are on average more than twice as large as centrilobular ones.
    assert bullous["lesion_volume_ml"] / bullous["n_lesions"] > 2 * cle["lesion_volume_ml"] / cle["n_lesions"]


def test_severity_zero_and_seeds(base):
    hu, labels = base
    new, lesion, truth = insert_emphysema(hu, labels, SPACING, "centrilobular", 0.0, 1)
    assert np.array_equal(new, hu) and not lesion.any() and truth["added_laa950_pct"] == 0.0
    a = insert_emphysema(hu, labels, SPACING, "paraseptal", 6.0, 7, measure_d=False)[0]
    b = insert_emphysema(hu, labels, SPACING, "paraseptal", 6.0, 7, measure_d=False)[0]
    c = insert_emphysema(hu, labels, SPACING, "paraseptal", 6.0, 8, measure_d=False)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_arguments_are_refused(base):
    hu, labels = base
    with pytest.raises(ValueError, match="unknown pattern"):
        insert_emphysema(hu, labels, SPACING, "honeycomb", 5.0, 0)
    with pytest.raises(ValueError, match="0-40"):
        insert_emphysema(hu, labels, SPACING, "bullous", 55.0, 0)
    with pytest.raises(ValueError, match="empty"):
        insert_emphysema(hu, np.zeros_like(labels), SPACING, "bullous", 5.0, 0)


@pytest.mark.parametrize("d", [1.3, 1.6, 1.9])
def test_lesion_sizes_follow_the_power_law_the_project_measures(d):
    vols = sample_volumes_mm3(4000, d, (3.0, 60.0), np.random.default_rng(0))
    assert vols.min() >= np.pi / 6 * 27 and vols.max() <= np.pi / 6 * 60 ** 3
    assert power_law_exponent(vols) == pytest.approx(d, abs=0.2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("insert")
    synth_patient(root / "src", 1, "none", 0.0, seed=2, size="small")
    patient = root / "src" / "dicom" / "SYNTH-0001"
    # A slab: the first 8 files of the thin series; a corrupt series: one file truncated.
    thin = max((p for p in patient.glob("*/*") if p.is_dir()), key=lambda p: len(list(p.iterdir())))
    slab, corrupt = root / "slab", root / "corrupt"
    slab.mkdir(), corrupt.mkdir()
    files = sorted(thin.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for f in files[20:28]:
        (slab / f.name).write_bytes(f.read_bytes())
    for f in files:
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / files[10].name).write_bytes(files[10].read_bytes()[:3000])
    label = root / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30, 30), np.uint8) + 1), str(label))
    out = root / "out"
    truth, refused = insert_cohort([f"P1={patient}", f"slab={slab}", f"corrupt={corrupt}", f"lab={label}"], out,
                                   patterns=["centrilobular", "bullous"], severities=[0, 10], seed=4,
                                   log=lambda s: None)
    return root, patient, out, truth, dict(refused)


def test_cohort_dicom_reads_back_the_truth(cohort):
    root, patient, out, truth, _ = cohort
    assert sorted(truth["pattern"]) == ["bullous", "centrilobular", "none"]
    bid = base_id("P1")
    assert set(truth["base_id"]) == {bid}
    # `emphy extract OUT/dicom` keys the scans exactly as the truth table does.
    records = index_files(find_files(out / "dicom"), out / "dicom")
    assert {r["scan_key"] for r in records} == set(truth["scan_key"])
    base_vol, _ = load_base(patient)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(out / truth["lung_mask"].iloc[0]))) > 0
    for row in truth.itertuples():
        vol = load_ct(out / "dicom" / row.scan_key)
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row.lesion_mask))) > 0
        assert np.array_equal(vol.hu != base_vol.hu, lesion)
        laa = 100.0 * np.count_nonzero(lung & (vol.hu < -950)) / lung.sum()
        assert laa == pytest.approx(row.expected_laa950_pct, abs=1e-9)
        ds = pydicom.dcmread(next((out / "dicom" / row.scan_key).rglob("*.dcm")))
        assert ds.PatientID == bid and str(ds.PatientName) == bid
        assert ds.StudyInstanceUID not in {r["study_uid"] for r in index_files(find_files(patient), patient)}
        leaked = [kw for kw in PHI_TAGS - {"PatientName", "PatientID", "StudyID", "StudyDate", "SeriesDate",
                                           "ContentDate", "StudyTime", "SeriesTime", "ContentTime"}
                  if kw in ds and str(ds.data_element(kw).value)]
        assert leaked == []
        assert ds.StudyDate == "20000101"
    assert not (out / ".partial").exists()


def test_unusable_bases_get_one_line_reasons_and_no_output(cohort):
    root, _, out, truth, refused = cohort
    assert set(refused) == {"slab", "corrupt", "lab"}
    assert "a slab of 8 slices" in refused["slab"] and str(root / "slab") in refused["slab"]
    assert "unreadable" in refused["corrupt"] or "truncated" in refused["corrupt"].lower()
    assert "label" in refused["lab"]
    assert all("\n" not in r for r in refused.values())
    assert len(list((out / "dicom").iterdir())) == len(truth) == 3
    assert (out / "refused.csv").read_text().count("\n") == 4


def test_cli_insert_refuses_a_slab_with_exit_1(cohort, tmp_path, capsys):
    from emphy_dask.cli import main

    root = cohort[0]
    assert main(["insert", "--base", f"thin={root / 'slab'}", "-o", str(tmp_path / "o")]) == 1
    printed = capsys.readouterr().out
    assert "refused thin:" in printed and "a slab of 8 slices (40 mm)" in printed
    assert not any((tmp_path / "o").rglob("*.dcm"))
    assert main(["insert", "--base", str(root / "slab"), "-o", str(tmp_path / "p"), "--severities", "50"]) == 2


# Read-back of the cluster exponent D: a finer phantom (2.5 x 1.5 x 1.5 mm) with the scanner's noise
# (about 65 HU in the parenchyma), where lesions span several voxels.
FINE = (2.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def fine_base():
    ph = make_phantom((64, 160, 160), FINE, 0.0, "none", np.random.default_rng(5))
    return ph.hu, ph.lung_labels


@pytest.mark.parametrize("pattern,severity", [("centrilobular", 5.0), ("centrilobular", 20.0), ("panlobular", 5.0),
                                              ("paraseptal", 5.0), ("bullous", 5.0), ("bullous", 20.0)])
def test_inserted_lesions_read_back_the_aimed_d(fine_base, pattern, severity):
    """D of the LAA clusters inside the lesion mask (the evaluator's quantity: written HU + lesion
    mask, the project's estimator) is within 0.2 of the pattern's aim, noise and all."""
    hu, labels = fine_base
    new, lesion, truth = insert_emphysema(hu, labels, FINE, pattern, severity, 11)
    d_read = laa_cluster_exponent_d(new, lesion, FINE)
    assert truth["d_lesions"] == d_read
    assert truth["d_aimed"] == PATTERNS[pattern].d_aim
    assert abs(d_read - truth["d_aimed"]) <= 0.2
    assert severity - 0.25 <= truth["added_laa950_pct"] <= severity + 2.0       # the severity still holds
    assert np.array_equal(lesion, new != hu) and np.array_equal(new[labels == 0], hu[labels == 0])


def test_the_closed_loop_steers_the_sampled_exponent(fine_base):
    """Without the loop the read-back misses (merged lesions, noise fragments); the loop samples
    another exponent and lands nearer the aim."""
    hu, labels = fine_base
    _, _, open_loop = insert_emphysema(hu, labels, FINE, "centrilobular", 20.0, 11, fit_d=False)
    _, _, closed = insert_emphysema(hu, labels, FINE, "centrilobular", 20.0, 11)
    assert open_loop["d_tries"] == 1 and open_loop["d_sampled"] == 1.5
    assert abs(open_loop["d_lesions"] - 1.5) > 0.2
    assert closed["d_tries"] > 1 and closed["d_sampled"] != 1.5
    assert abs(closed["d_lesions"] - 1.5) < abs(open_loop["d_lesions"] - 1.5)


def test_fast_helpers_give_the_plain_answers():
    """The insertion's shortcuts equal the plain numpy they replace: halo refusal read in growing
    blocks, deduplication on the touched list, block sums by strided adds, and the loop's first
    step over the prior slope."""
    from emphy_dask.synth.canvas import NO_OWNER, halo_free, unique_indices
    from emphy_dask.synth.insert import D_PRIOR_SLOPE, _next_exponent
    from emphy_dask.synth.lesions import _block_sum

    rng = np.random.default_rng(3)
    core = rng.random(50_000) < 0.02
    centres = rng.integers(500, 49_000, 4_000)
    halo = rng.integers(-400, 400, 300)
    assert np.array_equal(halo_free(core, centres, halo), ~core[centres[:, None] + halo[None]].any(axis=1))
    scratch = np.full(50_000, NO_OWNER, np.int32)
    idx = rng.integers(0, 50_000, 30_000)
    assert np.array_equal(np.sort(unique_indices(idx, scratch)), np.unique(idx))
    assert (scratch == NO_OWNER).all()
    for f in [(2, 7, 7), (1, 1, 1), (3, 2, 5)]:
        a = rng.random((13, 29, 31)) < 0.4
        h = rng.integers(-1024, 3000, a.shape).astype(np.int16)
        cz, cy, cx = (n // k for n, k in zip(a.shape, f))
        plain = lambda x: x[:cz * f[0], :cy * f[1], :cx * f[2]].reshape(cz, f[0], cy, f[1], cx, f[2]).sum(  # noqa: E731
            axis=(1, 3, 5), dtype=np.float64)
        assert np.array_equal(_block_sum(a, f), plain(a))
        assert np.array_equal(_block_sum(np.multiply(h, a, dtype=np.int32), f), plain(np.where(a, h, 0)))
    assert _next_exponent([(1.5, 1.3)], 1.5) == pytest.approx(1.5 + 0.2 / D_PRIOR_SLOPE)
