"""Model inputs cut from the 1 mm volume and its lung labels (CPU side; arrays in, arrays out).

Two recipes, one per backbone:

``volume_input`` (``ct-i3resnet152``; the backbone's upstream chest recipe): the volume is put in
RAS orientation, cropped to the bounding box of the lung mask plus a margin, resized to
160 x 224 x 224 (depth x plane, area interpolation) and HU -1000..200 scaled to 0..1 with
clipping. Array axes are (depth: towards the head, H: towards the patient's right, W: towards
anterior), the order the network was trained in (RAS array, depth moved first).

``slab_inputs`` (``resnet152``, the paper's 2.5D recipe): per lung zone, three consecutive
axial 1 mm slices around the zone's representative level (the slice with the largest lung
area in the zone) are the three channels of one 224 x 224 image, cropped to the lung's
in-plane bounding box made square with a margin, HU clipped to the [-1000, 400] window and
scaled to 0..1 (ImageNet normalisation is applied on the device).

**Input recipes** (``[embed].input_recipe``, ``INPUT_RECIPES``): which HU windows become the
network's 0..1 input (``[embed].input_recipe = "auto"``: ``multiwindow`` (on raw HU) for the
3D backbone, ``upstream`` for the 2.5D one; chosen by the real-anatomy benchmark,
``docs/models.md``). ``upstream``: the backbone's own window (ct-i3resnet152:
-1000..200 HU, where -950 vs -850 HU is 8 % of the range; resnet152: the [qc] clip window).
``lung``: -1024..-600 HU, the parenchyma spread over the whole range. ``multiwindow`` (3D backbone
only): three windows as the input's three channels (upstream, lung, low attenuation
-1024..-850 HU); the 2.5D backbone's channels are its three slices, so it takes one window.
``laamap`` (3D backbone only): the upstream and lung windows, and as third channel the lung's
low-attenuation map (``LungBelowFraction``): each input voxel holds the fraction of its 1 mm voxels
that are lung below -950 HU, thresholded *before* the resize. Windows are applied after the area
resize, which averages a sharp kernel's noise away; the threshold at 1 mm keeps what LAA%-950
itself counts (small lesions and noise-driven low attenuation alike), so the network sees the
measured quantity's local map beside the anatomy. It lost clearly on the real-anatomy benchmark
(the CT-trained network does not read such a map well) and is kept to reproduce that comparison.

Zones are the phenotypes' equal-volume cranio-caudal thirds (``phenotypes.regions.slice_thirds``),
applied on the 1 mm grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ScanError
from ..phenotypes.regions import slice_thirds
from ..volume import axis_lps_vectors, bounding_box

ZONES = ("upper", "middle", "lower")
VOLUME_SIZE = (160, 224, 224)          # depth, H, W of the 3D backbone's input
FEATURE_STRIDE = (16, 32, 32)          # layer4 cell of the 3D backbone, in input voxels
VOLUME_WINDOW_HU = (-1000.0, 200.0)    # upstream chest CT window of the 3D backbone
SLAB_SIZE = 224
LUNG_WINDOW_HU = (-1024.0, -600.0)     # parenchyma only: -950 vs -850 HU is 24 % of the range, not 8 %
LOW_ATTENUATION_WINDOW_HU = (-1024.0, -850.0)   # emphysema and air trapping below the normal lung


@dataclass(frozen=True)
class LungBelowFraction:
    """An input channel: per input voxel, the fraction of its 1 mm voxels that are lung below ``threshold_hu``.

    Thresholded on the 1 mm grid, then area-resized with the volume: the resized channel is a
    local LAA% map (0..1), whose lung-weighted mean is the scan's LAA% on the input grid.
    """

    threshold_hu: float = -950.0


#: [embed].input_recipe -> the input's channels, each a HU window (low, high) or a
#: ``LungBelowFraction`` (None: the backbone's own window)
INPUT_RECIPES = {"upstream": None, "lung": (LUNG_WINDOW_HU,),
                 "multiwindow": (VOLUME_WINDOW_HU, LUNG_WINDOW_HU, LOW_ATTENUATION_WINDOW_HU),
                 "laamap": (VOLUME_WINDOW_HU, LUNG_WINDOW_HU, LungBelowFraction(-950.0))}


def recipe_windows(recipe: str, upstream_hu) -> tuple:
    """The windows ((low, high) HU, one per channel) of ``recipe``; ``upstream_hu`` = the backbone's own."""
    if recipe not in INPUT_RECIPES:
        raise ValueError(f"input recipe must be one of {', '.join(INPUT_RECIPES)}, got {recipe!r}")
    windows = INPUT_RECIPES[recipe]
    return (tuple(float(v) for v in upstream_hu),) if windows is None else windows


def channel_meta(channel):
    """JSON form of one input channel: [low, high] HU, or {"lung_below_hu": t}."""
    if isinstance(channel, LungBelowFraction):
        return {"lung_below_hu": channel.threshold_hu}
    return list(channel)


def apply_windows(hu: np.ndarray, windows) -> np.ndarray:
    """HU -> 0..1 per window (clipped): shape of ``hu`` for one window, (len(windows), ...) for several.

    Parameters
    ----------
    hu : ndarray of float, HU
    windows : sequence of (low_hu, high_hu); low maps to 0, high to 1

    Returns
    -------
    ndarray of float32
    """
    hu = np.asarray(hu, np.float32)
    chans = [(np.clip(hu, lo, hi) - np.float32(lo)) / np.float32(hi - lo) for lo, hi in windows]
    return chans[0] if len(chans) == 1 else np.stack(chans)


@dataclass
class ModelInput:
    """What the GPU stage needs for one scan (numpy only: it crosses between workers).

    Attributes
    ----------
    array : ndarray of float16
        ``volume``: shape (160, 224, 224), values 0..1 (``multiwindow``: (3 windows, 160, 224, 224)).
        ``slabs``: shape (3 zones, 3, 224, 224), 0..1.
    recipe : str
        ``volume`` or ``slabs``.
    zones : tuple of str
        Zone names, in output order.
    zone_weights : ndarray of float32 or None
        ``volume`` only: shape (len(zones), 10, 7, 7), pooling weights of each zone over the
        ``layer4`` positions (rows sum to 1).
    feature_depth : dict
        zone -> (start, stop) layer4 depth rows with weight (``volume``).
    slice_indices : dict
        zone -> 1 mm slice ranks from the most superior slice (``slabs``), the channels' slices.
    png_slices : dict
        zone -> 2D float array (0..1) in radiological view, for the QC picture of the input.
    meta : dict
        Geometry of the crop (JSON-friendly), recorded next to the feature maps: ``crop_sra_1mm`` is
        the crop in the RAS view of the 1 mm array given (the pipeline gives the lung box of the
        1 mm grid, ``roi_1mm_zyx``).
    """

    array: np.ndarray
    recipe: str
    zones: tuple
    zone_weights: np.ndarray | None = None
    feature_depth: dict = field(default_factory=dict)
    slice_indices: dict = field(default_factory=dict)
    png_slices: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.zone_weights is None else self.zone_weights.nbytes
        return int(self.array.nbytes + extra + sum(a.nbytes for a in self.png_slices.values()))


def ras_axes(direction_xyz) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to view a (z, y, x) array as (S, R, A): (numpy axis per output axis, flip per axis).

    The output axes increase towards Superior, patient Right and Anterior; LPS vectors of the
    array axes come from the direction cosines, each output axis takes the closest array axis.
    """
    vecs = axis_lps_vectors(direction_xyz)              # rows: numpy axes; cols: L, P, S
    targets = ((2, 1.0), (0, -1.0), (1, -1.0))          # S = +S, R = -L, A = -P (LPS)
    axes, flips, used = [], [], set()
    for col, sign in targets:
        order = np.argsort(-np.abs(vecs[:, col]))
        a = int(next(i for i in order if int(i) not in used))
        used.add(a)
        axes.append(a)
        flips.append(bool(np.sign(vecs[a, col]) != sign))
    return tuple(axes), tuple(flips)


def to_ras(array: np.ndarray, direction_xyz) -> np.ndarray:
    """View of a (z, y, x) array with axes (S, R, A) (no copy)."""
    axes, flips = ras_axes(direction_xyz)
    out = np.transpose(array, axes)
    for ax, flip in enumerate(flips):
        if flip:
            out = np.flip(out, ax)
    return out


def radiological(slice_ra: np.ndarray) -> np.ndarray:
    """An axial (R, A) slice in the radiological view: anterior up, patient right on the left."""
    return np.ascontiguousarray(np.flip(np.asarray(slice_ra).T, (0, 1)))


def zone_labels(labels: np.ndarray, direction_xyz) -> np.ndarray:
    """Per-voxel zone of a lung label map: 0 not lung, 1 upper, 2 middle, 3 lower third (uint8)."""
    axis, third = slice_thirds(labels, direction_xyz)
    per_slice = (third + 1).astype(np.uint8)            # -1 (no lung) -> 0
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.where(np.asarray(labels) > 0, per_slice.reshape(shape), 0).astype(np.uint8)


def _lung_box(lung_sra: np.ndarray, margin_vox: int) -> tuple:
    if not lung_sra.any():
        raise ScanError("<array>", "no lung voxels on the 1 mm grid: nothing to embed", stage="inputs")
    return tuple((max(0, lo - margin_vox), min(n, hi + margin_vox))
                 for (lo, hi), n in zip(bounding_box(lung_sra), lung_sra.shape))


def _area_resize(array: np.ndarray, size) -> np.ndarray:
    """Area (box-average) resize of a 3D or 4D (C, ...) float array, as torch's ``mode="area"``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32, copy=False))
    t = t[None, None] if t.ndim == 3 else t[None]
    with torch.inference_mode():
        out = F.adaptive_avg_pool3d(t, tuple(size))
    return out[0, 0].numpy() if array.ndim == 3 else out[0].numpy()


def volume_input(hu_1mm: np.ndarray, labels_1mm: np.ndarray, direction_xyz, *, margin_mm: float = 10.0,
                 zone_pooling: str = "lung", size=VOLUME_SIZE, window_hu=VOLUME_WINDOW_HU,
                 windows=None) -> ModelInput:
    """The 3D backbone's input and per-zone pooling weights from a 1 mm volume.

    Parameters
    ----------
    hu_1mm : ndarray, shape (n_z, n_y, n_x), HU on a 1 x 1 x 1 mm grid
    labels_1mm : ndarray of uint8, same shape; lung > 0
    direction_xyz : 9 floats, ITK direction of the grid
    margin_mm : float
        Margin around the lung bounding box (clamped to the image).
    zone_pooling : {"lung", "slab"}
        ``lung``: a zone's embedding averages the layer4 positions weighted by how many of
        their input voxels are lung of that zone. ``slab``: plain average over the layer4 depth
        rows whose lung mostly belongs to the zone (``whole``: all positions, global average).
    size : (depth, H, W)
    window_hu : (low, high): HU mapped to 0 and 1
    windows : sequence of (low, high) or ``LungBelowFraction``, or None
        The input channels (``recipe_windows``): a window maps the area-resized HU to 0..1; a
        ``LungBelowFraction`` is thresholded on the 1 mm lung, then resized. None = ``(window_hu,)``.

    Returns
    -------
    ModelInput with zones ("whole", "upper", "middle", "lower").
    """
    if zone_pooling not in ("lung", "slab"):
        raise ValueError(f"zone_pooling must be 'lung' or 'slab', got {zone_pooling!r}")
    zones_sra = to_ras(zone_labels(labels_1mm, direction_xyz), direction_xyz)
    box = _lung_box(zones_sra > 0, int(round(margin_mm)))
    crop = tuple(slice(a, b) for a, b in box)
    hu_crop = to_ras(hu_1mm, direction_xyz)[crop]
    hu = _area_resize(hu_crop, size)
    zone_crop = zones_sra[crop]
    windows = tuple(windows) if windows else (tuple(window_hu),)
    chans = [_area_resize((zone_crop > 0) & (hu_crop < np.float32(w.threshold_hu)), size)
             if isinstance(w, LungBelowFraction) else apply_windows(hu, (w,)) for w in windows]
    array = (chans[0] if len(chans) == 1 else np.stack(chans)).astype(np.float16)
    del chans, hu_crop
    first = array if array.ndim == 3 else array[0]          # the QC picture shows the first window

    onehot = np.stack([zone_crop == z for z in (1, 2, 3)])
    grid = tuple(s // f for s, f in zip(size, FEATURE_STRIDE))
    # fraction of each layer4 cell's input voxels that are lung of each zone (area pooling
    # straight to the cell grid: the cells tile the resized input exactly); zone by zone, so one
    # float32 copy of the crop is held at a time, not three
    cells = np.stack([_area_resize(onehot[i], grid) for i in range(3)])    # (3, 10, 7, 7)
    per_zone = np.concatenate([cells.sum(0, keepdims=True), cells])     # whole, upper, middle, lower
    if zone_pooling == "slab":
        rows = cells.sum(axis=(2, 3))                                   # (3, depth rows)
        owner = np.where(rows.sum(0) > 0, rows.argmax(0), -1)
        slab = np.stack([np.broadcast_to((owner == z)[:, None, None], grid) for z in range(3)]).astype(np.float32)
        per_zone = np.concatenate([np.ones((1,) + grid, np.float32), slab])
    zones = ("whole",) + ZONES
    weights = np.zeros_like(per_zone, dtype=np.float32)
    feature_depth = {}
    for i, z in enumerate(zones):
        total = float(per_zone[i].sum())
        if total <= 0:
            raise ScanError("<array>", f"lung zone {z!r} covers no feature position", stage="inputs")
        weights[i] = per_zone[i] / total
        rows_with = np.flatnonzero(weights[i].sum(axis=(1, 2)) > 0)
        feature_depth[z] = (int(rows_with[0]), int(rows_with[-1]) + 1)

    depth_of = {}
    per_slice = onehot.sum(axis=(2, 3), dtype=np.float32)[:, :, None, None]   # (3, crop depth): lung per slice
    lung_rows = _area_resize(per_slice, (size[0], 1, 1))[:, :, 0, 0]    # (3, 160) on the input's depth axis
    for i, z in enumerate(ZONES):
        w = lung_rows[i]
        depth_of[z] = int(np.round((w * np.arange(w.size)).sum() / w.sum()))
    depth_of["whole"] = int(np.round((lung_rows.sum(0) * np.arange(size[0])).sum() / lung_rows.sum()))
    png = {z: radiological(first[d].astype(np.float32)) for z, d in depth_of.items()}
    meta = {"crop_sra_1mm": [list(b) for b in box], "input_size": list(size), "window_hu": list(windows[0]),
            "windows_hu": [channel_meta(w) for w in windows],
            "zone_pooling": zone_pooling, "png_depth": depth_of, "axes": "S,R,A"}
    return ModelInput(array, "volume", zones, weights, feature_depth, {}, png, meta)


def slab_inputs(hu_1mm: np.ndarray, labels_1mm: np.ndarray, direction_xyz, *, margin_mm: float = 10.0,
                window_hu=(-1000.0, 400.0), size: int = SLAB_SIZE) -> ModelInput:
    """The paper's 2.5D inputs: three zones x three consecutive axial 1 mm slices, 224 x 224.

    Parameters
    ----------
    hu_1mm, labels_1mm, direction_xyz : as ``volume_input``
    margin_mm : float
        Margin added around the square in-plane lung box.
    window_hu : (low, high): clip window, min-max scaled to 0..1 (the paper: [-1000, 400])
    size : output side, pixels

    Returns
    -------
    ModelInput with zones ("upper", "middle", "lower"), ``array`` shape (3, 3, size, size);
    ``slice_indices[zone]`` = the three slices' ranks from the most superior 1 mm slice.
    """
    import torch
    import torch.nn.functional as F

    zones_sra = to_ras(zone_labels(labels_1mm, direction_xyz), direction_xyz)
    hu_sra = to_ras(hu_1mm, direction_xyz)
    lung = zones_sra > 0
    (_, _), (r0, r1), (a0, a1) = _lung_box(lung, 0)
    side = max(r1 - r0, a1 - a0) + 2 * int(round(margin_mm))
    centre = ((r0 + r1) / 2.0, (a0 + a1) / 2.0)
    n_s = hu_sra.shape[0]
    images, slices, png = [], {}, {}
    area = lung.sum(axis=(1, 2))
    for z_i, z in enumerate(ZONES, start=1):
        in_zone = (zones_sra == z_i).sum(axis=(1, 2))
        if not in_zone.any():
            raise ScanError("<array>", f"lung zone {z!r} is empty on the 1 mm grid", stage="inputs")
        k = int(np.argmax(np.where(in_zone > 0, area, -1)))
        ks = [min(max(k + d, 0), n_s - 1) for d in (-1, 0, 1)]
        stack = np.stack([_square_crop(hu_sra[i], centre, side) for i in ks]).astype(np.float32)
        with torch.inference_mode():
            t = F.interpolate(torch.from_numpy(stack)[None], size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True)[0].numpy()
        img = apply_windows(t, (window_hu,))
        images.append(img)
        slices[z] = [n_s - 1 - i for i in ks]       # rank from the most superior slice
        png[z] = radiological(img[1])
    meta = {"square_side_mm": int(side), "window_hu": list(window_hu), "axes": "S,R,A"}
    return ModelInput(np.stack(images).astype(np.float16), "slabs", ZONES, None, {}, slices, png, meta)


def _square_crop(slice_ra: np.ndarray, centre, side: int) -> np.ndarray:
    """A side x side crop centred on ``centre``; outside the image is air (-1024 HU)."""
    out = np.full((side, side), -1024.0, np.float32)
    starts = [int(round(c - side / 2.0)) for c in centre]
    src, dst = [], []
    for s, n in zip(starts, slice_ra.shape):
        lo, hi = max(s, 0), min(s + side, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = slice_ra[tuple(src)]
    return out
