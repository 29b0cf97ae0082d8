"""Helpers for the job tests: real dask CLI clusters, subprocess jobs, table comparison."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from emphy_dask.tables import TABLES, read_frame

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stable_tables(out: Path) -> dict[str, pd.DataFrame]:
    """Every table without its volatile columns, sorted by key: what must be identical run to run."""
    return {t: read_frame(out, t, stable=True) for t in TABLES}


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = stable_tables(a), stable_tables(b)
    for name in TABLES:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=False, rtol=1e-9, obj=name)


def popen(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class DaskCLICluster:
    """``dask scheduler`` + N ``dask worker --resources CPU=1`` processes on 127.0.0.1."""

    def __init__(self, n_workers: int = 2):
        self.port, self.dash = free_port(), free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                "--dashboard-address", f"127.0.0.1:{self.dash}"])
        self.workers = [self._worker(i) for i in range(n_workers)]
        self.wait_for_workers(n_workers)

    def _worker(self, i: int) -> subprocess.Popen:
        return popen([str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--nworkers", "1",
                      "--resources", "CPU=1", "--memory-limit", "3GiB", "--name", f"cpu-{i}",
                      "--host", "127.0.0.1", "--no-dashboard"])

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(self.address, timeout="60s") as c:
            c.wait_for_workers(n, timeout=timeout)

    def http(self, route: str) -> tuple[int, str]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.dash}{route}", timeout=10) as r:
            return r.status, r.read().decode()

    def close(self) -> None:
        for p in self.workers + [self.scheduler]:
            kill_group(p)


def extract_cmd(input_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emphy_dask.cli", "extract", str(input_path), "-o", str(out), "--no-progress",
            *extra]


def wait_for(predicate, timeout: float = 120, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
