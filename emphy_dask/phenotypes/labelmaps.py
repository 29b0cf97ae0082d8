"""Lung label maps in the encodings users bring, decoded to side / third / lobe per lung voxel.

Encodings (detected from the values present, or named by the caller):

``binary``
    One nonzero value: lung, sides unknown. Right and left are then split as the threshold
    segmenter splits them (``emphy_dask.segment.sides.split_sides``: components, patient
    left-right from the direction cosines); said so in ``LungRegions.notes``.
``right-left``
    Values {1, 2}: 1 right lung, 2 left lung (lungmask R231, this project's masks).
``ltrc-lobes``
    Values within 1-5, at least three of them (lungmask's LTRCLobes model): 1 left upper,
    2 left lower, 3 right upper, 4 right middle, 5 right lower lobe.
``cip``
    The Chest Imaging Platform's label maps (``cipChestConventions.h``): chest region =
    value & 0xFF, chest type = value >> 8. Detected when a value exceeds 255 or every value
    is a CIP region code with at least one lung region. Lung = the lung regions only
    (WHOLELUNG 1, RIGHTLUNG 2, LEFTLUNG 3, the lobes 4-8, the per-lung thirds 9-14 and
    UPPER/MIDDLE/LOWERTHIRD 20-22); a voxel whose region is anything else (undefined,
    mediastinum, ...) is not lung whatever its type (airway, vessel).

Any other labelling is read as ``binary`` (nonzero = lung) with a note naming the values.

Thirds come from the map when it has them (CIP's thirds regions), else they are computed
(:func:`.regions.slice_thirds`, equal-volume slabs shared by both lungs, CIP's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emphy_dask.volume import counts_along

from .regions import REGIONS, THIRDS, slice_thirds

# CIP chest regions (cipChestConventions.h)
CIP_WHOLELUNG, CIP_RIGHTLUNG, CIP_LEFTLUNG = 1, 2, 3
CIP_LOBES = {4: 1, 5: 2, 6: 3, 7: 4, 8: 5}              # RSL, RML, RIL, LSL, LIL -> lobe code
CIP_THIRDS = {9: (2, 0), 10: (2, 1), 11: (2, 2),        # left upper/middle/lower third -> (side, third)
              12: (1, 0), 13: (1, 1), 14: (1, 2),       # right
              20: (0, 0), 21: (0, 1), 22: (0, 2)}       # upper/middle/lower third, both lungs
CIP_LUNG_REGIONS = frozenset(range(1, 15)) | {20, 21, 22}
CIP_N_REGIONS = 69                                      # UNDEFINEDREGION .. SPINALCORD
CIP_TYPE_NAMES = {1: "normal parenchyma", 2: "airway", 3: "vessel"}

#: Lobe codes 1..5 -> names (rows of the phenotype table when the map has lobes).
LOBES = ("RightUpperLobe", "RightMiddleLobe", "RightLowerLobe", "LeftUpperLobe", "LeftLowerLobe")
LOBE_SIDE = np.array([0, 1, 1, 1, 2, 2], np.uint8)       # lobe code -> side (1 right, 2 left)
LTRC_TO_LOBE = {1: 4, 2: 5, 3: 1, 4: 2, 5: 3}            # lungmask LTRCLobes label -> lobe code

NO_THIRD = 3
#: Codes per lung voxel: code = (side * 4 + third) * 6 + lobe, side 0-2, third 0-3 (3 none), lobe 0-5.
N_CODES = 3 * 4 * 6

ENCODING_TEXT = {
    "binary": "binary lung mask (one nonzero value)",
    "right-left": "right/left lung labels (1 right, 2 left)",
    "ltrc-lobes": "lungmask LTRCLobes labels (1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL)",
    "cip": "CIP label map (region = value & 0xFF, type = value >> 8; lung = lung regions only)",
    "empty": "empty mask (no nonzero voxel)",
}


@dataclass
class LungRegions:
    """A label map decoded to lung voxels and their side, third and lobe.

    Attributes
    ----------
    lung : ndarray of bool, shape (n_z, n_y, n_x)
    code : ndarray of uint8, shape (n_lung_voxels,)
        ``(side * 4 + third) * 6 + lobe`` per lung voxel, C order of ``lung``: side 0 unknown,
        1 right, 2 left; third 0 upper, 1 middle, 2 lower, 3 none; lobe 0 none, 1-5 (:data:`LOBES`).
    encoding : str
        binary | right-left | ltrc-lobes | cip | empty
    has_sides, has_lobes, thirds_from_map : bool
    notes : list of str
        What was read and done (for the user): encoding, voxels left out, sides split.
    """

    lung: np.ndarray
    code: np.ndarray
    encoding: str
    has_sides: bool
    has_lobes: bool
    thirds_from_map: bool
    notes: list = field(default_factory=list)

    @property
    def side(self) -> np.ndarray:
        return self.code // 24

    @property
    def third(self) -> np.ndarray:
        return (self.code // 6) % 4

    @property
    def lobe(self) -> np.ndarray:
        return self.code % 6

    def side_labels(self) -> np.ndarray:
        """uint8 volume of the lung used: 0 background, 1 right, 2 left; 1 = lung when sides are unknown."""
        out = np.zeros(self.lung.shape, np.uint8)
        out[self.lung] = self.side if self.has_sides else 1
        return out


def _as_label_array(labels) -> np.ndarray:
    """Labels as a non-negative integer array (bool -> uint8); anything else is a ValueError."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("label map holds non-integer values")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map holds negative values (min {int(labels.min())})")
    return labels


def _present_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D array of positive integers (the nonzero labels).

    A few compares when the range is small (the usual 1/2 or 1-5 maps: no int64 copy of
    tens of millions of voxels), a bincount for 16-bit ranges, ``np.unique`` beyond.
    """
    if values.size == 0:
        return np.array([], np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 16:
        return np.array([v for v in range(lo, hi + 1) if v in (lo, hi) or np.any(values == v)], np.int64)
    if hi < 65536:
        return np.flatnonzero(np.bincount(values, minlength=hi + 1)).astype(np.int64)
    return np.unique(values).astype(np.int64)


def detect_encoding(values) -> str:
    """Encoding of a label map from its distinct nonzero values (see the module doc)."""
    v = set(int(x) for x in values)
    if not v:
        return "empty"
    if max(v) > 255:
        return "cip"
    if len(v) == 1:
        return "binary"
    if v == {1, 2}:
        return "right-left"
    if v <= {1, 2, 3, 4, 5} and len(v) >= 3:
        return "ltrc-lobes"
    if v <= set(range(1, CIP_N_REGIONS)) and v & CIP_LUNG_REGIONS:
        return "cip"
    return "unknown"


def _cip_tables():
    """Lookup tables over region codes 0-255: is lung, side, third, lobe."""
    is_lung = np.zeros(256, bool)
    is_lung[list(CIP_LUNG_REGIONS)] = True
    side = np.zeros(256, np.uint8)
    third = np.full(256, NO_THIRD, np.uint8)
    lobe = np.zeros(256, np.uint8)
    side[CIP_RIGHTLUNG], side[CIP_LEFTLUNG] = 1, 2
    for r, k in CIP_LOBES.items():
        lobe[r], side[r] = k, LOBE_SIDE[k]
    for r, (s, t) in CIP_THIRDS.items():
        side[r], third[r] = s, t
    return is_lung, side, third, lobe


def decode_label_map(labels, spacing_zyx_mm, direction_xyz, encoding: str | None = None) -> LungRegions:
    """Decode a lung label map (any encoding of the module doc) into :class:`LungRegions`.

    Parameters
    ----------
    labels : ndarray of int or bool, shape (n_z, n_y, n_x)
    spacing_zyx_mm : 3 floats, mm (used to split a binary mask into lungs)
    direction_xyz : 9 floats, ITK direction (head-feet axis for thirds, left-right for sides)
    encoding : str, optional
        Force an encoding instead of detecting it (e.g. a segmenter that returns lobes).
    """
    labels = _as_label_array(labels)
    nonzero = labels != 0
    vals = labels[nonzero]                                # the labelled voxels, C order
    values = _present_values(vals)
    detected = detect_encoding(values)
    enc = encoding or detected
    notes = []
    if enc == "unknown":
        notes.append(f"mask values {values[:8].tolist()}{' ...' if values.size > 8 else ''} match no known "
                     "encoding: read as a binary mask (nonzero = lung)")
        enc = "binary"
    if enc not in ENCODING_TEXT:
        raise ValueError(f"unknown label encoding {enc!r}; known: {', '.join(ENCODING_TEXT)}")
    notes.insert(0, f"mask read as {ENCODING_TEXT[enc]}")

    lung = nonzero
    side_v = third_v = lobe_v = None
    if enc == "cip":
        is_lung, side_t, third_t, lobe_t = _cip_tables()
        region = np.bitwise_and(vals, 0xFF)
        keep = is_lung[region]
        n_out = int(keep.size - np.count_nonzero(keep))
        if n_out:
            tc = np.bincount((vals[~keep].astype(np.int64) >> 8))
            what = ", ".join(f"{CIP_TYPE_NAMES.get(t, f'type {t}')} {c}" for t, c in enumerate(tc) if c)
            notes.append(f"{n_out} labelled voxels in no lung region left out ({what})")
            lung = np.zeros(labels.shape, bool)
            lung[nonzero] = keep
        r = region[keep]
        side_v, third_v, lobe_v = side_t[r], third_t[r], lobe_t[r]
    elif enc == "ltrc-lobes":
        if values.size and values.max() > 5:
            raise ValueError(f"LTRCLobes labels are 1-5, got {int(values.max())}")
        lut = np.zeros(6, np.uint8)
        for k, lobe in LTRC_TO_LOBE.items():
            lut[k] = lobe
        lobe_v = lut[vals]
        side_v = LOBE_SIDE[lobe_v]
    elif enc == "right-left":
        if values.size and values.max() > 2:
            raise ValueError(f"right/left labels are 1-2, got {int(values.max())}")
        side_v = vals.astype(np.uint8, copy=False)
    if enc in ("binary", "cip") and lung.any() and (side_v is None or not side_v.any()):
        from emphy_dask.segment.sides import split_sides

        split = split_sides(lung, spacing_zyx_mm, direction_xyz)
        if split is None:
            notes.append("the mask holds one lung only: right/left not reported")
        else:
            side_v = split[lung]
            notes.append("right/left lungs split from the mask by its components, as the threshold "
                         "segmenter does (patient left-right from the direction cosines)")

    n = int(np.count_nonzero(lung))
    side_v = np.zeros(n, np.uint8) if side_v is None else side_v.astype(np.uint8, copy=False)
    lobe_v = np.zeros(n, np.uint8) if lobe_v is None else lobe_v.astype(np.uint8, copy=False)
    thirds_from_map = third_v is not None and bool(np.any(third_v != NO_THIRD))
    if not thirds_from_map:
        axis, third = slice_thirds(lung, direction_xyz)
        third = np.where(third < 0, NO_THIRD, third).astype(np.uint8)
        if axis == 0:       # lung voxels in C order run slice by slice: each slice's third, repeated
            third_v = np.repeat(third, counts_along(lung, 0))
        else:
            shape = [1] * lung.ndim
            shape[axis] = -1
            third_v = np.broadcast_to(third.reshape(shape), lung.shape)[lung]
    code = (side_v * np.uint8(4) + third_v.astype(np.uint8)) * np.uint8(6) + lobe_v
    return LungRegions(lung=lung, code=code, encoding=enc, has_sides=bool(np.any(side_v)),
                       has_lobes=bool(np.any(lobe_v)), thirds_from_map=thirds_from_map, notes=notes)


_CODES = np.arange(N_CODES)
_SIDE, _THIRD, _LOBE = _CODES // 24, (_CODES // 6) % 4, _CODES % 6


def region_selectors(regions: LungRegions) -> list[tuple[str, np.ndarray | None]]:
    """(region name, bool mask over the :data:`N_CODES` voxel codes) in report order.

    :data:`.regions.REGIONS` always (the side rows None when the map has no sides), then
    :data:`LOBES` when the map has lobes.
    """
    out = [("WholeLung", np.ones(N_CODES, bool))]
    for s, name in ((1, "RightLung"), (2, "LeftLung")):
        out.append((name, (_SIDE == s) if regions.has_sides else None))
    for t, name in enumerate(THIRDS):
        out.append((name, _THIRD == t))
    for s, side in ((1, "Right"), (2, "Left")):
        for t, level in enumerate(("Upper", "Middle", "Lower")):
            out.append((f"{side}{level}Third", ((_SIDE == s) & (_THIRD == t)) if regions.has_sides else None))
    if regions.has_lobes:
        out += [(name, _LOBE == k + 1) for k, name in enumerate(LOBES)]
    assert [n for n, _ in out[:len(REGIONS)]] == list(REGIONS)
    return out


def region_masks(labels, direction_xyz, spacing_zyx_mm=(1.0, 1.0, 1.0), encoding: str | None = None) -> dict:
    """Boolean mask of each region (:func:`region_selectors` order), shape like ``labels``.

    Regions the map cannot give (sides of a one-lung binary mask) are all False.
    """
    regions = decode_label_map(labels, spacing_zyx_mm, direction_xyz, encoding)
    masks = {}
    for name, sel in region_selectors(regions):
        m = np.zeros(regions.lung.shape, bool)
        if sel is not None:
            m[regions.lung] = sel[regions.code]
        masks[name] = m
    return masks
