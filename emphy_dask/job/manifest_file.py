"""The manifest as a Parquet file (OUT/manifest.parquet): written as tasks arrive, read back in batches.

``ManifestWriter`` writes ScanTasks in batches, atomically (the file appears under its name only
on ``close``; in an object store it is uploaded whole); ``iter_manifest_file`` reads them back
for the run, so no list of every scan is ever held. A ``--pseudonymize`` run's manifest holds no
paths (``PSEUDONYMIZED`` in its metadata).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..io import storage
from ..scan_state import ScanTask
from ..tables import arrow_schema, to_arrow

MANIFEST_FILE = "manifest.parquet"
PSEUDONYMIZED = b"emphy.pseudonymized"
#: the series-selection facts (``scan_state.selection_columns``) a manifest row carries to the scans table
SELECTION_KEYS = ("n_candidate_series", "not_picked", "multi_kernel", "kernels_in_study", "input_fingerprint",
                  "patient_key", "study_date_shifted")


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
