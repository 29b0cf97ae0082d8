"""Contribution maps of a linear head on pooled ``layer4`` features (exact class-activation maps).

A zone embedding is a weighted average of the layer4 map: e_z[c] = sum_pos A[c, pos] * w_z[pos]
(ct-i3resnet152: ``zone_weights[z]`` over (10, 7, 7) positions, summing to 1; resnet152: each
zone has its own (7, 7) map and w = 1/49). A linear head score = sum_z v_z . e_z + bias therefore
splits over positions exactly:

    M_z[pos] = sum_c v_z[c] * A[c, pos] * w_z[pos],    sum_z sum_pos M_z[pos] = score - bias,

where v_z are the model's weights on raw (unstandardised) embedding channels
(``LinearModel.raw_weights``). Maps are drawn on the zone's input PNG: the layer4 depth row
holding the PNG's input slice, upsampled in-plane and shown in the radiological view
(``embed.inputs.radiological``), red where the position pushes toward emphysema.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embed.inputs import radiological
from .saved import LinearModel


@dataclass
class FeatureMap:
    """A scan's saved layer4 maps (``featuremaps/<stem>.npz``), as stored (float16); sums in float64.

    ``layer4``: (C, D, H, W) for the 3D backbone, (zones, C, H, W) for resnet152;
    ``zone_weights``: (zones, D, H, W) or None; ``meta``: crop box, input size, png_depth, ...
    """

    layer4: np.ndarray
    zones: list
    zone_weights: np.ndarray | None
    meta: dict

    @property
    def volumetric(self) -> bool:
        return self.zone_weights is not None

    def pooling(self, zone: str) -> np.ndarray:
        """Pooling weights of ``zone`` over its layer4 positions (sum 1)."""
        if self.volumetric:
            return self.zone_weights[self.zones.index(zone)]
        hw = self.layer4.shape[2:]
        return np.full(hw, 1.0 / (hw[0] * hw[1]))

    def activations(self, zone: str) -> np.ndarray:
        """The layer4 map a zone's embedding pools: (C, D, H, W) or (C, H, W)."""
        return self.layer4 if self.volumetric else self.layer4[self.zones.index(zone)]

    def embedding(self, zone: str, channels=None) -> np.ndarray:
        """The zone's embedding recomputed from the stored map (C,), or of ``channels`` only."""
        a, w = self.activations(zone), self.pooling(zone)
        a = a if channels is None else a[np.asarray(channels)]
        return np.tensordot(a.astype(np.float64), w, axes=w.ndim)


def load_featuremap(path) -> FeatureMap:
    """Read ``featuremaps/<stem>.npz`` without unpickling; a clear error names the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            layer4 = f["layer4"]
            zones = [str(z) for z in f["zones"]]
            weights = f["zone_weights"].astype(np.float64) if "zone_weights" in f else None
            meta = json.loads(str(f["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable feature-map file ({exc})") from None
    return FeatureMap(layer4, zones, weights, meta)


def channel_weights(model: LinearModel, dim: int) -> tuple[dict, float]:
    """({zone: v (dim,)}, bias): the model's weights on raw embedding channels per zone."""
    if model.inputs != "embedding":
        raise ValueError("contribution maps need a model on embeddings")
    raw, bias = model.raw_weights()
    out: dict = {}
    for feature, w in raw.items():
        zone, ch = feature.split(":")
        out.setdefault(zone, np.zeros(dim))[int(ch)] += w
    return out, bias


def contribution_maps(fm: FeatureMap, model: LinearModel) -> tuple[dict, float]:
    """({zone: M_z}, bias) with M_z the zone's contribution per layer4 position; the sum of all
    maps plus bias equals the model's score on the embeddings recomputed from ``fm``."""
    dim = fm.layer4.shape[0] if fm.volumetric else fm.layer4.shape[1]
    v, bias = channel_weights(model, dim)
    maps = {}
    for zone, vz in v.items():
        if zone not in fm.zones:
            raise ValueError(f"the feature map has no zone {zone!r} (has {fm.zones})")
        used = np.flatnonzero(vz)                  # a t-test/L1 head uses a few channels of 2048
        acts = fm.activations(zone)[used].astype(np.float64)
        maps[zone] = np.tensordot(vz[used], acts, axes=1) * fm.pooling(zone)
    return maps, bias


def score_from_map(fm: FeatureMap, model: LinearModel) -> float:
    """The model's score on the embeddings recomputed from the stored map (the identity's right side)."""
    dim = fm.layer4.shape[0] if fm.volumetric else fm.layer4.shape[1]
    names = [f"{z}:{c:04d}" for z in fm.zones for c in range(dim)]
    x = np.concatenate([fm.embedding(z) for z in fm.zones])[None]
    return float(model.score(x, names)[0])


def png_slice(fm: FeatureMap, zone: str, volume_map: np.ndarray) -> np.ndarray:
    """The map's values on the zone's PNG, (224, 224) in the radiological view.

    3D: the layer4 depth row that covers the PNG's input slice (``meta.png_depth``), upsampled
    bilinearly from (7, 7) to the input plane. 2.5D: the zone's (7, 7) map upsampled.
    """
    from skimage.transform import resize

    m = np.asarray(volume_map, float)
    if fm.volumetric:
        depth_in = int(fm.meta["input_size"][0])
        d = int(fm.meta["png_depth"][zone]) * m.shape[0] // depth_in
        m = m[min(d, m.shape[0] - 1)]
        size = tuple(int(s) for s in fm.meta["input_size"][1:])
    else:
        size = (224, 224)
    return radiological(resize(m, size, order=1, mode="edge", anti_aliasing=False))


def overlay_png(gray_png, values: np.ndarray, out_path, *, scale: float | None = None, signed: bool = True,
                max_alpha: float = 0.75) -> Path:
    """Colour ``values`` (224, 224) over a grey PNG and write it.

    signed: red positive / blue negative, symmetric around 0; otherwise 0..max in 'inferno'.
    Opacity grows with |value| / scale, so positions that contribute nothing stay see-through.
    """
    import matplotlib
    from PIL import Image

    base = np.asarray(Image.open(gray_png).convert("L"), np.float32) / 255.0
    if base.shape != values.shape:
        raise ValueError(f"{gray_png}: image {base.shape} and map {values.shape} differ in size")
    scale = float(scale if scale else np.max(np.abs(values)) or 1.0)
    if signed:
        norm = np.clip(values / scale, -1, 1)
        rgb = matplotlib.colormaps["RdBu_r"]((norm + 1) / 2)[..., :3]
    else:
        norm = np.clip(values / scale, 0, 1)
        rgb = matplotlib.colormaps["inferno"](norm)[..., :3]
    alpha = (max_alpha * np.abs(norm))[..., None]
    out = (1 - alpha) * base[..., None] + alpha * rgb
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(out * 255).astype(np.uint8)).save(out_path, optimize=False)
    return out_path


def top_channels(model: LinearModel, n: int = 3) -> list[tuple[str, int, float]]:
    """(zone, channel, standardised coefficient) of the ``n`` largest |coefficients|."""
    order = np.argsort(-np.abs(np.asarray(model.coef)), kind="stable")[:n]
    out = []
    for i in order:
        zone, ch = model.features[i].split(":")
        out.append((zone, int(ch), float(model.coef[i])))
    return out
