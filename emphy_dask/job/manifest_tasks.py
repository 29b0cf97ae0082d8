"""The scan tasks every manifest source shares: from index records, from image files, from what
the folder walk passed over; unique keys; ``ordered_map`` (units indexed on the workers, results
in order). A leaf under ``manifest`` (the folder walk), ``manifest_csv`` (CSV/URL rows) and
``manifest_file`` (the Parquet manifest)."""
from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from pathlib import Path

from ..errors import ScanError
from ..scan_state import ScanTask, selection_columns

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Reason prefix of a ``skipped`` row the folder walk passed over (vs. a file that is not a scan).
PASSED_OVER = "folder walk:"


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


def _passed_over_task(path, reason: str, root: Path) -> ScanTask:
    """A ``skipped`` manifest row for what the folder walk passed over (link loop, unreadable folder,
    dangling link), keyed by its path under INPUT: listed with the reason, never processed."""
    key = Path(path).relative_to(root).as_posix()
    return ScanTask(key, "skipped", error=f"{PASSED_OVER} {reason}", error_path=str(path))


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
