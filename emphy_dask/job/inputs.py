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
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from ..errors import ScanError
from ..io import storage
from ..pipeline import ScanTask
from .manifest import _row_tasks, iter_manifest, ordered_map

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
    return next((prefix for prefix in SCHEMES if s.startswith(prefix)), None)


def check_input(input_path) -> None:
    """Refuse an INPUT that cannot be read, in one line, before any work (ScanError): a missing
    path, an object-store URL with no such bucket/prefix, a refused credential, an unreachable
    store."""
    scheme = _scheme(input_path)
    if scheme is not None:
        if scheme in CHECKS:
            CHECKS[scheme](input_path)
        return
    if storage.is_url(input_path):
        storage.check_input(input_path)
    elif not Path(input_path).exists():
        raise ScanError(input_path, "input not found: neither a folder nor a manifest file", stage="index")


def iter_input(input_path, client=None, in_flight: int = 32):
    """(input root, iterator of ScanTask) of any INPUT (see the module doc)."""
    scheme = _scheme(input_path)
    if scheme is not None:
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

    def tasks():
        seen: Counter = Counter()
        for (key, url), result in ordered_map(client, _row_tasks, rows, in_flight=in_flight, root=str(root)):
            if isinstance(result, BaseException):
                result = [ScanTask(key, "error", error=f"indexing failed: {type(result).__name__}: {result}",
                                   error_path=url)]
            for t in result:
                n = seen[t.scan_key]
                seen[t.scan_key] += 1
                yield t if n == 0 else dataclasses.replace(t, scan_key=f"{t.scan_key}~{n + 1}")

    return root, tasks()
