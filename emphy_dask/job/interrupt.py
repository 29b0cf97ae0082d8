"""Ctrl-C (SIGINT) and SIGTERM during ``emphy extract``: stop cleanly, keep what finished.

The CLI turns SIGTERM into the same ``KeyboardInterrupt`` as SIGINT (:func:`install_sigterm`);
the runner then writes the finished scans, closes the cluster with distributed's shutdown
chatter silenced, removes the pictures and masks of the scans still in flight (no file without
a row; a rerun redoes those scans), writes ``run.json`` with state ``interrupted`` and raises
:class:`Interrupted`, which the CLI prints as one line and exits 128 + the signal number.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from ..scan_state import artifact_stem

#: Folders of OUT holding per-scan files named by ``pipeline.artifact_stem``.
ARTIFACT_DIRS = ("masks", "qc", "featuremaps")
#: What follows the stem in their names (``pipeline._artifacts``, ``pipeline._model_input``, ``device_stages``).
ARTIFACT_SUFFIXES = (".nii.gz", "_montage.png", "_laa_curve.png", "_input_*.png", ".npz")


class Interrupted(Exception):
    """The job was stopped by a signal; finished scans are written, a rerun resumes."""

    def __init__(self, n_written: int, n_dropped: int, signum: int = signal.SIGINT):
        self.n_written, self.n_dropped, self.signum = n_written, n_dropped, int(signum)
        super().__init__(f"interrupted: {n_written} scans written, {n_dropped} in flight dropped; "
                         "rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's 128 + signal number)."""
        return 128 + self.signum


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def install_sigterm() -> None:
    """SIGTERM raises ``KeyboardInterrupt(SIGTERM)`` in the main thread, like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def signal_of(exc: BaseException) -> int:
    """The signal behind a ``KeyboardInterrupt`` (SIGINT unless :func:`install_sigterm` raised it)."""
    args = getattr(exc, "args", ())
    return int(args[0]) if args and isinstance(args[0], int) else int(signal.SIGINT)


class IgnoreSigint(WorkerPlugin):
    """Worker plugin: the LocalCluster's workers ignore SIGINT. A Ctrl-C in the terminal reaches
    the whole process group, and a worker that took it would stop under its task and print
    distributed's warnings; the driver alone handles it and tears the workers down. ``setup``
    runs on every worker, those the nanny restarts later too, in the worker process's main
    thread (where Python lets a handler be set)."""

    name = "emphy-ignore-sigint"
    idempotent = True

    def setup(self, worker) -> None:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:          # not the main thread: leave it
            pass


def local_workers_ignore_sigint(conn) -> None:
    """Register :class:`IgnoreSigint` when the job started its own LocalCluster (the workers of
    a cluster joined with ``--scheduler`` live in other terminals: theirs to stop)."""
    if conn.cluster is None:
        return
    conn.client.register_plugin(IgnoreSigint())


@contextlib.contextmanager
def shielded():
    """No second Ctrl-C while cleaning up (it would leave a half-closed cluster and a traceback),
    and no distributed warnings about the workers being torn down under their tasks."""
    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    _silence_logging()
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:          # not the main thread: nothing to shield
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _silence_logging() -> None:
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def quiet_workers(client) -> None:
    """Silence the workers' loggers before the cluster is torn down under their tasks (they
    would print a warning per cancelled task on the same terminal)."""
    try:
        client.run(_silence_logging, on_error="ignore", wait=True)
    except Exception:  # noqa: BLE001 - a worker already gone: nothing to silence there
        pass


def drop_artifacts(out_dir: Path, scan_keys) -> int:
    """Remove the masks, QC pictures and feature maps (and their temporary files) of scans that
    have no row: those in flight when the job stopped. Returns the number of files removed."""
    n = 0
    for key in scan_keys:
        stem = Path(artifact_stem(key))
        for folder in ARTIFACT_DIRS:
            parent = out_dir / folder / stem.parent
            if not parent.is_dir():
                continue
            for suffix in ARTIFACT_SUFFIXES:
                for f in [*parent.glob(stem.name + suffix), *parent.glob(f".tmp-*-{stem.name}{suffix}")]:
                    f.unlink(missing_ok=True)
                    n += 1
    return n
