"""Crash-safety of the run folder: orphan parts, staged scans, no duplicates."""
import json

import pytest

from emphy_dask.job.store import ConfigMismatch, RunStore, clean_out_dir
from emphy_dask.tables import part_ids, read_frame


def result(key, h="h1"):
    return {"scans": {"scan_key": key, "config_hash": h, "status": "ok"},
            "phenotypes": [{"scan_key": key, "config_hash": h, "region": "WholeLung", "hu_source": "raw",
                            "laa950_pct": 1.0}],
            "slices": [{"scan_key": key, "config_hash": h, "slice_index": 0, "rank_from_superior": 0,
                        "n_lung_voxels": 5, "laa950_pct": 0.0}],
            "errors": []}


def test_parts_hold_many_scans_and_scans_table_marks_done(tmp_path):
    store = RunStore(tmp_path, part_size=3)
    for k in "ABCDE":
        store.add(result(k))
    assert len(part_ids(tmp_path, "scans")) == 1          # A, B, C flushed together
    assert len(list((tmp_path / "_staging").glob("*.json"))) == 2
    store.close()
    assert set(store.done_keys()) == set("ABCDE") and len(part_ids(tmp_path, "scans")) == 2
    assert not (tmp_path / "_staging").exists()
    assert read_frame(tmp_path, "phenotypes")["scan_key"].tolist() == list("ABCDE")


def test_repair_removes_orphans_and_recovers_staged_without_duplicates(tmp_path):
    store = RunStore(tmp_path, part_size=2)
    store.add(result("A"))
    store.add(result("B"))           # flushed: part 1
    store.add(result("C"))           # staged only: "killed" before the next flush
    # a crash after writing phenotypes but before scans leaves an orphan part:
    from emphy_dask.tables import write_part
    write_part("phenotypes", result("D")["phenotypes"], tmp_path, "orphan")
    # and a staged file whose scan was already flushed (crash before unlink):
    fresh_path = RunStore(tmp_path)._staged("A")
    fresh_path.write_text(json.dumps(result("A")))
    fresh = RunStore(tmp_path, part_size=2)
    report = fresh.repair()
    assert report == {"orphan_parts_removed": 1, "staged_scans_recovered": 1}
    fresh.close()
    for table in ("scans", "phenotypes", "slices"):
        keys = read_frame(tmp_path, table)["scan_key"].tolist()
        assert keys == ["A", "B", "C"], table


def test_other_settings_in_same_out_are_refused(tmp_path):
    store = RunStore(tmp_path)
    store.add(result("A", h="old"))
    store.close()
    with pytest.raises(ConfigMismatch, match="other settings"):
        RunStore(tmp_path).check_config("new")


def test_overwrite_refuses_non_run_folders(tmp_path):
    (tmp_path / "thesis.docx").write_text("x")
    with pytest.raises(ConfigMismatch, match="holds files emphy did not write"):
        clean_out_dir(tmp_path)
    assert (tmp_path / "thesis.docx").exists()


def test_artifact_names_never_collide_and_keep_plain_keys():
    from emphy_dask.scan_state import artifact_stem

    import hashlib

    shard = hashlib.sha256(b"LIDC-IDRI-0001").hexdigest()[:2]
    assert artifact_stem("LIDC-IDRI-0001") == f"{shard}/LIDC-IDRI-0001"
    assert artifact_stem("lidc-idri-slabs/LIDC-IDRI-0001").endswith("/lidc-idri-slabs/LIDC-IDRI-0001")
    keys = ["a b", "a_b", "a/b", "a#1", "a#2", "ä", "../x", "a_b-1"]
    stems = [artifact_stem(k) for k in keys]
    assert len(set(stems)) == len(keys)
    assert all(".." not in s.split("/") and not s.startswith("/") for s in stems)


def test_artifact_folders_stay_small_at_archive_scale():
    """100,000 keys of one flat collection: 256 shard folders, none above a few thousand files
    (a mask, two QC pictures and four input pictures per scan)."""
    from collections import Counter

    from emphy_dask.scan_state import artifact_stem

    per_folder = Counter(artifact_stem(f"collection/PATIENT-{i:06d}").rsplit("/", 1)[0] for i in range(100_000))
    assert len(per_folder) == 256
    assert max(per_folder.values()) * 6 < 3000 and min(per_folder.values()) > 300


def test_staging_names_are_distinct_for_keys_that_look_alike(tmp_path):
    store = RunStore(tmp_path, part_size=10)
    for k in ("a b", "a_b", "a/b"):
        store.add(result(k))
    assert len(list((tmp_path / "_staging").glob("*.json"))) == 3
    report = RunStore(tmp_path).repair()                 # crash before the flush: all three recovered
    assert report["staged_scans_recovered"] == 3
    assert sorted(read_frame(tmp_path, "scans")["scan_key"]) == ["a b", "a/b", "a_b"]


def test_staged_results_of_other_settings_are_refused_before_they_are_written(tmp_path):
    store = RunStore(tmp_path, part_size=10)
    store.add(result("A", h="old"))                  # killed before the flush: staged only
    with pytest.raises(ConfigMismatch, match="old"):
        RunStore(tmp_path).check_config("new")
    assert read_frame(tmp_path, "scans").empty
