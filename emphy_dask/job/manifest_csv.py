"""Manifests given as INPUT: a run's ``manifest.parquet`` or a CSV of ``scan_key,path`` (or
``scan_key,url``, as Imaging Data Commons writes them), each row indexed on a worker."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from ..errors import ScanError
from ..io import storage
from ..scan_state import ScanTask
from .fingerprint import with_fingerprints
from .manifest_file import PSEUDONYMIZED, iter_manifest_file
from .manifest_tasks import _dicom_candidates, _image_task, _is_image, ordered_map, tasks_from_index


def read_manifest_file(path: Path, client=None, in_flight: int = 32):
    """(root, iterator of ScanTask) of a manifest: our own ``manifest.parquet`` or a CSV with
    columns ``scan_key,path``.

    In a CSV, ``path`` (or ``url``) is a series folder, a patient folder or an image file, relative
    to the CSV's folder or absolute, or an object-store URL (``s3://bucket/series/``); each row is
    indexed on a worker. A key listed twice becomes ``key~2``.
    """
    if path.suffix == ".parquet":
        meta = storage.parquet_file(path).schema_arrow.metadata or {}
        if meta.get(PSEUDONYMIZED) == b"true":
            raise ScanError(path, "the manifest of a --pseudonymize run holds no paths; give the original INPUT",
                            stage="index")
        return Path(meta.get(b"emphy.input_root", b".").decode()), iter_manifest_file(path)
    import csv

    import io

    root = path.parent if storage.is_url(path) else path.parent.resolve()
    text = storage.read_bytes(path).decode("utf-8-sig")
    fields = csv.DictReader(io.StringIO(text)).fieldnames or []
    column = "path" if "path" in fields else "url"
    if not {"scan_key", column} <= set(fields):
        raise ScanError(path, "manifest CSV needs the columns scan_key,path (or scan_key,url)", stage="index")

    def rows():
        for row in csv.DictReader(io.StringIO(text)):
            target = row[column].strip()
            yield row["scan_key"], (target if storage.is_url(target) else str((root / target).resolve()))

    return root, row_task_stream(rows(), root, client, in_flight)


def row_task_stream(rows, root: Path, client=None, in_flight: int = 32):
    """The tasks of (scan key, path or URL) rows, each indexed on a worker (``_row_tasks``), in row
    order; a row whose indexing failed becomes an error task, a repeated key gets ``~2``, ``~3``."""
    seen: Counter = Counter()
    for (key, target), result in ordered_map(client, _row_tasks, rows, in_flight=in_flight, root=str(root)):
        if isinstance(result, BaseException):
            result = [ScanTask(key, "error", error=f"indexing failed: {type(result).__name__}: {result}",
                               error_path=target)]
        for t in result:
            n = seen[t.scan_key]
            seen[t.scan_key] += 1
            yield t if n == 0 else dataclasses.replace(t, scan_key=f"{t.scan_key}~{n + 1}")


def _row_tasks(row: tuple[str, str], root: str) -> list[ScanTask]:
    """Tasks of one CSV row (on a worker): one, or ``key#1``, ``key#2`` when the folder holds several patients."""
    from ..io import find_files, index_files
    from ..io.image_io import label_image_reason

    key, target = row[0], Path(row[1])
    if storage.is_url(target):              # a series folder URL (``.../*`` as IDC's manifests write it)
        target = Path(storage.as_url(target).removesuffix("*").rstrip("/"))
        files = _dicom_candidates(find_files(target))
        records = [dict(r, scan_key=key) for r in index_files(files, Path(root))]
        tasks = (tasks_from_index([], records, Path(root)) if records else
                 [ScanTask(key, "error", error="listed in the manifest but not found (no DICOM object under this URL)",
                           error_path=storage.as_url(target))])
    elif target.is_file() and _is_image(target):
        tasks = [_image_task(key, target, label_image_reason(target))]
    elif not target.exists():
        tasks = [ScanTask(key, "error", error="listed in the manifest but not found", error_path=str(target))]
    else:
        files = [target] if target.is_file() else find_files(target)
        records = [dict(r, scan_key=key) for r in index_files(files, Path(root))]
        tasks = (tasks_from_index([], records, Path(root)) if records else
                 [ScanTask(key, "error", error="no DICOM files found", error_path=str(target))])
    return with_fingerprints(tasks, root)
