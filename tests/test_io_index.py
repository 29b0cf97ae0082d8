"""Header indexing, series grouping/selection, kernel table, PHI hygiene."""
from __future__ import annotations

from pathlib import Path

import pytest
from .conftest import DX, DX_SHARP, DX_SOFT, LIDC
from .dicom_factory import make_slice, write_series
from pydicom.uid import generate_uid

from emphy_dask.errors import ScanError
from emphy_dask.io import (PHI_TAGS, PUBLIC_KEYS, find_files, group_series, index_files, index_tree,
                           is_sharp_kernel, load_ct, read_header, scan_metadata, select_series)

PHI = {"PatientName": "DOE^JOHN", "PatientID": "SECRET123", "PatientBirthDate": "19500101",
       "InstitutionName": "ACME HOSPITAL", "ReferringPhysicianName": "DR^WHO",
       "StudyDate": "20200102", "AccessionNumber": "ACC99887"}


def test_find_files_sorted_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for p in ["b/2", "b/1", "a", ".hidden/x", "b/.dot"]:
        (tmp_path / p).write_text("x")
    assert find_files(tmp_path) == [tmp_path / "a", tmp_path / "b" / "1", tmp_path / "b" / "2"]


def test_read_header_real_lidc(shared_data):
    f = find_files(LIDC / "LIDC-IDRI-0001")[0]
    h = read_header(f)
    assert h["modality"] == "CT" and h["has_pixels"] is True
    assert h["kernel"] == "STANDARD" and h["manufacturer"].startswith("GE")
    assert h["rescale_intercept"] == -1024 and h["rescale_slope"] == 1
    assert len(h["position_xyz_mm"]) == 3 and len(h["orientation"]) == 6
    assert h["pixel_spacing_mm"] == pytest.approx([0.703125, 0.703125])
    assert h["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in h.values())


def test_read_header_non_dicom_returns_none(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not DICOM at all\n" * 20)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "rand.bin").write_bytes(bytes(range(256)) * 8)
    assert all(read_header(tmp_path / n) is None for n in ("notes.txt", "empty", "rand.bin"))


def test_no_phi_in_header_or_metadata(tmp_path):
    f = make_slice(tmp_path / "phi.dcm", z_mm=0, series_uid=generate_uid(), study_uid=generate_uid(),
                   for_uid=generate_uid(), phi=PHI)
    h = read_header(f)
    meta = scan_metadata(h, 1, (1.0, 0.5, 0.5))
    for text in (str(h), str(meta)):
        for secret in PHI.values():
            assert secret not in text
    assert set(meta) == set(PUBLIC_KEYS)
    # no output key is (a snake_case spelling of) a PHI keyword
    low = {k.lower() for k in PHI_TAGS}
    assert not {k.replace("_", "") for k in list(h) + list(meta)} & low
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName"} <= PHI_TAGS


def test_index_files_scan_key(shared_data):
    files = find_files(LIDC)
    recs = index_files(files, LIDC)
    assert len(recs) == 16 + 12 + 11  # ATTRIBUTION (not DICOM) skipped
    assert {r["scan_key"] for r in recs} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"}
    # works on any chunk, and a file directly in root gets root's folder name
    one = index_files(files[5:7], LIDC)
    assert [r["path"] for r in one] == [str(f) for f in files[5:7] if read_header(f)]
    direct = index_files([files[1]], files[1].parent)
    assert direct[0]["scan_key"] == files[1].parent.name


def test_group_series_real(shared_data):
    series = group_series(index_files(find_files(DX), DX))
    assert len(series) == 2
    by_kernel = {s.kernel: s for s in series}
    assert set(by_kernel) == {"B", "L"}
    for s in series:
        assert s.n_slices == 64 and s.slice_thickness_mm == 5.0 and not s.is_localizer
        assert s.manufacturer == "Philips" and len(s.files) == 64
    assert Path(by_kernel["B"].files[0]).parent == DX_SOFT
    assert Path(by_kernel["L"].files[0]).parent == DX_SHARP


def test_select_series_lung_dx_tiebreak(shared_data):
    series = group_series(index_files(find_files(DX), DX))
    for order in (series, series[::-1]):  # input order must not matter
        choice = select_series(order)
        assert Path(choice.picked.files[0]).parent.name == "3.000000-5mm-41315"
        assert choice.picked.kernel == "B"
        assert set(choice.multi_kernel_kernels) == {"B", "L"} and choice.multi_kernel_kernels[0] == "B"
        (uid, reason), = choice.not_picked
        assert uid == next(s.series_uid for s in series if s.kernel == "L")
        assert "sharp kernel L" in reason


def test_index_tree_real(shared_data):
    res = index_tree(SHARED := shared_data / "lidc-idri-slabs")
    assert set(res) == {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"}  # ATTRIBUTION ignored
    assert [res[k].picked.n_slices for k in sorted(res)] == [16, 12, 11]
    assert all(c.multi_kernel_kernels == () and c.not_picked == [] for c in res.values())
    dx = index_tree(SHARED.parent / "lung-pet-ct-dx")
    assert set(dx) == {"Lung_Dx-A0001"} and dx["Lung_Dx-A0001"].picked.kernel == "B"


def _ids():
    return dict(study_uid=generate_uid(), for_uid=generate_uid())


def test_localizer_non_ct_non_dicom_ignored(tmp_path):
    ids = _ids()
    scan = tmp_path / "P1"
    write_series(scan / "axial", n=4, **ids)
    make_slice(scan / "loc" / "l1.dcm", z_mm=0, series_uid=generate_uid(), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **ids)
    write_series(scan / "mr", n=6, modality="MR", **ids)  # more slices, but not CT
    (scan / "axial" / "DICOMDIR.txt").write_text("not dicom")
    res = index_tree(tmp_path)
    choice = res["P1"]
    assert choice.picked.n_slices == 4 and choice.picked.modality == "CT"
    reasons = " | ".join(r for _, r in choice.not_picked)
    assert "localizer" in reasons and "not CT (modality MR)" in reasons
    assert load_ct(scan).shape == (4, 8, 8)


def test_most_slices_then_thinner_then_series_number(tmp_path):
    ids = _ids()
    few = write_series(tmp_path / "a", n=3, series_number=1, **ids)
    many = write_series(tmp_path / "b", n=5, series_number=9, **ids)
    thick = write_series(tmp_path / "c", n=5, series_number=3, thickness_mm=3.0, **ids)
    series = group_series(index_files(few + many + thick, tmp_path))
    choice = select_series(series)
    assert choice.picked.files[0] == str(many[0])
    reasons = dict(choice.not_picked)
    assert any("fewer slices (3 < 5)" in r for r in reasons.values())
    assert any("thicker" in r for r in reasons.values())
    # same kernel everywhere -> not a multi-kernel case
    assert choice.multi_kernel_kernels == ()
    # full tie -> lower SeriesNumber wins
    s1 = write_series(tmp_path / "d", n=2, series_number=7, **ids)
    s2 = write_series(tmp_path / "e", n=2, series_number=4, **ids)
    ch = select_series(group_series(index_files(s1 + s2, tmp_path)))
    assert ch.picked.series_number == 4 and "SeriesNumber" in ch.not_picked[0][1]


def test_no_ct_series_error(tmp_path):
    write_series(tmp_path / "P9" / "mr", n=2, modality="MR")
    res = index_tree(tmp_path)
    err = res["P9"]
    assert isinstance(err, ScanError)
    assert "no CT series" in str(err) and "2 files" in str(err) and "MR" in str(err) and "P9" in str(err)
    with pytest.raises(ScanError, match="no CT series"):
        load_ct(tmp_path / "P9")


def test_only_localizer_is_no_ct(tmp_path):
    make_slice(tmp_path / "l.dcm", z_mm=0, series_uid=generate_uid(), image_type=("ORIGINAL", "LOCALIZER"), **_ids())
    with pytest.raises(ScanError, match="no CT series.*localizer"):
        load_ct(tmp_path)


def test_folder_without_dicom_reported(tmp_path):
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "readme.txt").write_text("x")
    write_series(tmp_path / "P2", n=2)
    res = index_tree(tmp_path)
    assert isinstance(res["P1"], ScanError) and "no DICOM files found" in str(res["P1"])
    assert res["P2"].picked.n_slices == 2


@pytest.mark.parametrize("kernel,manufacturer,expected", [
    ("B60f", "SIEMENS", True), ("B70f", "SIEMENS", True), ("Br59f", "Siemens Healthineers", True),
    ("I70f\\3", "SIEMENS", True), ("I70f/3", None, True), ("Bl57d", "SIEMENS", True),
    ("B30f", "SIEMENS", False), ("B31f", "SIEMENS", False), ("B35f", None, False), ("Br40d", "SIEMENS", False),
    ("LUNG", "GE MEDICAL SYSTEMS", True), ("BONE", "GE MEDICAL SYSTEMS", True), ("BONEPLUS", "GE", True),
    ("EDGE", "GE MEDICAL SYSTEMS", True), ("DETAIL", "GE MEDICAL SYSTEMS", True),
    ("STANDARD", "GE MEDICAL SYSTEMS", False), ("SOFT", "GE MEDICAL SYSTEMS", False), ("STANDARD", None, False),
    ("L", "Philips", True), ("D", "Philips", True), ("E", "Philips", True), ("YC", "Philips", True),
    ("A", "Philips", False), ("B", "Philips", False), ("C", "Philips", False),
    ("FC51", "TOSHIBA", True), ("FC86", "CANON_MEC", True), ("FC03", "TOSHIBA", False), ("FC18", "TOSHIBA", False),
    ("FC30", "TOSHIBA", None), ("XYZ", "SIEMENS", None), ("B", "SIEMENS", None), ("", "GE", None), (None, None, None),
])
def test_is_sharp_kernel(kernel, manufacturer, expected):
    assert is_sharp_kernel(kernel, manufacturer) is expected


def test_flat_folder_of_several_patients_is_split_per_patient(tmp_path):
    """A flat PACS export (all files in one folder) must not merge patients into one scan."""
    from emphy_dask.io import index_tree, load_ct

    flat = tmp_path / "export"
    write_series(flat, n=4, names=[f"a{i}.dcm" for i in range(4)], phi={"PatientID": "P-ONE"})
    write_series(flat, n=6, names=[f"b{i}.dcm" for i in range(6)], phi={"PatientID": "P-TWO"})
    out = index_tree(flat)
    assert sorted(out) == ["export#1", "export#2"]
    assert [out[k].picked.n_slices for k in sorted(out)] == [4, 6]
    with pytest.raises(ScanError, match="scan folders with CT|patients"):
        load_ct(flat)


def test_patient_folder_with_two_studies_picks_across_studies(tmp_path):
    from emphy_dask.io import load_ct

    patient = tmp_path / "PAT"
    write_series(patient / "study1" / "s1", n=4, phi={"PatientID": "P-ONE"})
    write_series(patient / "study2" / "s2", n=7, phi={"PatientID": "P-ONE"})
    assert load_ct(patient).shape[0] == 7


def test_reexported_series_in_two_folders_is_not_merged(tmp_path):
    """Same SeriesInstanceUID, same positions, other SOP instances, two folders: two candidates."""
    from emphy_dask.io import index_tree

    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    root = tmp_path / "P"
    write_series(root / "st" / "copyA", n=4, series_uid=uid, study_uid=study, for_uid=frame)
    write_series(root / "st" / "copyB", n=4, series_uid=uid, study_uid=study, for_uid=frame)
    write_series(root / "st" / "other", n=5, study_uid=study, for_uid=frame)
    choice = index_tree(tmp_path)["P"]
    assert choice.picked.n_slices == 5 and len(choice.not_picked) == 2
    # a series merely split across folders (no repeated position) stays one series
    split = tmp_path / "Q" / "st"
    uid2 = generate_uid()
    write_series(split / "part1", n=3, series_uid=uid2, study_uid=study, for_uid=frame)
    write_series(split / "part2", n=3, z0_mm=6.0, series_uid=uid2, study_uid=study, for_uid=frame,
                 names=[f"t{i}.dcm" for i in range(3)])
    assert index_tree(tmp_path)["Q"].picked.n_slices == 6
