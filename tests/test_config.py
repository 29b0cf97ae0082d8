"""Job files validate on load, with errors naming the file and the key."""
from pathlib import Path

import pytest

from emphy_dask.job.config import ConfigError, JobConfig, load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", ["demo.toml", "lidc-idri.toml"])
def test_shipped_jobs_load(name):
    cfg = load_job(JOBS / name)
    assert cfg.qc.max_hu == 1600 and cfg.qc.max_std_hu == 600
    assert (cfg.label.laa950_min_pct, cfg.label.mld_max_hu) == (6.0, -850.0)
    assert cfg.resample.spacing_mm == (1.0, 1.0, 1.0)


def test_paper_defaults_and_hash_tracks_result_settings_only(tmp_path):
    base = JobConfig()
    f = tmp_path / "a.toml"
    f.write_text("[cluster]\nworkers = 7\n[output]\npart_size = 3\n")
    assert load_job(f).config_hash == base.config_hash
    f.write_text("[qc]\nmax_hu = 2000\n")
    assert load_job(f).config_hash != base.config_hash


@pytest.mark.parametrize("text, match", [
    ("[qc]\nmax_hux = 1\n", r"unknown key \[qc\]\.max_hux"),
    ("[qcc]\n", r"unknown section or key 'qcc'"),
    ("[qc]\nmax_hu = 'high'\n", r"\[qc\]\.max_hu must be float"),
    ("[resample]\nspacing_mm = [1, 1]\n", r"spacing_mm must be a list of 3 positive numbers"),
    ("[cluster]\nworkers = 0\n", r"workers .* must be >= 1"),
    ("[cluster]\ngpu_workers = \"many\"\n", r"gpu_workers must be"),
    ("[qc\n", r"not valid TOML"),
    ("[segment]\nname = \"magic\"\n", r"not a known segmenter \(known: threshold\)"),
])
def test_bad_job_files_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_job(f)
    assert str(f) in str(info.value)


def test_missing_job_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.toml")
