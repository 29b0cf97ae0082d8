"""Embeddings: lung-zone feature vectors from a ResNet-152 backbone.

- ``inputs``: model inputs cut from the 1 mm volume and lung mask (CPU, numpy).
- ``backbones``: the two backbones, strict weight loading, batched forward (GPU or CPU).
- ``i3resnet``: the inflated 3D ResNet-152 module.
- ``weights``: where weight files are found, offline; clear errors when they are not.
"""
from __future__ import annotations

from .backbones import BACKBONES, load_model, run_batches, zone_embeddings
from .inputs import ZONES, ModelInput, slab_inputs, volume_input
from .weights import WeightsFile, WeightsMissing, resolve_backbone_weights, resolve_lungmask_weights


def inputs_for(settings, hu_1mm, labels_1mm, direction_xyz, clip_hu=(-1000.0, 400.0)) -> ModelInput:
    """The model input of ``settings.backbone`` (an ``[embed]`` section) for one 1 mm volume.

    ``clip_hu`` is the paper's model-input window ([qc] clip_min_hu/clip_max_hu), used by the
    2.5D ``resnet152`` recipe; the 3D backbone keeps the window it was trained with (-1000..200).
    """
    recipe = BACKBONES[settings.backbone].recipe
    if recipe == "volume":
        return volume_input(hu_1mm, labels_1mm, direction_xyz, margin_mm=settings.margin_mm,
                            zone_pooling=settings.zone_pooling)
    return slab_inputs(hu_1mm, labels_1mm, direction_xyz, margin_mm=settings.margin_mm,
                       window_hu=tuple(float(v) for v in clip_hu))


__all__ = ["BACKBONES", "ZONES", "ModelInput", "WeightsFile", "WeightsMissing", "inputs_for", "load_model",
           "resolve_backbone_weights", "resolve_lungmask_weights", "run_batches", "slab_inputs", "volume_input",
           "zone_embeddings"]
