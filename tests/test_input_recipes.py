"""Embedding input recipes ([embed].input_recipe): exact window maths, the 3D backbone's three
windows as channels, the recipe in config_hash and in the embeddings rows, predict's refusal."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from emphy_dask.embed import inputs_for
from emphy_dask.embed.backbones import feature_maps, load_model, load_state
from emphy_dask.embed.inputs import (INPUT_RECIPES, LungBelowFraction, ModelInput, apply_windows, recipe_windows,
                                    volume_input)
from emphy_dask.embed.weights import WeightsFile
from emphy_dask.job.config import ConfigError, EmbedSettings, JobConfig, config_from_dict

RANDOM = WeightsFile(None, "random", "random")
HU = np.array([-1100.0, -1024.0, -1000.0, -950.0, -850.0, -600.0, 0.0, 200.0, 300.0])


def test_recipe_windows_map_hu_exactly():
    up = apply_windows(HU, recipe_windows("upstream", (-1000.0, 200.0)))
    np.testing.assert_array_equal(up, np.float32([0, 0, 0, 50 / 1200, 150 / 1200, 400 / 1200, 1000 / 1200, 1, 1]))
    lung = apply_windows(HU, recipe_windows("lung", (-1000.0, 200.0)))
    np.testing.assert_array_equal(lung, np.float32([0, 0, 24 / 424, 74 / 424, 174 / 424, 1, 1, 1, 1]))
    multi = apply_windows(HU, recipe_windows("multiwindow", (-1000.0, 200.0)))
    assert multi.shape == (3, HU.size) and multi.dtype == np.float32
    np.testing.assert_array_equal(multi[0], up)
    np.testing.assert_array_equal(multi[1], lung)
    np.testing.assert_array_equal(multi[2], np.float32([0, 0, 24 / 174, 74 / 174, 1, 1, 1, 1, 1]))
    # -950 vs -850 HU: 8 % of the upstream range, 24 % of the lung window's
    assert up[4] - up[3] == pytest.approx(100 / 1200) and lung[4] - lung[3] == pytest.approx(100 / 424)
    assert recipe_windows("upstream", (-1000, 400)) == ((-1000.0, 400.0),)     # resnet152: the [qc] clip window
    with pytest.raises(ValueError, match="input recipe must be one of upstream, lung, multiwindow"):
        recipe_windows("soft", (-1000, 200))


def _lungs(shape=(40, 48, 48)):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 100, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[4:36, 8:40, 6:22] = 1
    labels[4:36, 8:40, 26:42] = 2
    return hu, labels


def test_volume_input_stacks_one_channel_per_window():
    hu, labels = _lungs()
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    one = volume_input(hu, labels, direction, size=(32, 64, 64))
    three = volume_input(hu, labels, direction, size=(32, 64, 64), windows=INPUT_RECIPES["multiwindow"])
    assert one.array.shape == (32, 64, 64) and three.array.shape == (3, 32, 64, 64)
    np.testing.assert_array_equal(three.array[0], one.array)      # the first window is upstream's
    np.testing.assert_array_equal(three.zone_weights, one.zone_weights)
    assert three.meta["windows_hu"] == [list(w) for w in INPUT_RECIPES["multiwindow"]]
    lung = inputs_for(EmbedSettings(input_recipe="lung"), hu, labels, direction)
    assert lung.meta["windows_hu"] == [[-1024.0, -600.0]] and lung.array.ndim == 3
    with pytest.raises(ValueError, match="three channels are three slices"):
        inputs_for(EmbedSettings(backbone="resnet152", input_recipe="multiwindow"), hu, labels, direction)


def test_laamap_channel_is_the_lungs_local_laa_fraction_thresholded_at_1mm():
    # Lung parenchyma at -870 HU with sharp-kernel-like noise (sd 60 HU): ~9 % of its 1 mm voxels
    # fall below -950 HU. Averaging the HU first (the windows' order) would hide them; the map keeps them.
    rng = np.random.default_rng(0)
    hu = np.full((64, 64, 64), -1024.0, np.float32)       # air outside: below -950 but not lung
    labels = np.zeros(hu.shape, np.uint8)
    labels[8:56, 8:56, 8:56] = 1
    hu[8:56, 8:56, 8:56] = -870.0 + rng.normal(0.0, 60.0, (48, 48, 48))
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    size = (32, 64, 64)
    got = volume_input(hu, labels, direction, size=size, windows=INPUT_RECIPES["laamap"])
    multi = volume_input(hu, labels, direction, size=size, windows=INPUT_RECIPES["multiwindow"])
    assert got.array.shape == (3, *size)
    np.testing.assert_array_equal(got.array[:2], multi.array[:2])             # upstream and lung windows
    lung_in = volume_input(labels.astype(np.float32), labels, direction, size=size, windows=[(0.0, 1.0)]).array
    laa_1mm = np.count_nonzero((labels > 0) & (hu < -950)) / np.count_nonzero(labels)
    assert 0.05 < laa_1mm < 0.15
    # the map's sum over the input is the lung's LAA-950 voxel count on the same grid (float16 rounding)
    ratio = got.array[2].astype(np.float64).sum() / lung_in.astype(np.float64).sum()
    assert ratio == pytest.approx(laa_1mm, rel=2e-3)
    assert got.array[2].max() <= 1.0 and got.array[2][:, :2].max() == 0        # no air outside the lung
    averaged_first = volume_input(hu, labels, direction, size=size, windows=[(-1024.0, -950.0)]).array
    inside = lung_in == 1
    assert np.count_nonzero((averaged_first < 1) & inside) < 0.5 * np.count_nonzero((got.array[2] > 0) & inside)
    assert got.meta["windows_hu"][2] == {"lung_below_hu": -950.0}
    assert INPUT_RECIPES["laamap"][2] == LungBelowFraction(-950.0)
    with pytest.raises(ValueError, match="three channels are three slices"):
        inputs_for(EmbedSettings(backbone="resnet152", input_recipe="laamap"), hu[:40], labels[:40], direction)


def test_three_window_channels_through_the_inference_form_equal_the_plain_module():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    plain = load_state("ct-i3resnet152", RANDOM)
    x = np.random.default_rng(1).random((3, 32, 64, 64)).astype(np.float16)    # three different channels
    with torch.inference_mode():
        ref = plain(torch.from_numpy(x.astype(np.float32))[None]).numpy()
    got = feature_maps(load_model("ct-i3resnet152", RANDOM, "cpu", "fp32"), [ModelInput(x, "volume", ("whole",))],
                       "volume", "cpu", "fp32")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_recipe_enters_config_hash_only_when_not_upstream_and_is_checked():
    base = JobConfig(embed=EmbedSettings(input_recipe="upstream", hu_source="raw"))
    assert "input_recipe" not in base.result_settings()["embed"]          # old runs keep their hash
    assert "hu_source" not in base.result_settings()["embed"]
    lung = dataclasses.replace(base, embed=EmbedSettings(input_recipe="lung", hu_source="raw"))
    assert lung.result_settings()["embed"]["input_recipe"] == "lung" and lung.config_hash != base.config_hash
    # the default ("auto"): the benchmark's choice for the 3D backbone, the paper's own for resnet152
    default = JobConfig()
    assert (default.embed.input_recipe, default.embed.hu_source) == ("multiwindow", "raw")
    assert "harmonize_method" not in default.result_settings()["embed"]         # raw inputs: not a factor
    assert default.config_hash not in (base.config_hash, lung.config_hash)
    paper = config_from_dict({"embed": {"backbone": "resnet152"}}).embed
    assert (paper.input_recipe, paper.hu_source) == ("upstream", "raw")
    auto = config_from_dict({"embed": {"input_recipe": "auto", "hu_source": "auto"}}).embed
    assert (auto.input_recipe, auto.hu_source) == ("multiwindow", "raw")
    # the harmonisation method enters the hash with harmonised inputs, whatever the recipe
    up_h = JobConfig(embed=EmbedSettings(input_recipe="upstream", hu_source="harmonized"))
    assert up_h.result_settings()["embed"]["harmonize_method"] == up_h.harmonize.method
    assert config_from_dict({"embed": {"input_recipe": "multiwindow"}}).embed.input_recipe == "multiwindow"
    with pytest.raises(ConfigError, match=r"\[embed\].input_recipe must be one of upstream, lung, multiwindow"):
        config_from_dict({"embed": {"input_recipe": "bone"}}, "job.toml")
    for recipe in ("multiwindow", "laamap"):
        with pytest.raises(ConfigError, match=f'input_recipe = "{recipe}" needs the 3D backbone'):
            config_from_dict({"embed": {"input_recipe": recipe, "backbone": "resnet152"}}, "job.toml")


def test_predict_refuses_embeddings_of_another_recipe(tmp_path):
    from emphy_dask.models.fabricate import fabricate_run
    from emphy_dask.models.predict import RunMismatch, check_run

    run = {"backbone": "ct-i3resnet152", "weights_sha256": "f" * 64, "hu_source": "raw", "input_recipe": "lung"}
    lung = fabricate_run(tmp_path / "lung", 6, seed=1, input_recipe="lung")
    check_run(lung, run)
    old = fabricate_run(tmp_path / "old", 6, seed=1, input_recipe=None)            # rows from before the column
    with pytest.raises(RunMismatch, match="embeddings of the 'upstream' input recipe; the model was fitted on 'lung'"):
        check_run(old, run)
