"""Render a noise-free phantom as a scanner would with a given reconstruction kernel.

For tests of kernel harmonisation: the same object (``make_phantom(..., scanner=False)``) and the
same raw-data noise reconstructed with two kernels, as a real scanner does when one acquisition
is reconstructed twice. Filtered back-projection makes each kernel an in-plane filter: the
image is ``MTF_k * (object + ramp-shaped noise)``, so the noise power spectrum of kernel k is
``f * MTF_k(f)^2`` and two kernels differ by exactly ``MTF_a / MTF_b``.

Kernel models (in-plane kernel response, f in lp/mm; structure also passes the system blur,
``exp(-2 pi^2 (0.5 mm)^2 f^2)`` for detector aperture and focal spot, which shapes the object but
not the quantum noise):

* ``standard``: ``exp(-(f/0.420)^2.26)``, the shape fitted to a real standard kernel's noise
  (Philips B, ``preprocess.harmonize.REF_NPS_*``);
* ``sharp`` / ``very_sharp``: the standard MTF times ``exp(s g(f))`` with s = 1 / 1.6, g the
  measured Philips L -> B transfer (the family the harmonisation assumes);
* ``edge``: an edge-enhancing kernel outside that family, ``exp(-(f/0.75)^2) (1 + 0.8 (1 -
  exp(-(f/0.25)^2)))`` (MTF peak ~1.3 at 0.45 lp/mm, flat below 0.1 lp/mm), to test how the
  harmonisation copes with a kernel whose shape it was not calibrated on;
* ``soft``: ``exp(-(f/0.33)^2)``.

The vendor family (``VENDOR_KERNELS``; "-like": shapes with the published kernels' character,
not their measured curves): ``MTF(f) = exp(-(f/f_c)^p) (1 + a (1 - exp(-(f/f_b)^2)))``, a
low-pass roll-off times an edge-enhancement step that lifts mid frequencies by up to ``1 + a``.
Standard kernels have ``a`` ~ 0 and ``f_c`` 0.40-0.50 lp/mm (MTF50 ~0.3-0.4 lp/mm); lung and
bone kernels lift 0.3-0.6 lp/mm by 1.3-1.9x (MTF peaks above 1, as GE LUNG and Siemens B70f
do). Each comes with its class in the vendor table (``io/kernels.py``) so a test can feed the
rendering with the name a scanner would write.
"""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from emphy_dask.preprocess.kernel_estimate import REF_NPS_F_LPMM, REF_NPS_Q, calibrated_g

#: Strength of the family kernels (see module docstring).
FAMILY_STRENGTH = {"standard": 0.0, "sharp": 1.0, "very_sharp": 1.6}
#: Gaussian sigma of the imaging chain outside the kernel (detector aperture, focal spot), mm:
#: 0.5: with the phantom skin's own partial volume (~0.25 mm) its air-skin edge matches the real
#: Philips B edge beyond the kernel (0.55 mm, preprocess/transfer.py).
SYSTEM_BLUR_MM = 0.5
#: name: (vendor, ConvolutionKernel, f_c lp/mm, p, a, f_b lp/mm); see the module docstring.
VENDOR_KERNELS = {
    "siemens_b30f": ("SIEMENS", "B30f", 0.40, 2.2, 0.0, 0.3),
    "siemens_b45f": ("SIEMENS", "B45f", 0.50, 2.0, 0.10, 0.30),
    "siemens_b70f": ("SIEMENS", "B70f", 0.95, 2.0, 0.90, 0.35),
    "siemens_i70f": ("SIEMENS", "I70f", 0.85, 2.5, 0.70, 0.30),
    "ge_standard": ("GE MEDICAL SYSTEMS", "STANDARD", 0.45, 2.3, 0.05, 0.30),
    "ge_lung": ("GE MEDICAL SYSTEMS", "LUNG", 0.80, 2.0, 0.60, 0.30),
    "ge_bone": ("GE MEDICAL SYSTEMS", "BONE", 0.75, 1.8, 0.35, 0.35),
    "philips_b": ("Philips", "B", 0.42, 2.26, 0.0, 0.3),
    "philips_c": ("Philips", "C", 0.46, 2.2, 0.05, 0.30),
    "philips_l": ("Philips", "L", 0.70, 2.2, 0.50, 0.25),
    "philips_ya": ("Philips", "YA", 0.50, 2.0, 0.15, 0.30),
    "canon_fc13": ("TOSHIBA", "FC13", 0.43, 2.4, 0.0, 0.3),
    "canon_fc51": ("TOSHIBA", "FC51", 0.78, 2.2, 0.55, 0.28),
}
KERNEL_MODELS = ("soft", "standard", "sharp", "very_sharp", "edge", *VENDOR_KERNELS)


def shaped_mtf(f_lpmm, f_c: float, p: float, a: float = 0.0, f_b: float = 0.3) -> np.ndarray:
    """``exp(-(f/f_c)^p) (1 + a (1 - exp(-(f/f_b)^2)))``: any kernel-like MTF (unit gain at 0)."""
    f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
    return np.exp(-(f / f_c) ** p) * (1.0 + a * (1.0 - np.exp(-(f / f_b) ** 2)))


def kernel_mtf(kernel, f_lpmm) -> np.ndarray:
    """In-plane MTF of a kernel model at frequencies ``f_lpmm`` (lp/mm).

    ``kernel``: a name of ``KERNEL_MODELS``, or ``(f_c, p, a, f_b)`` of ``shaped_mtf`` (a shape
    no table in the code knows)."""
    f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
    if not isinstance(kernel, str):
        return shaped_mtf(f, *kernel)
    if kernel in VENDOR_KERNELS:
        return shaped_mtf(f, *VENDOR_KERNELS[kernel][2:])
    standard = np.exp(-(f / REF_NPS_F_LPMM) ** REF_NPS_Q)
    if kernel in FAMILY_STRENGTH:
        return standard * np.exp(FAMILY_STRENGTH[kernel] * calibrated_g(f))
    if kernel == "edge":
        return np.exp(-(f / 0.75) ** 2) * (1.0 + 0.8 * (1.0 - np.exp(-(f / 0.25) ** 2)))
    if kernel == "soft":
        return np.exp(-(f / 0.33) ** 2)
    raise ValueError(f"unknown kernel model {kernel!r} (known: {', '.join(KERNEL_MODELS)}, or (f_c, p, a, f_b))")


def render_kernel(obj_hu: np.ndarray, spacing_zyx_mm, kernel: str, *, noise_sd_hu: float = 20.0, seed=0,
                  fov_mask_yx: np.ndarray | None = None, floor_hu: int = -1024,
                  padding_hu: int | None = None) -> np.ndarray:
    """Reconstruct a noise-free object with kernel ``kernel``: int16 HU, same shape.

    Parameters
    ----------
    obj_hu : ndarray (n_z, n_y, n_x)
        Noise-free object, HU (``make_phantom(..., scanner=False).hu``); planes are axis 0.
    spacing_zyx_mm : 3 floats, mm
    kernel : str or 4 floats
        One of ``KERNEL_MODELS``, or ``(f_c, p, a, f_b)`` of ``shaped_mtf``.
    noise_sd_hu : float
        Standard deviation of the noise in a uniform region *with the standard kernel*; other
        kernels get the same raw-data noise through their own filter (same ``seed`` = same
        acquisition).
    seed : int or numpy Generator
    fov_mask_yx : bool ndarray (n_y, n_x), optional
        Inside the scan circle; outside is treated as air and written back as ``padding_hu``.
    floor_hu : int
        Lowest stored HU (scanners store >= -1024 with intercept -1024): values below are clipped,
        as in real sharp-kernel series.
    padding_hu : int, optional
        Value written outside ``fov_mask_yx`` (default: the input's value there).
    """
    obj = np.asarray(obj_hu)
    nz, ny, nx = obj.shape
    dy, dx = float(spacing_zyx_mm[1]), float(spacing_zyx_mm[2])
    rng = np.random.default_rng(seed)
    fr = np.hypot(np.fft.fftfreq(ny, dy)[:, None], np.fft.rfftfreq(nx, dx)[None, :])
    fr_full = np.hypot(np.fft.fftfreq(ny, dy)[:, None], np.fft.fftfreq(nx, dx)[None, :])
    ramp_std = np.sqrt(fr_full) * kernel_mtf("standard", fr_full)
    # white noise through sqrt(f) * MTF_standard has variance mean(|filter|^2): normalise it
    scale = noise_sd_hu / np.sqrt(np.mean(ramp_std ** 2))
    kern = kernel_mtf(kernel, fr).astype(np.float32)
    system = np.exp(-2 * np.pi ** 2 * SYSTEM_BLUR_MM ** 2 * fr ** 2).astype(np.float32)
    ramp = (scale * np.sqrt(fr)).astype(np.float32)
    out = np.empty(obj.shape, np.int16)
    outside = None if fov_mask_yx is None else ~np.asarray(fov_mask_yx, bool)
    for k in range(nz):
        plane = obj[k].astype(np.float32)
        if outside is not None:
            plane[outside] = -1000.0          # air, not the padding code, outside the circle
        spec = system * sfft.rfft2(plane) + ramp * sfft.rfft2(rng.standard_normal((ny, nx), dtype=np.float32))
        img = sfft.irfft2(spec * kern, s=(ny, nx))
        img = np.clip(np.rint(img), floor_hu, 3071).astype(np.int16)
        if outside is not None:
            img[outside] = obj[k][outside] if padding_hu is None else padding_hu
        out[k] = img
    return out
