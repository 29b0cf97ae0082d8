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
import tempfile
import uuid
from collections import Counter, deque
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ScanError
from ..io import storage
from ..scan_state import ScanTask, selection_columns
from ..tables import arrow_schema, to_arrow
from .fingerprint import with_fingerprints

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


def tasks_from_index(files: list[Path], records: list[dict], root: Path) -> list[ScanTask]:
    """One task per scan key of a whole tree (``io.scans_from_index``): the picked series, or
    the reason none could be picked. The streamed manifest gives the same tasks unit by unit."""
    from ..io import scans_from_index

    return _tasks_from_choices(scans_from_index(files, records, root))


def _tasks_from_choices(choices: dict) -> list[ScanTask]:
    tasks = []
    for key, choice in choices.items():
        if isinstance(choice, ScanError):
            tasks.append(ScanTask(key, "error", error=choice.reason, error_path=choice.path))
            continue
        tasks.append(ScanTask(key, "dicom", tuple(str(p) for p in choice.picked.files),
                              selection_columns(choice.n_candidates, choice.not_picked, choice.multi_kernel_kernels,
                                                choice.picked.patient_ref,
                                                study_date_shifted=choice.picked.study_date_shifted)))
    return tasks


def _dicom_candidates(files: list[Path]) -> list[Path]:
    return [f for f in files if not _is_image(f) and not f.name.lower().endswith((".raw", ".zraw"))]


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


def _passed_over_task(path, reason: str, root: Path) -> ScanTask:
    """A ``skipped`` manifest row for what the folder walk passed over (link loop, unreadable folder,
    dangling link), keyed by its path under INPUT: listed with the reason, never processed."""
    key = Path(path).relative_to(root).as_posix()
    return ScanTask(key, "skipped", error=f"{PASSED_OVER} {reason}", error_path=str(path))


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


def ordered_map(client, fn, items, *, in_flight: int = 32, name: str = "index", **kwargs):
    """``fn(item, **kwargs)`` for each item, on the workers with at most ``in_flight`` at once,
    results yielded in item order (in-process without a client). A unit whose task fails (e.g.
    its worker died) yields the exception instead of stopping the manifest."""
    items = iter(items)
    if client is None:
        for item in items:
            try:
                yield item, fn(item, **kwargs)
            except Exception as exc:  # noqa: BLE001
                yield item, exc
        return
    token = uuid.uuid4().hex[:8]
    pending: deque = deque()
    n = 0
    while True:
        while len(pending) < in_flight:
            item = next(items, None)
            if item is None:
                break
            pending.append((item, client.submit(fn, item, **kwargs, key=f"{name}-{n}-{token}", pure=False)))
            n += 1
        if not pending:
            return
        item, fut = pending.popleft()
        try:
            result = fut.result()
        except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker on a pathological file
            if fut.status == "cancelled":
                from .flow import SchedulerLost

                raise SchedulerLost(f"lost the scheduler while indexing ({exc!r}): rerun the same command") from exc
            result = exc
        fut.release()
        yield item, result


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


PSEUDONYMIZED = b"emphy.pseudonymized"
#: the series-selection facts (``scan_state.selection_columns``) a manifest row carries to the scans table
SELECTION_KEYS = ("n_candidate_series", "not_picked", "multi_kernel", "kernels_in_study", "input_fingerprint",
                  "patient_key", "study_date_shifted")
#: Reason prefix of a ``skipped`` row the folder walk passed over (vs. a file that is not a scan).
PASSED_OVER = "folder walk:"


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


def iter_manifest_file(path: Path, batch_rows: int = 128):
    """The ScanTasks of a ``manifest.parquet``, read in batches."""
    source = storage.parquet_file(path)
    root = Path((source.schema_arrow.metadata or {}).get(b"emphy.input_root", b".").decode())
    for batch in source.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            sel = {k: row.get(k) for k in SELECTION_KEYS}      # manifests older than patient_key: None
            paths = tuple(p if row["kind"] == "dicomweb" or storage.is_url(p) else str(root / p)
                          for p in row["paths"] or ())
            yield ScanTask(row["scan_key"], row["kind"], paths,
                           sel, row["error"], row["error_path"])


class ManifestWriter:
    """Writes ScanTasks to a manifest Parquet file as they come (batches of ``batch_rows``),
    atomically: the file appears under its name only on ``close``.

    ``drop_paths``: the public manifest of a ``--pseudonymize`` run (no paths under INPUT).
    """

    def __init__(self, final: Path, root: Path, drop_paths: bool = False, batch_rows: int = 512):
        self.final, self.root, self.drop_paths, self.batch_rows = Path(final), Path(root), drop_paths, batch_rows
        meta = {b"emphy.input_root": str(root).encode()}
        if drop_paths:
            meta[PSEUDONYMIZED] = b"true"
        schema = arrow_schema("manifest")
        self.schema = schema.with_metadata({**(schema.metadata or {}), **meta})
        # an object store has no rename: the file is written locally and uploaded whole on close
        self.tmp = (Path(tempfile.mkdtemp(prefix="emphy-manifest-")) / self.final.name if storage.is_url(self.final)
                    else self.final.with_name(".tmp-" + self.final.name))
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.rows: list[dict] = []
        self.kinds: Counter = Counter()

    def add(self, t: ScanTask) -> None:
        rel = []
        if not self.drop_paths:
            for p in t.paths:
                try:
                    rel.append(Path(p).relative_to(self.root).as_posix())
                except ValueError:
                    rel.append(storage.as_url(p))
        sel = t.selection
        self.rows.append({"scan_key": t.scan_key, "kind": t.kind, "paths": None if self.drop_paths else rel, "error": t.error,
                          "error_path": t.error_path,
                          **{k: sel.get(k) for k in SELECTION_KEYS}})
        self.kinds[t.kind] += 1
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_batches(to_arrow("manifest", self.rows).to_batches(),
                                                          schema=self.schema))
            self.rows = []

    def close(self) -> Path:
        self._flush()
        self.writer.close()
        if storage.is_url(self.final):
            storage.write_via_file(self.final, lambda p: os.replace(self.tmp, p))
            self.tmp.parent.rmdir()
        else:
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)
        if storage.is_url(self.final):
            self.tmp.parent.rmdir()


def write_manifest(out_dir: Path, root: Path, tasks) -> Path:
    """Save the manifest (paths relative to ``root``) atomically as OUT/manifest.parquet."""
    w = ManifestWriter(Path(out_dir) / MANIFEST_FILE, root)
    for t in tasks:
        w.add(t)
    return w.close()


def manifest_summary(tasks) -> dict:
    """Scan count per kind (dicom / image / error / skipped)."""
    return dict(Counter(t.kind for t in tasks))
