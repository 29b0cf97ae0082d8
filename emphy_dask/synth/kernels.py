"""Render a noise-free phantom as a scanner would with a given reconstruction kernel.

For tests of kernel harmonisation: the same object (``make_phantom(..., scanner=False)``) and the
same raw-data noise reconstructed with two kernels, as a real scanner does when one acquisition
is reconstructed twice. Filtered back-projection makes each kernel an in-plane filter: the
image is ``MTF_k * (object + ramp-shaped noise)``, so the noise power spectrum of kernel k is
``f * MTF_k(f)^2`` and two kernels differ by exactly ``MTF_a / MTF_b``.

Kernel models (in-plane kernel response, f in lp/mm; structure also passes the system blur,
``exp(-2 pi^2 (0.4 mm)^2 f^2)`` for detector aperture and focal spot, which shapes the object but
not the quantum noise):

* ``standard``: ``exp(-(f/0.420)^2.26)``, the shape fitted to a real standard kernel's noise
  (Philips B, ``preprocess.harmonize.REF_NPS_*``);
* ``sharp`` / ``very_sharp``: the standard MTF times ``exp(s g(f))`` with s = 1 / 1.6, g the
  measured Philips L -> B transfer (the family the harmonisation assumes);
* ``edge``: an edge-enhancing kernel outside that family, ``exp(-(f/0.75)^2) (1 + 0.8 (1 -
  exp(-(f/0.25)^2)))`` (MTF peak ~1.3 at 0.45 lp/mm, flat below 0.1 lp/mm), to test how the
  harmonisation copes with a kernel whose shape it was not calibrated on;
* ``soft``: ``exp(-(f/0.33)^2)``.
"""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from emphy_dask.preprocess.kernel_estimate import REF_NPS_F_LPMM, REF_NPS_Q, calibrated_g

#: Strength of the family kernels (see module docstring).
FAMILY_STRENGTH = {"standard": 0.0, "sharp": 1.0, "very_sharp": 1.6}
#: Gaussian sigma of the system blur (detector aperture, focal spot), mm.
SYSTEM_BLUR_MM = 0.4
KERNEL_MODELS = ("soft", "standard", "sharp", "very_sharp", "edge")


def kernel_mtf(kernel: str, f_lpmm) -> np.ndarray:
    """In-plane MTF of a kernel model at frequencies ``f_lpmm`` (lp/mm)."""
    f = np.abs(np.asarray(f_lpmm, dtype=np.float64))
    standard = np.exp(-(f / REF_NPS_F_LPMM) ** REF_NPS_Q)
    if kernel in FAMILY_STRENGTH:
        return standard * np.exp(FAMILY_STRENGTH[kernel] * calibrated_g(f))
    if kernel == "edge":
        return np.exp(-(f / 0.75) ** 2) * (1.0 + 0.8 * (1.0 - np.exp(-(f / 0.25) ** 2)))
    if kernel == "soft":
        return np.exp(-(f / 0.33) ** 2)
    raise ValueError(f"unknown kernel model {kernel!r} (known: {', '.join(KERNEL_MODELS)})")


def render_kernel(obj_hu: np.ndarray, spacing_zyx_mm, kernel: str, *, noise_sd_hu: float = 20.0, seed=0,
                  fov_mask_yx: np.ndarray | None = None, floor_hu: int = -1024,
                  padding_hu: int | None = None) -> np.ndarray:
    """Reconstruct a noise-free object with kernel ``kernel``: int16 HU, same shape.

    Parameters
    ----------
    obj_hu : ndarray (n_z, n_y, n_x)
        Noise-free object, HU (``make_phantom(..., scanner=False).hu``); planes are axis 0.
    spacing_zyx_mm : 3 floats, mm
    kernel : str
        One of ``KERNEL_MODELS``.
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
