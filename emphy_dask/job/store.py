"""The run folder as a crash-safe store: staged results, Parquet parts, resume state.

Protocol (each step atomic: temporary file + rename):
1. a finished scan's rows are staged at once in ``OUT/_staging/<key>.json`` (readers skip ``_``);
2. every ``part_size`` scans (and at the end) the staged rows become one ``part-<id>.parquet`` in
   each table, ``scans/`` written last: a scan counts as done only once its scans row exists;
3. then the staged files are removed.
A crash between any two steps is repaired on the next start: parts whose id has no scans part
are orphans and deleted; staged scans already in ``scans/`` are dropped, the others flushed.
So a killed job loses at most the scans in flight, and no row is ever written twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
        self.staging.mkdir(parents=True, exist_ok=True)
        self._pending: list[dict] = []

    # -- start-up -------------------------------------------------------------------------
    def repair(self) -> dict:
        """Delete orphan parts and flush/drop leftover staged scans; returns what was done."""
        done_ids = part_ids(self.out_dir, "scans")
        orphans = 0
        for table in TABLES:
            if table == "scans":
                continue
            for pid in part_ids(self.out_dir, table) - done_ids:
                (self.out_dir / table / f"part-{pid}.parquet").unlink()
                orphans += 1
        for tmp in self.out_dir.rglob(".tmp-*"):
            tmp.unlink()
        done = set(self.done_keys())
        staged = []
        for f in sorted(self.staging.glob("*.json")):
            result = json.loads(f.read_text())
            if result["scans"]["scan_key"] in done:
                f.unlink()
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

    def failed_keys(self, reason_part: str) -> set[str]:
        """Keys of failed scans whose reason holds ``reason_part`` (e.g. a PACS transfer failure)."""
        t = read_table(self.out_dir, "scans", columns=["scan_key", "status", "reason"])
        rows = zip(t.column("scan_key").to_pylist(), t.column("status").to_pylist(), t.column("reason").to_pylist())
        return {k for k, status, reason in rows if status == "failed" and reason_part in (reason or "")}

    def forget(self, keys: set[str]) -> int:
        """Remove every row of ``keys`` (each table's parts that hold them are rewritten), so
        that the run processes them again: scans that failed for a transient reason. The old
        scans part goes first: a crash then leaves orphans (removed by ``repair``) and scans
        that count as not done (redone), never a row twice. Returns the parts rewritten."""
        n = 0
        for pid in sorted(part_ids(self.out_dir, "scans")):
            old = {t: self.out_dir / t / f"part-{pid}.parquet" for t in TABLES}
            scans = pq.read_table(old["scans"])
            if not set(scans.column("scan_key").to_pylist()) & keys:
                continue
            drop = pa.array(sorted(keys))
            kept = {t: pq.read_table(p).filter(pc.invert(pc.is_in(pc.field("scan_key"), drop)))
                    for t, p in old.items() if p.exists()}
            new = uuid.uuid4().hex[:12]
            old["scans"].unlink()
            for t in [t for t in TABLES if t != "scans"] + ["scans"]:
                if t in kept and kept[t].num_rows:
                    tmp = self.out_dir / t / f".tmp-part-{new}.parquet"
                    pq.write_table(kept[t], tmp, compression="zstd")
                    os.replace(tmp, self.out_dir / t / f"part-{new}.parquet")
                old[t].unlink(missing_ok=True)
            n += 1
        return n

    def check_config(self, config_hash: str) -> None:
        """Refuse an OUT whose written or staged (crashed-run) results used other settings."""
        staged = {json.loads(f.read_text())["scans"]["config_hash"] for f in self.staging.glob("*.json")}
        other = {h for h in set(self.done_keys().values()) | staged if h != config_hash}
        if other:
            raise ConfigMismatch(
                f"{self.out_dir} holds results made with other settings (config hash {', '.join(sorted(other))}, "
                f"this job {config_hash}); rerun with --overwrite or write to a new OUT")

    def check_pseudonym(self, fingerprint: str | None) -> None:
        """Refuse mixing real keys and pseudonyms (or two secrets) in one OUT; mark a new
        pseudonymised OUT with the secret's fingerprint (``job.pseudonym``), never the secret."""
        marker = self.out_dir / PSEUDONYM_FILE
        have = json.loads(marker.read_text())["fingerprint"] if marker.exists() else None
        if have == fingerprint:
            return
        has_rows = bool(part_ids(self.out_dir, "scans")) or any(self.staging.glob("*.json"))
        if have is None and not has_rows:
            tmp = marker.with_name(".tmp-" + marker.name)
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))
            os.replace(tmp, marker)
            return
        if have is None:
            why = "holds results under real scan keys; --pseudonymize needs a new OUT (or --overwrite)"
        elif fingerprint is None:
            why = "holds pseudonymised results; rerun with --pseudonymize and the same secret"
        else:
            why = "was pseudonymised with another secret (EMPHY_PSEUDONYM_KEY); use the same one or a new OUT"
        raise ConfigMismatch(f"{self.out_dir} {why}")

    def _staged(self, scan_key: str) -> Path:
        # hashed: any key (slashes, unicode) maps to its own flat file name
        return self.staging / f"{hashlib.sha256(scan_key.encode()).hexdigest()[:24]}.json"

    # -- during the run ---------------------------------------------------------------------
    def add(self, result: dict) -> None:
        """Stage one scan's rows durably, then flush a part when enough are pending."""
        key = result["scans"]["scan_key"]
        final = self._staged(key)
        tmp = self.staging / f".tmp-{final.name}"
        tmp.write_text(json.dumps(result, default=_plain))
        os.replace(tmp, final)
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
            self._staged(res["scans"]["scan_key"]).unlink(missing_ok=True)
        self._pending = []

    def close(self) -> None:
        self.flush()
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def counts(self) -> dict:
        t = read_table(self.out_dir, "scans", columns=["status"])
        vc = pc.value_counts(t.column("status")).to_pylist() if t.num_rows else []
        return {d["values"]: d["counts"] for d in vc}


def clean_out_dir(out_dir: str | Path) -> None:
    """``--overwrite``: remove a previous run's outputs (refuses folders that are not runs)."""
    out = Path(out_dir)
    if not out.exists():
        return
    markers = {"run.json", "manifest.parquet", "scans", STAGING}
    entries = {p.name for p in out.iterdir()}
    if entries and not entries & markers:
        raise ConfigMismatch(f"{out}: --overwrite refuses to delete a folder that is not an emphy run")
    shutil.rmtree(out)
