"""Kernel harmonisation: turn a sharp-kernel CT into what a standard kernel would have given.

Why: LAA%-950, LAA%-910, Perc15 and MLD are density thresholds and moments, and the kernel moves
them more than mild disease does (Philips L vs B on one acquisition: LAA%-950 13.2 % vs 0.1 %,
MLD 16 HU lower). A sharp kernel is, to first order, the standard kernel times an in-plane
transfer R(f): it amplifies high-frequency noise *and* mid/low-frequency edge overshoot (the
dark halos around vessels and the chest wall that lower MLD). The filter T = 1/R undoes both.

Method ``"nps_ratio"`` (default; ``transfer.py``, ``edge_mtf.py``): the whole transfer R(f) is
read from the scan itself, shape-free: its soft-tissue noise power spectrum against the
reference standard kernel's (Philips B) gives R up to the noise level, the air-skin edge's MTF
pins R at 0.04-0.3 lp/mm; ``ln R`` is a three-term low-order form with R(0) = 1. T is clipped
to <= 1 (never amplify), non-increasing, and aims at the scan's vendor standard
(``transfer.VENDOR_STANDARD_LOG_R``). A scan whose estimate is unreliable (fewer than
``MIN_ROIS`` soft-tissue ROIs, e.g. a slab; no usable air-skin edge; a failed fit) is left as
it is, with the reason, never filtered on a guess.

Method ``"nps_shape"`` (the former default, kept for comparison): ``exp(-s g(f))`` with ``g``
the Philips L/B transfer measured once and shipped as constants, ``s`` fitted to the NPS over
0.2-0.55 lp/mm. A kernel of another shape gets a wrong ``s`` and a wrong extrapolation below
0.2 lp/mm: it over-corrects (``benchmarks/README.md``).

Both: voxels the sharp kernel pushed below the lowest stored value (-1024) first get their
expected value below it (``clipping.py``), or the filter would spread the clipping's upward
bias as too-dense lung; each slice is then multiplied in Fourier space by T (zero phase, unit
gain at f = 0, >= 32 mm of air padding) and rounded to int16 within the input's range.

Which scans are filtered: a kernel classed ``sharp`` / ``very_sharp`` by the vendor table
(``io/kernels.py``), or ``unknown`` there and sharp by the image estimate. Soft and standard
kernels are returned unchanged (the reference is a standard kernel; sharpening would add noise).

What it cannot do: recover detail (it only removes the sharp kernel's excess); make a soft
kernel standard; undo iterative or deep-learning reconstructions (non-linear, their noise
texture is not a filtered FBP texture); remove dose or slice-thickness differences; restore
where, inside a heavily clipped emphysema cluster, the deep voxels were.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from scipy import fft as sfft

from .clipping import body_mask, clipped_fill
from .edge_mtf import MIN_PROFILES as EDGE_MIN_PROFILES
from .edge_mtf import edge_mtf
from .kernel_estimate import (FIT_BAND_LPMM, MIN_ROIS, KernelEstimate, estimate_kernel, image_noise_sd, measured_nps,
                              planes_first, transfer_function)
from .transfer import TRANSFER_BAND_LPMM, VENDOR_STANDARD_LOG_R, fit_transfer, nps_mean_frequency

__all__ = ["harmonize_kernel", "harmonize_volume", "harmonize_scan", "filter_planes", "params_json",
           "estimate_kernel", "KernelEstimate", "transfer_function", "METHODS"]

#: Strength of each vendor's standard kernel against the reference (Philips B): a sharp scan is
#: filtered down to its own vendor's standard, not to Philips B. GE STANDARD: 0.38, measured on
#: LIDC-IDRI-0013 (GE LightSpeed Plus, 467 ROIs; one scan: the short LIDC slabs hold too little
#: soft tissue); vendors without a measured standard are taken as the reference.
VENDOR_STANDARD_STRENGTH = {"philips": 0.0, "ge": 0.38}
#: Strength used when the image gives no estimate (too little uniform soft tissue).
DEFAULT_STRENGTH = {"sharp": 1.0, "very_sharp": 1.5}
MAX_STRENGTH = 3.0
MIN_STRENGTH = 0.1
#: ``nps_ratio`` (default): the whole transfer from the scan's own NPS (``transfer.py``);
#: ``nps_shape``: the former one-parameter filter exp(-s g(f)), g the Philips L/B shape (kept
#: for comparison: it over-corrects kernels of another shape, ``benchmarks/README.md``).
METHODS = ("nps_ratio", "nps_shape")
#: A transfer that keeps more than this at 0.5 lp/mm removes nothing worth a filter.
MIN_REMOVED_GAIN = 0.95


def _plane_grid(shape_yx, spacing_yx_mm):
    """FFT sizes (>= 32 mm of padding per side: the filter's low-frequency tail undoes edge
    overshoot up to ~30 mm away) and the radial frequency of each rfft2 bin, lp/mm."""
    (ny, nx), (dy, dx) = shape_yx, spacing_yx_mm
    my = sfft.next_fast_len(ny + 2 * int(np.ceil(32.0 / dy)), real=True)
    mx = sfft.next_fast_len(nx + 2 * int(np.ceil(32.0 / dx)), real=True)
    return (my, mx), np.hypot(np.fft.fftfreq(my, dy)[:, None], np.fft.rfftfreq(mx, dx)[None, :])


def _filter_block(block: np.ndarray, h: np.ndarray, size) -> np.ndarray:
    """``block`` (k, ny, nx) float32 filtered by ``h`` (rfft2 bins of ``size``), zero phase.

    The block's air level is subtracted first so that the zero padding continues the image."""
    ny, nx = block.shape[1:]
    level = np.median(block[:, [0, -1], :], axis=(1, 2))[:, None, None].astype(np.float32)
    spec = sfft.rfft2(block - level, s=size, axes=(1, 2))
    spec *= h
    return sfft.irfft2(spec, s=size, axes=(1, 2))[:, :ny, :nx] + level


def filter_planes(hu: np.ndarray, spacing_zyx_mm, strength, slice_axis: int = 0, *, fov_mask=None,
                  floor_hu: float | None = None, fills: dict | None = None, clip_range=None,
                  body=None, chunk: int = 16) -> np.ndarray:
    """Apply an in-plane transfer to every reconstruction plane; same shape, float32 (or int16).

    Parameters
    ----------
    hu : ndarray, HU
    spacing_zyx_mm : 3 floats, mm
    strength : float or callable
        The transfer: a callable ``T(f_lpmm) -> gain`` (``transfer.Transfer.gain``), or the
        strength s of ``exp(-s g(f))`` (method ``nps_shape``).
    slice_axis : int
    fov_mask : bool ndarray like ``hu``, optional
        Padding (False) is set to ``floor_hu`` (air) before filtering, so that the scan
        circle's edge does not ring into the body.
    fills : dict, optional
        ``clipping.clipped_fill`` output: values for clipped voxels, set before filtering.
    clip_range : (low, high), optional
        Round, clip to this range and return int16 (a stored image), chunk by chunk.
    body : coarse body mask (``clipping.body_mask``), optional
        Only the body's bounding box (+ 40 mm) is filtered, the air beyond is copied: the FFTs
        shrink by a third to a half on a typical field of view.
    """
    planes = planes_first(np.asarray(hu), slice_axis)
    fov = None if fov_mask is None else planes_first(np.asarray(fov_mask, bool), slice_axis)
    dy, dx = [float(s) for i, s in enumerate(spacing_zyx_mm) if i != slice_axis]
    out = np.empty(planes.shape, np.float32 if clip_range is None else np.int16)
    grids = {}
    for k0 in range(0, planes.shape[0], chunk):
        ys, xs = _crop(body, k0, chunk, planes.shape[1:], (dy, dx))
        if (ys.stop - ys.start, xs.stop - xs.start) not in grids:
            size, fr = _plane_grid((ys.stop - ys.start, xs.stop - xs.start), (dy, dx))
            h = strength(fr) if callable(strength) else transfer_function(fr, strength)
            grids[(ys.stop - ys.start, xs.stop - xs.start)] = size, h.astype(np.float32)
        size, h = grids[(ys.stop - ys.start, xs.stop - xs.start)]
        out[k0:k0 + chunk] = planes[k0:k0 + chunk]         # air beyond the crop: copied
        block = planes[k0:k0 + chunk].astype(np.float32)
        if fov is not None and floor_hu is not None:
            block[~fov[k0:k0 + chunk]] = floor_hu
        for j in range(block.shape[0]):
            if fills and (k0 + j) in fills:
                idx, values = fills[k0 + j]
                block[j].flat[idx] = values
        filtered = _filter_block(block[:, ys, xs], h, size)
        if clip_range is not None:
            filtered = np.clip(np.rint(filtered, out=filtered), *clip_range, out=filtered)
        out[k0:k0 + chunk, ys, xs] = filtered
    return np.moveaxis(out, 0, slice_axis)


def _crop(body, k0: int, chunk: int, shape_yx, spacing_yx_mm, margin_mm: float = 40.0):
    """Row and column slices of the body's bounding box in planes k0..k0+chunk, grown by
    ``margin_mm`` and rounded up to 16 pixels (few distinct FFT sizes); the whole plane without a body."""
    full = slice(0, shape_yx[0]), slice(0, shape_yx[1])
    if body is None:
        return full
    step = -(-shape_yx[0] // body.shape[1])
    b = body[k0:k0 + chunk].any(axis=0)
    if not b.any():
        return full
    out = []
    for axis, (n, d) in enumerate(zip(shape_yx, spacing_yx_mm)):
        idx = np.flatnonzero(b.any(axis=1 - axis))
        lo, hi = idx[0] * step - margin_mm / d, (idx[-1] + 1) * step + margin_mm / d
        width = min(n, int(np.ceil((hi - lo) / 16.0)) * 16)
        start = int(np.clip(round((lo + hi - width) / 2), 0, n - width))
        out.append(slice(start, start + width))
    return tuple(out)


def _stored_range(planes: np.ndarray, fov=None, chunk: int = 32) -> tuple[float, float]:
    """Lowest and highest stored HU inside the field of view (chunked: no full-size temporaries)."""
    lo, hi = np.inf, -np.inf
    for k0 in range(0, planes.shape[0], chunk):
        block = planes[k0:k0 + chunk]
        if fov is not None:
            block = block[fov[k0:k0 + chunk]]
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return (lo, hi) if np.isfinite(lo) else (-1024.0, 3071.0)


def harmonize_kernel(hu: np.ndarray, spacing_zyx_mm, kernel_class: str = "unknown", *, method: str = "nps_ratio",
                     slice_axis: int = 0, fov_mask=None, estimate: KernelEstimate | None = None,
                     target_strength: float = 0.0, target_log_r=(0.0, 0.0, 0.0)):
    """Harmonise a CT toward the reference standard kernel.

    Parameters
    ----------
    hu : ndarray (n_z, n_y, n_x), HU (int16 or float)
    spacing_zyx_mm : 3 floats, mm
    kernel_class : str
        Class from the vendor table (``io.kernels.kernel_class``); ``unknown`` lets the image decide.
    method : {"nps_ratio", "nps_shape"}
    slice_axis : int
        Array axis across reconstruction planes (0 for DICOM series).
    fov_mask : bool ndarray like ``hu``, optional
        False = padding: ignored by the estimate, kept as is in the output.
    estimate : KernelEstimate, optional
        A previous ``estimate_kernel`` of this volume (saves ~0.3 s).
    target_strength : float
        ``nps_shape``: strength of the standard kernel to reach (``VENDOR_STANDARD_STRENGTH``).
    target_log_r : 3 floats
        ``nps_ratio``: ln R of the standard kernel to reach (``transfer.VENDOR_STANDARD_LOG_R``).

    Returns
    -------
    hu_out : ndarray int16, same shape (``hu`` itself, unchanged, when nothing is done)
    params : dict
        ``method``, ``applied`` (bool), ``reason``, ``kernel_class`` (final) and
        ``kernel_class_source`` (table | image | None), the estimate (``estimate_*``); when a
        transfer was fitted: ``gain_03`` / ``gain_05`` (T at 0.3 / 0.5 lp/mm), ``fav_before_lpmm``
        / ``fav_after_lpmm`` (NPS mean frequency before / after, the latter = NPS T^2),
        ``transfer_coef``, ``noise_log_level``, ``transfer_fit_rms``; ``nps_shape``: ``strength``.
        JSON-serialisable.
    """
    if method not in METHODS:
        raise ValueError(f"unknown harmonisation method {method!r} (known: {', '.join(METHODS)})")
    est = estimate if estimate is not None else estimate_kernel(hu, spacing_zyx_mm, slice_axis, fov_mask)
    table = kernel_class or "unknown"
    if table != "unknown":
        cls, source = table, "table"
    elif est.strength is not None:
        cls, source = est.kernel_class, "image"
    else:
        cls, source = "unknown", None
    params = {"method": method, "applied": False, "reason": None, "strength": None, "strength_source": None,
              "kernel_class": cls, "kernel_class_source": source,
              **{f"estimate_{k}": v for k, v in dataclasses.asdict(est).items()}}
    if cls not in ("sharp", "very_sharp"):
        params["reason"] = f"kernel class {cls} ({source or 'no estimate'}): left as is"
        return hu, params
    spacing_yx = [float(s) for i, s in enumerate(spacing_zyx_mm) if i != slice_axis]
    src = hu
    hu = np.asarray(hu)
    fov = None if fov_mask is None else np.asarray(fov_mask, bool)
    planes, fov_planes = planes_first(hu, slice_axis), None if fov is None else planes_first(fov, slice_axis)
    if method == "nps_shape":
        transfer, noise_sd = _shape_transfer(est, cls, target_strength, spacing_yx, params)
    else:
        transfer, noise_sd = _ratio_transfer(est, target_log_r, params, planes, spacing_yx, fov_planes)
    if transfer is None:
        return src, params
    floor, top = _stored_range(planes, fov_planes)
    # sharp series clip air, emphysema and the pleural undershoot at the lowest stored value
    # (Philips L: 3.8 % of the lung): extrapolate the censored tail (clipping.py)
    body = body_mask(planes)
    fills, info = clipped_fill(planes, floor, body, spacing_yx, noise_sd, fov_planes)
    params.update(floor_hu=floor, noise_sd_hu=round(noise_sd, 1), **{f"clipped_{k}": v for k, v in info.items()})
    # a real reconstruction stores nothing below/above the scanner's range either
    out = filter_planes(hu, spacing_zyx_mm, transfer, slice_axis, fov_mask=fov, floor_hu=floor, fills=fills,
                        clip_range=(floor, top), body=body)
    if fov is not None:
        out[~fov] = hu[~fov]
    params.update(applied=True, reason=f"kernel class {cls} ({source}): filtered ({method})")
    return out, params


def _shape_transfer(est, cls, target_strength, spacing_yx, params):
    """``nps_shape``: exp(-s g(f)) with s from the image (or the class default); None when s is too small."""
    if est.strength is not None:
        strength, params["strength_source"] = est.strength, "image"
    else:
        strength, params["strength_source"] = DEFAULT_STRENGTH[cls], "class-default"
    params["target_strength"] = float(target_strength)
    strength = float(np.clip(strength - target_strength, 0.0, MAX_STRENGTH))
    params["strength"] = round(strength, 4)
    if strength < MIN_STRENGTH:
        params["reason"] = f"kernel class {cls} but measured strength {strength:.2f} < {MIN_STRENGTH}: left as is"
        return None, None
    noise_sd = image_noise_sd(est, spacing_yx) if est.noise_ratio is not None else 40.0
    return strength, noise_sd


def _ratio_transfer(est, target_log_r, params, planes, spacing_yx, fov_planes):
    """``nps_ratio``: T(f) from the scan's NPS and air-skin edge (``transfer.py``); None (with the
    reason) when the estimate is unreliable or T removes nothing: the scan is then left as it
    is, never guessed."""
    nps = measured_nps(est)
    if nps is None:
        params["reason"] = (f"unreliable estimate: {est.n_rois} uniform soft-tissue ROIs (need "
                            f"{MIN_ROIS}; a slab or little soft tissue): left as is")
        return None, None
    f, power = nps
    edge = edge_mtf(planes, spacing_yx, fov_planes)
    params["edge_profiles"] = 0 if edge is None else edge[2]
    if edge is None:
        params["reason"] = (f"unreliable estimate: fewer than {EDGE_MIN_PROFILES} air-skin edge profiles "
                            "(a truncated body or a slab): left as is")
        return None, None
    fit, why = fit_transfer(f, power, est.nyquist_lpmm, edge)
    if fit is None:
        params["reason"] = f"unreliable estimate: {why}: left as is"
        return None, None

    def transfer(fr):
        return fit.gain(fr, target_log_r)

    t = transfer(f)
    params.update(gain_03=round(float(transfer(0.3)), 4), gain_05=round(float(transfer(0.5)), 4),
                  **{k: None if v is None else round(v, 4) for k, v in (
                      ("fav_before_lpmm", nps_mean_frequency(f, power)),
                      ("fav_after_lpmm", nps_mean_frequency(f, power * t ** 2)))},
                  transfer_coef=[round(c, 4) for c in fit.coef], target_log_r=list(target_log_r),
                  noise_log_level=round(fit.log_level, 4), transfer_fit_rms=round(fit.fit_rms, 4))
    if params["gain_05"] > MIN_REMOVED_GAIN:
        params["reason"] = f"transfer keeps {params['gain_05']:.2f} at 0.5 lp/mm: nothing to remove, left as is"
        return None, None
    # noise sd of the sharp image: its measured NPS over the plane (rings of width df)
    ok = np.isfinite(power) & (f <= est.nyquist_lpmm)
    df = float(f[1] - f[0])
    noise_sd = float(np.sqrt(np.sum(power[ok] * 2 * np.pi * f[ok] * df)))
    return transfer, noise_sd


def harmonize_volume(volume, method: str = "nps_ratio", estimate: KernelEstimate | None = None):
    """``harmonize_kernel`` on a ``CTVolume``; returns ``(CTVolume, params)``.

    The kernel class comes from ``volume.meta`` (``kernel``, ``manufacturer``) via the vendor
    table, the target from the vendor's standard kernel (``transfer.VENDOR_STANDARD_LOG_R``,
    ``VENDOR_STANDARD_STRENGTH`` for ``nps_shape``); the slice
    axis from the direction (the cranio-caudal axis). This is the call for any
    stage that wants the harmonised volume (phenotypes, embeddings).
    """
    from emphy_dask.io.kernels import kernel_class, vendor_of
    from emphy_dask.volume import craniocaudal_axis

    meta = volume.meta or {}
    cls = kernel_class(meta.get("kernel"), meta.get("manufacturer"))
    vendor = vendor_of(meta.get("manufacturer"))
    axis, _ = craniocaudal_axis(volume.direction_xyz)
    hu, params = harmonize_kernel(volume.hu, volume.spacing_zyx_mm, cls, method=method, slice_axis=axis,
                                  fov_mask=volume.fov_mask, estimate=estimate,
                                  target_strength=VENDOR_STANDARD_STRENGTH.get(vendor, 0.0),
                                  target_log_r=VENDOR_STANDARD_LOG_R.get(vendor, (0.0, 0.0, 0.0)))
    if hu is volume.hu:
        return volume, params
    return volume.with_hu(hu), params


def params_json(params: dict) -> str:
    """Compact JSON of the filter parameters for the scans table."""
    keep = ("method", "applied", "reason", "strength", "strength_source", "target_strength", "estimate_noise_ratio",
            "estimate_n_rois", "estimate_fit_rms", "floor_hu", "noise_sd_hu", "clipped_n_clipped",
            "clipped_tail_mean_hu", "clipped_fill_sd_hu", "clipped_fill_mean_hu", "gain_03", "gain_05",
            "fav_before_lpmm", "fav_after_lpmm", "transfer_coef", "target_log_r", "noise_log_level",
            "transfer_fit_rms", "edge_profiles")
    doc = {k: params[k] for k in keep if k in params}
    if params.get("applied") and params["method"] == "nps_shape":
        doc.update(transfer="exp(-strength*g(f)), g: Philips L->B (Lung_Dx-A0001)",
                   fit_band_lpmm=list(FIT_BAND_LPMM))
    elif "transfer_coef" in params:
        doc.update(transfer="T = exp(min(0, lnR_target - lnR)), lnR = b1 f^2 + b2 f^4 + b3 f^6 (f lp/mm), "
                            "fitted to the scan's soft-tissue NPS; non-increasing",
                   fit_band_lpmm=[TRANSFER_BAND_LPMM[0], min(TRANSFER_BAND_LPMM[1],
                                                             0.95 * params["estimate_nyquist_lpmm"])])
    return json.dumps(doc, sort_keys=True)


def harmonize_scan(volume, enabled: bool, method: str = "nps_ratio", *, volume_only: bool = False):
    """Kernel facts for a results row, and the harmonised volume when ``enabled``.

    The image estimate runs either way (~0.5 s), so that a kernel the vendor table does not
    know still gets a class (``kernel_class_source = "image"``). ``volume_only``: the harmonised
    volume even when not ``enabled`` (for the model inputs), from the same estimate, without
    the ``harmonize_*`` columns (which describe the phenotypes' HU).

    Returns
    -------
    columns : dict
        ``kernel_class``, ``kernel_class_source``, ``kernel_nps_fav_lpmm``, ``kernel_strength``,
        ``harmonize_applied``, ``harmonize_strength``, ``harmonize_params`` (JSON),
        ``harmonize_gain_03``, ``harmonize_gain_05``, ``harmonize_fav_before_lpmm``,
        ``harmonize_fav_after_lpmm``, ``harmonize_reason`` (None when not enabled), ``t_harmonize_s``.
        ``harmonize_mld_shift_hu`` is the phenotype stage's (it has the lung mask).
    harmonized : CTVolume or None
        None when neither ``enabled`` nor ``volume_only``; ``volume`` itself when the kernel is
        soft/standard.
    """
    import time

    from emphy_dask.io.kernels import kernel_class
    from emphy_dask.volume import craniocaudal_axis

    t0 = time.perf_counter()
    meta = volume.meta or {}
    est = estimate_kernel(volume.hu, volume.spacing_zyx_mm, craniocaudal_axis(volume.direction_xyz)[0],
                          volume.fov_mask)
    table = kernel_class(meta.get("kernel"), meta.get("manufacturer"))
    if table != "unknown":
        cls, source = table, "table"
    else:
        cls, source = (est.kernel_class, "image") if est.strength is not None else ("unknown", None)
    cols = {"kernel_class": cls, "kernel_class_source": source, "kernel_nps_fav_lpmm": est.nps_fav_lpmm,
            "kernel_strength": est.strength, "harmonize_applied": None, "harmonize_strength": None,
            "harmonize_params": None, "harmonize_gain_03": None, "harmonize_gain_05": None,
            "harmonize_fav_before_lpmm": None, "harmonize_fav_after_lpmm": None, "harmonize_reason": None}
    harmonized = None
    if enabled or volume_only:
        harmonized, params = harmonize_volume(volume, method, estimate=est)
    if enabled:
        cols.update(harmonize_applied=bool(params["applied"]), harmonize_strength=params["strength"],
                    harmonize_params=params_json(params), harmonize_gain_03=params.get("gain_03"),
                    harmonize_gain_05=params.get("gain_05"), harmonize_fav_before_lpmm=params.get("fav_before_lpmm"),
                    harmonize_fav_after_lpmm=params.get("fav_after_lpmm"), harmonize_reason=params["reason"])
    cols["t_harmonize_s"] = round(time.perf_counter() - t0, 4)
    return cols, harmonized
