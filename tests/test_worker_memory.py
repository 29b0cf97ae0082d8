"""A scan too large for its workers' memory: that scan fails with the reason, the others finish."""
from __future__ import annotations

import numpy as np

from emphy_dask.job.config import load_job
from emphy_dask.job.runner import run_extract
from emphy_dask.tables import read_frame


def test_one_huge_scan_out_of_memory_fails_alone(tmp_path):
    import dask

    from emphy_dask.synth import synth_cohort
    from emphy_dask.synth.dicom_write import write_dicom_series

    synth_cohort(tmp_path / "c", 2, seed=4, size="small")
    # 640 x 512 x 512 (168 M voxels): decoding, QC and segmenting it need ~1 GB beside the worker's
    # own ~0.33 GB; the small scans far less
    hu = np.full((640, 512, 512), -1000, np.int16)
    hu[:, 100:400, 80:430] = 40
    write_dicom_series(hu, (1.0, 0.7, 0.7), tmp_path / "c" / "dicom" / "HUGE" / "study" / "series", seed=9,
                       patient_id="HUGE")
    del hu
    job = tmp_path / "job.toml"
    job.write_text('[cluster]\nworkers = 2\nmemory_limit = "768MiB"\ndashboard_address = "127.0.0.1:0"\n'
                   '[embed]\nbackbone = "none"\n')
    lines = []
    # two worker deaths per attempt instead of four (Dask's default allowed-failures 3): a quicker test
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        summary = run_extract(tmp_path / "c" / "dicom", tmp_path / "out", load_job(job), progress=False,
                              log=lines.append)
    assert summary.exit_code == 0 and summary.counts == {"ok": 2, "failed": 1}
    scans = read_frame(tmp_path / "out", "scans").set_index("scan_key")
    huge = scans.loc["HUGE"]
    assert huge["status"] == "failed" and huge["error_stage"] == "worker"
    assert huge["reason"].startswith("HUGE: 2 worker(s) died running its prepare task, the last time with this scan "
                                     "alone on the cluster (KilledWorker); likely out of memory on this scan "
                                     "(workers' memory limit 0.8 GiB)"), huge["reason"]
    assert (scans.drop(index="HUGE")["status"] == "ok").all()
    errors = read_frame(tmp_path / "out", "errors")
    assert errors["scan_key"].tolist() == ["HUGE"] and errors["error_type"].tolist() == ["KilledWorker"]
    assert any("retrying them one at a time" in str(line) for line in lines)
