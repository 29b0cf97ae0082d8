"""The patient/scan manifest: which series of which scan to process, from headers only.

Streamed, so that the driver's memory does not grow with the archive: indexing is split into
units, one per top-level folder of INPUT (a patient folder in the LIDC-IDRI layout) or one per
row of a CSV manifest; each unit is listed, its headers read and its series picked on a worker
(``index_unit``), at most ``in_flight`` units at a time, and only the unit's ``ScanTask``s come
back, in unit order. The manifest is written to Parquet as they arrive (``ManifestWriter``) and
read back in batches for the run (``iter_manifest_file``): no list of every file, header or
scan is ever held. A scan key never spans two units (a key is the file's path up to the patient
folder, which starts with the top-level folder), so the result equals indexing the whole tree at
once (``io.scans_from_index``; a test compares them). Without a client it runs in-process.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

from ..errors import ScanError
from ..io import storage
from ..scan_state import ScanTask
from .fingerprint import with_fingerprints
from .manifest_csv import read_manifest_file, row_task_stream
from .manifest_file import (MANIFEST_FILE, PSEUDONYMIZED, SELECTION_KEYS, ManifestWriter, iter_manifest_file,
                            manifest_summary, write_manifest)
from .manifest_tasks import (IMAGE_SUFFIXES, PASSED_OVER, _dicom_candidates, _image_key, _image_task, _is_image,
                             _passed_over_task, _tasks_from_choices, ordered_map, scan_tasks, tasks_from_index,
                             unique_keys)

#: the names other modules and tests import from here (the manifest's parts live beside it)
__all__ = ["IMAGE_SUFFIXES", "MANIFEST_FILE", "PASSED_OVER", "PSEUDONYMIZED", "SELECTION_KEYS", "ManifestWriter",
           "build_manifest", "index_unit", "iter_dicomweb", "iter_manifest", "iter_manifest_file", "iter_tree",
           "manifest_summary", "ordered_map", "read_manifest_file", "row_task_stream", "scan_tasks",
           "tasks_from_index", "unique_keys", "write_manifest", "_image_key", "_image_task", "_is_image"]


def index_unit(unit: str, root: str) -> tuple[list[ScanTask], int]:
    """Tasks of one top-level folder of INPUT (runs on a worker): list it, read its headers, pick
    each scan's series, tell label images from CT. Returns (tasks sorted by key, DICOM-candidate
    file count). The same choices as ``io.scans_from_index`` on the whole tree, restricted to the
    unit; empty folders directly under INPUT are the driver's (an empty unit)."""
    from collections import defaultdict

    from ..io.dicom_index import empty_scan_folders, find_files, index_files, scan_key_of
    from ..io.image_io import label_image_reason
    from ..io.series import choose_by_scan

    root_p, unit_p = Path(root), Path(unit)
    passed_over: list = []
    files = find_files(unit_p, passed_over, inside=os.path.realpath(root_p))
    skipped = [_passed_over_task(path, reason, root_p) for path, reason in passed_over]
    if not files:
        rel = unit_p.relative_to(root_p).as_posix()
        return [*with_fingerprints([ScanTask(rel, "error", error="empty folder: no files at all",
                                             error_path=str(unit_p))], root_p), *skipped], 0
    dicom = _dicom_candidates(files)
    out = choose_by_scan(index_files(dicom, root_p), root_p)
    counts: dict[str, int] = defaultdict(int)
    for f in dicom:
        counts[scan_key_of(f, root_p)] += 1
    for key, n in counts.items():       # as io.scans_from_index: folders holding no DICOM at all
        if key in out or (key == root_p.name and (out or len(counts) > 1)):
            continue
        if any(other.startswith((key + "/", key + "#")) for other in out):
            continue                    # a collection folder above other scans (README, metadata.csv)
        out[key] = ScanError(root_p / key, f"no DICOM files found ({n} other files)")
    # the folders directly under INPUT are units of their own (each indexed apart)
    for key in empty_scan_folders(root_p, set(counts) | set(out), include_root=False):
        out.setdefault(key, ScanError(root_p / key, "empty folder: no files at all"))
    tasks = _tasks_from_choices(dict(sorted(out.items())))
    images = [f for f in files if _is_image(f)]
    tasks += [_image_task(_image_key(f, root_p), f, label_image_reason(f)) for f in images]
    return with_fingerprints(unique_keys(tasks + skipped), root_p), len(dicom)


def _root_files(files: list[Path], root: Path, beside_scans: bool) -> list[ScanTask]:
    """Tasks of the files directly in INPUT: a series dropped in the root (key = its name), image files."""
    from ..io import index_files
    from ..io.image_io import label_image_reason
    from ..io.series import choose_by_scan

    dicom = _dicom_candidates(files)
    out = choose_by_scan(index_files(dicom, root), root) if dicom else {}
    if dicom and root.name not in out and not beside_scans:
        out[root.name] = ScanError(root, f"no DICOM files found ({len(dicom)} other files)")
    tasks = _tasks_from_choices(dict(sorted(out.items())))
    tasks += [_image_task(_image_key(f, root), f, label_image_reason(f)) for f in files if _is_image(f)]
    return with_fingerprints(tasks, root)


def iter_tree(root: Path, client=None, in_flight: int = 32):
    """The tasks of a DICOM/image tree (a folder, or a prefix in an object store), unit by unit
    (see the module doc): each worker lists and reads its own units."""
    if storage.is_url(root):
        entries = storage.list_dir(root)
        dirs = [str(root / name) for name, is_dir in entries if is_dir]
        files, passed_over = [root / name for name, is_dir in entries if not is_dir], []
    else:
        dirs, files, passed_over = _top_level(root)
    # keys a root-level file may take (a series in the root, image stems): a unit's task with the
    # same key came first and keeps it (as unique_keys on the whole tree)
    watch = {root.name} | {_image_key(f, root) for f in files if _is_image(f)}
    seen: Counter = Counter()
    any_dicom = False
    for unit, result in ordered_map(client, index_unit, dirs, in_flight=in_flight, root=str(root)):
        if isinstance(result, BaseException):
            rel = Path(unit).relative_to(root).as_posix()
            result = ([ScanTask(rel, "error", error=f"indexing this folder failed: {type(result).__name__}: "
                                                      f"{' '.join(str(result).split())[:300]}", error_path=unit)], 0)
        tasks, n_dicom = result
        any_dicom |= n_dicom > 0
        for t in tasks:
            if t.scan_key in watch:
                seen[t.scan_key] += 1
            yield t
    for t in [*_root_files(files, root, beside_scans=any_dicom), *passed_over]:
        n = seen[t.scan_key]
        seen[t.scan_key] += 1
        yield t if n == 0 else dataclasses.replace(t, scan_key=f"{t.scan_key}~{n + 1}")


def _top_level(root: Path) -> tuple[list[str], list[Path], list[ScanTask]]:
    """(folders, files, ``skipped`` tasks) directly under INPUT. Symlinked folders count as
    folders (a cohort made of links to patient folders); two links to one real folder give one
    unit, a link to INPUT itself (or above) none, a dangling link none: each is listed with why."""
    real_root = os.path.realpath(root)
    dirs, files, passed_over, first = [], [], [], {}
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):     # real folders claim first
        path = root / e.name
        if e.is_symlink() and not path.exists():
            passed_over.append(_passed_over_task(path, f"dangling symbolic link to {os.readlink(path)}", root))
        elif e.is_dir():
            real = os.path.realpath(path)
            if real == real_root or real_root.startswith(real + os.sep):
                passed_over.append(_passed_over_task(path, f"symbolic link loop: points to {real}, a folder above it", root))
            elif e.is_symlink() and real.startswith(real_root + os.sep) and real not in first:
                passed_over.append(_passed_over_task(path, f"links to {real}, inside the input tree: indexed there, "
                                                           "not twice", root))
            elif real in first:
                passed_over.append(_passed_over_task(path, f"same folder as {first[real]}: walked once", root))
            else:
                first[real] = str(path)
                dirs.append(str(path))
        elif e.is_file():
            files.append(path)
    return sorted(dirs), sorted(files), sorted(passed_over, key=lambda t: t.scan_key)


def build_manifest(input_path: str | Path, client=None) -> tuple[Path, list[ScanTask]]:
    """Index ``input_path`` (a tree, or a manifest file) into scan tasks, as a list (for small
    inputs and tests; the job streams them with ``iter_manifest``).

    Keys that hold no DICOM but a NIfTI/NRRD/MHD file become ``image`` tasks keyed by the file's
    path without suffix; an image file that is a label map (``io.image_io.label_image_reason``:
    integer, a handful of values, no air) becomes a ``skipped`` task with the reason: listed in
    the manifest, never processed, no scans row.
    """
    root, tasks = iter_manifest(input_path, client)
    return root, list(tasks)


def iter_manifest(input_path: str | Path, client=None, in_flight: int = 32):
    """(input root, iterator of ScanTask) of a tree, a CSV manifest, a run's manifest.parquet (local or in an
    object store, ``storage``) or a DICOMweb URL (``io.dicomweb``); ``job.inputs.iter_input`` dispatches to this."""
    from ..io.dicomweb import is_dicomweb_url

    if is_dicomweb_url(input_path):
        return iter_dicomweb(str(input_path), client, in_flight)
    path = Path(input_path)
    if storage.is_url(path):                     # an object store: a prefix (a tree) or a manifest object
        fs, inner = storage.filesystem(path)
        if fs.isfile(inner):
            return read_manifest_file(path, client, in_flight)
        return path, iter_tree(path, client, in_flight)
    if path.is_file() and _is_image(path):       # one CT image file: one scan, keyed by its name
        from ..io.image_io import label_image_reason

        root = path.parent.resolve()
        task = _image_task(_image_key(path.resolve(), root), path.resolve(), label_image_reason(path))
        return root, iter(with_fingerprints([task], root))
    if path.is_file():
        return read_manifest_file(path, client, in_flight)
    if not path.is_dir():
        raise ScanError(path, "input not found: neither a folder nor a manifest file", stage="index")
    root = path.resolve()
    return root, iter_tree(root, client, in_flight)


def iter_dicomweb(url: str, client=None, in_flight: int = 32):
    """(root, tasks) of a PACS: patients listed by QIDO-RS on the driver (a PACS that cannot be
    reached stops here, before any work), each patient's series picked on a worker from WADO-RS
    metadata (``io.dicomweb.index_patient``); ``dicomweb`` tasks whose paths are instance URLs."""
    from ..io.dicomweb import index_patient, list_patients, parse_source

    source = parse_source(url)
    units = list_patients(source)

    def tasks():
        for (key, studies), result in ordered_map(client, index_patient, units, in_flight=in_flight,
                                                  base_url=source.base_url):
            if isinstance(result, BaseException):
                result = {key: ScanError(source.base_url, f"indexing failed: {type(result).__name__}: {result}")}
            for t in _tasks_from_choices(result):
                yield dataclasses.replace(t, kind="dicomweb") if t.kind == "dicom" else t

    return Path("/"), tasks()
