"""The whole transfer ratio T(f) that takes a scan's kernel to the reference standard kernel,
read from the scan itself: its soft-tissue noise power spectrum and its air-skin edge. No
kernel shape is assumed.

Why: filtered back-projection makes a kernel an in-plane filter, so the noise power spectrum
(NPS) of uniform soft tissue is ``c |MTF_k(f)|^2 NPS_0(f)``: ``c`` is dose and slice thickness,
``MTF_k`` the kernel. Against the reference standard kernel's NPS,
``0.5 ln(NPS_scan / NPS_ref) = 0.5 ln c + ln R(f)`` with ``R = MTF_k / MTF_ref`` the kernel's
excess, and the harmonisation filter is ``T = 1 / R``, whatever shape ``R`` has.

How it is read (``fit_transfer``), one least-squares fit of:

* **the NPS** over 0.05-0.7 lp/mm (or 0.95 Nyquist): ``2 ln R(f) + ln(c + a f^-3 / NPS_ref)``.
  ``c`` is the noise level; ``a f^-3`` the soft-tissue texture that dominates below ~0.15
  lp/mm (it passes the same kernel).
* **the air-skin edge MTF** (``edge_mtf.py``) over 0.04-0.30 lp/mm: ``ln R(f) = ln MTF_edge(f) -
  ln MTF_ref_edge(f)``. The NPS alone gives R only up to the level ``c``: a kernel that lifts
  0.1 lp/mm by 1.6x (Philips L) reads as a noisier standard one and was under-corrected by
  a third; the edge pins R where the noise cannot.
* ``ln R(f) = b1 f^2 + b2 f^3 + b3 f^4``: R(0) = 1 (unit gain at f = 0: the filter moves no
  large region's mean) with zero slope at 0 (a linear term lets the fit lower T at 0.02-0.05
  lp/mm, where neither edge nor noise has data, and spread the chest wall into the lung: MLD
  +7.6 HU on the real pair); f^3 follows the heavy-tailed point spreads of lung kernels. Three
  terms regularise where the ring averages are noise.
* Beyond the fitted band ``ln R`` keeps its slope there; ``T`` is then clipped to <= 1 (never
  amplify) and made non-increasing in f.

What it cannot do: read a kernel whose air noise is so strong that most of the air at the
skin is clipped at -1024 (the edge's profiles fail the air test: the scan is left as is, with
the reason), or correct fully where clipping of the air side biases the edge (the phantom
rendering of ``synth`` ``sharp``, 23 % of the lung clipped: under-corrected).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

from .kernel_estimate import REF_NPS_F_LPMM, REF_NPS_LOG_LEVEL, REF_NPS_Q, reference_nps_log

#: Fitted band, lp/mm (its top is also capped at 0.95 Nyquist).
TRANSFER_BAND_LPMM = (0.05, 0.70)
#: Fewer usable rings than this, or a fit worse than ``MAX_FIT_RMS`` (ln NPS): no transfer.
MIN_RINGS = 8
MAX_FIT_RMS = 0.35
#: Edge MTF band that enters the fit (lp/mm): above it the edge's own shape (skin, fat) and the
#: rest of the imaging chain weigh more than the kernel.
EDGE_BAND_LPMM = (0.04, 0.30)
EDGE_WEIGHT = 25.0
#: Powers of f in ln R (see the module docstring).
EXPONENTS = (2, 3, 4)
#: Blur of the imaging chain outside the kernel (focal spot, detector, skin) at the reference
#: edge, mm: Philips B's air-skin edge MTF over 0.1-0.25 lp/mm is its kernel shape times a
#: Gaussian of 0.5-0.57 mm (Lung_Dx-A0001); the phantoms' chain is 0.4 mm.
REF_EDGE_SIGMA_MM = 0.55
#: ln R of each vendor's standard kernel against the reference (Philips B, R = 1), as
#: (b1, b2, b3): a sharp scan is taken to its own vendor's standard, not to Philips B. GE
#: STANDARD: the mean of this module's fits on LIDC-IDRI-0013 and -0002 (GE LightSpeed; ln R
#: 0.18-0.25 at 0.2 lp/mm, 0.70-0.73 at 0.5); vendors without a measured standard (and scans
#: without a Manufacturer) are taken to the reference.
VENDOR_STANDARD_LOG_R = {"philips": (0.0, 0.0, 0.0), "ge": (8.49, -19.44, 16.31)}

@dataclass(frozen=True)
class Transfer:
    """ln R(f) of a scan against the reference standard kernel (see module docstring).

    coef : (b1, b2, b3), ln R = b1 f^2 + b2 f^3 + b3 f^4 (f in lp/mm; ``EXPONENTS``)
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
        top = self.f_max_lpmm
        inside = np.minimum(f, top)
        out = sum(b * inside ** e for b, e in zip(self.coef, EXPONENTS))
        slope = sum(b * e * top ** (e - 1) for b, e in zip(self.coef, EXPONENTS))
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


def reference_edge_log_mtf(f_lpmm) -> np.ndarray:
    """ln MTF of the reference standard kernel's air-skin edge: the kernel (``REF_NPS_*`` shape)
    times the rest of the chain (focal spot, detector, skin), a Gaussian of ``REF_EDGE_SIGMA_MM``."""
    f = np.asarray(f_lpmm, dtype=np.float64)
    return -(f / REF_NPS_F_LPMM) ** REF_NPS_Q - 2.0 * np.pi ** 2 * REF_EDGE_SIGMA_MM ** 2 * f ** 2


def fit_transfer(f_lpmm: np.ndarray, nps: np.ndarray, nyquist_lpmm: float,
                 edge=None) -> tuple[Transfer | None, str | None]:
    """Fit ``Transfer`` to a soft-tissue NPS (``kernel_estimate.soft_tissue_nps``) and, when
    given, the air-skin edge MTF (``edge_mtf.edge_mtf``), which pins the noise level.

    Parameters
    ----------
    f_lpmm : ndarray (n_bins,), ring centres, lp/mm
    nps : ndarray (n_bins,), HU^2 mm^2 (NaN for empty rings)
    nyquist_lpmm : float
        In-plane Nyquist frequency of the scan, lp/mm.
    edge : (f_lpmm, mtf, n_profiles), optional
        Its ``EDGE_BAND_LPMM`` enters as ln R = ln MTF - ``reference_edge_log_mtf``, each point
        weighted ``EDGE_WEIGHT`` NPS rings.

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
    texture = np.log(f ** -3.0) - (reference_nps_log(f) - REF_NPS_LOG_LEVEL)
    if edge is not None:
        fe, me = np.asarray(edge[0]), np.asarray(edge[1])
        use = (fe >= EDGE_BAND_LPMM[0]) & (fe <= EDGE_BAND_LPMM[1]) & (me > 0.05)
        fe, ye = fe[use], np.log(me[use]) - reference_edge_log_mtf(fe[use])
    else:
        fe, ye = np.empty(0), np.empty(0)

    def log_r(b, x):
        return sum(c * x ** e for c, e in zip(b, EXPONENTS))

    def residuals(p):
        log_c, log_a, b = p[0], p[1], p[2:]
        r_nps = 2.0 * log_r(b, f) + np.logaddexp(log_c, log_a + texture) - y
        return np.concatenate([r_nps, np.sqrt(EDGE_WEIGHT) * 2.0 * (log_r(b, fe) - ye)])

    res = optimize.least_squares(residuals, x0=(float(np.median(y)), -9.0, 0.0, 0.0, 0.0),
                                 bounds=((-10, -25, -50, -500, -5000), (10, 0, 50, 500, 5000)))
    rms = float(np.sqrt(np.mean(res.fun[:f.size] ** 2)))
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
