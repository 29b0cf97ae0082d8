"""The run folder as a crash-safe store: staged results, Parquet parts, resume state.

Protocol (each step atomic: temporary file + rename):
1. a finished scan's rows are staged at once in ``OUT/_staging/<key>.json`` (readers skip ``_``);
2. every ``part_size`` scans (and at the end) the staged rows become one ``part-<id>.parquet`` in
   each table, ``scans/`` written last: a scan counts as done only once its scans row exists;
3. then the staged files are removed.
A crash between any two steps is repaired on the next start: parts whose id has no scans part
are orphans and deleted; staged scans already in ``scans/`` are dropped, the others flushed.
So a killed job loses at most the scans in flight, and no row is ever written twice.

OUT may be an object-store URL (``s3://bucket/run``; ``io.storage``). A store has no rename, but
an object appears whole or not at all, so each file is written under its final name in one PUT;
the order (staged rows, other tables, ``scans/`` last, then the staged files removed) and thus the
repair are the same: a killed run resumes from the store.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pyarrow.compute as pc

from ..io import storage
from ..tables import TABLES, part_ids, read_table, write_part

STAGING = "_staging"
PSEUDONYM_FILE = "pseudonym.json"      # fingerprint of the --pseudonymize secret of this OUT


def _plain(obj):
    """numpy scalars -> python (json)."""
    return obj.item() if hasattr(obj, "item") else str(obj)


class ConfigMismatch(RuntimeError):
    """OUT holds results made with other settings."""


class RunStore:
    """Resume state and writers of one run folder."""

    def __init__(self, out_dir: str | Path, part_size: int = 64):
        self.out_dir = Path(out_dir)
        self.part_size = part_size
        self.staging = self.out_dir / STAGING
        self.remote = storage.is_url(self.out_dir)
        if not self.remote:
            self.staging.mkdir(parents=True, exist_ok=True)
        self._pending: list[dict] = []

    def _staged_files(self) -> list[str]:
        return storage.glob(self.staging / "*.json")

    # -- start-up -------------------------------------------------------------------------
    def repair(self) -> dict:
        """Delete orphan parts and flush/drop leftover staged scans; returns what was done."""
        done_ids = part_ids(self.out_dir, "scans")
        orphans = 0
        for table in TABLES:
            if table == "scans":
                continue
            for pid in part_ids(self.out_dir, table) - done_ids:
                storage.remove(self.out_dir / table / f"part-{pid}.parquet")
                orphans += 1
        if not self.remote:                    # (an object store never holds a temporary file)
            for tmp in self.out_dir.rglob(".tmp-*"):
                tmp.unlink()
        done = set(self.done_keys())
        staged = []
        for f in self._staged_files():
            result = json.loads(storage.read_bytes(f))
            if result["scans"]["scan_key"] in done:
                storage.remove(f)
            else:
                staged.append(result)
        self._pending = staged
        flushed = len(staged)
        self.flush()
        return {"orphan_parts_removed": orphans, "staged_scans_recovered": flushed}

    def done_keys(self) -> dict[str, str]:
        """scan_key -> config_hash of every scan already written."""
        t = read_table(self.out_dir, "scans", columns=["scan_key", "config_hash"])
        return dict(zip(t.column("scan_key").to_pylist(), t.column("config_hash").to_pylist()))

    def check_config(self, config_hash: str) -> None:
        """Refuse an OUT whose written or staged (crashed-run) results used other settings."""
        staged = {json.loads(storage.read_bytes(f))["scans"]["config_hash"] for f in self._staged_files()}
        other = {h for h in set(self.done_keys().values()) | staged if h != config_hash}
        if other:
            raise ConfigMismatch(
                f"{storage.as_url(self.out_dir)} holds results made with other settings "
                f"(config hash {', '.join(sorted(other))}, "
                f"this job {config_hash}); rerun with --overwrite or write to a new OUT")

    def check_pseudonym(self, fingerprint: str | None) -> None:
        """Refuse mixing real keys and pseudonyms (or two secrets) in one OUT; mark a new
        pseudonymised OUT with the secret's fingerprint (``job.pseudonym``), never the secret."""
        marker = self.out_dir / PSEUDONYM_FILE
        have = json.loads(storage.read_bytes(marker))["fingerprint"] if storage.exists(marker) else None
        if have == fingerprint:
            return
        has_rows = bool(part_ids(self.out_dir, "scans")) or bool(self._staged_files())
        if have is None and not has_rows:
            storage.write_bytes(marker, json.dumps({"fingerprint": fingerprint}).encode())
            return
        if have is None:
            why = "holds results under real scan keys; --pseudonymize needs a new OUT (or --overwrite)"
        elif fingerprint is None:
            why = "holds pseudonymised results; rerun with --pseudonymize and the same secret"
        else:
            why = "was pseudonymised with another secret (EMPHY_PSEUDONYM_KEY); use the same one or a new OUT"
        raise ConfigMismatch(f"{storage.as_url(self.out_dir)} {why}")

    def _staged(self, scan_key: str) -> Path:
        # hashed: any key (slashes, unicode) maps to its own flat file name
        return self.staging / f"{hashlib.sha256(scan_key.encode()).hexdigest()[:24]}.json"

    # -- during the run ---------------------------------------------------------------------
    def add(self, result: dict) -> None:
        """Stage one scan's rows durably, then flush a part when enough are pending."""
        key = result["scans"]["scan_key"]
        storage.write_bytes(self._staged(key), json.dumps(result, default=_plain).encode())
        self._pending.append(result)
        if len(self._pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pid = uuid.uuid4().hex[:12]
        for table in TABLES:
            if table == "scans":
                continue
            rows = [r for res in self._pending for r in res.get(table, [])]
            if rows:
                write_part(table, rows, self.out_dir, pid)
        write_part("scans", [res["scans"] for res in self._pending], self.out_dir, pid)
        for res in self._pending:
            storage.remove(self._staged(res["scans"]["scan_key"]))
        self._pending = []

    def close(self) -> None:
        self.flush()
        if not self.remote and self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def counts(self) -> dict:
        t = read_table(self.out_dir, "scans", columns=["status"])
        vc = pc.value_counts(t.column("status")).to_pylist() if t.num_rows else []
        return {d["values"]: d["counts"] for d in vc}


def clean_out_dir(out_dir: str | Path) -> None:
    """``--overwrite``: remove a previous run's outputs (refuses folders that are not runs)."""
    markers = {"run.json", "manifest.parquet", "scans", STAGING}
    if storage.is_url(out_dir):
        fs, inner = storage.filesystem(out_dir)
        entries = {name for name, _ in storage.list_dir(out_dir)} if fs.exists(inner) else set()
        if entries and not entries & markers:
            raise ConfigMismatch(f"{storage.as_url(out_dir)}: --overwrite refuses to delete a prefix that is not "
                                 "an emphy run")
        if entries:
            storage.remove(out_dir, recursive=True)
        return
    out = Path(out_dir)
    if not out.exists():
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not entries & markers:
        raise ConfigMismatch(f"{out}: --overwrite refuses to delete a folder that is not an emphy run")
    shutil.rmtree(out)
