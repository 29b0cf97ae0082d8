"""Kernel table (vendor + ConvolutionKernel -> class) and the image-based estimate that fills its gaps."""
import numpy as np
import pytest

from emphy_dask.io import load_ct, scan_metadata
from emphy_dask.io.kernels import KERNEL_CLASSES, kernel_class
from emphy_dask.preprocess.harmonize import harmonize_scan
from emphy_dask.preprocess.kernel_estimate import estimate_kernel

from .conftest import DX_SHARP, DX_SOFT, SHARED_DATA


@pytest.mark.parametrize("kernel, manufacturer, expected", [
    # Siemens: number = sharpness; f/s/d/u suffixes, SAFIRE/ADMIRE strength after a backslash
    ("B10f", "SIEMENS", "soft"), ("B20f", "SIEMENS", "soft"), ("B26f", "SIEMENS", "soft"),
    ("B30f", "SIEMENS", "standard"), ("B31f", "SIEMENS", "standard"), ("B45f", "SIEMENS", "standard"),
    ("Br40d", "Siemens Healthineers", "standard"), ("Qr40", "SIEMENS", "standard"), ("I30f\\3", "SIEMENS", "standard"),
    ("B50f", "SIEMENS", "sharp"), ("B60f", "SIEMENS", "sharp"), ("Bl57d", "SIEMENS", "sharp"),
    ("Br59f", "SIEMENS", "sharp"), ("Br64d", "SIEMENS", "sharp"),
    ("B70f", "SIEMENS", "very_sharp"), ("B80f", "SIEMENS", "very_sharp"), ("I70f\\3", "SIEMENS", "very_sharp"),
    # GE names, with and without the HD prefix
    ("SOFT", "GE MEDICAL SYSTEMS", "soft"), ("STANDARD", "GE MEDICAL SYSTEMS", "standard"),
    ("CHST", "GE MEDICAL SYSTEMS", "standard"), ("HD STANDARD", "GE MEDICAL SYSTEMS", "standard"),
    ("DETAIL", "GE MEDICAL SYSTEMS", "sharp"), ("LUNG", "GE MEDICAL SYSTEMS", "sharp"),
    ("BONE", "GE MEDICAL SYSTEMS", "sharp"), ("HD LUNG", "GE", "sharp"),
    ("BONEPLUS", "GE MEDICAL SYSTEMS", "very_sharp"), ("EDGE", "GE MEDICAL SYSTEMS", "very_sharp"),
    # Philips letters
    ("A", "Philips", "soft"), ("B", "Philips", "standard"), ("C", "Philips", "standard"), ("YA", "Philips", "standard"),
    ("D", "Philips", "sharp"), ("L", "Philips Medical Systems", "sharp"), ("YC", "Philips", "sharp"),
    ("E", "Philips", "very_sharp"), ("YD", "Philips", "very_sharp"),
    # Toshiba / Canon
    ("FC01", "TOSHIBA", "soft"), ("FC13", "TOSHIBA", "standard"), ("FC18", "CANON_MEC", "standard"),
    ("FC51", "TOSHIBA", "sharp"), ("FL04", "TOSHIBA", "sharp"), ("FC86", "CANON_MEC", "very_sharp"),
    # no manufacturer: the tables must agree
    ("STANDARD", None, "standard"), ("B70f", None, "very_sharp"), ("L", None, "sharp"),
])
def test_known_kernels_are_classified(kernel, manufacturer, expected):
    assert kernel_class(kernel, manufacturer) == expected


@pytest.mark.parametrize("kernel, manufacturer", [
    ("XYZ", "SIEMENS"), ("B", "SIEMENS"), ("FC30", "TOSHIBA"), ("FC99", "TOSHIBA"), ("LUNG", "Philips"),
    ("Q7", "ACME CT"), ("", "GE MEDICAL SYSTEMS"), (None, None), ("   ", "SIEMENS"),
])
def test_unknown_kernels_are_reported_unknown(kernel, manufacturer):
    assert kernel_class(kernel, manufacturer) == "unknown"


def test_metadata_carries_the_class_not_a_flag():
    meta = scan_metadata({"kernel": "B70f", "manufacturer": "SIEMENS"}, 10, (1.0, 0.7, 0.7))
    assert meta["kernel_class"] == "very_sharp" and "kernel_is_sharp" not in meta
    assert load_ct(DX_SHARP).meta["kernel_class"] == "sharp"
    assert load_ct(DX_SOFT).meta["kernel_class"] == "standard"


@pytest.fixture(scope="module")
def real_pair():
    return load_ct(DX_SHARP), load_ct(DX_SOFT)


def test_image_estimate_tells_the_real_kernels_apart(real_pair):
    sharp, soft = (estimate_kernel(v.hu, v.spacing_zyx_mm, 0, v.fov_mask) for v in real_pair)
    assert sharp.kernel_class == "sharp" and 0.8 < sharp.strength < 1.2          # calibration kernel: 1.04
    assert soft.kernel_class == "standard" and abs(soft.strength) < 0.2          # reference kernel: 0.02
    assert sharp.nps_fav_lpmm > soft.nps_fav_lpmm + 0.05                          # 0.42 vs 0.30 lp/mm
    assert sharp.n_rois > 100 and soft.n_rois > 100


def test_image_estimate_on_a_scan_not_used_for_the_shape():
    """GE LightSpeed STANDARD (LIDC-IDRI-0013): another vendor's standard kernel reads standard."""
    vol = load_ct(SHARED_DATA / "lidc-idri-full" / "LIDC-IDRI-0013")
    est = estimate_kernel(vol.hu, vol.spacing_zyx_mm, 0, vol.fov_mask)
    assert est.kernel_class == "standard" and est.strength < 0.5


def test_unknown_kernel_gets_the_image_class(real_pair):
    """A kernel name the table does not know: the class comes from the image and says so."""
    sharp = real_pair[0]
    renamed = sharp.with_hu(sharp.hu, meta={**sharp.meta, "kernel": "XLUNG9", "manufacturer": "ACME"})
    cols, harmonized = harmonize_scan(renamed, enabled=False)
    assert (cols["kernel_class"], cols["kernel_class_source"]) == ("sharp", "image") and harmonized is None
    cols, _ = harmonize_scan(sharp, enabled=False)
    assert (cols["kernel_class"], cols["kernel_class_source"]) == ("sharp", "table")
    assert cols["kernel_strength"] == pytest.approx(1.04, abs=0.1) and cols["harmonize_applied"] is None


def test_noiseless_image_has_no_estimate():
    flat = np.full((6, 128, 128), 40, np.int16)                    # uniform soft tissue, no noise at all
    est = estimate_kernel(flat, (5.0, 0.7, 0.7))
    assert est.strength is None and est.kernel_class == "unknown"
    assert set(KERNEL_CLASSES) == {"soft", "standard", "sharp", "very_sharp"}


def test_vendor_kernel_family_renders_with_its_table_class():
    """Every rendered vendor-like kernel carries the name a scanner writes; its table class matches
    its shape (standard kernels ~1 at 0.3 lp/mm, lung/bone kernels lift mid frequencies)."""
    from emphy_dask.synth.kernels import VENDOR_KERNELS, kernel_mtf

    f = np.array([0.0, 0.3])
    expected = {"siemens_b30f": "standard", "siemens_b45f": "standard", "siemens_b70f": "very_sharp",
                "siemens_i70f": "very_sharp", "ge_standard": "standard", "ge_lung": "sharp", "ge_bone": "sharp",
                "philips_b": "standard", "philips_c": "standard", "philips_l": "sharp", "philips_ya": "standard",
                "canon_fc13": "standard", "canon_fc51": "sharp"}
    assert set(VENDOR_KERNELS) == set(expected)
    for name, (vendor, kernel, *_shape) in VENDOR_KERNELS.items():
        assert kernel_class(kernel, vendor) == expected[name], name
        m0, m3 = kernel_mtf(name, f)
        assert m0 == 1.0                                                   # unit gain at f = 0
        assert (m3 > 0.95) if expected[name] in ("sharp", "very_sharp") else (0.5 < m3 < 0.85), (name, m3)
    with pytest.raises(ValueError, match="unknown kernel model"):
        kernel_mtf("siemens_b99x", f)
