"""Kernel harmonisation: the same lungs give the same numbers whatever the reconstruction kernel."""
import dataclasses
import re

import numpy as np
import pytest

from emphy_dask.job.config import ConfigError, JobConfig, config_from_dict
from emphy_dask.preprocess.harmonize import filter_planes, harmonize_kernel, transfer_function
from emphy_dask.preprocess.kernel_estimate import estimate_kernel, reference_nps_log
from emphy_dask.quantify import quantify_path
from emphy_dask.synth.kernels import render_kernel
from emphy_dask.synth.phantom import make_phantom

from .conftest import DX_SHARP, DX_SOFT


def _lung_stats(hu, lung) -> dict:
    v = hu[lung].astype(np.float64)
    return {"laa950": 100 * np.mean(v < -950), "laa910": 100 * np.mean(v < -910),
            "perc15": np.percentile(v, 15), "mld": v.mean()}


# --- the real pair: one acquisition, Philips L (sharp) and B (standard) ---------------------------

@pytest.fixture(scope="module")
def real_pair():
    """``emphy quantify`` on each series, with and without --harmonize (each series segmented itself)."""
    out = {}
    for name, path in (("sharp", DX_SHARP), ("soft", DX_SOFT)):
        table, extras = quantify_path(path, harmonize=True)
        plain, plain_extras = quantify_path(path)
        whole = table[table["region"] == "WholeLung"].set_index("hu_source")
        out[name] = {"raw": whole.loc["raw"], "harmonized": whole.loc["harmonized"], "extras": extras,
                     "plain": plain.set_index("region").loc["WholeLung"], "plain_extras": plain_extras}
    return out


def test_real_pair_agrees_over_the_histogram_after_harmonisation(real_pair):
    s, b = real_pair["sharp"]["harmonized"], real_pair["soft"]["harmonized"]
    assert abs(s["laa950_pct"] - b["laa950_pct"]) < 0.5          # measured 0.08 vs 0.12
    assert abs(s["laa910_pct"] - b["laa910_pct"]) < 2.0          # 4.4 vs 3.9
    assert abs(s["perc15_hu"] - b["perc15_hu"]) < 5.0            # -889 vs -888
    assert abs(s["hu_mean"] - b["hu_mean"]) < 5.0                # -797.7 vs -797.7
    assert real_pair["sharp"]["extras"]["harmonize"]["applied"] is True
    assert real_pair["sharp"]["extras"]["hu_source"] == "harmonized"


def test_real_pair_raw_difference_is_kept_without_harmonize(real_pair):
    s, b = real_pair["sharp"], real_pair["soft"]
    assert s["raw"]["laa950_pct"] - b["raw"]["laa950_pct"] > 10        # 13.2 vs 0.1: the kernel's effect
    for x in (s, b):                                                   # raw rows = plain quantify
        assert x["raw"]["laa950_pct"] == x["plain"]["laa950_pct"] and x["raw"]["hu_mean"] == x["plain"]["hu_mean"]
    assert s["plain_extras"]["harmonize"] is None and s["plain_extras"]["hu_source"] == "raw"
    assert any("--harmonize" in w for w in s["plain_extras"]["warnings"])


def test_soft_series_is_left_as_is(real_pair):
    b = real_pair["soft"]
    assert abs(b["harmonized"]["laa950_pct"] - b["raw"]["laa950_pct"]) < 0.3
    assert b["harmonized"]["hu_mean"] == b["raw"]["hu_mean"]          # standard class: not filtered at all
    assert b["extras"]["harmonize"]["applied"] is False and b["extras"]["kernel_class"] == "standard"


# --- phantoms rendered with two kernels from one noise realisation ---------------------------------

@pytest.fixture(scope="module", params=[(10.0, "centrilobular", 1), (25.0, "panlobular", 4)],
                ids=["centrilobular10", "panlobular25"])
def phantom(request):
    severity, pattern, seed = request.param
    ph = make_phantom((24, 384, 384), (5.0, 0.78, 0.78), severity, pattern, seed, scanner=False)
    assert 8 < ph.truth["laa950_pct"] < 27
    return ph


def _render(ph, kernel, floor_hu, noise_sd_hu=10.0):
    return render_kernel(ph.hu, ph.spacing_zyx_mm, kernel, noise_sd_hu=noise_sd_hu, seed=3,
                         fov_mask_yx=ph.fov_mask_yx, floor_hu=floor_hu)


#: Kernel shapes no table or constant in the code holds, (f_c, p, a, f_b) of ``shaped_mtf``: a
#: lung kernel between GE LUNG and Siemens B70f, and one whose lift starts lower than any
#: vendor model's (MTF 1.2 at 0.2 lp/mm, peak ~1.5).
MADE_UP_SHAPE = (0.6, 2.0, 0.6, 0.3)
STRONG_LOW_LIFT_SHAPE = (0.66, 1.7, 0.8, 0.21)


@pytest.mark.parametrize("kernel", ["siemens_b70f", "ge_lung", MADE_UP_SHAPE], ids=["b70f", "ge_lung", "made_up"])
def test_sharp_kernels_of_any_shape_are_harmonised_to_the_standard(phantom, kernel):
    """Stored from -1024 up, as Philips/Siemens do: the method knows neither the shape nor the
    vendor, and lands within the issue's tolerances of the standard kernel's rendering."""
    lung, fov = phantom.lung_labels > 0, np.broadcast_to(phantom.fov_mask_yx, phantom.hu.shape)
    soft = _lung_stats(_render(phantom, "standard", -1024, 15.0), lung)
    sharp_hu = _render(phantom, kernel, -1024, 15.0)
    harmonized, params = harmonize_kernel(sharp_hu, phantom.spacing_zyx_mm, "sharp", fov_mask=fov)
    raw, harm = _lung_stats(sharp_hu, lung), _lung_stats(harmonized, lung)
    assert raw["laa950"] - soft["laa950"] > 3                         # the sharp kernel's effect
    assert params["applied"] and params["method"] == "nps_ratio" and params["edge_profiles"] > 1000
    assert abs(harm["laa950"] - soft["laa950"]) < 0.5                 # and so never over-corrected
    assert abs(harm["laa910"] - soft["laa910"]) < 2.0
    assert abs(harm["perc15"] - soft["perc15"]) < 5.0 and abs(harm["mld"] - soft["mld"]) < 5.0
    assert params["fav_after_lpmm"] < params["fav_before_lpmm"] - 0.05


def test_a_kernel_lifting_low_frequencies_is_under_not_over_corrected(phantom):
    """The known limit: a lift that starts below 0.2 lp/mm is read 5-10 % short (the fit's level
    and the edge's clipped air side), so the harmonised LAA%-950 ends 0.8-1.2 points high. It
    must still remove most of the kernel's effect and never overshoot the standard."""
    lung, fov = phantom.lung_labels > 0, np.broadcast_to(phantom.fov_mask_yx, phantom.hu.shape)
    soft = _lung_stats(_render(phantom, "standard", -1024, 15.0), lung)
    sharp_hu = _render(phantom, STRONG_LOW_LIFT_SHAPE, -1024, 15.0)
    harmonized, _ = harmonize_kernel(sharp_hu, phantom.spacing_zyx_mm, "sharp", fov_mask=fov)
    raw, harm = _lung_stats(sharp_hu, lung), _lung_stats(harmonized, lung)
    assert 0 < harm["laa950"] - soft["laa950"] < 0.15 * (raw["laa950"] - soft["laa950"])
    assert abs(harm["mld"] - soft["mld"]) < 5.0


def test_the_former_fixed_shape_over_corrects_a_shape_it_was_not_fitted_on():
    """The issue's Siemens case, rendered: B70f-like vs B30f-like, 30 slices of 8 mm. The shipped
    Philips L/B shape (``nps_shape``) over-corrects and lifts MLD; ``nps_ratio`` does not."""
    ph = make_phantom((30, 384, 384), (8.0, 0.78, 0.78), 15.0, "centrilobular", 5, scanner=False)
    lung, fov = ph.lung_labels > 0, np.broadcast_to(ph.fov_mask_yx, ph.hu.shape)
    soft = _lung_stats(_render(ph, "siemens_b30f", -1024, 12.0), lung)
    sharp_hu = _render(ph, "siemens_b70f", -1024, 12.0)
    old, _ = harmonize_kernel(sharp_hu, ph.spacing_zyx_mm, "very_sharp", method="nps_shape", fov_mask=fov)
    new, params = harmonize_kernel(sharp_hu, ph.spacing_zyx_mm, "very_sharp", fov_mask=fov)
    old, new = _lung_stats(old, lung), _lung_stats(new, lung)
    assert soft["laa950"] - old["laa950"] > 2.0 and old["mld"] - soft["mld"] > 5.0     # over-corrected
    assert abs(new["laa950"] - soft["laa950"]) < 0.5 and abs(new["mld"] - soft["mld"]) < 5.0
    assert abs(new["laa910"] - soft["laa910"]) < 2.0


def test_clipped_voxels_are_filled_before_filtering(phantom):
    """A sharp kernel clips part of these lungs at -1024; their expected values below the floor
    go in first, or the filter spreads the clipping's upward bias as denser lung."""
    lung, fov = phantom.lung_labels > 0, np.broadcast_to(phantom.fov_mask_yx, phantom.hu.shape)
    sharp_hu = _render(phantom, "siemens_b70f", -1024, 15.0)
    assert np.mean(sharp_hu[lung] <= -1024) > 0.03
    _, params = harmonize_kernel(sharp_hu, phantom.spacing_zyx_mm, "sharp", fov_mask=fov)
    assert params["clipped_n_clipped"] > 1000 and params["clipped_fill_mean_hu"] < -1030


def test_phantom_kernel_strength_is_recovered_and_standard_left_alone(phantom):
    fov = np.broadcast_to(phantom.fov_mask_yx, phantom.hu.shape)
    very = estimate_kernel(_render(phantom, "very_sharp", -2048, 20.0), phantom.spacing_zyx_mm, fov_mask=fov)
    assert very.kernel_class == "very_sharp" and very.strength == pytest.approx(1.6, abs=0.12)
    std_hu = _render(phantom, "standard", -1024, 20.0)
    out, params = harmonize_kernel(std_hu, phantom.spacing_zyx_mm, "unknown", fov_mask=fov)
    assert out is std_hu and params["kernel_class"] == "standard" and params["kernel_class_source"] == "image"
    assert params["estimate_noise_ratio"] > 1                         # 20 HU: noisier than the reference


def test_unreliable_estimate_leaves_the_scan_as_it_is():
    """A volume cut inside the body (no air-skin edge) or a slab too small for soft-tissue ROIs:
    no transfer is guessed; the scan is returned unchanged with the reason."""
    ph = make_phantom((12, 384, 384), (5.0, 0.78, 0.78), 15.0, "centrilobular", 2, scanner=False)
    hu = _render(ph, "ge_lung", -1024, 15.0)
    inside = np.ascontiguousarray(hu[:, 120:264, 60:324])              # lungs and mediastinum, no skin
    out, params = harmonize_kernel(inside, ph.spacing_zyx_mm, "sharp")
    assert out is inside and not params["applied"] and "air-skin edge" in params["reason"]
    slab = np.ascontiguousarray(hu[5:6, 150:230, 150:230])
    out, params = harmonize_kernel(slab, ph.spacing_zyx_mm, "sharp")
    assert out is slab and "unreliable estimate" in params["reason"] and "ROIs" in params["reason"]


# --- the filter itself ----------------------------------------------------------------------------

def test_transfer_keeps_large_scale_density_and_removes_high_frequencies():
    f = np.linspace(0, 0.8, 81)
    h = transfer_function(f, 1.0)
    assert h[0] == 1.0 and np.all(np.diff(h) < 0) and h[50] < 0.11    # 0.5 lp/mm: ~0.1 (L -> B)
    rng = np.random.default_rng(0)
    vol = np.full((3, 160, 160), -1000, np.int16)
    vol[:, 30:130, 30:130] = -850 + rng.normal(0, 80, (3, 100, 100)).round().astype(np.int16)
    out = filter_planes(vol, (5.0, 0.8, 0.8), 1.0)
    inner = (slice(None), slice(60, 100), slice(60, 100))               # > 24 mm from the square's edge
    assert abs(out[inner].mean() - vol[inner].mean()) < 2.0             # unit gain at f = 0
    assert out[inner].std() < 0.3 * vol[inner].std()                   # white noise mostly removed


def test_transfer_from_a_known_spectrum_and_edge_is_recovered_and_never_amplifies():
    """Pure arithmetic: an NPS made of a known kernel ratio R, dose, soft-tissue texture and the
    reference's shape, with R's edge MTF, gives back T = 1/R; T(0) = 1, T <= 1, non-increasing."""
    from emphy_dask.preprocess.transfer import fit_transfer, reference_edge_log_mtf
    from emphy_dask.synth.kernels import kernel_mtf

    f = (np.arange(32) + 1) * 0.025
    true_r = kernel_mtf(MADE_UP_SHAPE, f) / kernel_mtf("standard", f)
    nps_ref = np.exp(reference_nps_log(f))
    texture = 3.0 * np.exp(reference_nps_log(0.1)) * (f / 0.1) ** -3.0       # = the noise at 0.1 lp/mm
    nps = true_r ** 2 * (3.0 * nps_ref + texture)
    fe = np.arange(12) * 0.0625
    edge = (fe, kernel_mtf(MADE_UP_SHAPE, fe) / kernel_mtf("standard", fe) * np.exp(reference_edge_log_mtf(fe)), 999)
    fit, why = fit_transfer(f, nps, 0.64, edge)
    assert why is None and fit.log_level == pytest.approx(0.5 * np.log(3.0), abs=0.1)
    grid = np.linspace(0, 1.0, 101)
    t = fit.gain(grid)
    assert t[0] == 1.0 and np.all(t <= 1.0) and np.all(np.diff(t) <= 0)
    band = (f >= 0.1) & (f <= 0.6)
    np.testing.assert_allclose(fit.gain(f[band]), 1 / true_r[band], rtol=0.12)
    soft = fit_transfer(f, nps / true_r ** 2 * 0.8, 0.64, (fe, np.exp(reference_edge_log_mtf(fe)) * 0.999, 999))[0]
    assert soft.gain(grid).min() > 0.9                                  # a standard scan: nothing to remove
    assert fit_transfer(f[:5], nps[:5], 0.64)[1].startswith("4 usable NPS rings")       # 0.05-0.125 lp/mm


def test_unknown_method_and_config_section():
    with pytest.raises(ValueError, match="unknown harmonisation method"):
        harmonize_kernel(np.zeros((2, 32, 32), np.int16), (1, 1, 1), "sharp", method="gauss")
    raw_inputs = {"embed": {"hu_source": "raw"}}
    base = config_from_dict(raw_inputs)
    on = config_from_dict({**raw_inputs, "harmonize": {"enabled": True}})
    assert on.harmonize.enabled and on.config_hash != base.config_hash            # it changes results
    assert on.harmonize.method == "nps_ratio"                                     # the default
    # off, and the model inputs raw: the method changes nothing, so not the hash either
    assert config_from_dict({**raw_inputs, "harmonize": {"method": "nps_shape"}}).config_hash == base.config_hash
    assert config_from_dict({"harmonize": {"method": "nps_shape"}}).config_hash == JobConfig().config_hash  # default: raw
    # harmonised model inputs: there the method changes results even with [harmonize] off
    harm_inputs = {"embed": {"hu_source": "harmonized"}}
    assert (config_from_dict({**harm_inputs, "harmonize": {"method": "nps_shape"}}).config_hash
            != config_from_dict(harm_inputs).config_hash)
    assert dataclasses.replace(on, harmonize=dataclasses.replace(on.harmonize, method="nps_ratio")) == on
    old = config_from_dict({**raw_inputs, "harmonize": {"enabled": True, "method": "nps_shape"}})
    assert old.config_hash != on.config_hash
    with pytest.raises(ConfigError, match=r"\[harmonize\].method"):
        config_from_dict({"harmonize": {"enabled": True, "method": "gauss"}}, "job.toml")


# --- the job: [harmonize] on, rows read back with their schemas ----------------------------------

def test_job_rows_carry_kernel_class_both_hu_sources_and_harmonised_label(tmp_path):
    import json
    from pathlib import Path

    from emphy_dask.local import process_scan
    from emphy_dask.scan_state import ScanTask
    from emphy_dask.tables import read_frame, write_part

    cfg = config_from_dict({"harmonize": {"enabled": True}, "qc": {"max_hu": 4000.0}, "embed": {"backbone": "none"},
                            "output": {"write_masks": False, "write_qc_png": False}})
    task = ScanTask("dx-sharp", "dicom", tuple(str(p) for p in sorted(Path(DX_SHARP).glob("*.dcm"))))
    result = process_scan(task, cfg, tmp_path)
    row = result["scans"]
    assert row["status"] == "ok", row["reason"]
    assert (row["kernel"], row["kernel_class"], row["kernel_class_source"]) == ("L", "sharp", "table")
    assert row["harmonize_applied"] is True and row["hu_source"] == "harmonized"
    params = json.loads(row["harmonize_params"])
    assert params["method"] == "nps_ratio" and params["gain_05"] == row["harmonize_gain_05"] < 0.3
    assert row["harmonize_fav_before_lpmm"] > 0.40 and 0.28 < row["harmonize_fav_after_lpmm"] < 0.34
    assert abs(row["harmonize_mld_shift_hu"]) > 5 and "filtered" in row["harmonize_reason"]
    assert row["laa950_pct"] < 0.5 and row["label"] == 0                    # raw: 13.2 %
    write_part("scans", [row], tmp_path, "p")
    write_part("phenotypes", result["phenotypes"], tmp_path, "p")
    scans, pheno = read_frame(tmp_path, "scans"), read_frame(tmp_path, "phenotypes")
    assert scans.loc[0, "kernel_class"] == "sharp" and scans.loc[0, "kernel_strength"] > 0.8
    assert scans.loc[0, "harmonize_mld_shift_hu"] == pytest.approx(row["harmonize_mld_shift_hu"])
    whole = pheno[pheno["region"] == "WholeLung"].set_index("hu_source")
    counts = pheno["hu_source"].value_counts()
    assert set(counts.index) == {"raw", "harmonized"} and counts["raw"] == counts["harmonized"]
    assert whole.loc["raw", "laa950_pct"] > 10 and whole.loc["harmonized", "laa950_pct"] == pytest.approx(
        row["laa950_pct"])


def test_sharp_scan_is_taken_to_its_own_vendors_standard():
    from emphy_dask.io import load_ct
    from emphy_dask.preprocess.harmonize import harmonize_volume
    from emphy_dask.preprocess.transfer import VENDOR_STANDARD_LOG_R

    philips = load_ct(DX_SHARP)
    as_ge = philips.with_hu(philips.hu, meta={**philips.meta, "manufacturer": "GE MEDICAL SYSTEMS", "kernel": "LUNG"})
    _, p_philips = harmonize_volume(philips)
    out, p_ge = harmonize_volume(as_ge)
    assert p_philips["target_log_r"] == [0.0, 0.0, 0.0] and p_ge["target_log_r"] == list(VENDOR_STANDARD_LOG_R["ge"])
    assert p_ge["gain_05"] > p_philips["gain_05"] and p_ge["fav_after_lpmm"] > p_philips["fav_after_lpmm"]
    assert p_ge["applied"] and out.hu.dtype == np.int16 and out.hu.shape == philips.hu.shape


def test_model_inputs_from_harmonised_hu(tmp_path):
    """[embed].hu_source = "harmonized": the backbone's input is cut from the harmonised volume (the
    same array whether [harmonize] made it for the phenotypes or the resample stage made it), its
    fine structure is calmer than the raw sharp kernel's, and the rows say which HU they saw."""
    from pathlib import Path

    from emphy_dask.device_stages import embed_states
    from emphy_dask.embed.weights import resolve_weights
    from emphy_dask.pipeline import prepare_scan
    from emphy_dask.scan_state import ScanTask

    task = ScanTask("dx-sharp", "dicom", tuple(str(p) for p in sorted(Path(DX_SHARP).glob("*.dcm"))))
    base = {"qc": {"max_hu": 4000.0}, "output": {"write_masks": False, "write_qc_png": False},
            "embed": {"weights": "random"}}

    def state(embed=None, harmonize=None):
        cfg = resolve_weights(config_from_dict({**base, "embed": {**base["embed"], **(embed or {})},
                                                "harmonize": harmonize or {}}))
        s = prepare_scan(task, cfg, tmp_path)
        assert s.row["status"] == "ok", s.row.get("reason")
        return cfg, s

    raw_cfg, raw = state({"hu_source": "raw"})
    cfg, harm = state({"hu_source": "harmonized"})
    _, harm_on = state({"hu_source": "harmonized"}, {"enabled": True})
    np.testing.assert_array_equal(harm.model_input.array, harm_on.model_input.array)

    def fine(a):                                   # mean |second difference| in-plane: high frequencies
        a = a.astype(np.float32)
        return float(np.abs(a[:, :, 2:] - 2 * a[:, :, 1:-1] + a[:, :, :-2]).mean())
    assert fine(harm.model_input.array) < 0.8 * fine(raw.model_input.array)

    assert raw_cfg.config_hash == resolve_weights(config_from_dict(base)).config_hash    # raw: the default
    assert cfg.config_hash != raw_cfg.config_hash
    with pytest.raises(ConfigError, match=r"\[embed\].hu_source"):
        config_from_dict({"embed": {"hu_source": "smooth"}})
    rows = embed_states([harm], cfg, tmp_path, "cpu")[0]["embeddings"]
    assert {r["hu_source"] for r in rows} == {"harmonized"} and len(rows) == 4
    assert all(np.isfinite(r["embedding"]).all() for r in rows)


def test_scan_page_shows_the_noise_spectrum_before_and_after(tmp_path):
    """The report's per-scan page lists what harmonisation did to that scan: fav before/after,
    the transfer's gains, the MLD shift and the reason."""
    from emphy_dask.models.fabricate import fabricate_run
    from emphy_dask.report.cohort import load_run
    from emphy_dask.report.scan_pages import scan_page
    from emphy_dask.tables import read_frame

    out = fabricate_run(tmp_path / "run", 6, seed=2, n_featuremaps=0)
    row = read_frame(out, "scans").iloc[0].to_dict()
    row.update(kernel_nps_fav_lpmm=0.4174, harmonize_applied=True, harmonize_fav_before_lpmm=0.4174,
               harmonize_fav_after_lpmm=0.3113, harmonize_gain_03=0.2441, harmonize_gain_05=0.107,
               harmonize_mld_shift_hu=13.8, harmonize_reason="kernel class sharp (table): filtered (nps_ratio)")
    html = scan_page(load_run(out), row, None, out / "report").read_text()
    for field, value in (("harmonize_fav_before_lpmm", "0.417"), ("harmonize_fav_after_lpmm", "0.311"),
                         ("harmonize_gain_05", "0.107"), ("harmonize_mld_shift_hu", "13.8")):
        assert re.search(rf"{field}</td>\s*<td[^>]*>{re.escape(value)}", html), field
    assert "filtered (nps_ratio)" in html
