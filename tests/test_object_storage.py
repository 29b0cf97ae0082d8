"""Object storage without a server: URL handling, IDC manifests, and the run store's crash safety
on an fsspec object store (``memory://``: no rename, like S3)."""
from __future__ import annotations

import json
import uuid

import botocore.exceptions
import pytest

from emphy_dask.errors import ScanError, StorageUnavailable
from emphy_dask.io import storage
from emphy_dask.job.inputs import check_input, parse_url_list
from emphy_dask.job.store import RunStore, clean_out_dir
from emphy_dask.tables import part_ids, read_frame, write_part

from .test_store import result


def test_urls_survive_pathlib_and_joins():
    from pathlib import Path

    url = Path("s3://bucket/run") / "scans" / "part-1.parquet"        # pathlib writes s3:/bucket/...
    assert storage.as_url(url) == "s3://bucket/run/scans/part-1.parquet"
    assert storage.protocol("gs://b/x") == "gs" and storage.protocol("/data/s3:/x") is None
    assert not storage.is_url("relative/dir") and not storage.is_url("C:/x")
    assert storage.join("s3://b/run/", "masks", "a.nii.gz") == "s3://b/run/masks/a.nii.gz"
    assert storage.join("/tmp/run", "masks") == Path("/tmp/run/masks")


def test_secrets_are_redacted_at_any_depth():
    opts = {"s3": {"endpoint_url": "http://x:9000", "key": "AKIA1", "secret": "s3cr3t",
                   "client_kwargs": {"aws_session_token": "tok-9", "region_name": "eu"}}}
    red = storage.redacted(opts)
    assert "s3cr3t" not in json.dumps(red) and "AKIA1" not in json.dumps(red) and "tok-9" not in json.dumps(red)
    assert red["s3"]["endpoint_url"] == "http://x:9000" and red["s3"]["client_kwargs"]["region_name"] == "eu"


def test_unreachable_store_is_told_from_other_faults():
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert storage.unreachable(refused) and storage.unreachable(ConnectionRefusedError())
    wrapped = OSError("read failed")
    wrapped.__cause__ = refused
    assert storage.unreachable(wrapped)
    assert not storage.unreachable(FileNotFoundError("k")) and not storage.unreachable(PermissionError("denied"))
    err = storage.fault("s3:/b/k.dcm", refused)
    assert isinstance(err, StorageUnavailable) and isinstance(err, ScanError)
    assert err.path == "s3://b/k.dcm" and "rerun" in err.reason


def test_idc_manifest_and_url_lists():
    aws = ("# To download the files in this manifest, first install s5cmd\n"
           "# s5cmd --no-sign-request --endpoint-url https://s3.amazonaws.com run manifest.s5cmd\n"
           "cp s3://idc-open-data/6079cc3b-4b0f-41ec-bdbb-c6e754e88229/* .\n\n"
           "cp s3://idc-open-data/a1e77e5c-299f-49ef-a659-f4484e0cedd2/* .\n")
    assert parse_url_list(aws) == [
        ("6079cc3b-4b0f-41ec-bdbb-c6e754e88229", "s3://idc-open-data/6079cc3b-4b0f-41ec-bdbb-c6e754e88229"),
        ("a1e77e5c-299f-49ef-a659-f4484e0cedd2", "s3://idc-open-data/a1e77e5c-299f-49ef-a659-f4484e0cedd2")]
    # IDC's manifests for Google Cloud address GCS through its S3-compatible endpoint: read as gs://
    gcs = ("# s5cmd --no-sign-request --endpoint-url https://storage.googleapis.com run x.s5cmd\n"
           "cp s3://public-datasets-idc/6079cc3b/* .\n")
    assert parse_url_list(gcs) == [("6079cc3b", "gs://public-datasets-idc/6079cc3b")]
    assert parse_url_list("s3://b/series-1/\ngs://c/series-2\n") == [("series-1", "s3://b/series-1"),
                                                                     ("series-2", "gs://c/series-2")]
    with pytest.raises(ValueError, match="not a series URL"):
        parse_url_list("cp /local/folder .\n")


def test_missing_local_input_is_refused_in_one_line(tmp_path):
    with pytest.raises(ScanError, match="input not found"):
        check_input(tmp_path / "nope")


@pytest.fixture
def memory_run():
    url = f"memory://emphy-run-{uuid.uuid4().hex[:8]}"
    yield url
    storage.remove(url, recursive=True)


def test_run_store_on_an_object_store_repairs_and_resumes(memory_run):
    """The disk protocol without rename: a killed run (staged scan, orphan part, a staged file of a
    scan already written) is repaired from the store itself, with no row written twice."""
    out = memory_run
    store = RunStore(out, part_size=2)
    store.add(result("A"))
    store.add(result("B"))                       # flushed as one part, scans/ last
    store.add(result("C"))                       # staged only: the job is "killed" here
    write_part("phenotypes", result("D")["phenotypes"], out, "orphan")   # crash before scans/
    storage.write_bytes(RunStore(out)._staged("A"), json.dumps(result("A")).encode())   # crash before unlink
    assert len(part_ids(out, "scans")) == 1 and len(part_ids(out, "phenotypes")) == 2
    fresh = RunStore(out, part_size=2)
    assert fresh.repair() == {"orphan_parts_removed": 1, "staged_scans_recovered": 1}
    fresh.close()
    for table in ("scans", "phenotypes", "slices"):
        assert read_frame(out, table)["scan_key"].tolist() == ["A", "B", "C"], table
    assert storage.glob(f"{out}/_staging/*") == []
    clean_out_dir(out)                           # --overwrite on a prefix
    assert not part_ids(out, "scans")


def test_overwrite_refuses_a_prefix_that_is_not_a_run(memory_run):
    storage.write_bytes(f"{memory_run}/thesis.docx", b"x")
    with pytest.raises(Exception, match="not an emphy run"):
        clean_out_dir(memory_run)
    assert storage.exists(f"{memory_run}/thesis.docx")


def test_job_file_storage_options_are_checked_and_never_written():
    from emphy_dask.job.config import ConfigError, config_from_dict

    cfg = config_from_dict({"storage": {"s3": {"endpoint_url": "http://h:1", "secret": "planted-7"}}})
    assert cfg.storage["s3"]["secret"] == "planted-7"
    assert "planted-7" not in repr(cfg) and "planted-7" not in json.dumps(cfg.to_dict())
    assert cfg.config_hash == config_from_dict({}).config_hash      # where files are is not a result setting
    with pytest.raises(ConfigError, match="unknown storage protocol"):
        config_from_dict({"storage": {"ftp": {}}})
    with pytest.raises(ConfigError, match=r"one table per protocol"):
        config_from_dict({"storage": {"s3": "x"}})


def test_pseudonyms_scrub_object_store_paths_in_both_spellings():
    """--pseudonymize on a bucket: a message naming a file or the patient prefix (as a URL or as
    pathlib writes it) keeps no real folder name."""
    from emphy_dask.job.pseudonym import Pseudonymizer
    from emphy_dask.scan_state import ScanTask

    from pathlib import Path

    root = Path("s3://archive/lidc")
    files = tuple(str(root / "LIDC-IDRI-0001" / "1.2.3" / "4.5.6" / f"{i}.dcm") for i in range(2))
    pseudo = Pseudonymizer(b"k" * 32, root)
    task = pseudo.task(ScanTask("LIDC-IDRI-0001", "dicom", files))
    assert "LIDC-IDRI-0001" not in task.scan_key
    err = ScanError(files[0], "cannot read DICOM file 0.dcm")
    assert str(err).startswith("s3://archive/lidc/LIDC-IDRI-0001/")
    result = {"scans": {"scan_key": task.scan_key, "reason": str(err)},
              "errors": [{"message": f"{files[1]} and s3://archive/lidc/LIDC-IDRI-0001/1.2.3 failed"}]}
    scrubbed = json.dumps(pseudo.scrub_result(result, task))
    assert "LIDC-IDRI-0001" not in scrubbed and "1.2.3" not in scrubbed and task.scan_key in scrubbed


def test_a_new_scheme_slots_into_the_input_dispatch(monkeypatch):
    """``job.inputs`` is the one INPUT dispatch: a scheme (e.g. ``dicomweb+http://``) adds a handler
    and a check, and both are used for INPUTs that start with it."""
    from emphy_dask.job import inputs
    from emphy_dask.pipeline import ScanTask

    checked = []
    monkeypatch.setitem(inputs.SCHEMES, "fake+http://",
                        lambda src, client, in_flight: ("root", iter([ScanTask("k", "error", error="x")])))
    monkeypatch.setitem(inputs.CHECKS, "fake+http://", checked.append)
    inputs.check_input("fake+http://host/q")
    root, tasks = inputs.iter_input("fake+http://host/q")
    assert checked == ["fake+http://host/q"] and root == "root" and [t.scan_key for t in tasks] == ["k"]
