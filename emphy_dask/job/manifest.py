"""The patient/scan manifest: which series of which scan to process, from headers only.

Indexing is itself distributed: the tree is listed per top-level folder and headers are read
in chunks of files on the workers (``client.map``); grouping and series selection, which need
every header of a scan, run on the driver and are cheap. Without a client it runs in-process.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import ScanError
from ..pipeline import ScanTask, selection_columns
from ..tables import to_arrow

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MANIFEST_FILE = "manifest.parquet"


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _image_key(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    for suffix in IMAGE_SUFFIXES:
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _list_files(root: Path, client=None) -> list[Path]:
    from ..io import find_files

    tops = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    dirs = [p for p in tops if p.is_dir()]
    files = [p for p in tops if p.is_file()]
    if client is not None and len(dirs) > 1:
        listed = client.gather(client.map(find_files, dirs, pure=False))
    else:
        listed = [find_files(d) for d in dirs]
    for chunk in listed:
        files.extend(chunk)
    return sorted(files)


def _index(files: list[Path], root: Path, client=None, chunk_size: int = 512) -> list[dict]:
    from ..io import index_files

    chunks = [files[i:i + chunk_size] for i in range(0, len(files), chunk_size)]
    if client is not None and len(chunks) > 1:
        parts = client.gather(client.map(index_files, chunks, root=root, pure=False))
    else:
        parts = [index_files(c, root) for c in chunks]
    return [rec for part in parts for rec in part]


def tasks_from_index(files: list[Path], records: list[dict], root: Path) -> list[ScanTask]:
    """One task per scan key: the picked series, or the reason none could be picked."""
    from ..io import scans_from_index

    tasks = []
    for key, choice in scans_from_index(files, records, root).items():
        if isinstance(choice, ScanError):
            tasks.append(ScanTask(key, "error", error=choice.reason, error_path=choice.path))
            continue
        tasks.append(ScanTask(key, "dicom", tuple(str(p) for p in choice.picked.files),
                              selection_columns(choice.n_candidates, choice.not_picked, choice.multi_kernel_kernels)))
    return tasks


def build_manifest(input_path: str | Path, client=None) -> tuple[Path, list[ScanTask]]:
    """Index ``input_path`` (a tree, or a manifest file) into scan tasks, sorted by key.

    Returns (input root, tasks). Keys that hold no DICOM but a NIfTI/NRRD/MHD file become
    ``image`` tasks keyed by the file's path without suffix; an image file that is a label
    map (``io.image_io.label_image_reason``: integer, a handful of values, no air) becomes a
    ``skipped`` task with the reason: listed in the manifest, never processed, no scans row.
    """
    path = Path(input_path)
    if path.is_file():
        return read_manifest_file(path, client)
    if not path.is_dir():
        raise ScanError(path, "input not found: neither a folder nor a manifest file", stage="index")
    root = path.resolve()
    files = _list_files(root, client)
    images = [f for f in files if _is_image(f)]
    dicom_candidates = [f for f in files if not _is_image(f) and not f.name.lower().endswith((".raw", ".zraw"))]
    tasks = tasks_from_index(dicom_candidates, _index(dicom_candidates, root, client), root)
    tasks += [_image_task(_image_key(f, root), f, why) for f, why in zip(images, _label_reasons(images, client))]
    return root, unique_keys(tasks)


def _label_reasons(images: list[Path], client=None) -> list[str | None]:
    """Per image file: why it is a label map (not a CT), or None. Read on the workers."""
    from ..io.image_io import label_image_reason

    if client is not None and len(images) > 1:
        return client.gather(client.map(label_image_reason, images, pure=False))
    return [label_image_reason(f) for f in images]


def _image_task(key: str, path: Path, label_reason: str | None) -> ScanTask:
    """An ``image`` task, or a ``skipped`` one (listed in the manifest, never processed) for a label map."""
    if label_reason is not None:
        return ScanTask(key, "skipped", (str(path),), error=label_reason, error_path=str(path))
    return ScanTask(key, "image", (str(path),), selection_columns(1, [], ()))


def scan_tasks(tasks: list[ScanTask]) -> tuple[list[ScanTask], list[ScanTask]]:
    """(tasks to process, ``skipped`` ones: files that are not scans, e.g. label maps)."""
    return [t for t in tasks if t.kind != "skipped"], [t for t in tasks if t.kind == "skipped"]


def unique_keys(tasks: list[ScanTask]) -> list[ScanTask]:
    """Sorted by key; a key met again (a DICOM scan and an image file of the same name, a CSV
    listing a key twice) becomes ``key~2``, ``key~3``: never two scans under one key."""
    seen, unique = {}, []
    for t in sorted(tasks, key=lambda t: t.scan_key):
        n = seen.get(t.scan_key, 0)
        seen[t.scan_key] = n + 1
        unique.append(t if n == 0 else dataclasses.replace(t, scan_key=f"{t.scan_key}~{n + 1}"))
    return unique


def read_manifest_file(path: Path, client=None) -> tuple[Path, list[ScanTask]]:
    """A manifest: our own ``manifest.parquet`` or a CSV with columns ``scan_key,path``.

    In a CSV, ``path`` is a series folder, a patient folder or an image file, relative to the
    CSV's folder or absolute.
    """
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        root = Path(table.schema.metadata.get(b"emphy.input_root", b".").decode())
        tasks = []
        for row in table.to_pylist():
            sel = {k: row[k] for k in ("n_candidate_series", "not_picked", "multi_kernel", "kernels_in_study")}
            tasks.append(ScanTask(row["scan_key"], row["kind"], tuple(str(root / p) for p in row["paths"] or ()),
                                  sel, row["error"], row["error_path"]))
        return root, tasks
    import csv

    root = path.parent.resolve()
    tasks = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"scan_key", "path"} <= set(reader.fieldnames):
            raise ScanError(path, "manifest CSV needs the columns scan_key,path", stage="index")
        for row in reader:
            target = (root / row["path"]).resolve()
            tasks.extend(_tasks_for_target(row["scan_key"], target, root, client))
    return root, unique_keys(tasks)


def _tasks_for_target(key: str, target: Path, root: Path, client=None) -> list[ScanTask]:
    """Tasks of one manifest row: one, or ``key#1``, ``key#2`` when the folder holds several patients."""
    if target.is_file() and _is_image(target):
        return [_image_task(key, target, _label_reasons([target])[0])]
    if not target.exists():
        return [ScanTask(key, "error", error="listed in the manifest but not found", error_path=str(target))]
    from ..io import find_files

    files = [target] if target.is_file() else find_files(target)
    records = [dict(r, scan_key=key) for r in _index(files, root, client)]
    if not records:
        return [ScanTask(key, "error", error="no DICOM files found", error_path=str(target))]
    return tasks_from_index([], records, root)


def write_manifest(out_dir: Path, root: Path, tasks: list[ScanTask]) -> Path:
    """Save the manifest (paths relative to ``root``) atomically as OUT/manifest.parquet."""
    rows = []
    for t in tasks:
        rel = []
        for p in t.paths:
            try:
                rel.append(Path(p).resolve().relative_to(root).as_posix())
            except ValueError:
                rel.append(str(p))
        sel = t.selection
        rows.append({"scan_key": t.scan_key, "kind": t.kind, "paths": rel, "error": t.error,
                     "error_path": t.error_path,
                     **{k: sel.get(k) for k in ("n_candidate_series", "not_picked", "multi_kernel",
                                                 "kernels_in_study")}})
    table = to_arrow("manifest", rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"emphy.input_root": str(root).encode()})
    final = Path(out_dir) / MANIFEST_FILE
    tmp = final.with_name(".tmp-" + final.name)
    pq.write_table(table, tmp)
    tmp.replace(final)
    return final


def manifest_summary(tasks: list[ScanTask]) -> dict:
    """Scan count per kind (dicom / image / error / skipped)."""
    return dict(Counter(t.kind for t in tasks))


