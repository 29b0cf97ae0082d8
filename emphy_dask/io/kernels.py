"""Reconstruction-kernel table: manufacturer + ConvolutionKernel -> sharpness class.

Why: a density threshold such as LAA%-950 measures the kernel as much as the lungs. Sharp
(lung, bone, edge) kernels add high-frequency noise and edge overshoot that push lung voxels
below -950 HU (13 % vs 0.1 % LAA%-950 on one acquisition reconstructed with Philips L and B,
``../shared/data``). Every result therefore records the kernel's class, and the harmonisation
step (``preprocess/harmonize.py``) acts on sharp classes only.

Classes, softest first: ``soft``, ``standard``, ``sharp``, ``very_sharp``; ``unknown`` when the
table does not know the name (then the image-based estimate of ``harmonize.estimate_kernel``
fills the gap and says so in ``kernel_class_source``). The table is built from the vendors'
published kernel families (names and their order of sharpness), not from measurements:

* Siemens: family letters (B body, Br/Bl/Bf/Bv, I/Ir/Il SAFIRE, Q/Qr/Ql ADMIRE, H/Hr head,
  D/Dr, U/Ur, ...) + a 2-digit sharpness + optional suffix (``B30f``, ``I70f\\3``, ``Br40d``):
  <= 26 soft (B10f-B26f), 27-45 standard (B30f "medium smooth" .. B45f "medium"),
  46-65 sharp (B50f-B65f, Bl57, Br59, Br64), >= 66 very sharp (B70f "very sharp", B75f, B80f).
* GE: SOFT/SMOOTH soft; STANDARD, CHST (chest) standard; DETAIL, LUNG, BONE sharp;
  BONEPLUS, EDGE, ULTRA very sharp. ``HD`` prefixes (HD STANDARD, HD LUNG ...) follow the base.
* Philips: A, UA soft; B, C, CB, UB, YA standard; D, L, LA, LB, UC, YB, YC sharp;
  E, EC, YD, YE, YF very sharp.
* Toshiba / Canon: FC01-FC05 soft, FC06-FC18 standard (body), FC50-FC56 sharp (lung),
  FC80-FC89 very sharp (high resolution / bone), FL01-FL05 sharp (lung); other FC numbers
  (head and special kernels) unknown.
"""
from __future__ import annotations

import re

#: Classes in order of sharpness (index = rank).
KERNEL_CLASSES: tuple[str, ...] = ("soft", "standard", "sharp", "very_sharp")
UNKNOWN = "unknown"

_GE = {
    "SOFT": "soft", "SMOOTH": "soft",
    "STANDARD": "standard", "STND": "standard", "STD": "standard", "CHST": "standard", "CHEST": "standard",
    "DETAIL": "sharp", "LUNG": "sharp", "BONE": "sharp",
    "BONEPLUS": "very_sharp", "EDGE": "very_sharp", "ULTRA": "very_sharp",
}
_PHILIPS = {
    "A": "soft", "UA": "soft",
    "B": "standard", "C": "standard", "CB": "standard", "UB": "standard", "YA": "standard",
    "D": "sharp", "L": "sharp", "LA": "sharp", "LB": "sharp", "UC": "sharp", "YB": "sharp", "YC": "sharp",
    "E": "very_sharp", "EC": "very_sharp", "YD": "very_sharp", "YE": "very_sharp", "YF": "very_sharp",
}
_SIEMENS_RE = re.compile(r"^(B|BR|BL|BF|BV|BS|I|IR|IL|IV|Q|QR|QL|H|HR|HC|D|DR|U|UR|J|JR|C|T|S)(\d{2})[A-Z]?$")
_TOSHIBA_RE = re.compile(r"^F([CL])(\d{2})$")

_VENDOR_RE = (
    ("ge", re.compile(r"^GE\b|GENERAL ELECTRIC")),
    ("siemens", re.compile(r"SIEMENS")),
    ("philips", re.compile(r"PHILIPS|MARCONI|PICKER")),
    ("toshiba", re.compile(r"TOSHIBA|CANON")),
)
VENDORS = tuple(v for v, _ in _VENDOR_RE)


def normalise_kernel(kernel: str) -> str:
    """Upper case, first value only, no spaces/underscores/dashes.

    Siemens writes e.g. ``I70f\\3`` (kernel, strength) and Philips may append the iDose level;
    ``read_header`` joins multi-values with ``/``.
    """
    first = re.split(r"[\\/,;]", str(kernel).strip())[0]
    return re.sub(r"[\s_\-]", "", first).upper()


def vendor_of(manufacturer: str | None) -> str | None:
    """``ge`` / ``siemens`` / ``philips`` / ``toshiba`` from DICOM Manufacturer, else None."""
    m = (manufacturer or "").strip().upper()
    for key, pattern in _VENDOR_RE:
        if pattern.search(m):
            return key
    return None


def _siemens(k: str) -> str | None:
    m = _SIEMENS_RE.match(k)
    if m is None:
        return None
    n = int(m.group(2))
    return "soft" if n <= 26 else "standard" if n <= 45 else "sharp" if n <= 65 else "very_sharp"


def _toshiba(k: str) -> str | None:
    m = _TOSHIBA_RE.match(k)
    if m is None:
        return None
    kind, n = m.group(1), int(m.group(2))
    if kind == "L":
        return "sharp" if 1 <= n <= 5 else None
    if 1 <= n <= 5:
        return "soft"
    if 6 <= n <= 18:
        return "standard"
    if 50 <= n <= 56:
        return "sharp"
    if 80 <= n <= 89:
        return "very_sharp"
    return None


def _lookup(vendor: str, k: str) -> str | None:
    if vendor == "ge":
        return _GE.get(k[2:] if k.startswith("HD") and k[2:] in _GE else k)
    if vendor == "philips":
        return _PHILIPS.get(k)
    if vendor == "siemens":
        return _siemens(k)
    if vendor == "toshiba":
        return _toshiba(k)
    return None


def kernel_class(kernel: str | None, manufacturer: str | None = None) -> str:
    """Sharpness class of a reconstruction kernel from the vendor tables.

    Parameters
    ----------
    kernel : str or None
        DICOM ConvolutionKernel (first value used when multi-valued).
    manufacturer : str, optional
        DICOM Manufacturer; picks the vendor table. Missing or not one of the four vendors:
        every table is tried and a unanimous answer is returned (single letters such as
        ``B`` are Philips-only, so they resolve; ambiguous names stay unknown).

    Returns
    -------
    str
        One of ``KERNEL_CLASSES`` or ``"unknown"``.
    """
    if kernel is None or not str(kernel).strip():
        return UNKNOWN
    k = normalise_kernel(kernel)
    vendor = vendor_of(manufacturer)
    if vendor is not None:
        return _lookup(vendor, k) or UNKNOWN
    answers = {_lookup(v, k) for v in VENDORS} - {None}
    return answers.pop() if len(answers) == 1 else UNKNOWN


def is_sharp_class(cls: str | None) -> bool | None:
    """True for sharp / very_sharp, False for soft / standard, None for unknown."""
    if cls in ("sharp", "very_sharp"):
        return True
    if cls in ("soft", "standard"):
        return False
    return None
