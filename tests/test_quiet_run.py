"""Quiet terminal, useful rows: library warnings go to the scan's row and OUT/logs/, worker memory
sized from the machine and a scan's need."""
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from emphy_dask.job.cluster import PAUSE_FRACTION, SCAN_PEAK_BYTES, worker_memory_limit
from emphy_dask.job.config import config_from_dict
from emphy_dask.job.logs import RunLogs
from emphy_dask.pipeline import prepare_scan
from emphy_dask.scan_state import ScanTask
from emphy_dask.synth.dicom_write import write_dicom_series

from .dicom_factory import invalidate_series_number

GiB = 2**30


@pytest.fixture(scope="module")
def odd_series(tmp_path_factory) -> list[Path]:
    """A small CT series whose SeriesNumber is "1.5" (not a valid IS): pydicom warns on every file."""
    folder = tmp_path_factory.mktemp("odd") / "P1" / "study" / "series"
    hu = np.full((12, 48, 48), -1000, np.int16)
    hu[:, 6:42, 6:42] = 40
    write_dicom_series(hu, (2.0, 1.0, 1.0), folder, seed=1, patient_id="P1")
    files = sorted(folder.iterdir())
    invalidate_series_number(files)
    return files


def test_pydicom_warnings_go_into_the_scans_row_once_and_not_to_the_terminal(odd_series, tmp_path, capfd):
    cfg = config_from_dict({"embed": {"backbone": "none"}, "output": {"write_masks": False, "write_qc_png": False}})
    task = ScanTask("P1", "dicom", tuple(str(f) for f in odd_series))
    state = prepare_scan(task, cfg, tmp_path)
    found = state.row["warnings"].split("; ")
    # 12 files x (a warning + the same text logged): two distinct messages, each once, from the ingest stage
    assert found == ["ingest: Invalid value for VR IS: '1.5'. Please see "
                     "<https://dicom.nema.org/medical/dicom/current/output/html/part05.html#table_6.2-1> for allowed "
                     "values for each VR.", 'ingest: Value "1.5" is not valid for elements with a VR of IS']
    assert "1.5" not in capfd.readouterr().err


def test_a_clean_scan_has_no_warnings(tmp_path, shared_data):
    cfg = config_from_dict({"embed": {"backbone": "none"}, "output": {"write_masks": False, "write_qc_png": False}})
    series = sorted((shared_data / "lidc-idri-slabs" / "LIDC-IDRI-0003").rglob("*.dcm"))
    state = prepare_scan(ScanTask("LIDC-IDRI-0003", "dicom", tuple(map(str, series))), cfg, tmp_path)
    assert state.row["status"] in ("ok", "excluded") and state.row.get("warnings") is None


def test_run_logs_take_library_records_off_the_terminal_and_give_them_back(tmp_path, capfd, caplog):
    dist, root = logging.getLogger("distributed.worker.memory"), logging.getLogger("distributed")
    before = (root.handlers[:], root.propagate, root.level)
    with RunLogs(tmp_path / "logs") as logs:
        dist.warning("Worker is at 81% memory usage. Pausing worker.")
        warnings.warn("an odd file", UserWarning)
    assert capfd.readouterr().err == "" and not caplog.records
    text = logs.path.read_text()
    assert "distributed.worker.memory WARNING: Worker is at 81% memory usage" in text and "an odd file" in text
    assert (root.handlers, root.propagate, root.level) == before      # the terminal's own logging is back
    dist.warning("after the run")
    assert [r.getMessage() for r in caplog.records] == ["after the run"]
    assert "after the run" not in logs.path.read_text()


def test_worker_memory_is_sized_from_the_machine_and_a_scans_need():
    limit, warning = worker_memory_limit("auto", 2, total_bytes=24 * GiB)
    assert limit == int(24 * GiB * 0.9 / 2) and warning is None
    assert limit * PAUSE_FRACTION > SCAN_PEAK_BYTES             # the demo's workers never pause
    limit, warning = worker_memory_limit("768MiB", 2, total_bytes=24 * GiB)
    assert limit == 768 * 2**20                                  # the user's own setting is kept ...
    assert warning.startswith("warning: 2 worker(s) with 768.00 MiB each")   # ... and said plainly, once
    assert "--workers" in warning and "\n" not in warning
    limit, warning = worker_memory_limit("auto", 4, total_bytes=8 * GiB)
    assert limit == int(8 * GiB * 0.9 / 4) and "this machine has 8.00 GiB" in warning


def test_memory_limit_is_checked_in_the_job_file():
    from emphy_dask.errors import ConfigError

    assert config_from_dict({"cluster": {"memory_limit": "6GiB"}}).cluster.memory_limit == "6GiB"
    with pytest.raises(ConfigError, match=r"\[cluster\].memory_limit must be \"auto\" or a size"):
        config_from_dict({"cluster": {"memory_limit": "lots"}}, "job.toml")
