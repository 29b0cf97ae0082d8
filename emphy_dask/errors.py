"""Errors a person can act on: each names the file (or folder) and the reason."""
from __future__ import annotations

import re

#: ``io.storage.PROTOCOLS`` with one slash (pathlib's spelling of ``s3://``); kept here so that this
#: module imports nothing of the package.
_MANGLED_URL = re.compile(r"^(s3|s3a|gs|gcs|az|abfs|memory):/(?!/)")


class ScanError(Exception):
    """A scan could not be processed. ``str()`` is a one-line, human-readable reason.

    Parameters
    ----------
    path : str
        The file or folder at fault.
    reason : str
        What is wrong, in words a radiologist or engineer understands.
    stage : str
        Pipeline stage that raised it (``ingest``, ``qc``, ``segment``, ...).
    """

    def __init__(self, path, reason: str, stage: str = "ingest"):
        # an object-store path that went through pathlib (``s3:/b/k``) is named as its URL
        self.path = _MANGLED_URL.sub(r"\1://", str(path))
        self.reason = reason
        self.stage = stage
        super().__init__(f"{self.path}: {reason}")


class ConfigError(ValueError):
    """A job file (or command-line setting) that cannot be used; the message names the file and the key."""


class StorageUnavailable(ScanError):
    """The object store holding a scan's files could not be reached (connection refused, reset,
    timed out). Transient: the scan is reported with this reason but not written as done, so a
    rerun processes it (``job.runner``)."""
