"""The streamed manifest (one unit per top-level folder, on workers) equals indexing the whole tree at once."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from emphy_dask.io import find_files, index_files
from emphy_dask.job.manifest import (ManifestWriter, _image_key, _image_task, _is_image, build_manifest,
                                     iter_manifest_file, tasks_from_index, unique_keys)
from emphy_dask.io.image_io import label_image_reason
from emphy_dask.job.fingerprint import with_fingerprints

from .broken_archive import make_broken_archive
from .dicom_factory import write_series


def whole_tree_tasks(root):
    """The manifest as it was built before streaming: every file and header of the tree at once."""
    root = root.resolve()
    files = find_files(root)
    images = [f for f in files if _is_image(f)]
    dicom = [f for f in files if not _is_image(f)]
    tasks = tasks_from_index(dicom, index_files(dicom, root), root)
    tasks += [_image_task(_image_key(f, root), f, label_image_reason(f)) for f in images]
    return with_fingerprints(unique_keys(tasks), root)     # the streamed ones carry the same fingerprints


def as_set(tasks):
    return sorted((t.scan_key, t.kind, t.paths, t.error, t.error_path, tuple(sorted((k, v) for k, v in t.selection.items() if v is not None)))
                  for t in tasks)


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """Layouts side by side: patient/study/series, a collection folder of patients (with a README and an
    empty patient), a shallow patient/series, a flat two-patient export, empty top-level folders, a
    series dropped in a patient's root, image files (CT and label map) colliding with folder keys."""
    root = tmp_path_factory.mktemp("mixed")
    write_series(root / "P1" / "study" / "series", n=4)
    write_series(root / "P1" / "study" / "thick", n=2, step_mm=5.0)
    write_series(root / "coll" / "P2" / "study" / "series", n=3)
    write_series(root / "coll" / "P3" / "study" / "series", n=3, modality="MR")
    (root / "coll" / "README.txt").write_text("collection notes")
    (root / "coll" / "P-empty" / "study").mkdir(parents=True)
    write_series(root / "shallow" / "series", n=3)
    write_series(root / "flat", n=3, phi={"PatientID": "A"}, names=[f"a{i}.dcm" for i in range(3)])
    write_series(root / "flat", n=3, phi={"PatientID": "B"}, names=[f"b{i}.dcm" for i in range(3)])
    (root / "empty" / "x").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("not dicom")
    ct = sitk.GetImageFromArray(np.full((4, 8, 8), -1000, np.int16))
    sitk.WriteImage(ct, str(root / "P1.nii.gz"))                 # same key as the folder P1
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 8, 8), np.uint8)), str(root / "coll" / "P2-mask.nii.gz"))
    (root / "README.md").write_text("archive")
    return root


def test_streamed_manifest_equals_whole_tree_indexing(mixed_tree):
    root, streamed = build_manifest(mixed_tree)
    assert as_set(streamed) == as_set(whole_tree_tasks(mixed_tree))
    keys = {t.scan_key: t for t in streamed}
    assert keys["P1"].kind == "dicom" and keys["P1~2"].kind == "image"        # the folder keeps the key
    assert keys["empty"].error == "empty folder: no files at all"
    assert keys["coll/P-empty"].error == "empty folder: no files at all"
    assert keys["coll/P2-mask"].kind == "skipped"
    assert {"flat#1", "flat#2"} <= set(keys) and keys["docs"].kind == "error"
    assert len(keys) == len(streamed)


def test_streamed_manifest_on_the_broken_corpus_and_a_cluster(tmp_path):
    """The held-out style corpus (every broken case) through workers gives the whole-tree answer."""
    from distributed import Client, LocalCluster

    from emphy_dask.synth import synth_cohort

    synth_cohort(tmp_path / "clean", 2, seed=3, size="small")
    make_broken_archive(tmp_path / "archive", tmp_path / "clean" / "dicom")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        root, streamed = build_manifest(tmp_path / "archive", client)
    assert as_set(streamed) == as_set(whole_tree_tasks(tmp_path / "archive"))


def test_manifest_written_in_batches_reads_back_lazily(mixed_tree, tmp_path):
    root, tasks = build_manifest(mixed_tree)
    w = ManifestWriter(tmp_path / "manifest.parquet", root, batch_rows=3)
    for t in tasks:
        w.add(t)
    assert not (tmp_path / "manifest.parquet").exists()          # appears only once complete
    w.close()
    assert pq.ParquetFile(tmp_path / "manifest.parquet").metadata.num_row_groups == -(-len(tasks) // 3)
    assert as_set(iter_manifest_file(tmp_path / "manifest.parquet")) == as_set(tasks)
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_unit_that_cannot_be_indexed_becomes_an_error_row(mixed_tree, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    shutil.copytree(mixed_tree, root)
    import emphy_dask.job.manifest as manifest

    real = manifest.index_unit

    def broken(unit, root):
        if unit.endswith("shallow"):
            raise OSError("I/O error reading the disk")
        return real(unit, root)

    monkeypatch.setattr(manifest, "index_unit", broken)
    _, tasks = build_manifest(root)
    bad = {t.scan_key: t for t in tasks}["shallow"]
    assert bad.kind == "error" and "I/O error" in bad.error and "P1" in {t.scan_key for t in tasks}
