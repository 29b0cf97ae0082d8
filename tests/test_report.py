"""fit + report on a real extract run of a synthetic cohort; the report opened in headless Chromium;
the contribution-map identity; the report of a fabricated run (exclusions, discordant labels)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emphy_dask.cli import main
from emphy_dask.models.cam import FeatureMap, contribution_maps, load_featuremap, png_slice, score_from_map
from emphy_dask.models.cohort import load_cohort
from emphy_dask.models.fabricate import fabricate_run
from emphy_dask.models.saved import LinearModel, load_models
from emphy_dask.report import build_report
from emphy_dask.report.browser import PageChecker, find_chromium
from emphy_dask.tables import read_frame

from .jobutil import extract_cmd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """14 synthetic patients (half with emphysema) through extract (ct-i3resnet152 on CPU), fit, report."""
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("real-report")
    synth_cohort(root / "cohort", 14, seed=5, size="small")
    job = root / "job.toml"
    job.write_text((REPO / "jobs" / "demo.toml").read_text().replace('"127.0.0.1:8787"', '"127.0.0.1:0"'))
    run = root / "run"
    proc = subprocess.run(extract_cmd(root / "cohort" / "dicom", run, "--job", str(job)), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the 3D backbone's whole-lung embedding (the middle zone alone is noisier on 14 scans)
    assert main(["fit", str(run), "--features", "whole", "--bootstrap", "200"]) == 0
    assert main(["report", str(run)]) == 0
    return run


def test_fit_on_a_real_run_finds_the_density_signal(real_run):
    m = json.loads((real_run / "model" / "metrics.json").read_text())
    assert m["cohort"]["positive"] == 7 and m["cohort"]["negative"] == 7
    assert m["nested_cv"]["auc"] >= 0.8, m["nested_cv"]["auc"]          # measured 0.96 (honest, 5 x 5 folds)
    assert m["paper_protocol"]["auc"] >= m["nested_cv"]["auc"]
    assert m["features"]["backbone"] == "ct-i3resnet152" and m["features"]["zones"] == ["whole"]


def test_contribution_maps_sum_to_score_minus_bias_on_a_real_run(real_run):
    models, run = load_models(real_run / "model")
    model = models["paper"]
    c = load_cohort(real_run, run["zones"])
    scans = read_frame(real_run, "scans").set_index("scan_key")
    for i, key in enumerate(c.keys[:4]):
        fm = load_featuremap(real_run / scans.at[key, "featuremap_path"])
        maps, bias = contribution_maps(fm, model)
        total = sum(float(m.sum()) for m in maps.values())
        # exact on the stored map (float64 arithmetic) ...
        assert total + bias == pytest.approx(score_from_map(fm, model), rel=1e-12, abs=1e-12)
        # ... and equal to the table's embedding score up to the float16 storage of layer4
        table_score = float(model.score(c.X[i:i + 1], c.feature_names)[0])
        assert total + bias == pytest.approx(table_score, abs=0.02 * (1 + abs(table_score)))
        np.testing.assert_allclose(fm.embedding("whole"), c.X[i], rtol=2e-3, atol=2e-3)
        assert png_slice(fm, "whole", maps["whole"]).shape == (224, 224)


def _linear(features, rng) -> LinearModel:
    k = len(features)
    return LinearModel("logistic", "embedding", "label", features, rng.normal(size=k).tolist(),
                       rng.uniform(0.5, 2, k).tolist(), rng.normal(size=k).tolist(), 0.3)


def test_contribution_map_identity_to_float_precision_both_layouts():
    rng = np.random.default_rng(0)
    # 3D: layer4 (C, D, H, W), zone weights over positions summing to 1 per zone
    C = 64
    zw = rng.random((4, 10, 7, 7))
    zw[1, :5] = 0                                            # a zone covering half the depth rows
    zw /= zw.sum(axis=(1, 2, 3), keepdims=True)
    fm = FeatureMap(rng.normal(size=(C, 10, 7, 7)), ["whole", "upper", "middle", "lower"], zw,
                    {"input_size": [160, 224, 224], "png_depth": {"whole": 80, "upper": 120, "middle": 70, "lower": 20}})
    model = _linear([f"upper:{c:04d}" for c in (1, 5, 9)] + [f"middle:{c:04d}" for c in (2, 5)], rng)
    maps, bias = contribution_maps(fm, model)
    emb = {z: np.einsum("cdhw,dhw->c", fm.layer4, zw[i]) for i, z in enumerate(fm.zones)}
    x = np.concatenate([emb[z] for z in fm.zones])[None]
    names = [f"{z}:{c:04d}" for z in fm.zones for c in range(C)]
    score = float(model.score(x, names)[0])
    assert sum(m.sum() for m in maps.values()) + bias == pytest.approx(score, rel=1e-13, abs=1e-13)
    assert np.all(maps["upper"][:5] == 0)                    # no contribution outside the zone's rows
    # 2.5D (resnet152): one (C, 7, 7) map per zone, global average
    fm2 = FeatureMap(rng.normal(size=(3, C, 7, 7)), ["upper", "middle", "lower"], None, {})
    maps2, bias2 = contribution_maps(fm2, model)
    emb2 = {z: fm2.layer4[i].mean(axis=(1, 2)) for i, z in enumerate(fm2.zones)}
    names2 = [f"{z}:{c:04d}" for z in fm2.zones for c in range(C)]
    score2 = float(model.score(np.concatenate([emb2[z] for z in fm2.zones])[None], names2)[0])
    assert sum(m.sum() for m in maps2.values()) + bias2 == pytest.approx(score2, rel=1e-13, abs=1e-13)


def test_report_pages_and_files(real_run):
    report = real_run / "report"
    index = (report / "index.html").read_text()
    scans = read_frame(real_run, "scans")
    pages = sorted((report / "scans").rglob("*.html"))
    assert len(pages) == len(scans) == 14
    for key in scans["scan_key"]:
        assert f">{key}</a>" in index
    for needle in ("paper protocol: OPTIMISTIC", "honest", "Top 10 LAA%-950", "Discordant labels",
                   "circularity check", "Most confident positives", "Misclassified",
                   "On real anatomy with inserted emphysema"):
        assert needle in index, needle
    assert "http://" not in index and "https://" not in index and "<script" not in index
    # every image a page names exists on disk; the scan pages show maps of the model
    for p in [report / "index.html", *pages]:
        for src in re.findall(r'<img src="([^"]+)"', p.read_text()):
            assert (p.parent / src).resolve().is_file(), (p, src)
    assert len(list((report / "maps").rglob("*_cam_whole.jpg"))) == 14
    page = pages[0].read_text()
    assert "score = bias" in page and "model input" in page and "Zone values" in page


def test_report_single_scan_redraws_one_page(real_run, capsys):
    key = read_frame(real_run, "scans")["scan_key"][3]
    page = next((real_run / "report" / "scans").rglob(f"{key}.html"))
    page.unlink()
    assert main(["report", str(real_run), "--scan", key]) == 0
    assert page.exists() and str(page.resolve()) in capsys.readouterr().out
    assert main(["report", str(real_run), "--scan", "NO-SUCH-SCAN"]) == 2


def test_report_opens_in_headless_chromium(real_run, tmp_path):
    browser, driver, why = find_chromium()
    if why:
        pytest.fail(f"chromium cannot be used here ({why}): install Debian's chromium and chromium-driver "
                    f"(.ci/run does when it can); the report is only checked in a real browser")
    report = real_run / "report"
    pages = [report / "index.html", *sorted((report / "scans").rglob("*.html"))]
    with PageChecker() as pc:
        for i, page in enumerate(pages):
            res = pc.check(page, tmp_path / f"shot{i:02d}.png")
            assert res["errors"] == [], (page, res["errors"])
            assert res["broken"] == [], (page, res["broken"])
            assert res["images"] >= (10 if i == 0 else 5), (page, res["images"])
            assert Path(res["screenshot"]).stat().st_size > 10_000
            assert all(h.startswith("file://") for h in res["links"]), page    # nothing from the network


def test_report_of_a_fabricated_run_shows_exclusions_and_discordant_labels(tmp_path):
    out = fabricate_run(tmp_path / "run", 30, seed=6, signal=1.0, n_excluded=5, n_featuremaps=2, discordant_every=4)
    # no model yet: the report still draws the cohort and says how to get a model
    index = build_report(out).read_text()
    assert "run <code>emphy fit OUT</code>" in index and "max_hu&gt;1600" in index
    assert "exclude scanners and kernels at different rates" in index
    n_disc = int(re.search(r"LAA%-950 &ge; 6 % but label 0: (\d+)", index).group(1))
    scans = read_frame(out, "scans")
    ok = scans[scans["status"] == "ok"]
    assert n_disc == int(((ok["laa950_pct"] >= 6) & (ok["label"] == 0)).sum()) and n_disc > 0
    assert len(list((out / "report" / "scans").rglob("*.html"))) == 35


def test_real_anatomy_note_quotes_the_record_the_benchmark_writes(tmp_path):
    import sys
    from pathlib import Path

    from emphy_dask.report.evidence import RECORD_KEYS, real_anatomy_note, recorded_benchmark

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_anatomy import record_of

    shipped = recorded_benchmark()
    note = real_anatomy_note()
    for needle in (f"{shipped['n_scans']} scans", f"AUC {shipped['auc_label']:.3f}",
                   f"R&sup2; {shipped['r2_laa950']:.2f}", f"input recipe {shipped['recipe']}"):
        assert needle in note, needle
    res = {"n_model": 12, "n_groups": 3, "recipe": "lung", "hu_source": "raw",
           "embeddings": {"r2": 0.5, "shuffled_r2": -0.1, "auc": 0.81234, "shuffled_auc": 0.4},
           "pattern_embeddings": {"accuracy": 0.9, "shuffled_accuracy": 0.2},
           "pattern_phenotypes": {"accuracy": 0.7}, "laa_vs_truth": [{"max_abs": 0.1}, {"max_abs": 0.3}]}
    rec = record_of(res, "2026-01-02")
    assert set(rec) == set(RECORD_KEYS)                    # what the benchmark writes, the report reads
    assert "AUC 0.812" in real_anatomy_note(rec) and "0.30 points" in real_anatomy_note(rec)
    partial = tmp_path / "real_anatomy.json"
    partial.write_text(json.dumps({k: v for k, v in rec.items() if k != "recipe"}))
    with pytest.raises(ValueError, match="lacks recipe: rewrite it with benchmarks/real_anatomy.py --record"):
        recorded_benchmark(partial)
