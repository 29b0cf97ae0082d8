"""A run's log file: Dask's, pydicom's and lungmask's records and warnings go to ``OUT/logs/``.

The terminal of ``emphy extract`` shows the progress bar and the summary. What the libraries say
on the way (a worker's memory notes, a nanny restarting a worker, pydicom on an odd file) is
kept, with its time, in ``OUT/logs/driver.log`` (this process: scheduler, nannies, client) and
``OUT/logs/worker-<name>.log`` (each LocalCluster worker, via ``WorkerLogs``); warnings about one
scan also go into its row (``scan_state.StageClock`` -> ``scans.warnings``). Workers of an
external cluster keep their own logging (their disks are not OUT's).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

LOG_DIR = "logs"
#: Loggers whose records leave the terminal for the log file during a run.
LOGGERS = ("distributed", "tornado", "asyncio", "bokeh", "pydicom", "lungmask", "emphy_dask", "py.warnings")
FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s: %(message)s"


class _FolderFileHandler(logging.FileHandler):
    """A FileHandler that opens (and creates its folder) on the first record only: a run that logs
    nothing leaves no file, and ``--overwrite`` may empty OUT before the first record."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class RunLogs:
    """Context manager: while open, the ``LOGGERS`` of this process write to ``folder/name`` only.

    On exit the loggers get their handlers, levels and propagation back (a notebook or a test
    that runs two extracts sees its own logging again).

    Parameters
    ----------
    folder : path
        ``OUT/logs``.
    name : str
        The file's name in it.
    """

    def __init__(self, folder, name: str = "driver.log"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._saved: list = []

    def __enter__(self) -> RunLogs:
        handler = _FolderFileHandler(self.path)
        handler.setFormatter(logging.Formatter(FORMAT))
        self._handler = handler
        self._saved = redirect(handler)
        return self

    def __exit__(self, *exc) -> None:
        restore(self._saved)
        self._handler.close()


def redirect(handler: logging.Handler) -> list:
    """Send ``LOGGERS`` (and Python warnings) to ``handler`` alone; returns what ``restore`` needs."""
    saved = []
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers = [handler]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)      # the file keeps what the terminal used to drop too
    logging.captureWarnings(True)
    return saved


def restore(saved: list) -> None:
    for lg, handlers, propagate, level in saved:
        lg.handlers, lg.propagate = handlers, propagate
        lg.setLevel(level)
    logging.captureWarnings(False)


class WorkerLogs(WorkerPlugin):
    """Worker plugin: the worker process's ``LOGGERS`` go to ``folder/worker-<name>.log``."""

    name = "emphy-worker-logs"

    def __init__(self, folder: str):
        self.folder = str(folder)

    def setup(self, worker) -> None:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(worker.name))
        handler = _FolderFileHandler(Path(self.folder) / f"worker-{stem}.log")
        handler.setFormatter(logging.Formatter(FORMAT))
        self._saved = redirect(handler)

    def teardown(self, worker) -> None:
        restore(getattr(self, "_saved", []))
