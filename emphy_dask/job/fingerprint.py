"""A cheap fingerprint of a scan's input, so that a rerun redoes a failed scan whose files changed.

Hashing pixel data would cost a read of every file; a file that is added, removed, replaced or
rewritten changes its name, size or modification time, which ``os.stat`` gives for free. Paths
enter relative to INPUT, so moving the whole archive keeps the fingerprints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path


def files_fingerprint(files, root: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the sorted (path relative to ``root``, size, mtime_ns)
    of ``files``; a file that vanished counts as (path, -1, -1)."""
    root = str(root)
    entries = []
    for f in files:
        f = str(f)
        try:
            st = os.stat(f)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        rel = os.path.relpath(f, root) if os.path.isabs(f) == os.path.isabs(root) else f
        entries.append(f"{rel}\0{size}\0{mtime}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def _listing(path: Path) -> list[str]:
    """Every file under ``path`` (or ``path`` itself when it is a file; nothing when it is missing)."""
    if path.is_file():
        return [str(path)]
    out = []
    for folder, _, names in os.walk(path):
        out += [os.path.join(folder, n) for n in names]
    return out


def task_fingerprint(task, root: str | Path) -> str:
    """Fingerprint of one ``ScanTask``'s input: its files (the picked series, an image file),
    or, when no series could be picked, everything under the folder or file at fault, so that
    adding the missing DICOM files to a folder changes it."""
    if task.paths:
        return files_fingerprint(task.paths, root)
    target = Path(task.error_path) if task.error_path else None
    return files_fingerprint(_listing(target) if target is not None else [], root)


def with_fingerprints(tasks, root: str | Path) -> list:
    """The tasks with ``selection["input_fingerprint"]`` set (it lands in manifest and scans rows).
    ``skipped`` rows (not scans, never processed) get none: nothing to redo when they change."""
    return [t if t.kind == "skipped" else
            dataclasses.replace(t, selection={**t.selection, "input_fingerprint": task_fingerprint(t, root)})
            for t in tasks]
