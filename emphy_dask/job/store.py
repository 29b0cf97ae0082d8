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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import storage
from ..io.atomic import atomic_write
from ..tables import TABLES, arrow_schema, part_ids, read_table, write_part

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

    def failed_keys(self, reason_part: str) -> set[str]:
        """Keys of failed scans whose reason holds ``reason_part`` (e.g. a PACS transfer failure)."""
        t = read_table(self.out_dir, "scans", columns=["scan_key", "status", "reason"])
        rows = zip(t.column("scan_key").to_pylist(), t.column("status").to_pylist(), t.column("reason").to_pylist())
        return {k for k, status, reason in rows if status == "failed" and reason_part in (reason or "")}

    def check_config(self, config) -> None:
        """Refuse an OUT whose written or staged (crashed-run) results used other settings than
        ``config`` (a JobConfig, or its config hash); the message names each setting that differs,
        old and new, when ``run.json`` records the settings of those results."""
        this = config if isinstance(config, str) else config.config_hash    # a bare hash: no diff
        staged = {json.loads(storage.read_bytes(f))["scans"]["config_hash"] for f in self._staged_files()}
        other = {h for h in set(self.done_keys().values()) | staged if h != this}
        if not other:
            return
        diff = [] if isinstance(config, str) else self._settings_diff(other, config)
        what = "; ".join(diff) if diff else f"config hash {', '.join(sorted(other))}, this job {this}"
        raise ConfigMismatch(f"{storage.as_url(self.out_dir)} holds results made with other settings ({what}); "
                             "rerun with the same settings, --overwrite, or write to a new OUT")

    def _settings_diff(self, other: set, config) -> list[str]:
        from .config import config_from_run_json, settings_diff

        try:
            info = json.loads(storage.read_bytes(self.out_dir / "run.json"))
        except (OSError, ValueError):
            return []
        old = config_from_run_json(info)
        if old is None or {old.config_hash} != other:   # run.json must describe exactly those rows
            return []
        return settings_diff(old.result_settings(), config.result_settings())

    def failed_fingerprints(self) -> dict[str, str | None]:
        """scan_key -> ``input_fingerprint`` of every failed scan already written (None: not recorded)."""
        t = read_table(self.out_dir, "scans", columns=["scan_key", "status", "input_fingerprint"])
        return {k: f for k, s, f in zip(*(t.column(c).to_pylist() for c in ("scan_key", "status",
                                                                          "input_fingerprint"))) if s == "failed"}

    def forget(self, keys: set[str]) -> int:
        """Remove every row of ``keys`` from every table, so that those scans are redone (a failed
        scan whose input changed, ``--retry failed``). Parts are rewritten atomically, ``scans/``
        last: a crash half-way leaves the scans rows, so the next start forgets them again.
        Returns the number of scans rows removed."""
        if not keys:
            return 0
        wanted = pa.array(sorted(keys), pa.string())
        removed = 0
        for table in [t for t in TABLES if t != "scans"] + ["scans"]:
            schema = arrow_schema(table)
            for pid in sorted(part_ids(self.out_dir, table)):
                path = self.out_dir / table / f"part-{pid}.parquet"
                t = pq.read_table(path, schema=schema)
                hit = pc.is_in(t.column("scan_key"), value_set=wanted)
                n = pc.sum(hit).as_py() or 0
                if not n:
                    continue
                kept = t.filter(pc.invert(hit))
                atomic_write(path, lambda p, kept=kept: pq.write_table(kept, p, compression="zstd"))
                removed += n if table == "scans" else 0
        return removed

    def check_pseudonym(self, fingerprint: str | None) -> None:
        """Refuse mixing real keys and pseudonyms (or two secrets) in one OUT; mark a new
        pseudonymised OUT with the secret's fingerprint (``job.pseudonym``), never the secret."""
        marker = self.out_dir / PSEUDONYM_FILE
        have = json.loads(storage.read_bytes(marker))["fingerprint"] if storage.exists(marker) else None
        if have == fingerprint:
            return
        has_rows = bool(part_ids(self.out_dir, "scans")) or bool(self._staged_files())
        if have is None and not has_rows:
            atomic_write(marker, lambda p: p.write_text(json.dumps({"fingerprint": fingerprint})))
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
        final = self._staged(key)
        atomic_write(final, lambda p: p.write_text(json.dumps(result, default=_plain)))
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
        """Flush, then give every table at least an (empty) part with its schema, so that
        ``pd.read_parquet("OUT/errors")`` and DuckDB read every table of every run."""
        self.flush()
        missing = [t for t in TABLES if not part_ids(self.out_dir, t)]
        if missing:
            # the id of an existing scans part: an empty part under it is never taken for an orphan
            pid = min(part_ids(self.out_dir, "scans"), default=None) or uuid.uuid4().hex[:12]
            for table in sorted(missing, key=lambda t: t == "scans"):     # scans last, as in flush
                write_part(table, [], self.out_dir, pid)
        self.tidy()

    def tidy(self) -> None:
        """Remove ``_staging/`` when it holds nothing (a refused or failed start leaves no trace)."""
        if not self.remote and self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def counts(self) -> dict:
        t = read_table(self.out_dir, "scans", columns=["status"])
        vc = pc.value_counts(t.column("status")).to_pylist() if t.num_rows else []
        return {d["values"]: d["counts"] for d in vc}


#: Everything emphy writes directly in OUT (``extract``, ``fit``, ``predict``, ``report``, logs);
#: ``--overwrite`` removes these and nothing else.
RUN_LAYOUT = frozenset({"run.json", "manifest.parquet", PSEUDONYM_FILE, STAGING, *TABLES, "masks", "qc",
                        "featuremaps", "model", "report", "predictions", "logs", "longitudinal", "track"})


def foreign_entries(out_dir: str | Path) -> list[str]:
    """Names in OUT that emphy did not write (temporary ``.tmp-*`` files are its own)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_LAYOUT and not p.name.startswith(".tmp-"))


def clean_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """``--overwrite``: remove what a previous run wrote in OUT, and only that.

    An OUT holding anything else (a user's notes, another tool's files) is refused, naming a few
    of them; with ``force`` those are kept and only emphy's own entries are removed.
    """
    if storage.is_url(out_dir):
        fs, inner = storage.filesystem(out_dir)
        entries = {name for name, _ in storage.list_dir(out_dir)} if fs.exists(inner) else set()
        if entries and not entries & {"run.json", "manifest.parquet", "scans", STAGING}:
            raise ConfigMismatch(f"{storage.as_url(out_dir)}: --overwrite refuses to delete a prefix that is not "
                                 "an emphy run")
        if entries:
            storage.remove(out_dir, recursive=True)
        return
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigMismatch(f"{out}: OUT is a file, not a folder")
    foreign = foreign_entries(out)
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigMismatch(f"{out} holds files emphy did not write ({shown}); --overwrite removes only a "
                             "run's own files: move them, pick another OUT, or add --force to keep them "
                             "and remove the rest")
    for p in out.iterdir():
        if p.name in RUN_LAYOUT or p.name.startswith(".tmp-"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not any(out.iterdir()):
        out.rmdir()
