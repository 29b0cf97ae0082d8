"""Phenotype stage: every metric against hand-computed or reference values."""
import math

import numpy as np
import pytest
from scipy import stats

from emphy_dask.phenotypes import (
    PHENOTYPE_COLUMNS,
    REGIONS,
    LabelRule,
    emphysema_label,
    laa_cluster_exponent_d,
    laa_per_slice,
    metrics_from_values,
    parenchyma_phenotypes,
    power_law_exponent,
    region_masks,
    schneider_density_g_ml,
    slice_thirds,
)

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def lung_of(values, shape=(10, 10, 10)):
    """HU volume whose first len(values) voxels (C order) are lung with these HU."""
    values = np.asarray(values)
    hu = np.full(int(np.prod(shape)), 0, np.int16)
    lab = np.zeros(hu.size, np.uint8)
    hu[: values.size] = values
    lab[: values.size] = 1
    return hu.reshape(shape), lab.reshape(shape)


def whole(rows):
    assert [r["region"] for r in rows] == list(REGIONS)
    return rows[0]


# --- exact hand-built values ------------------------------------------------

def test_laa950_six_percent_and_label():
    hu, lab = lung_of([-980] * 60 + [-860] * 940)
    m = whole(parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE))
    assert m["n_voxels"] == 1000
    assert m["laa950_pct"] == 6.0
    assert m["laa925_pct"] == 6.0 and m["laa910_pct"] == 6.0
    assert m["laa856_pct"] == 100.0
    assert m["haa700_pct"] == 0.0
    assert m["hu_mean"] == pytest.approx(-867.2, abs=1e-9)
    assert emphysema_label(m["laa950_pct"], m["hu_mean"]) == 1


def test_thresholds_are_strict():
    # -951 counts for LAA950, -950 does not; -699 counts for HAA700, -700 does not.
    vals = [-951] * 30 + [-950] * 20 + [-926] * 10 + [-925] * 10 + [-700] * 5 + [-699] * 25
    hu, lab = lung_of(vals)
    m = whole(parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE))
    n = len(vals)
    assert m["laa950_pct"] == pytest.approx(100 * 30 / n)
    assert m["laa925_pct"] == pytest.approx(100 * 60 / n)   # -951, -950, -926
    assert m["haa700_pct"] == pytest.approx(100 * 25 / n)


def test_percentiles_linear_interpolation():
    hu, lab = lung_of(np.arange(-1000, -900))               # 100 distinct values
    m = whole(parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE))
    assert m["perc10_hu"] == pytest.approx(-990.1, abs=1e-9)
    assert m["perc15_hu"] == pytest.approx(-985.15, abs=1e-9)
    assert m["hu_median"] == pytest.approx(-950.5, abs=1e-9)
    assert m["laa950_pct"] == 50.0


def test_volume_and_mass_anisotropic():
    spacing = (2.5, 0.6, 0.8)                                # 1.2 mm^3 per voxel
    hu, lab = lung_of([-900] * 500 + [-800] * 500)
    m = whole(parenchyma_phenotypes(hu, lab, spacing, EYE))
    assert m["volume_l"] == pytest.approx(1000 * 1.2 / 1e6, rel=1e-12)
    # 1.2 ml of lung at mean -850 HU -> 0.15 g/ml -> 0.18 g
    assert m["mass_g"] == pytest.approx(1.2 * 0.15, rel=1e-12)
    dens = schneider_density_g_ml(np.array([-900.0, -800.0]))
    assert m["mass_schneider_g"] == pytest.approx(500 * 1.2e-3 * dens.sum(), rel=1e-12)


def test_schneider_curve_points():
    m = (1.21e-3 - 0.93) / (-1000 + 98)
    got = schneider_density_g_ml([-1200, -1000, -500, 0, 50, 200])
    want = [1.21e-3, 1.21e-3, 1.21e-3 + 500 * m, 1.018, 1.003 + 1.169 * 0.05, 1.017 + 0.592 * 0.2]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the air-to-soft-tissue line reaches 0.93 g/ml at -98 HU
    assert schneider_density_g_ml([-98.0001])[0] == pytest.approx(0.93, abs=1e-6)


def test_empty_lung_gives_nan_rows():
    hu = np.zeros((4, 4, 4), np.int16)
    rows = parenchyma_phenotypes(hu, np.zeros_like(hu, dtype=np.uint8), (1, 1, 1), EYE)
    for r in rows:
        assert r["n_voxels"] == 0
        assert all(math.isnan(r[c]) for c in PHENOTYPE_COLUMNS if c != "n_voxels")


# --- against straightforward reference computations --------------------------

def random_case(seed=0, shape=(30, 40, 50)):
    rng = np.random.default_rng(seed)
    hu = np.clip(rng.normal(-840, 90, shape), -1024, 400).round().astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.indices(shape)
    inside = ((yy - 20) ** 2 / 15 ** 2 + (zz - 15) ** 2 / 13 ** 2) < 1
    lab[inside & (xx < 24) & (xx > 3)] = 1
    lab[inside & (xx > 26) & (xx < 47)] = 2
    return hu, lab


def cli_rule_reference(x, p, min_bin=-1024, max_bin=1024):
    """GenerateParenchymaPhenotypes' loop, literally: walk the integer bins, keep the last one
    whose cumulative fraction is <= p."""
    counts = {int(v): int(c) for v, c in zip(*np.unique(x, return_counts=True))}
    n, cum, found = len(x), 0, None
    for i in range(min_bin, max_bin + 1):
        cum += counts.get(i, 0)
        if cum / n <= p:
            found = i
    return found


def reference_metrics(x, voxel_mm3):
    x = x.astype(np.float64)
    return {
        "n_voxels": x.size,
        "laa950_pct": 100 * np.mean(x < -950), "laa925_pct": 100 * np.mean(x < -925),
        "laa910_pct": 100 * np.mean(x < -910), "laa905_pct": 100 * np.mean(x < -905),
        "laa900_pct": 100 * np.mean(x < -900), "laa875_pct": 100 * np.mean(x < -875),
        "laa856_pct": 100 * np.mean(x < -856),
        "haa700_pct": 100 * np.mean(x > -700), "haa600_pct": 100 * np.mean(x > -600),
        "haa250_pct": 100 * np.mean(x > -250), "haa0_pct": 100 * np.mean(x > 0),
        "perc10_hu": np.percentile(x, 10), "perc15_hu": np.percentile(x, 15),
        "perc10_cli_hu": cli_rule_reference(x, 0.10), "perc15_cli_hu": cli_rule_reference(x, 0.15),
        "hu_mean": np.mean(x), "hu_std": np.std(x), "hu_median": np.median(x),
        "hu_median_cli": cli_rule_reference(x, 0.5), "hu_mode": stats.mode(x, keepdims=False).mode,
        "hu_skewness": stats.skew(x, bias=True), "hu_kurtosis": stats.kurtosis(x, fisher=True, bias=False),
        "hu_kurtosis_pearson": stats.kurtosis(x, fisher=False, bias=True),
        "volume_l": x.size * voxel_mm3 / 1e6,
        "mass_g": x.size * voxel_mm3 / 1000 * (np.mean(x) + 1000) / 1000,
        "mass_schneider_g": voxel_mm3 / 1000 * schneider_density_g_ml(x).sum(),
    }


@pytest.mark.parametrize("as_float", [False, True])
def test_all_regions_match_reference(as_float):
    hu, lab = random_case()
    spacing = (1.25, 0.7, 0.65)
    voxel = 1.25 * 0.7 * 0.65
    rows = parenchyma_phenotypes(hu.astype(np.float32) if as_float else hu, lab, spacing, EYE)
    masks = region_masks(lab, EYE)
    assert [r["region"] for r in rows] == list(REGIONS) == list(masks)
    for row in rows:
        ref = reference_metrics(hu[masks[row["region"]]], voxel)
        assert row["n_voxels"] == ref["n_voxels"] > 0
        for col in PHENOTYPE_COLUMNS:
            assert row[col] == pytest.approx(ref[col], rel=1e-9, abs=1e-9), (row["region"], col)


def test_histogram_and_value_paths_agree():
    hu, lab = random_case(seed=3)
    fast = parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE)[0]
    slow = metrics_from_values(hu[lab > 0], 1.0)
    for col in PHENOTYPE_COLUMNS:
        assert fast[col] == pytest.approx(slow[col], rel=1e-10, abs=1e-10), col


# --- regions -------------------------------------------------------------------

def test_thirds_split_voxels_and_upper_is_superior():
    _, lab = random_case()
    # EYE: larger z index = more superior (+S), so the upper third has the largest z.
    masks = region_masks(lab, EYE)
    n = masks["WholeLung"].sum()
    counts = [masks[t].sum() for t in ("UpperThird", "MiddleThird", "LowerThird")]
    assert sum(counts) == n
    for c in counts:
        assert abs(c - n / 3) <= 0.06 * n                   # whole slices: ~1/3 each
    z = np.indices(lab.shape)[0]
    assert z[masks["UpperThird"]].min() > z[masks["MiddleThird"]].max()
    assert z[masks["MiddleThird"]].min() > z[masks["LowerThird"]].max()
    # thirds are shared by both lungs: the same slices in right and left
    zr = np.unique(z[masks["UpperThird"] & (lab == 1)])
    zl = np.unique(z[masks["UpperThird"] & (lab == 2)])
    assert set(zr) == set(zl)


def test_thirds_follow_anatomy_not_array_order():
    hu, lab = random_case()
    lab[:5] = 0                                              # asymmetric in z
    a = region_masks(lab, EYE)
    b = region_masks(lab[::-1], FLIP_Z)                      # same patient, z stored the other way
    for name in REGIONS:
        np.testing.assert_array_equal(a[name], b[name][::-1])
    ra = parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE)
    rb = parenchyma_phenotypes(hu[::-1], lab[::-1], (1, 1, 1), FLIP_Z)
    for x, y in zip(ra, rb):
        for col in PHENOTYPE_COLUMNS:
            assert x[col] == pytest.approx(y[col], nan_ok=True)


def test_thirds_on_non_z_axis():
    # array axis 1 (y) points +S (head), e.g. a coronal acquisition
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)  # columns: x->L, y->S, z->-P
    _, third = slice_thirds(np.ones((4, 9, 5), np.uint8), direction)
    np.testing.assert_array_equal(third, [2, 2, 2, 1, 1, 1, 0, 0, 0])


def test_sides_from_labels():
    hu, lab = random_case()
    rows = {r["region"]: r for r in parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE)}
    assert rows["RightLung"]["n_voxels"] == np.count_nonzero(lab == 1)
    assert rows["LeftLung"]["n_voxels"] == np.count_nonzero(lab == 2)
    assert rows["RightLung"]["n_voxels"] + rows["LeftLung"]["n_voxels"] == rows["WholeLung"]["n_voxels"]


@pytest.mark.parametrize("value", [1, 7, 255])
def test_binary_mask_is_split_into_the_same_sides(value):
    hu, lab = random_case()
    binary = np.where(lab > 0, value, 0).astype(np.uint8)
    with_sides = {r["region"]: r for r in parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE)}
    rows = {r["region"]: r for r in parenchyma_phenotypes(hu, binary, (1, 1, 1), EYE)}
    assert list(rows) == list(REGIONS)
    for name in REGIONS:
        for col in PHENOTYPE_COLUMNS:
            assert rows[name][col] == pytest.approx(with_sides[name][col]), (name, col)


def test_one_lung_binary_mask_has_no_sides():
    hu, lab = random_case()
    one = (lab == 2).astype(np.uint8)
    rows = {r["region"]: r for r in parenchyma_phenotypes(hu, one, (1, 1, 1), EYE)}
    assert rows["WholeLung"]["n_voxels"] == np.count_nonzero(lab == 2)
    for name in ("RightLung", "LeftLung", "LeftUpperThird"):
        assert rows[name]["n_voxels"] == 0 and math.isnan(rows[name]["laa950_pct"])
    assert rows["UpperThird"]["n_voxels"] > 0


# --- slice curve ------------------------------------------------------------------

def test_laa_per_slice_consistent_with_whole_lung():
    hu, lab = random_case()
    curve = laa_per_slice(hu, lab, EYE, spacing_zyx_mm=(2.0, 1, 1))
    whole_row = parenchyma_phenotypes(hu, lab, (1, 1, 1), EYE)[0]
    assert curve["n_laa_voxels"].sum() == round(whole_row["laa950_pct"] * whole_row["n_voxels"] / 100)
    assert curve["n_lung_voxels"].sum() == whole_row["n_voxels"]
    # superior first: EYE -> descending z index
    np.testing.assert_array_equal(curve["slice_index"], np.arange(hu.shape[0])[::-1])
    np.testing.assert_array_equal(curve["depth_mm"], 2.0 * np.arange(hu.shape[0]))
    empty = curve["n_lung_voxels"] == 0
    assert empty.any() and np.isnan(curve["laa_pct"][empty]).all()
    k = np.flatnonzero(~empty)[0]
    z = curve["slice_index"][k]
    sl = hu[z][lab[z] > 0]
    assert curve["laa_pct"][k] == pytest.approx(100 * np.mean(sl < -950))


def test_laa_per_slice_flipped_direction_same_curve():
    hu, lab = random_case()
    a = laa_per_slice(hu, lab, EYE)
    b = laa_per_slice(hu[::-1], lab[::-1], FLIP_Z)
    np.testing.assert_array_equal(a["n_laa_voxels"], b["n_laa_voxels"])
    np.testing.assert_array_equal(b["slice_index"], np.arange(hu.shape[0]))


# --- cluster exponent D ---------------------------------------------------------------

def power_law_phantom(sizes, cell=24):
    """Lung of -850 HU holding one compact -980 HU cluster of each size, in its own cell."""
    n = len(sizes)
    side = int(np.ceil(np.sqrt(n)))
    w = cell - 2
    hu = np.full((cell, side * cell, side * cell), -850, np.int16)
    for i, s in enumerate(sizes):
        cy, cx = divmod(i, side)
        y0, x0, z, rem = cy * cell + 1, cx * cell + 1, 0, int(s)
        while rem > 0:                                    # fill plane by plane, row by row
            k = min(rem, w * w)
            plane = np.zeros(w * w, bool)
            plane[:k] = True
            hu[1 + z, y0:y0 + w, x0:x0 + w][plane.reshape(w, w)] = -980
            rem -= k
            z += 1
    return hu


@pytest.mark.parametrize("d_true", [1.2, 1.6, 2.0])
def test_cluster_exponent_recovers_power_law(d_true):
    n = 400
    u = (np.arange(n) + 0.5) / n                          # quantiles of P(S >= s) = (s/2)^-D
    sizes = np.maximum(1, np.round(2 * u ** (-1 / d_true))).astype(int)
    hu = power_law_phantom(sizes)
    d = laa_cluster_exponent_d(hu, np.ones(hu.shape, bool), (1.5, 0.7, 0.7))
    assert d == pytest.approx(d_true, abs=0.2)


def test_cluster_exponent_random_sample():
    rng = np.random.default_rng(7)
    d_true = 1.5
    sizes = np.round(2 * (1 - rng.random(500)) ** (-1 / d_true)).astype(int)
    sizes = np.minimum(sizes, 22 * 22 * 20)
    hu = power_law_phantom(sizes)
    d = laa_cluster_exponent_d(hu, np.ones(hu.shape, bool), (1, 1, 1))
    assert d == pytest.approx(d_true, abs=0.2)


def test_cluster_sizes_respect_connectivity_and_mask():
    hu = np.full((5, 5, 5), -850, np.int16)
    hu[1, 1, 1] = hu[2, 2, 2] = -990                      # corner-touching only
    lung = np.ones(hu.shape, bool)
    from emphy_dask.phenotypes import cluster_sizes_mm3
    assert sorted(cluster_sizes_mm3(hu, lung, (2, 1, 1))) == [2.0, 2.0]
    assert list(cluster_sizes_mm3(hu, lung, (2, 1, 1), connectivity=3)) == [4.0]
    lung[2, 2, 2] = False
    assert list(cluster_sizes_mm3(hu, lung, (2, 1, 1))) == [2.0]


def test_cluster_exponent_nan_with_few_clusters():
    assert math.isnan(power_law_exponent([1, 2, 3]))
    hu = np.full((5, 5, 5), -850, np.int16)
    assert math.isnan(laa_cluster_exponent_d(hu, np.ones(hu.shape, bool), (1, 1, 1)))


# --- label ---------------------------------------------------------------------------

def test_label_rule_boundaries():
    assert emphysema_label(6.0, -850.1) == 1
    assert emphysema_label(5.999, -900) == 0
    assert emphysema_label(30.0, -850.0) == 0              # MLD must be strictly below
    assert emphysema_label(float("nan"), -900) is None
    assert emphysema_label(10.0, None) is None
    assert emphysema_label(4.0, -900, LabelRule(laa950_min_pct=3.0)) == 1
