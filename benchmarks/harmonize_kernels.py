"""Harmonised sharp vs standard on phantom lungs rendered with a family of kernel shapes.

    python benchmarks/harmonize_kernels.py [--quick]

The same noise-free phantom lungs (10, 20 and 30 % emphysema; ``make_phantom(scanner=False)``)
and the same raw-data noise are reconstructed with every kernel of ``synth.kernels`` (the
vendor family and the former calibration family), clipped at -1024 as Philips/Siemens store
them. For each sharp kernel: LAA%-950, LAA%-910, Perc15 and MLD of the lungs raw and after
``harmonize_kernel`` (method ``nps_ratio``, and the former ``nps_shape``), against the
reference standard kernel's rendering (the truth the method aims at) and the vendor's own
standard. Also: standard kernels through the class gate (must stay as they are) and the
issue's Siemens case (B70f vs B40f-like, 30 slices of 8 mm).
"""
from __future__ import annotations

import sys

import numpy as np

from emphy_dask.io.kernels import kernel_class
from emphy_dask.preprocess.harmonize import harmonize_kernel
from emphy_dask.synth.kernels import VENDOR_KERNELS, render_kernel
from emphy_dask.synth.phantom import make_phantom

SHARP = ["siemens_b70f", "siemens_i70f", "ge_lung", "ge_bone", "philips_l", "canon_fc51", "sharp", "very_sharp",
         "edge"]
STANDARD = ["siemens_b30f", "siemens_b45f", "ge_standard", "philips_b", "philips_c", "philips_ya", "canon_fc13"]
OWN_STANDARD = {"siemens": "siemens_b30f", "ge": "ge_standard", "philips": "philips_b", "canon": "canon_fc13"}


def stats(hu, lung) -> dict:
    v = hu[lung].astype(np.float64)
    return {"laa950": 100 * np.mean(v < -950), "laa910": 100 * np.mean(v < -910),
            "perc15": float(np.percentile(v, 15)), "mld": float(v.mean())}


def render(ph, kernel, seed=3, noise=15.0):
    return render_kernel(ph.hu, ph.spacing_zyx_mm, kernel, noise_sd_hu=noise, seed=seed,
                         fov_mask_yx=ph.fov_mask_yx, floor_hu=-1024)


def row(name, ref, raw, out):
    d = {k: out[k] - ref[k] for k in ref}
    ok = abs(d["laa950"]) <= 0.5 and abs(d["laa910"]) <= 2 and abs(d["perc15"]) <= 5 and abs(d["mld"]) <= 5
    return (f"| {name} | {raw['laa950']:.2f} | {out['laa950']:.2f} | {ref['laa950']:.2f} | {d['laa950']:+.2f} | "
            f"{d['laa910']:+.2f} | {d['perc15']:+.1f} | {d['mld']:+.1f} | {'yes' if ok else 'no'} |")


def main(quick: bool = False) -> None:
    severities = (20.0,) if quick else (10.0, 20.0, 30.0)
    shape = (12, 384, 384) if quick else (24, 384, 384)
    header = ("| kernel | raw LAA950 | harm. LAA950 | standard LAA950 | dLAA950 | dLAA910 | dPerc15 | dMLD | "
              "within targets |\n|---|---|---|---|---|---|---|---|---|")
    for sev in severities:
        ph = make_phantom(shape, (5.0, 0.78, 0.78), sev, "panlobular" if sev >= 20 else "centrilobular", 11,
                          scanner=False)
        lung, fov = ph.lung_labels > 0, np.broadcast_to(ph.fov_mask_yx, ph.hu.shape)
        ref = stats(render(ph, "standard"), lung)
        print(f"\n### {sev:.0f} % emphysema (truth LAA950 {ph.truth['laa950_pct']:.2f}; reference standard "
              f"rendering {ref['laa950']:.2f})\n")
        for method in ("nps_ratio", "nps_shape"):
            print(f"\nmethod {method}, harmonised sharp minus reference standard:\n\n{header}")
            for k in SHARP:
                hu = render(ph, k)
                out, p = harmonize_kernel(hu, ph.spacing_zyx_mm, "sharp", method=method, fov_mask=fov)
                print(row(k, ref, stats(hu, lung), stats(out, lung)))
        print(f"\nstandard kernels with their table class (class gate; nps_ratio):\n\n{header}")
        for k in STANDARD:
            hu = render(ph, k)
            cls = kernel_class(VENDOR_KERNELS[k][1], VENDOR_KERNELS[k][0])
            out, p = harmonize_kernel(hu, ph.spacing_zyx_mm, cls, fov_mask=fov)
            print(row(f"{k} ({cls}, applied {p['applied']})", stats(hu, lung), stats(hu, lung), stats(out, lung)))


def siemens_case() -> None:
    """The issue's Siemens pair, rendered: B70f-like vs B30f-like, 30 slices of 8 mm."""
    ph = make_phantom((30, 384, 384), (8.0, 0.78, 0.78), 15.0, "centrilobular", 5, scanner=False)
    lung, fov = ph.lung_labels > 0, np.broadcast_to(ph.fov_mask_yx, ph.hu.shape)
    soft = stats(render(ph, "siemens_b30f", noise=12.0), lung)
    hu = render(ph, "siemens_b70f", noise=12.0)
    print("\n### Siemens-like pair, 30 x 8 mm: B70f-like harmonised minus B30f-like\n")
    print("| method | raw LAA950 | harm. LAA950 | B30f LAA950 | dLAA950 | dLAA910 | dPerc15 | dMLD | within targets |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for method in ("nps_shape", "nps_ratio"):
        out, p = harmonize_kernel(hu, ph.spacing_zyx_mm, "very_sharp", method=method, fov_mask=fov)
        extra = f"s = {p['strength']}" if method == "nps_shape" else f"T(0.3) {p['gain_03']}, T(0.5) {p['gain_05']}"
        print(row(f"{method} ({extra})", soft, stats(hu, lung), stats(out, lung)))


if __name__ == "__main__":
    siemens_case()
    main("--quick" in sys.argv)
