"""``--pseudonymize``: scan keys become keyed hashes, and no path under INPUT reaches OUT.

A scan key (the patient folder's name, ``LIDC-IDRI-0001``) identifies a patient in the archive it
came from. With ``--pseudonymize`` every key is replaced, before any work, by
``anon-<20 hex>`` = HMAC-SHA256(secret, key): stable across runs and machines for the same secret
(so resume and joins across runs work), not reversible without the secret, and different for
another secret. The secret comes from the environment (``EMPHY_PSEUDONYM_KEY``, at least 16
characters), never from a file in the repository or OUT.

Workers receive the pseudonymised key, so every table row, file name (``masks/``, ``qc/``,
``featuremaps/``), QC picture title and Dask task name carries only it. Error messages may
still name files: every path of the scan (its files and their folders under INPUT, absolute or
relative) is rewritten on the driver before a row is written (``scrub_result``): a folder becomes
the pseudonym, a file ``<pseudonym>/<file name>`` (the name alone, e.g. ``1-001.dcm``, tells
which slice broke; a name holding the key's folder name is hashed too).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
from pathlib import Path

from ..io import storage

ENV = "EMPHY_PSEUDONYM_KEY"
MIN_SECRET_CHARS = 16
PREFIX = "anon-"


class PseudonymError(ValueError):
    """No usable secret, or OUT made with another secret (or without pseudonyms)."""


def pseudonym(scan_key: str, secret: bytes) -> str:
    """``anon-`` + the first 20 hex digits (80 bits) of HMAC-SHA256(secret, scan_key)."""
    return PREFIX + hmac.new(secret, scan_key.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def secret_from_env() -> bytes:
    value = os.environ.get(ENV, "")
    if len(value) < MIN_SECRET_CHARS:
        raise PseudonymError(f"--pseudonymize needs a secret of at least {MIN_SECRET_CHARS} characters in "
                             f"the environment variable {ENV} (e.g. export {ENV}=$(openssl rand -hex 32)); "
                             "keep it to map keys again later")
    return value.encode("utf-8")


def _forms(path: str, root: Path | None) -> list[str]:
    """The absolute and the root-relative spelling of ``path`` (and, for an object-store path,
    both its URL spellings: ``s3://b/k`` and ``s3:/b/k`` as ``pathlib`` writes it)."""
    p = Path(path)
    out = {str(p)}
    if storage.is_url(p):
        out.add(storage.as_url(p))
    if root is not None:
        try:
            out.add(p.relative_to(root).as_posix())
        except ValueError:
            pass
    return [f for f in out if f and f != "."]


@dataclasses.dataclass(frozen=True)
class Pseudonymizer:
    """Keys -> pseudonyms, and the rewriting of a scan's paths in every string of its rows."""

    secret: bytes
    root: Path | None = None

    @classmethod
    def from_env(cls, root=None) -> "Pseudonymizer":
        return cls(secret_from_env(), Path(root).resolve() if root is not None else None)

    def key(self, scan_key: str) -> str:
        return pseudonym(scan_key, self.secret)

    @property
    def fingerprint(self) -> str:
        """Identifies the secret (not the secret): stored in OUT so that a rerun with another one is refused."""
        return hmac.new(self.secret, b"emphy-pseudonym-fingerprint", hashlib.sha256).hexdigest()[:16]

    def replacements(self, task, alias: str) -> list[tuple[str, str]]:
        """(text, replacement) pairs for the paths of ``task`` (its files, their folders below
        INPUT, the error path), longest first so that a file's path goes before its folder's."""
        pairs: dict[str, str] = {}
        for path in (p for p in (*task.paths, task.error_path) if p):
            p = Path(path)
            if not p.is_absolute() and not storage.is_url(p) and self.root is not None:
                p = self.root / p                 # index records name files relative to INPUT
            folders = self._folders(p)
            is_file = path != task.error_path or p.is_file()
            if is_file:
                name = p.name
                if task.kind == "image" or any(len(f.name) >= 3 and f.name in name for f in folders):
                    name = "file-" + hashlib.sha256(name.encode()).hexdigest()[:8] + "".join(p.suffixes[-2:])
                for form in {*_forms(str(p), self.root), path}:
                    pairs.setdefault(form, f"{alias}/{name}")
            else:
                folders = [p, *folders]
            for folder in folders:
                for form in _forms(str(folder), self.root):
                    pairs.setdefault(form, alias)
        return sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def _folders(self, path: Path) -> list[Path]:
        """The folders of ``path`` below INPUT (patient, study, series); outside INPUT (a CSV
        manifest's absolute path) the three above the file, never one shallower than /a/b/c."""
        if self.root is not None and (path == self.root or self.root in path.parents):
            return [f for f in path.parents if self.root in f.parents]
        return [f for f in list(path.parents)[:3] if len(f.parts) >= 4]

    def task(self, task):
        """``task`` under its pseudonym; its error text scrubbed. ``paths`` stay real (workers read them)."""
        alias = self.key(task.scan_key)
        pairs = self.replacements(task, alias)
        selection = scrub(task.selection, pairs)
        if selection.get("patient_key"):           # the public salted hash of PatientID -> this run's secret HMAC
            selection = {**selection, "patient_key": self.key("patient:" + selection["patient_key"])}
        return dataclasses.replace(task, scan_key=alias, selection=selection,
                                   error=scrub(task.error, pairs), error_path=scrub(task.error_path, pairs))

    def scrub_result(self, result: dict, task) -> dict:
        """Every string in ``result`` (rows of every table) without the real paths of ``task``
        (a task from ``self.task``: pseudonymised key and error path, real paths)."""
        return scrub(result, self.replacements(dataclasses.replace(task, error_path=None), task.scan_key))


def scrub(value, pairs: list[tuple[str, str]]):
    """``value`` (str, or dicts/lists of them) with each ``text`` of ``pairs`` replaced where it
    stands as a whole path (not inside a longer name: folder ``1`` is not the 1 of ``512``)."""
    if not pairs:
        return value
    table = dict(pairs)
    pattern = re.compile(r"(?<![A-Za-z0-9_.\-])(" + "|".join(re.escape(old) for old, _ in pairs) + r")(?![A-Za-z0-9_\-])")
    return _scrub(value, pattern, table)


def _scrub(value, pattern, table):
    if isinstance(value, str):
        return pattern.sub(lambda m: table[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _scrub(v, pattern, table) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, pattern, table) for v in value)
    return value
