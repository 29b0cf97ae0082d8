"""INPUT of ``emphy extract``: the one place that tells what INPUT is and who lists it.

| INPUT | read by |
|---|---|
| a local folder (DICOM / NIfTI tree) | ``manifest.iter_tree`` (a unit per top-level folder, on workers) |
| ``s3://bucket/prefix``, ``gs://...`` (a tree in a store) | the same; workers list and read their units |
| a CSV ``scan_key,path`` or ``scan_key,url`` | ``manifest.read_manifest_file`` (one row per worker task) |
| a run's ``manifest.parquet`` | ``manifest.iter_manifest_file`` |
| an Imaging Data Commons s5cmd manifest (``.s5cmd``, ``.txt``): a series folder URL a line | ``read_url_list`` |
| a scheme in ``SCHEMES`` (e.g. ``dicomweb+http://``) | its handler |

IDC manifest lines read ``cp s3://idc-open-data/<crdc_series_uuid>/* .``; the key is the series
folder's name. A new kind of source adds one entry to ``SCHEMES``: ``prefix -> handler(input, client, in_flight)``
returning ``(root, iterator of ScanTask)``, and optionally to ``CHECKS`` (refuse a bad INPUT in one
line before any work).

Local INPUT and OUT are checked before anything is written (``_check_local``): a missing path,
one DICOM file (pass its series folder), a label image, a file that is no manifest, OUT inside
INPUT or INPUT inside OUT are refused in one line naming the path and what to pass instead.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ScanError
from ..io import storage
from .manifest import IMAGE_SUFFIXES, iter_manifest, row_task_stream

#: URL scheme prefix -> handler(input, client, in_flight) -> (root, iterator of ScanTask).
SCHEMES: dict = {}
#: URL scheme prefix -> check(input) raising ScanError: run before any work.
CHECKS: dict = {}
#: Suffixes of IDC's download manifests (``.s5cmd``) and plain URL lists (``.txt``).
URL_LIST_SUFFIXES = (".s5cmd", ".txt")
#: IDC's s5cmd manifests written for Google Cloud name GCS's S3-compatible endpoint in their header.
_GCS_ENDPOINT = "storage.googleapis.com"


def _scheme(input_path) -> str | None:
    s = str(input_path)
    return next((prefix for prefix in (*SCHEMES, *CHECKS) if s.startswith(prefix)), None)


def check_input(input_path, out_dir=None) -> None:
    """Refuse an INPUT that cannot be read, in one line, before any work (ScanError): a missing
    path, an object-store URL with no such bucket/prefix, a refused credential, an unreachable
    store or PACS, and (local INPUT) what ``_check_local`` refuses."""
    scheme = _scheme(input_path)
    if scheme is not None:
        if scheme in CHECKS:
            CHECKS[scheme](input_path)
        return
    if storage.is_url(input_path):
        storage.check_input(input_path)
    else:
        _check_local(input_path, out_dir)


def iter_input(input_path, client=None, in_flight: int = 32):
    """(input root, iterator of ScanTask) of any INPUT (see the module doc)."""
    scheme = _scheme(input_path)
    if scheme in SCHEMES:
        return SCHEMES[scheme](input_path, client, in_flight)
    if str(input_path).lower().endswith(URL_LIST_SUFFIXES):
        return read_url_list(input_path, client, in_flight)
    return iter_manifest(input_path, client, in_flight)


def parse_url_list(text: str) -> list[tuple[str, str]]:
    """(scan key, series folder URL) of an IDC download manifest or a plain list of URLs.

    Lines: ``cp s3://bucket/<series>/* .`` (IDC's s5cmd manifest), or a bare URL; ``#`` comments
    and blank lines are skipped. An s5cmd header naming ``--endpoint-url https://storage.googleapis.com``
    means the bucket is in Google Cloud Storage: its URLs become ``gs://``. The key is the series
    folder's name (IDC: the ``crdc_series_uuid``).
    """
    gcs = any(line.lstrip().startswith("#") and _GCS_ENDPOINT in line for line in text.splitlines())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        url = next((w for w in words if storage.is_url(w)), None)
        if url is None:
            raise ValueError(f"not a series URL: {line[:120]!r}")
        url = url.removesuffix("*").rstrip("/")
        if gcs and url.startswith("s3://"):
            url = "gs://" + url[len("s3://"):]
        out.append((url.rsplit("/", 1)[-1], url))
    return out


def read_url_list(path, client=None, in_flight: int = 32):
    """(root, iterator of ScanTask) of an IDC manifest / URL list: each series is listed and its
    headers read on a worker, straight from the store."""
    try:
        rows = parse_url_list(storage.read_bytes(path).decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScanError(path, f"not a manifest of series URLs: {exc}", stage="index") from None
    if not rows:
        raise ScanError(path, "the manifest lists no series URL", stage="index")
    root = Path(storage.as_url(path)).parent if storage.is_url(path) else Path(path).resolve().parent

    return root, row_task_stream(rows, root, client, in_flight)


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


def _check_local(input_path, out_dir) -> None:
    """Refuse an INPUT that cannot be a run's input, and an OUT nested in INPUT (or INPUT in OUT).

    Raises
    ------
    ScanError
        One line: the path and what to pass instead. Nothing has been written.
    """
    path = Path(input_path)
    if not path.exists():
        raise ScanError(path, "input not found: neither a folder nor a manifest file", stage="index")
    if out_dir is None or storage.is_url(out_dir):
        out = None
    else:
        out = Path(out_dir).resolve()
    src = path.resolve()
    if path.is_dir() and out is not None:
        if out == src or src in out.parents:
            raise ScanError(out, f"OUT is inside INPUT {src}: a rerun would index the run's own files as scans; "
                                 "write OUT outside INPUT", stage="index")
        if out in src.parents:
            raise ScanError(src, f"INPUT is inside OUT {out}: write OUT elsewhere", stage="index")
        return
    if path.is_dir():
        return
    name = path.name.lower()
    if name.endswith((".parquet",) + URL_LIST_SUFFIXES):
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


def _check_dicomweb(url) -> None:
    """A bad DICOMweb URL or an unreachable PACS: one line, no work (``io.dicomweb``)."""
    from ..io.dicomweb import check_source, parse_source

    check_source(parse_source(url))


CHECKS["dicomweb+"] = _check_dicomweb     # listed by manifest.iter_manifest (QIDO-RS on the driver)
