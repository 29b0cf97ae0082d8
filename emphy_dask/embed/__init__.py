"""Embeddings: lung-zone feature vectors from a ResNet-152 backbone.

- ``inputs``: model inputs cut from the 1 mm volume and lung mask (CPU, numpy).
- ``backbones``: the two backbones, strict weight loading, batched forward (GPU or CPU).
- ``i3resnet``: the inflated 3D ResNet-152 module.
- ``weights``: where weight files are found, offline; clear errors when they are not.
"""
from __future__ import annotations

from .backbones import BACKBONES, load_model, run_batches, zone_embeddings
from .inputs import INPUT_RECIPES, VOLUME_WINDOW_HU, ZONES, ModelInput, recipe_windows, slab_inputs, volume_input
from .weights import WeightsFile, WeightsMissing, resolve_backbone_weights, resolve_lungmask_weights


def inputs_for(settings, hu_1mm, labels_1mm, direction_xyz, clip_hu=(-1000.0, 400.0)) -> ModelInput:
    """The model input of ``settings.backbone`` (an ``[embed]`` section) for one 1 mm volume.

    ``clip_hu`` is the paper's model-input window ([qc] clip_min_hu/clip_max_hu), used by the
    2.5D ``resnet152`` recipe; the 3D backbone keeps the window it was trained with (-1000..200).
    ``settings.input_recipe`` (``inputs.INPUT_RECIPES``) replaces those windows: ``lung``, or
    ``multiwindow`` or ``laamap`` (3D backbone only: three channels).
    """
    recipe = BACKBONES[settings.backbone].recipe
    input_recipe = getattr(settings, "input_recipe", "upstream")
    if recipe == "volume":
        return volume_input(hu_1mm, labels_1mm, direction_xyz, margin_mm=settings.margin_mm,
                            zone_pooling=settings.zone_pooling, windows=recipe_windows(input_recipe, VOLUME_WINDOW_HU))
    windows = recipe_windows(input_recipe, clip_hu)
    if len(windows) != 1 or not isinstance(windows[0], tuple):
        raise ValueError(f"input recipe {input_recipe!r} needs a backbone with free input channels; "
                         f"{settings.backbone}'s three channels are three slices")
    return slab_inputs(hu_1mm, labels_1mm, direction_xyz, margin_mm=settings.margin_mm, window_hu=windows[0])


__all__ = ["BACKBONES", "INPUT_RECIPES", "ZONES", "ModelInput", "WeightsFile", "WeightsMissing", "inputs_for",
           "load_model", "recipe_windows", "resolve_backbone_weights", "resolve_lungmask_weights", "run_batches",
           "slab_inputs", "volume_input", "zone_embeddings"]
