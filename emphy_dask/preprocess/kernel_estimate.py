"""The kernel's strength, measured on the image's own noise, and the shipped calibration.

See ``harmonize.py`` for the method. Here: ``g(f)``, the shape of the Philips L -> B transfer
measured once on the real pair; the reference (standard-kernel) noise power spectrum; and
``estimate_kernel``, which fits ``ln NPS / NPS_ref = ln c + 2 s g(f)`` to the noise power
spectrum of uniform soft tissue (no paired data: the image alone).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Frequencies (lp/mm) and g = -ln H of the Philips L -> B transfer, measured on Lung_Dx-A0001
#: (cross-spectrum <B L*>/<|L|^2> over 56 full slices, 0.02 lp/mm rings).
CAL_F_LPMM = tuple(round(0.02 * i, 2) for i in range(30))
CAL_G = (0.0, 0.0132, 0.0764, 0.1574, 0.2532, 0.3337, 0.4459, 0.5457, 0.6446, 0.759, 0.8615, 0.9746,
         1.0878, 1.1832, 1.2946, 1.4046, 1.5067, 1.6307, 1.707, 1.8042, 1.9027, 1.9886, 2.0863, 2.1541,
         2.2234, 2.2865, 2.345, 2.4003, 2.457, 2.4724)
#: Slope of g beyond the calibrated range (per lp/mm; the last 0.1 lp/mm of the table).
CAL_G_SLOPE = 2.5
#: Reference (standard-kernel) NPS shape: NPS(f) ~ f * exp(-2 (f / REF_NPS_F_LPMM) ** REF_NPS_Q).
REF_NPS_F_LPMM = 0.4196
REF_NPS_Q = 2.259
#: ln of the reference NPS level (HU^2 mm^2 at the shape's scale): the B series gives c = 1.
REF_NPS_LOG_LEVEL = 7.02
#: Frequency band (lp/mm) of the strength fit: noise dominates anatomy there in soft tissue.
FIT_BAND_LPMM = (0.20, 0.55)
#: Band of the image sharpness value (NPS mean frequency).
FAV_BAND_LPMM = (0.10, 0.55)
ROI_MM = 24.0
MIN_ROIS = 20
#: Strength bounds of the image-based classes (soft < -0.35 <= standard < 0.5 <= sharp < 1.5).
#: Calibration: Philips B 0.03, GE STANDARD (4 LIDC-IDRI scans) -0.10..0.40, Philips L 1.01.
CLASS_BOUNDS = ((-0.35, "soft"), (0.5, "standard"), (1.5, "sharp"), (float("inf"), "very_sharp"))

def calibrated_g(f_lpmm) -> np.ndarray:
    """g(f) = -ln H(f) of the shipped calibration (Philips L -> B), any frequencies in lp/mm."""
    f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
    g = np.interp(f, CAL_F_LPMM, CAL_G)
    beyond = f > CAL_F_LPMM[-1]
    g[beyond] = CAL_G[-1] + CAL_G_SLOPE * (f[beyond] - CAL_F_LPMM[-1])
    return g


def transfer_function(f_lpmm, strength: float) -> np.ndarray:
    """H_s(f) = exp(-s g(f)): the in-plane filter that removes a kernel of strength ``s``."""
    return np.exp(-float(strength) * calibrated_g(f_lpmm))


def reference_nps_log(f_lpmm) -> np.ndarray:
    """ln of the reference standard-kernel NPS, HU^2 mm^2 (the B series' soft-tissue level)."""
    f = np.asarray(f_lpmm, dtype=np.float64)
    return REF_NPS_LOG_LEVEL + np.log(f) - 2.0 * (f / REF_NPS_F_LPMM) ** REF_NPS_Q


@dataclass(frozen=True)
class KernelEstimate:
    """What the image says about its kernel.

    strength : float or None
        s of ``exp(-s g(f))`` (0 = reference standard, 1 = Philips L); None without enough ROIs.
    kernel_class : str
        Class from ``CLASS_BOUNDS`` (``unknown`` without an estimate).
    nps_fav_lpmm : float or None
        Mean frequency of the soft-tissue NPS over ``FAV_BAND_LPMM``, lp/mm (sharper = higher;
        Philips B 0.32, GE STANDARD 0.27-0.36, Philips L 0.42).
    noise_ratio : float or None
        c: NPS level relative to the reference (dose, slice thickness).
    n_rois : int
    fit_rms : float or None
        RMS residual of the fit, in ln NPS.
    nps_f_lpmm, nps_hu2mm2 : tuples or None
        The measured soft-tissue NPS (ring centres, lp/mm; HU^2 mm^2, None for empty rings) when
        ``MIN_ROIS`` ROIs were found: ``transfer.fit_transfer`` reads the whole transfer from it.
    nyquist_lpmm : float or None
        In-plane Nyquist frequency (coarser axis).
    """

    strength: float | None
    kernel_class: str
    nps_fav_lpmm: float | None
    noise_ratio: float | None
    n_rois: int
    fit_rms: float | None
    nps_f_lpmm: tuple | None = None
    nps_hu2mm2: tuple | None = None
    nyquist_lpmm: float | None = None


def planes_first(hu: np.ndarray, slice_axis: int) -> np.ndarray:
    return np.moveaxis(hu, slice_axis, 0)


def soft_tissue_nps(hu: np.ndarray, spacing_zyx_mm, slice_axis: int = 0, fov_mask=None,
                    max_slices: int = 32, bin_lpmm: float = 0.025):
    """Radially averaged in-plane NPS of uniform soft tissue.

    Parameters
    ----------
    hu : ndarray (n_z, n_y, n_x), HU
    spacing_zyx_mm : 3 floats, mm
    slice_axis : int
        Array axis across reconstruction planes (0 for DICOM series).
    fov_mask : bool ndarray like ``hu``, optional
        False = padding (never used).
    max_slices : int
        Planes sampled evenly over the central 80 % of the volume.

    Returns
    -------
    f_lpmm : ndarray (n_bins,), ring centres, lp/mm
    nps : ndarray (n_bins,), HU^2 mm^2 (NaN for empty rings)
    n_rois : int
    """
    planes = planes_first(hu, slice_axis)
    fov = None if fov_mask is None else planes_first(np.asarray(fov_mask, bool), slice_axis)
    dy, dx = [float(s) for i, s in enumerate(spacing_zyx_mm) if i != slice_axis]
    n = planes.shape[0]
    ks = np.unique(np.linspace(0.1 * n, 0.9 * n - 1, min(max_slices, n)).round().astype(int).clip(0, n - 1))
    ry, rx = (max(8, int(round(ROI_MM / d / 2)) * 2) for d in (dy, dx))
    yy, xx = np.mgrid[0:ry, 0:rx].astype(np.float64)
    basis = np.stack([np.ones_like(yy), yy, xx, yy * yy, xx * xx, yy * xx]).reshape(6, -1).T
    proj = basis @ np.linalg.pinv(basis)          # quadratic trend of a ROI (anatomy, cupping)
    win = np.outer(np.hanning(ry), np.hanning(rx))
    rois = []
    by, bx = ry // 2, rx // 2                     # ROIs on a half-overlapping grid of blocks
    for k in ks:
        img = planes[k].astype(np.float32)
        sm = ndi.gaussian_filter(img, (2.0 / dy, 2.0 / dx))
        soft = (sm > -150) & (sm < 150)
        if fov is not None:
            soft &= fov[k]
        ny_b, nx_b = img.shape[0] // by, img.shape[1] // bx
        if ny_b < 2 or nx_b < 2:
            continue

        def blocks(a, how):
            return how(a[:ny_b * by, :nx_b * bx].reshape(ny_b, by, nx_b, bx), axis=(1, 3))

        def roi(b, how):                          # a ROI = 2 x 2 blocks
            return how(how(b[:-1, :-1], b[1:, :-1]), how(b[:-1, 1:], b[1:, 1:]))

        hi, lo = roi(blocks(sm, np.max), np.maximum), roi(blocks(sm, np.min), np.minimum)
        ok = roi(blocks(soft, np.all), np.logical_and) & (hi - lo < 60)
        for i, j in zip(*np.nonzero(ok)):
            rois.append(img[i * by:i * by + ry, j * bx:j * bx + rx])
    n_bins = int(round(0.8 / bin_lpmm))
    centres = (np.arange(n_bins) + 1) * bin_lpmm
    if not rois:
        return centres, np.full(n_bins, np.nan), 0
    x = np.stack(rois).reshape(len(rois), -1).astype(np.float64)
    x = (x - x @ proj.T).reshape(-1, ry, rx) * win
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=0) * dy * dx / (win ** 2).sum()
    fr = np.hypot(np.fft.fftfreq(ry, dy)[:, None], np.fft.fftfreq(rx, dx)[None, :])
    ring = np.rint(fr / bin_lpmm).astype(int) - 1
    ok = (ring >= 0) & (ring < n_bins)
    total = np.bincount(ring[ok], weights=power[ok], minlength=n_bins)
    count = np.bincount(ring[ok], minlength=n_bins)
    with np.errstate(invalid="ignore"):
        nps = total / count
    return centres, nps, len(rois)


def _class_of(strength: float) -> str:
    for bound, name in CLASS_BOUNDS:
        if strength < bound:
            return name
    return CLASS_BOUNDS[-1][1]


def estimate_kernel(hu: np.ndarray, spacing_zyx_mm, slice_axis: int = 0, fov_mask=None) -> KernelEstimate:
    """Kernel strength and class from the image's soft-tissue noise (see module docstring).

    Needs ``MIN_ROIS`` uniform soft-tissue ROIs and pixels <= 0.9 mm (the fit band reaches
    0.55 lp/mm); otherwise the estimate is None and the class ``unknown``.
    """
    f, nps, n_rois = soft_tissue_nps(hu, spacing_zyx_mm, slice_axis, fov_mask)
    pix = max(float(s) for i, s in enumerate(spacing_zyx_mm) if i != slice_axis)
    nyquist = 0.5 / pix
    none = KernelEstimate(None, "unknown", None, None, int(n_rois), None, nyquist_lpmm=round(nyquist, 4))
    if n_rois < MIN_ROIS:
        return none
    none = dataclasses.replace(none, nps_f_lpmm=tuple(round(float(x), 4) for x in f),
                               nps_hu2mm2=tuple(None if not np.isfinite(x) else float(f"{x:.5g}") for x in nps))
    fav_sel = (f >= FAV_BAND_LPMM[0]) & (f <= min(FAV_BAND_LPMM[1], nyquist)) & np.isfinite(nps)
    if not (nps[fav_sel] > 1e-3).any():             # a noiseless (synthetic) image has no kernel to measure
        return none
    fav = float((nps[fav_sel] * f[fav_sel] ** 2).sum() / (nps[fav_sel] * f[fav_sel]).sum())
    sel = (f >= FIT_BAND_LPMM[0] - 1e-9) & (f <= min(FIT_BAND_LPMM[1], 0.95 * nyquist) + 1e-9)
    sel &= np.isfinite(nps) & (nps > 1e-3)
    if sel.sum() < 6:                               # pixels too coarse for the fit band
        return dataclasses.replace(none, nps_fav_lpmm=round(fav, 4))
    y = np.log(nps[sel]) - reference_nps_log(f[sel])
    design = np.column_stack([np.ones(sel.sum()), 2.0 * calibrated_g(f[sel])])
    (log_c, s), *_ = np.linalg.lstsq(design, y, rcond=None)
    rms = float(np.sqrt(np.mean((y - design @ (log_c, s)) ** 2)))
    return dataclasses.replace(none, strength=round(float(s), 4), kernel_class=_class_of(float(s)),
                               nps_fav_lpmm=round(fav, 4), noise_ratio=round(float(np.exp(log_c)), 4),
                               fit_rms=round(rms, 4))


def image_noise_sd(estimate: KernelEstimate, spacing_yx_mm) -> float:
    """Noise sd (HU) of the image, from its NPS fit ``c NPS_ref(f) exp(2 s g(f))`` integrated
    over the plane's frequencies."""
    fr = np.hypot(np.fft.fftfreq(256, spacing_yx_mm[0])[:, None], np.fft.fftfreq(256, spacing_yx_mm[1])[None, :])
    fr[0, 0] = 1e-6
    nps = estimate.noise_ratio * np.exp(reference_nps_log(fr) + 2.0 * estimate.strength * calibrated_g(fr))
    return float(np.sqrt(nps.sum() / (256 * spacing_yx_mm[0] * 256 * spacing_yx_mm[1])))


def measured_nps(estimate: KernelEstimate) -> tuple[np.ndarray, np.ndarray] | None:
    """``(f_lpmm, nps_hu2mm2)`` arrays of an estimate (NaN for empty rings), or None."""
    if estimate.nps_f_lpmm is None:
        return None
    return (np.asarray(estimate.nps_f_lpmm, np.float64),
            np.array([np.nan if v is None else v for v in estimate.nps_hu2mm2], np.float64))
