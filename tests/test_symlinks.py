"""The folder walk follows symlinked folders, walks each real folder once, and lists what it passed over."""
import os
from pathlib import Path

import pandas as pd

from emphy_dask.io.dicom_index import find_files
from emphy_dask.job.manifest import build_manifest

from .jobutil import assert_same_tables


def _tree(tmp_path: Path) -> Path:
    """series/ (two files), a second link to it, a link back up (a loop), a dangling link."""
    root = tmp_path / "patient"
    (root / "study" / "series").mkdir(parents=True)
    for name in ("1.dcm", "2.dcm"):
        (root / "study" / "series" / name).write_text("x")
    os.symlink("series", root / "study" / "series-again")
    os.symlink("../..", root / "study" / "series" / "up")
    os.symlink(tmp_path / "no-such-folder", root / "study" / "gone")
    return root


def test_walk_follows_links_walks_each_folder_once_and_says_what_it_passed_over(tmp_path):
    root = _tree(tmp_path)
    skipped = []
    files = find_files(root, skipped)
    assert files == [root / "study" / "series" / "1.dcm", root / "study" / "series" / "2.dcm"]
    why = {Path(p).relative_to(root).as_posix(): reason for p, reason in skipped}
    assert why == {
        "study/series-again": f"same folder as {root / 'study' / 'series'}: walked once",
        "study/series/up": f"symbolic link loop: points to {root}, a folder above it",
        "study/gone": f"dangling symbolic link to {tmp_path / 'no-such-folder'}",
    }
    # a link is followed like a folder when it is the only way in
    os.rename(root / "study" / "series", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "study" / "series")
    assert [f.name for f in find_files(root)] == ["1.dcm", "2.dcm"]


def test_an_unreadable_folder_is_passed_over_with_the_reason(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    real_scandir, locked = os.scandir, str(root / "study" / "series")

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped = []
    assert find_files(root, skipped) == []
    assert (locked, "unreadable folder: Permission denied") in skipped


def test_a_symlinked_cohort_gives_the_same_tables_as_the_real_folders(tmp_path, capsys, shared_data):
    """A study curated as links to patient folders of a read-only archive, with a loop and a dangling
    link beside them: the same tables as the archive's own folders; the two links listed, not scans."""
    from emphy_dask.cli import main

    real = (shared_data / "lidc-idri-slabs").resolve()   # the walk reports real paths
    patients = sorted(p.name for p in real.iterdir() if p.is_dir())
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for p in patients:
        os.symlink(real / p, cohort / p)
    os.symlink(cohort, cohort / "loop")
    os.symlink(tmp_path / "retired-patient", cohort / "gone")
    job = tmp_path / "job.toml"
    job.write_text('[cluster]\nworkers = 1\nmemory_limit = "2GiB"\ndashboard_address = "127.0.0.1:0"\n'
                   '[embed]\nbackbone = "none"\n[output]\nwrite_qc_png = false\n')
    _, real_tasks = build_manifest(real)
    _, link_tasks = build_manifest(cohort)
    assert [t.scan_key for t in real_tasks] == patients
    assert [t for t in link_tasks if t.kind != "skipped"] == [
        t.__class__(t.scan_key, t.kind, tuple(p.replace(str(real), str(cohort)) for p in t.paths), t.selection)
        for t in real_tasks]
    for name, src in (("real", real), ("links", cohort)):
        assert main(["extract", str(src), "-o", str(tmp_path / name), "--job", str(job), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert_same_tables(tmp_path / "real", tmp_path / "links", exact=True)
    assert len(pd.read_parquet(tmp_path / "links" / "scans")) == len(patients)
    manifest = pd.read_parquet(tmp_path / "links" / "manifest.parquet").set_index("scan_key")
    skipped = manifest.loc[manifest["kind"] == "skipped", "error"].to_dict()
    assert skipped == {"gone": f"folder walk: dangling symbolic link to {tmp_path / 'retired-patient'}",
                       "loop": f"folder walk: symbolic link loop: points to {cohort}, a folder above it"}
    assert "passed over by the folder walk: 2, gone: dangling symbolic link" in printed
