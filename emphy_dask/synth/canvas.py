"""The change field of one inserted variant, built lesion group by group, and the passes that fill it.

``insert.py`` calls ``place_lesions`` once per try of its closed loop on the cluster exponent D
(``Canvas.reset`` between tries), and reads the tried variant's D with ``Canvas.lesion_d``: the
project's estimator (``phenotypes/clusters.py``) on the LAA clusters inside the changed voxels,
the quantity an evaluator computes from the written DICOM and the lesion mask.
"""
from __future__ import annotations

import math

import numpy as np

from emphy_dask.phenotypes.clusters import mask_cluster_sizes_mm3, power_law_exponent
from emphy_dask.synth.lesions import mean_volume_mm3, sample_centres, sample_volumes_mm3

LAA_HU = -950
#: Stop adding lesions once the added LAA% is this close to the aim (percentage points).
TOLERANCE_PCT = 0.25
MAX_PASSES = 20
NO_OWNER = np.iinfo(np.int32).max
#: Lesions are kept apart until a pass accepts fewer than this fraction of its lesions (the lung
#: then holds no more separate ones; merged lesions would read as one large LAA cluster).
MERGE_BELOW = 0.2
#: At most this many candidates per lesion needed in a pass that keeps lesions apart.
MAX_OVERSAMPLE = 6.0
#: The last passes may merge lesions whatever the acceptance (the severity is reached).
MERGE_PASSES = 3


def first_claims(idx: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Lesions (rows of flat voxel indices, (m, k)) that share no voxel with an earlier row.
    ``scratch``: int32 flat array of the canvas' size holding ``NO_OWNER`` (restored)."""
    m, k = idx.shape
    flat = idx.ravel()
    lid = np.repeat(np.arange(m, dtype=np.int32), k)
    np.minimum.at(scratch, flat, lid)          # each voxel: its first claimant
    keep = np.ones(m, bool)
    keep[lid[scratch[flat] != lid]] = False
    scratch[flat] = NO_OWNER
    return keep


def halo_free(flat_core: np.ndarray, centres: np.ndarray, halo: np.ndarray) -> np.ndarray:
    """Which candidates (flat centres, (m,)) hold no core voxel in their halo (flat offsets, (h,)), bool (m,).

    Most candidates are refused once the lung fills, most after a few of their halo's voxels:
    the halo is read in blocks of growing size (1, 2, 4, ... offsets), each on the candidates
    not yet refused, instead of all m x h voxels at once. The same answer as
    ``~flat_core[centres[:, None] + halo[None]].any(axis=1)``, in any order of ``halo``."""
    alive = np.arange(len(centres))
    start, step = 0, 1
    while start < len(halo) and len(alive):
        block = halo[start:start + step]
        alive = alive[~flat_core[centres[alive, None] + block[None]].any(axis=1)]
        start, step = start + step, min(2 * step, 256)
    free = np.zeros(len(centres), bool)
    free[alive] = True
    return free


def unique_indices(idx: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """The distinct values of ``idx`` (flat voxel indices, any order; fewer than 2^31), in
    O(len(idx)) rather than a sort or a pass over the canvas. ``scratch``: int32 flat array of
    the canvas' size holding ``NO_OWNER`` (restored)."""
    pos = np.arange(len(idx), dtype=np.int32)
    scratch[idx] = pos                         # of repeated voxels one position wins, whichever
    first = idx[scratch[idx] == pos]
    scratch[first] = NO_OWNER
    return first


class Canvas:
    """The change field of one variant on the (padded) lung box, built lesion group by group.

    ``change`` (float32, HU) holds per voxel the most negative ``delta * weight`` of the
    lesions covering it; ``covered`` marks covered voxels and ``core`` those of weight >= 0.5, so
    that a pass may refuse lesions whose halo (core plus a gap) would hold another's core: kept
    apart, lesions stay separate clusters and the size law survives into the LAA clusters.
    Later passes let them merge (confluent emphysema) when the lung holds no more separate ones.
    """

    def __init__(self, hu_b, lung_b, paren_b, floor_hu):
        self.hu, self.lung, self.paren, self.floor = hu_b, lung_b, paren_b, floor_hu
        self.change = np.zeros(hu_b.shape, np.float32)
        self.covered = np.zeros(hu_b.shape, bool)
        self.core = np.zeros(hu_b.shape, bool)
        self.base_laa = lung_b & (hu_b < LAA_HU)
        self.laa = self.base_laa.copy()
        self.scratch = np.full(hu_b.size, NO_OWNER, np.int32)
        self.strides = np.array([hu_b.shape[1] * hu_b.shape[2], hu_b.shape[2], 1], np.int64)   # (z, y, x) -> flat
        self.n_lesions = 0
        self.mask = None                    # lesion_d's LAA mask, allocated at its first call

    def reset(self) -> None:
        """Back to the base (no lesion), for another try: only the covered voxels are cleared
        (every change, core and LAA change lies there)."""
        t = np.flatnonzero(self.covered)
        self.change.reshape(-1)[t] = 0.0
        self.covered.reshape(-1)[t] = False
        self.core.reshape(-1)[t] = False
        self.laa.reshape(-1)[t] = self.base_laa.reshape(-1)[t]
        self.n_lesions = 0

    def state(self) -> tuple:
        """What a try built, on its covered voxels only (``restore`` puts it back): a copy of
        the whole box's arrays cost more than a try's read-back of D."""
        t = np.flatnonzero(self.covered)
        return t, self.change.reshape(-1)[t], self.core.reshape(-1)[t], self.n_lesions

    def restore(self, state) -> None:
        t, change, core, n = state
        self.reset()
        self.change.reshape(-1)[t] = change
        self.covered.reshape(-1)[t] = True
        self.core.reshape(-1)[t] = core
        self.laa.reshape(-1)[t] = self.lung.reshape(-1)[t] & (self._values(t) < LAA_HU)
        self.n_lesions = n

    def flat(self, templates) -> list:
        """Per radius bin, per shape: the template as flat offsets on this canvas (elements):
        (offsets, weights, halo offsets, core offsets, the halo's offsets in a fixed shuffled
        order for ``halo_free``: spread-out voxels first refuse most candidates early). The box is
        padded by the largest template's reach, so a centre inside the lung plus any offset stays
        inside the box."""
        strides = self.strides
        shuffle = np.random.default_rng(0)          # its own stream: the lesions' draws do not move
        return [[(off @ strides, w, halo @ strides, (off @ strides)[w >= 0.5],
                  shuffle.permutation(halo @ strides)) for off, w, halo in row]
                for row in templates]

    def add(self, centres, bins, which, deltas, flat_templates, separate: bool) -> tuple[int, int]:
        """Add lesions (centres (n, 3) in box voxels, template ``flat_templates[bins][which]``,
        from ``flat``); returns (core voxels (weight >= 0.5) of the lesions accepted, lesions accepted)."""
        flat_change, flat_cov, flat_core = self.change.reshape(-1), self.covered.reshape(-1), self.core.reshape(-1)
        centres = np.asarray(centres, np.int64) @ self.strides
        touched, n_core, n_accepted = [], 0, 0
        for b in np.unique(bins)[::-1]:         # large lesions first: small ones fill the gaps, and
            for t in range(len(flat_templates[b])):  # separation does not refuse large ones more often
                sel = (bins == b) & (which == t)
                if not sel.any():
                    continue
                off, w, halo, core_off, halo_shuffled = flat_templates[b][t]
                c, d = centres[sel], deltas[sel]
                if separate:
                    # Refuse lesions whose halo holds another's core, and all but one of a group whose halos overlap.
                    free = halo_free(flat_core, c, halo_shuffled)
                    c, d = c[free], d[free]
                    near = c[:, None] + halo[None]
                    if len(c) > 1:
                        keep = first_claims(near, self.scratch)
                        c, d = c[keep], d[keep]
                if not len(c):
                    continue
                idx = (c[:, None] + off[None]).ravel()
                vals = (d[:, None] * w[None]).astype(np.float32).ravel()
                np.minimum.at(flat_change, idx, vals)
                flat_cov[idx] = True
                flat_core[(c[:, None] + core_off[None]).ravel()] = True
                touched.append(idx)
                self.n_lesions += len(c)
                n_core += len(c) * len(core_off)
                n_accepted += len(c)
        if touched:
            # LAA again on the touched voxels, each once (fringes overlap, many times for panlobular's
            # wide ones). A pass touches a few % of the box: dedup on the touched list itself (each
            # voxel keeps the one position whose number it holds), not a scan of the box.
            t = unique_indices(np.concatenate(touched), self.scratch)
            self.laa.reshape(-1)[t] = self.lung.reshape(-1)[t] & (self._values(t) < LAA_HU)
        return n_core, n_accepted

    def _values(self, t):
        hu = self.hu.reshape(-1)[t].astype(np.int32)
        step = np.rint(self.change.reshape(-1)[t]).astype(np.int32)
        moved = self.paren.reshape(-1)[t] & (step <= -1)
        return np.where(moved, np.maximum(hu + step, self.floor), hu)

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """The changed voxels of the box (flat indices, ascending) and their new HU (int32)."""
        t = np.flatnonzero(self.covered)
        v = self._values(t)
        moved = v != self.hu.reshape(-1)[t]
        return t[moved], v[moved]

    def lesion_d(self, spacing_zyx_mm) -> float:
        """Cluster exponent D of the LAA inside the changed voxels: ``laa_cluster_exponent_d`` of
        (result, changed voxels), on the same clusters, built from the covered voxels alone (no
        copy of the box's HU). Every changed voxel lies in the box, so this equals D on the whole
        written volume and its lesion mask; NaN with too few clusters. The mask is a bool box
        kept for every try (cleared on its voxels), the labels go into ``scratch`` (refilled):
        no box is allocated and paged in per try."""
        t, v = self.changes()
        t = t[v < LAA_HU]                                      # LAA among the changed voxels
        if self.mask is None:
            self.mask = np.zeros(self.hu.shape, bool)
        self.mask.reshape(-1)[t] = True
        try:
            sizes = mask_cluster_sizes_mm3(self.mask, spacing_zyx_mm, voxels=t,
                                           output=self.scratch.reshape(self.hu.shape))
        finally:
            self.mask.reshape(-1)[t] = False
            self.scratch.fill(NO_OWNER)
        return power_law_exponent(sizes)


def place_lesions(canvas: Canvas, plan, d_s: float, goal_vox: float, rng) -> int:
    """Add lesions in passes until ``goal_vox`` LAA voxels are added (from below); returns those added.

    ``plan`` (dict): grid, weights (per radius bin a list of stages' ``centre_table``), flat_templates
    (``Canvas.flat`` of the templates, built once for every try), radii,
    core_vox (bins x shapes), n_shapes, spec,
    voxel_mm3, fallback_hu, target_hu, n_lung. Sizes follow the power law of exponent ``d_s``
    (``sample_volumes_mm3``). Passes keep lesions apart; once a pass accepts fewer than
    ``MERGE_BELOW`` of its lesions the favoured cells are full, and the centres are drawn with
    the next stage's weights (flatter, then wider); after the last stage, lesions may merge.
    """
    spec, grid, radii = plan["spec"], plan["grid"], plan["radii"]
    core_vox, n_shapes, n_lung = plan["core_vox"], plan["n_shapes"], plan["n_lung"]
    base_laa = int(np.count_nonzero(canvas.base_laa))
    shape = np.asarray(canvas.hu.shape)
    efficiency = 0.8                        # new LAA voxels per core voxel; measured after each pass
    mean_mm3 = mean_volume_mm3(d_s, spec.diameter_mm)
    # Where the pattern's favoured cells hold no more separate lesions, spread them over its other
    # cells (flatter weights) before letting them merge: the zone predominance stays (favoured cells
    # fill first), and lesions stay distinct clusters as long as the lung has room for them.
    stages = plan["weights"]                # per radius bin, per stage
    flat_templates = plan["flat_templates"]
    stage, separate, added, accept = 0, True, 0, 1.0
    for i_pass in range(MAX_PASSES):
        # Aim a little short, then top up: approach the severity from below.
        need_vox = 0.9 * (goal_vox - added) / efficiency
        # Candidates for the need, more where the last pass refused many (kept apart).
        want_vox = need_vox / accept if separate else need_vox
        vols = sample_volumes_mm3(int(math.ceil(1.5 * want_vox * plan["voxel_mm3"] / mean_mm3)) + 4, d_s,
                                  spec.diameter_mm, rng)
        bins = np.clip(np.searchsorted(radii, np.cbrt(vols * 3.0 / (4.0 * np.pi))), 0, len(radii) - 1)
        which = rng.integers(0, n_shapes[bins])
        size = core_vox[bins, which]
        fits = size <= max(1.5 * need_vox, size.min())        # no single lesion far past the aim
        bins, which, size = bins[fits], which[fits], size[fits]
        n = int(np.searchsorted(np.cumsum(size), want_vox)) + 1
        bins, which = bins[:n], which[:n]
        order = np.argsort(bins, kind="stable")
        bins, which = bins[order], which[order]
        ubins, counts = np.unique(bins, return_counts=True)
        parts = [sample_centres(grid, stages[b][stage], int(k), rng) for b, k in zip(ubins, counts)]
        placed = np.repeat(np.array([len(c) > 0 for c in parts], bool), counts)   # a size no allowed cell takes is dropped
        bins, which = bins[placed], which[placed]
        centres = (np.concatenate(parts) if parts else np.zeros((0, 3), int)).clip(0, shape - 1)
        ok = canvas.lung[tuple(centres.T)]
        centres, bins, which = centres[ok], bins[ok], which[ok]
        cell = tuple((centres // np.asarray(grid.factor)).clip(0, np.asarray(grid.paren_mean_hu.shape) - 1).T)
        local = np.nan_to_num(grid.paren_mean_hu[cell], nan=plan["fallback_hu"])
        deltas = np.minimum(plan["target_hu"] + rng.normal(0, 8, len(bins)) - local, 0.0).astype(np.float32)
        before = added
        n_core, n_accepted = canvas.add(centres, bins, which, deltas, flat_templates, separate)
        added = int(np.count_nonzero(canvas.laa)) - base_laa
        if added >= goal_vox - TOLERANCE_PCT / 100.0 * n_lung:
            break
        if separate:
            accept = float(np.clip(n_accepted / max(len(bins), 1), 1.0 / MAX_OVERSAMPLE, 1.0))
        if i_pass + 1 >= MAX_PASSES - MERGE_PASSES:
            separate = False                    # the last passes reach the severity whatever it takes
        elif separate and n_accepted < MERGE_BELOW * max(len(bins), 1):
            if stage + 1 < len(stages[0]):
                stage += 1                      # the favoured cells are full: spread out
            else:
                separate = False                # the lung is full of separate lesions: let them merge
        if n_core and added > before:
            efficiency = float(np.clip((added - before) / n_core, 0.1, 1.5))
    return added
