"""What ``emphy extract`` accepts as INPUT and OUT, checked before anything is written.

A bad INPUT or OUT is refused with one line naming the path and what to pass instead (the CLI
exits 2), before OUT is created: a refused run leaves nothing behind.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ScanError
from .manifest import IMAGE_SUFFIXES

_WHAT = "give a folder (a DICOM tree, a patient or series folder, image files), a CT image file, " \
        "a CSV manifest (scan_key,path) or a run's manifest.parquet"


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 ("DICM" after the 128-byte preamble) or a bare dataset pydicom can parse."""
    import pydicom

    try:
        with path.open("rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return True
        pydicom.dcmread(path, stop_before_pixels=True, force=False)
        return True
    except Exception:  # noqa: BLE001 - any parse failure: not DICOM
        return False


def _check_csv(path: Path) -> None:
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as fh:
            fields = csv.DictReader(fh).fieldnames or []
    except (UnicodeDecodeError, csv.Error):
        raise ScanError(path, f"not a folder, an image or a CSV manifest (binary, not text); {_WHAT}",
                        stage="index") from None
    if not {"scan_key", "path"} <= set(fields):
        raise ScanError(path, f"a CSV manifest needs the columns scan_key,path (found: {', '.join(fields) or 'none'})",
                        stage="index")


def check_input(input_path, out_dir) -> None:
    """Refuse an INPUT that cannot be a run's input, and an OUT nested in INPUT (or INPUT in OUT).

    Raises
    ------
    ScanError
        One line: the path and what to pass instead. Nothing has been written.
    """
    path = Path(input_path)
    if not path.exists():
        raise ScanError(path, "input not found: neither a folder nor a manifest file", stage="index")
    src, out = path.resolve(), Path(out_dir).resolve()
    if path.is_dir():
        if out == src or src in out.parents:
            raise ScanError(out, f"OUT is inside INPUT {src}: a rerun would index the run's own files as scans; "
                                 "write OUT outside INPUT", stage="index")
        if out in src.parents:
            raise ScanError(src, f"INPUT is inside OUT {out}: write OUT elsewhere", stage="index")
        return
    name = path.name.lower()
    if name.endswith(".parquet"):
        return
    if name.endswith(IMAGE_SUFFIXES):
        from ..io.image_io import label_image_reason

        why = label_image_reason(path)
        if why is not None:
            raise ScanError(path, f"{why}; extract needs the CT image (a lung mask goes with "
                                  "`emphy quantify --ct CT --mask MASK`)", stage="index")
        return
    if _is_dicom_file(path):
        raise ScanError(path, f"a single DICOM file (one slice) is not a scan: pass its series folder "
                              f"({path.parent}) or the patient folder above it", stage="index")
    _check_csv(path)
