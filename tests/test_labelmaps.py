"""Label maps users bring (CIP, binary, right/left, LTRCLobes): the right voxels in every region,
and CIP command-line definitions on hand-checked histograms."""
import math

import numpy as np
import pytest

from emphy_dask.phenotypes import (
    LOBES,
    PHENOTYPE_COLUMNS,
    REGIONS,
    cli_percentile_hu,
    decode_label_map,
    detect_encoding,
    metrics_from_values,
    parenchyma_phenotypes,
    region_masks,
)
from emphy_dask.segment.sides import split_sides

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)     # larger x index = patient right

# CIP chest regions and types (cipChestConventions.h)
WHOLELUNG, RIGHTLUNG, LEFTLUNG = 1, 2, 3
RSL, RML, RIL, LSL, LIL = 4, 5, 6, 7, 8
LUT, LMT, LLT, RUT, RMT, RLT = 9, 10, 11, 12, 13, 14
MEDIASTINUM = 15
AIRWAY, VESSEL = 2, 3


def cip(region, ctype=0):
    return (ctype << 8) | region


def cip_case(seed=0, shape=(24, 30, 44)):
    """A CIP partial-lung label map (EYE: larger z = superior): per-lung thirds of unequal size,
    airway/vessel types inside lung regions (lung) and outside any lung region (not lung)."""
    rng = np.random.default_rng(seed)
    hu = np.clip(rng.normal(-860, 80, shape), -1024, 300).round().astype(np.int16)
    lm = np.zeros(shape, np.uint16)
    z, y, x = np.indices(shape)
    body = (y > 3) & (y < 26) & (z > 1) & (z < 22)
    right, left = body & (x > 2) & (x < 19), body & (x > 24) & (x < 42)   # EYE: small x = patient right
    # thirds by z slab, deliberately unequal (a computed equal-volume split would differ)
    for (side, codes) in ((right, (RUT, RMT, RLT)), (left, (LUT, LMT, LLT))):
        lm[side & (z >= 16)] = codes[0]
        lm[side & (z >= 7) & (z < 16)] = codes[1]
        lm[side & (z < 7)] = codes[2]
    # types inside lung regions: still lung
    vessel_in = right & (rng.random(shape) < 0.05)
    lm[vessel_in] = lm[vessel_in] | (VESSEL << 8)
    airway_in = left & (rng.random(shape) < 0.03)
    lm[airway_in] = lm[airway_in] | (AIRWAY << 8)
    # outside any lung region: trachea (airway, no region), hilar vessels, mediastinum vessel
    lm[(x >= 20) & (x <= 23) & (z > 12) & (y > 10) & (y < 14)] = cip(0, AIRWAY)
    lm[(x >= 20) & (x <= 23) & (z > 5) & (z < 10) & (y > 16) & (y < 19)] = cip(0, VESSEL)
    lm[(x >= 20) & (x <= 23) & (z < 4) & (y > 20) & (y < 24)] = cip(MEDIASTINUM, VESSEL)
    return hu, lm


def by_region(rows):
    return {r["region"]: r for r in rows}


def assert_region(row, hu, voxels):
    ref = metrics_from_values(hu[voxels], 1.0)
    assert row["n_voxels"] == np.count_nonzero(voxels) > 0
    for col in PHENOTYPE_COLUMNS:
        assert row[col] == pytest.approx(ref[col], rel=1e-12, abs=1e-12), (row["region"], col)


def test_cip_label_map_right_voxels_per_region():
    hu, lm = cip_case()
    region, ctype = lm & 0xFF, lm >> 8
    assert {int(t) for t in np.unique(ctype)} == {0, AIRWAY, VESSEL}
    rows = by_region(parenchyma_phenotypes(hu, lm, (1, 1, 1), EYE))
    assert list(rows) == list(REGIONS)                       # no lobes in a partial-lung map
    lung = np.isin(region, [LUT, LMT, LLT, RUT, RMT, RLT])
    # airway/vessel voxels of no lung region (and mediastinum) are not lung
    assert np.count_nonzero(lm) - np.count_nonzero(lung) > 100
    assert_region(rows["WholeLung"], hu, lung)
    assert_region(rows["RightLung"], hu, np.isin(region, [RUT, RMT, RLT]))
    assert_region(rows["LeftLung"], hu, np.isin(region, [LUT, LMT, LLT]))
    for level, (lcode, rcode) in zip(("Upper", "Middle", "Lower"), ((LUT, RUT), (LMT, RMT), (LLT, RLT))):
        assert_region(rows[f"{level}Third"], hu, np.isin(region, [lcode, rcode]))
        assert_region(rows[f"Left{level}Third"], hu, region == lcode)
        assert_region(rows[f"Right{level}Third"], hu, region == rcode)
    dec = decode_label_map(lm, (1, 1, 1), EYE)
    assert dec.encoding == "cip" and dec.thirds_from_map and dec.has_sides and not dec.has_lobes
    assert any("CIP" in n for n in dec.notes)
    assert any("no lung region left out" in n and "airway" in n and "vessel" in n for n in dec.notes)


def test_cip_lobes_and_whole_lung_regions():
    hu, lm = cip_case(seed=1)
    region = lm & 0xFF
    lobes = np.zeros_like(lm)
    lobes[np.isin(region, [RUT])] = RSL
    lobes[np.isin(region, [RMT])] = RML
    lobes[np.isin(region, [RLT])] = cip(RIL, VESSEL)
    lobes[np.isin(region, [LUT, LMT])] = LSL
    lobes[np.isin(region, [LLT])] = LIL
    lobes[(region == 0) & (lm > 0)] = lm[(region == 0) & (lm > 0)]      # keep the non-lung airway
    rows = by_region(parenchyma_phenotypes(hu, lobes, (1, 1, 1), EYE))
    assert list(rows) == list(REGIONS) + list(LOBES)
    for name, code in zip(LOBES, (RSL, RML, RIL, LSL, LIL)):
        assert_region(rows[name], hu, (lobes & 0xFF) == code)
    assert_region(rows["RightLung"], hu, np.isin(lobes & 0xFF, [RSL, RML, RIL]))
    # no thirds in a lobe map: computed equal-volume thirds instead, covering the whole lung
    n = rows["WholeLung"]["n_voxels"]
    assert sum(rows[t]["n_voxels"] for t in ("UpperThird", "MiddleThird", "LowerThird")) == n
    # a CIP map with the whole-lung region only: sides split from its components
    whole = np.where(lobes & 0xFF, cip(WHOLELUNG), np.where(lobes > 0, cip(0, AIRWAY), 0)).astype(np.uint16)
    w = by_region(parenchyma_phenotypes(hu, whole, (1, 1, 1), EYE))
    assert w["RightLung"]["n_voxels"] == rows["RightLung"]["n_voxels"]
    assert w["LeftLung"]["n_voxels"] == rows["LeftLung"]["n_voxels"]


def test_ltrc_lobes_labels():
    hu, lm = cip_case(seed=2)
    region = lm & 0xFF
    ltrc = np.zeros(lm.shape, np.uint8)
    ltrc[np.isin(region, [LUT, LMT])] = 1      # left upper
    ltrc[region == LLT] = 2                    # left lower
    ltrc[region == RUT] = 3                    # right upper
    ltrc[region == RMT] = 4                    # right middle
    ltrc[region == RLT] = 5                    # right lower
    dec = decode_label_map(ltrc, (1, 1, 1), EYE)
    assert dec.encoding == "ltrc-lobes" and dec.has_lobes and dec.has_sides
    rows = by_region(parenchyma_phenotypes(hu, ltrc, (1, 1, 1), EYE))
    for name, lab in zip(("LeftUpperLobe", "LeftLowerLobe", "RightUpperLobe", "RightMiddleLobe", "RightLowerLobe"),
                         (1, 2, 3, 4, 5)):
        assert_region(rows[name], hu, ltrc == lab)
    assert_region(rows["LeftLung"], hu, np.isin(ltrc, [1, 2]))
    assert_region(rows["RightLung"], hu, np.isin(ltrc, [3, 4, 5]))


@pytest.mark.parametrize("values, encoding", [
    ([], "empty"), ([1], "binary"), ([255], "binary"), ([1, 2], "right-left"), ([1, 2, 3, 4, 5], "ltrc-lobes"),
    ([3, 4, 5], "ltrc-lobes"), ([2, 3], "cip"), ([9, 10, 11, 12, 13, 14], "cip"), ([1, 512], "cip"),
    ([7, 200], "unknown"),
])
def test_encoding_detection(values, encoding):
    assert detect_encoding(values) == encoding


def two_lungs(shape=(16, 24, 40)):
    z, y, x = np.indices(shape)
    a = ((y - 12) / 8) ** 2 + ((x - 10) / 7) ** 2 + ((z - 8) / 7) ** 2 < 1     # small x index
    b = ((y - 12) / 8) ** 2 + ((x - 29) / 8) ** 2 + ((z - 8) / 7) ** 2 < 1     # large x index
    return a, b


@pytest.mark.parametrize("direction, a_side", [(EYE, 1), (FLIP_X, 2)])
def test_binary_two_components_get_their_sides_from_the_direction_cosines(direction, a_side):
    a, b = two_lungs()
    island = np.zeros_like(a)
    island[8, 12, 1] = True                                   # a detached voxel beside lung a
    labels = split_sides(a | b | island, (2.0, 1.0, 1.0), direction)
    other = 3 - a_side
    assert (labels[a | island] == a_side).all() and (labels[b] == other).all()
    assert np.count_nonzero(labels) == np.count_nonzero(a | b | island)
    # through the phenotype stage: the split is said in the notes
    hu = np.full(a.shape, -850, np.int16)
    dec = decode_label_map((a | b | island).astype(np.uint8) * 255, (2.0, 1.0, 1.0), direction)
    assert dec.encoding == "binary" and dec.has_sides and any("split" in n for n in dec.notes)
    rows = by_region(parenchyma_phenotypes(hu, (a | b | island).astype(np.uint8), (2.0, 1.0, 1.0), direction))
    right = a | island if a_side == 1 else b
    assert rows["RightLung"]["n_voxels"] == np.count_nonzero(right)


def test_binary_touching_lungs_are_split_by_the_segmenter_rule():
    a, b = two_lungs()
    bridge = np.zeros_like(a)
    bridge[6:10, 10:14, 14:25] = True                         # the lungs touch in front of the mediastinum
    mask = a | b | bridge
    from scipy import ndimage as ndi
    assert ndi.label(mask)[1] == 1
    labels = split_sides(mask, (2.0, 1.0, 1.0), EYE)
    assert labels is not None and np.count_nonzero(labels) == np.count_nonzero(mask)
    core_a = a & ~ndi.binary_dilation(bridge, iterations=3)
    core_b = b & ~ndi.binary_dilation(bridge, iterations=3)
    assert (labels[core_a] == 1).all() and (labels[core_b] == 2).all()


def test_region_masks_match_rows_and_float_path():
    hu, lm = cip_case(seed=3)
    masks = region_masks(lm, EYE)
    rows = parenchyma_phenotypes(hu.astype(np.float32), lm, (1, 1, 1), EYE)
    for r in rows:
        assert r["n_voxels"] == np.count_nonzero(masks[r["region"]])
        assert r["laa950_pct"] == pytest.approx(100 * np.mean(hu[masks[r["region"]]] < -950))


# --- CIP's command-line definitions on hand-checked histograms --------------------------------

def test_cli_percentile_counts_empty_bins_and_keeps_the_fraction_equal_to_p():
    # 1 voxel at -950, 9 at -900: cum(-950)/10 = 0.1 does not exceed 0.1, nor do the empty bins
    # -949 ... -901 (still 0.1); -900 brings 1.0. The CLI keeps walking: -901.
    assert cli_percentile_hu([-950, -900], [1, 9], 0.10) == -901
    # 3 of 20 at -960: 3/20 == 0.15 exactly -> -901 again; with 4 of 20, -961 (before the -960 bin).
    assert cli_percentile_hu([-960, -900], [3, 17], 0.15) == -901
    assert cli_percentile_hu([-960, -900], [4, 16], 0.15) == -961
    # 5 at -1000, 5 at -990: the first bin alone exceeds 0.1 -> the bin below it
    assert cli_percentile_hu([-1000, -990], [5, 5], 0.10) == -1001
    # median of two voxels -900, -800: 1/2 <= 0.5 until -800 -> -801 (numpy: -850)
    assert cli_percentile_hu([-900, -800], [1, 1], 0.5) == -801
    assert math.isnan(cli_percentile_hu([], [], 0.1))


def test_cli_columns_mode_and_pearson_kurtosis_by_hand():
    vals = np.array([-1000 + k for k in range(100)], np.int16)        # -1000 .. -901, one each
    m = parenchyma_phenotypes(*_lung(vals), (1, 1, 1), EYE)[0]
    assert m["perc10_cli_hu"] == -991.0                                # cum(-991) = 10 -> 0.10 <= 0.10
    assert m["perc15_cli_hu"] == -986.0
    assert m["hu_median_cli"] == -951.0 and m["hu_median"] == -950.5
    assert m["perc10_hu"] == pytest.approx(-990.1)
    tied = np.array([-900, -900, -800, -800, -700], np.int16)
    t = parenchyma_phenotypes(*_lung(tied), (1, 1, 1), EYE)[0]
    assert t["hu_mode"] == -900.0                                      # first maximum, as the CLI
    sym = np.array([-901, -901, -899, -899], np.int16)                 # d = +-1: m2 = m4 = 1
    k = parenchyma_phenotypes(*_lung(sym), (1, 1, 1), EYE)[0]
    assert k["hu_kurtosis_pearson"] == pytest.approx(1.0)
    hi = np.array([-100, 10, 300, -900], np.int16)
    h = parenchyma_phenotypes(*_lung(hi), (1, 1, 1), EYE)[0]
    assert (h["haa600_pct"], h["haa250_pct"], h["haa0_pct"]) == (75.0, 75.0, 50.0)


def _lung(values):
    hu = np.zeros((4, 6, 8), np.int16)
    lab = np.zeros(hu.shape, np.uint8)
    flat_hu, flat_lab = hu.reshape(-1), lab.reshape(-1)
    flat_hu[: len(values)] = values
    flat_lab[: len(values)] = 1
    return hu, lab
