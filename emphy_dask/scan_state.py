"""What one scan carries between its tasks, and how its rows are written.

A leaf under both halves of a scan: ``pipeline`` (the CPU stages) and ``device_stages`` (the
U-Net and the backbone) import the scan's state from here and never each other; ``local``
chains them in one process, ``job/flow`` across a cluster. It depends only on ``errors`` (and
``volume`` for type hints), so the manifest, the runner and the report can use it without loading a stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ScanError

if TYPE_CHECKING:       # type only: importing volume would load SimpleITK into the manifest and report
    from .volume import CTVolume

STAGES = ("ingest", "qc", "segment", "phenotypes", "artifacts", "resample", "inputs", "embed")


@dataclass(frozen=True)
class ScanTask:
    """What a worker needs to process one scan (small: it is shipped to the worker).

    Attributes
    ----------
    scan_key : str
        Output key (top-level folder of the scan in the input tree, or the manifest's key).
    kind : str
        ``dicom`` (``paths`` = the picked series' files), ``dicomweb`` (their WADO-RS instance URLs), ``image`` (``paths`` = one
        NIfTI/NRRD/MHD file) or ``error`` (indexing failed: ``error`` says why).
    paths : tuple of str
    selection : dict
        Series-selection facts for the scans table (n_candidate_series, not_picked, ...).
    error, error_path : str or None
        Why no series could be picked, and the file/folder at fault (``kind == "error"``).
    """

    scan_key: str
    kind: str
    paths: tuple = ()
    selection: dict = field(default_factory=dict)
    error: str | None = None
    error_path: str | None = None


@dataclass
class ScanState:
    """One scan between its tasks: the rows so far and what the next task needs.

    Attributes
    ----------
    result : dict
        ``{"scans": row, "phenotypes": [...], "slices": [...], "embeddings": [...], "errors": [...]}``.
    volume : CTVolume or None
        The native volume, kept only while lungmask runs (it stays on the CPU worker).
    lungmask_input : segment.lungmask.LungmaskInput or None
        What the lungmask device task needs.
    model_input : embed.inputs.ModelInput or None
        What the backbone device task needs (float16, ~16 MB for the 3D backbone).
    """

    result: dict
    volume: CTVolume | None = None
    lungmask_input: object | None = None
    model_input: object | None = None

    @property
    def row(self) -> dict:
        return self.result["scans"]

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"


def artifact_stem(scan_key: str) -> str:
    """Relative path (no suffix) of a scan's masks/QC/feature-map files: ``<shard>/<key>``.

    The shard (two hex digits of the key's SHA-256, 256 folders) keeps every folder small
    however large the archive: 100,000 scans put ~390 masks and ~2,300 QC pictures in each. The
    key's folders are kept as folders; characters outside ``[A-Za-z0-9._-]`` become ``_`` and,
    when that changed anything, a short hash of the key is appended so two keys never share files.
    """
    digest = hashlib.sha256(scan_key.encode()).hexdigest()
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in scan_key.split("/")]
    stem = "/".join(parts)
    if stem != scan_key:
        stem += "-" + digest[:8]
    return f"{digest[:2]}/{stem}"


class StageClock:
    """Runs stages of one scan: times them into its row, turns an exception into a failed row.

    ``after_stage``: called (no arguments) after each stage that returned, within its time; the
    pipeline gives ``heap.trim_heap`` so that a stage's freed temporaries leave the process
    before the next stage allocates its own.
    """

    def __init__(self, state: ScanState, config, after_stage=None):
        self.state, self.config = state, config
        self.stage = "ingest"
        self.after_stage = after_stage

    def __call__(self, name, fn, *args, **kwargs):
        self.stage = name
        t0 = time.perf_counter()
        with scan_warnings(self.state.row, name):
            value = fn(*args, **kwargs)
        if self.after_stage is not None:
            self.after_stage()
        key = f"t_{name}_s"
        self.state.row[key] = round((self.state.row.get(key) or 0.0) + time.perf_counter() - t0, 4)
        return value

    def fail(self, exc: BaseException) -> ScanState:
        """The scan's rows become a failed row (no partial tables) with a one-line reason."""
        fail_scan(self.state, self.config, self.stage, exc)
        return self.state


#: Loggers whose warnings about a scan go into its row (beside Python warnings raised by its stages).
SCAN_LOGGERS = ("pydicom", "lungmask", "emphy_dask")
MAX_WARNINGS_CHARS = 2000
_log = logging.getLogger("emphy_dask.scan")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def scan_warnings(row: dict, stage: str):
    """Warnings raised while one stage of a scan runs go into ``row["warnings"]`` (and the log file).

    Python warnings (``warnings.warn``, e.g. pydicom's "Invalid value for VR IS") and WARNING
    records of ``SCAN_LOGGERS`` are caught, never printed; each distinct one is appended as
    ``<stage>: <message>``, ``"; "``-separated, at most ``MAX_WARNINGS_CHARS``; each is
    also logged once (``emphy_dask.scan``), so it lands in the worker's log with the scan's key.
    Not thread-safe (``warnings.catch_warnings``): workers run one thread, as the job's do.
    """
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in SCAN_LOGGERS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lg in loggers:
            lg.addHandler(collect)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(collect)
            # pydicom both warns and logs the same text: kept once
            found = [str(w.message) for w in caught] + collect.messages
            if found:
                _add_warnings(row, stage, found)


def _add_warnings(row: dict, stage: str, found: list[str]) -> None:
    have = row.get("warnings") or ""
    parts = have.split("; ") if have else []
    for msg in dict.fromkeys(" ".join(str(m).split()) for m in found):
        entry = f"{stage}: {msg}"
        if entry not in parts:
            parts.append(entry)
            _log.warning("scan %s: %s", row.get("scan_key"), entry)
    text = "; ".join(parts)
    row["warnings"] = text if len(text) <= MAX_WARNINGS_CHARS else text[:MAX_WARNINGS_CHARS - 3] + "..."


def fail_scan(state: ScanState, config, stage: str, exc: BaseException) -> None:
    """Turn ``state`` into a failed scan: status, one-line reason, an ``errors`` row; no partial tables.

    Parameters
    ----------
    state : ScanState
        Changed in place: its per-scan tables are emptied and its arrays dropped.
    config : JobConfig
        Gives the ``config_hash`` of the error row.
    stage : str
        The stage that was running; a ``ScanError`` naming a later stage wins.
    exc : BaseException
        A ``ScanError`` gives the file at fault and its reason; anything else its type and text.
    """
    key = state.row["scan_key"]
    path = None
    if isinstance(exc, ScanError):
        stage = exc.stage if exc.stage != "ingest" else stage
        path = key if exc.path == "<array>" else exc.path   # array-level stages name no file
        message = f"{path}: {exc.reason}"
    else:
        message = f"{key}: {type(exc).__name__}: {exc}"
    message = " ".join(message.split())[:1000]
    state.row.update(status="failed", reason=message, error_stage=stage)
    for table in ("phenotypes", "slices", "embeddings"):
        state.result[table] = []
    state.result["errors"].append({"scan_key": key, "config_hash": config.config_hash, "stage": stage,
                                   "error_type": type(exc).__name__, "message": message, "path": path})
    state.volume = state.lungmask_input = state.model_input = None


def selection_columns(n_candidates: int, not_picked, multi_kernel_kernels, patient_key: str | None = None, *,
                      study_date_shifted: str | None = None) -> dict:
    """Scans-table columns describing how the series was picked, whose scan it is and when.

    ``patient_key``: the series' ``patient_ref`` (a salted one-way hash of PatientID, never the ID;
    ``--pseudonymize`` replaces it by the run's HMAC pseudonym of it), so models can group folds
    by patient and scans of one person can be followed over time. ``study_date_shifted``: the
    study date moved by the patient's own offset (``io.dicom_index.shifted_date``).
    """
    return {"n_candidate_series": int(n_candidates), "patient_key": patient_key,
            "study_date_shifted": study_date_shifted,
            "not_picked": json.dumps([{"series_uid": uid, "reason": why} for uid, why in not_picked]),
            "multi_kernel": bool(multi_kernel_kernels),
            "kernels_in_study": ",".join(multi_kernel_kernels) if multi_kernel_kernels else None}
