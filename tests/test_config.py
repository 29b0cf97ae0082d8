"""Job files validate on load, with errors naming the file and the key."""
from pathlib import Path

import pytest
from dataclasses import replace

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
    ("[segment]\nname = \"magic\"\n", r"not a known segmenter \(known: threshold, lungmask\)"),
    ("[segment]\nmodel = \"R999\"\n", r"\[segment\]\.model must be"),
    ("[embed]\nbackbone = \"vgg\"\n", r"\[embed\]\.backbone 'vgg' is not a known backbone"),
    ("[embed]\nprecision = \"fp16\"\n", r"\[embed\]\.precision must be one of bf16, fp32"),
    ("[embed]\nzone_pooling = \"max\"\n", r"zone_pooling must be"),
    ("[embed]\nbatch_size = 0\n", r"batch_size .* must be >= 1"),
])
def test_bad_job_files_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_job(f)
    assert str(f) in str(info.value)


def test_hash_covers_backbone_weights_and_recipe_not_paths_or_batch(tmp_path):
    base = JobConfig()
    with_sha = replace(base, weights_sha256={"embed": "a" * 64})
    assert with_sha.config_hash != base.config_hash
    assert replace(with_sha, weights_sha256={"embed": "b" * 64}).config_hash != with_sha.config_hash
    # where the file lies and how many scans share a forward do not change results
    moved = replace(with_sha, embed=replace(with_sha.embed, weights="/elsewhere/w.pt", batch_size=3))
    assert moved.config_hash == with_sha.config_hash
    for change in ({"backbone": "resnet152"}, {"precision": "fp32"}, {"zone_pooling": "slab"}, {"margin_mm": 5.0}):
        assert replace(with_sha, embed=replace(with_sha.embed, **change)).config_hash != with_sha.config_hash
    # lungmask's model and weights count only when lungmask segments
    assert replace(base, segment=replace(base.segment, model="LTRCLobes")).config_hash == base.config_hash
    lm = replace(base, segment=replace(base.segment, name="lungmask"))
    assert replace(lm, segment=replace(lm.segment, model="LTRCLobes")).config_hash != lm.config_hash


def test_missing_job_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.toml")
