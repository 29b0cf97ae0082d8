"""The whole transfer ratio T(f) that takes a scan's kernel to the reference standard kernel,
from the scan's own noise power spectrum: no kernel shape is assumed.

Why: filtered back-projection makes a kernel an in-plane filter, so the noise power spectrum
(NPS) of uniform soft tissue is ``c |MTF_k(f)|^2 NPS_0(f)``: ``c`` is dose and slice thickness,
``MTF_k`` the kernel. Against the reference standard kernel's NPS,
``0.5 ln(NPS_scan / NPS_ref) = 0.5 ln c + ln R(f)`` with ``R = MTF_k / MTF_ref`` the kernel's
excess, and the harmonisation filter is ``T = 1 / R``, whatever shape ``R`` has.

How the spectrum is read (``fit_transfer``):

* ``ln R(f) = b1 f^2 + b2 f^4 + b3 f^6``: an MTF is the Fourier transform of a real, symmetric
  point spread, hence even and analytic at 0, so ``ln R`` starts as ``f^2`` and ``R(0) = 1``
  (unit gain at f = 0: the filter moves no large region's mean). Three even terms follow
  every published kernel's ratio to a standard one over 0.05-0.7 lp/mm (a low-order form
  regularises where the ring averages are noisy); the level ``0.5 ln c`` is fitted beside them.
* Below ~0.15 lp/mm real soft tissue is not uniform: its texture adds power falling as
  ``f^-3`` (through the same kernel). The fit carries that term, ``a f^-3``, instead of
  discarding the band that pins the level.
* Beyond the fitted band (the pixel's Nyquist limit or 0.7 lp/mm) ``ln R`` keeps its slope
  there; ``T`` is then clipped to <= 1 (never amplify) and made non-increasing.

What it cannot tell apart: a kernel that lifts the lowest frequencies (< 0.1 lp/mm) broadly from
a higher dose, both raise the NPS where texture dominates. The fit assigns such a lift to the
level, so T then under-corrects (Philips L: T(0.2 lp/mm) 0.57 where the paired cross-spectrum
says 0.42; see ``benchmarks/README.md``), it never over-corrects for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

from .kernel_estimate import REF_NPS_LOG_LEVEL, reference_nps_log

#: Fitted band, lp/mm (its top is also capped at 0.95 Nyquist).
TRANSFER_BAND_LPMM = (0.05, 0.70)
#: Fewer usable rings than this, or a fit worse than ``MAX_FIT_RMS`` (ln NPS): no transfer.
MIN_RINGS = 8
MAX_FIT_RMS = 0.25
#: ln R of each vendor's standard kernel against the reference (Philips B, R = 1), as
#: (b1, b2, b3): a sharp scan is taken to its own vendor's standard. GE STANDARD: the mean of
#: the fits on LIDC-IDRI-0013 and -0002 (GE LightSpeed, STANDARD); vendors without a measured
#: standard are taken to the reference.
VENDOR_STANDARD_LOG_R = {"philips": (0.0, 0.0, 0.0), "ge": (-1.45, 8.9, -10.2)}


@dataclass(frozen=True)
class Transfer:
    """ln R(f) of a scan against the reference standard kernel (see module docstring).

    coef : (b1, b2, b3), ln R = b1 f^2 + b2 f^4 + b3 f^6 (f in lp/mm)
    log_level : 0.5 ln c (noise level against the reference: dose, slice thickness)
    f_max_lpmm : top of the fitted band; beyond it ln R continues with its slope there
    fit_rms : RMS residual of the fit, ln NPS
    """

    coef: tuple
    log_level: float
    f_max_lpmm: float
    fit_rms: float

    def log_r(self, f_lpmm) -> np.ndarray:
        """ln R at ``f_lpmm`` (any shape), extrapolated linearly beyond ``f_max_lpmm``."""
        f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
        b1, b2, b3 = self.coef
        top = self.f_max_lpmm
        inside = np.minimum(f, top)
        out = b1 * inside ** 2 + b2 * inside ** 4 + b3 * inside ** 6
        slope = 2 * b1 * top + 4 * b2 * top ** 3 + 6 * b3 * top ** 5
        return out + max(slope, 0.0) * np.maximum(f - top, 0.0)

    def gain(self, f_lpmm, target_coef=(0.0, 0.0, 0.0)) -> np.ndarray:
        """The harmonisation filter T(f) <= 1, non-increasing, T(0) = 1, toward a standard of
        ln R = ``target_coef`` (the reference by default)."""
        f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
        grid = np.linspace(0.0, max(float(f.max(initial=0.0)), 1e-3), 512)
        target = Transfer(tuple(target_coef), 0.0, self.f_max_lpmm, 0.0)
        t = np.exp(np.minimum(target.log_r(grid) - self.log_r(grid), 0.0))
        t = np.minimum.accumulate(t)
        return np.interp(f, grid, t)


def fit_transfer(f_lpmm: np.ndarray, nps: np.ndarray, nyquist_lpmm: float) -> tuple[Transfer | None, str | None]:
    """Fit ``Transfer`` to a soft-tissue NPS (``kernel_estimate.soft_tissue_nps``).

    Parameters
    ----------
    f_lpmm : ndarray (n_bins,), ring centres, lp/mm
    nps : ndarray (n_bins,), HU^2 mm^2 (NaN for empty rings)
    nyquist_lpmm : float
        In-plane Nyquist frequency of the scan, lp/mm.

    Returns
    -------
    (Transfer, None), or (None, reason) when the spectrum cannot carry a fit.
    """
    f_hi = min(TRANSFER_BAND_LPMM[1], 0.95 * nyquist_lpmm)
    sel = (f_lpmm >= TRANSFER_BAND_LPMM[0]) & (f_lpmm <= f_hi) & np.isfinite(nps) & (nps > 1e-3)
    if sel.sum() < MIN_RINGS:
        return None, f"{int(sel.sum())} usable NPS rings below {f_hi:.2f} lp/mm (need {MIN_RINGS})"
    f = f_lpmm[sel]
    y = np.log(nps[sel]) - reference_nps_log(f)
    # soft-tissue texture (f^-3) relative to the reference noise shape, through the same kernel
    texture = f ** -3.0 / np.exp(reference_nps_log(f) - REF_NPS_LOG_LEVEL)

    def model(p):
        log_c, log_a, b1, b2, b3 = p
        return 2.0 * (b1 * f ** 2 + b2 * f ** 4 + b3 * f ** 6) + np.logaddexp(log_c, log_a + np.log(texture))

    res = optimize.least_squares(lambda p: model(p) - y, x0=(float(np.median(y)), -9.0, 0.0, 0.0, 0.0),
                                 bounds=((-10, -25, -50, -500, -5000), (10, 0, 50, 500, 5000)))
    rms = float(np.sqrt(np.mean(res.fun ** 2)))
    if not res.success or rms > MAX_FIT_RMS:
        return None, f"NPS fit failed (rms {rms:.2f} ln NPS)"
    log_c, _, b1, b2, b3 = res.x
    return Transfer((float(b1), float(b2), float(b3)), 0.5 * float(log_c), float(f_hi), rms), None


def nps_mean_frequency(f_lpmm, nps, band=(0.10, 0.55)) -> float | None:
    """Mean frequency of an NPS over ``band`` (lp/mm): the image's sharpness, sharper = higher."""
    f, nps = np.asarray(f_lpmm), np.asarray(nps)
    sel = (f >= band[0]) & (f <= band[1]) & np.isfinite(nps)
    if not sel.any() or not (nps[sel] > 0).any():
        return None
    return float((nps[sel] * f[sel] ** 2).sum() / (nps[sel] * f[sel]).sum())
