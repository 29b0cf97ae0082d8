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


def assert_same_tables(a: Path, b: Path, exact: bool = False) -> None:
    """Every table of two runs equal (volatile columns aside); ``exact``: bit for bit."""
    ta, tb = stable_tables(a), stable_tables(b)
    for name in TABLES:
        if exact:
            pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)
        else:
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
    """``dask scheduler`` + N ``dask worker --resources CPU=1`` processes on 127.0.0.1 (each its own
    process group, so one can be killed alone); with ``tls`` = (ca, cert, key) files, TLS only."""

    def __init__(self, n_workers: int = 2, tls: tuple | None = None, memory_limit: str = "3GiB"):
        self.port, self.dash = free_port(), free_port()
        self.tls, self.memory_limit = tls, memory_limit
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{self.port}"
        self.scheduler = popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                "--dashboard-address", f"127.0.0.1:{self.dash}", *self._tls_args()]
                               + (["--protocol", "tls"] if tls else []))
        self.workers: dict[str, subprocess.Popen] = {}
        for i in range(n_workers):
            self.add_worker(f"cpu-{i}")
        self.wait_for_workers(n_workers)

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        ca, cert, key = self.tls
        return ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]

    def security(self):
        from distributed.security import Security

        if not self.tls:
            return None
        ca, cert, key = (str(x) for x in self.tls)
        return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)

    def add_worker(self, name: str) -> subprocess.Popen:
        self.workers[name] = popen([str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--nworkers", "1",
                                    "--resources", "CPU=1", "--memory-limit", self.memory_limit, "--name", name,
                                    "--host", "127.0.0.1", "--no-dashboard", *self._tls_args()])
        return self.workers[name]

    def client(self):
        from distributed import Client

        kw = {"security": self.security()} if self.tls else {}
        return Client(self.address, timeout="60s", **kw)

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker and its nanny: a machine lost, not a clean shutdown."""
        kill_group(self.workers.pop(name))

    def http(self, route: str) -> tuple[int, str]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.dash}{route}", timeout=10) as r:
            return r.status, r.read().decode()

    def close(self) -> None:
        for p in [*self.workers.values(), self.scheduler]:
            kill_group(p)


def holding(client, prefix: str) -> str | None:
    """Name of a worker that holds (runs, or has queued to run next) a task whose key starts with
    ``prefix`` (e.g. ``embed-``): the scheduler's view, one call, no call to the workers (a
    SIGKILLed worker does not answer). Losing such a worker makes the scheduler reschedule the
    task, whether it had started or not; a quick stage is caught this way where "executing now"
    is a window of a second."""
    try:
        by_worker = client.processing()
    except Exception:  # noqa: BLE001 - the scheduler busy with a lost worker
        return None
    names = {a: w.get("name") for a, w in client.scheduler_info().get("workers", {}).items()}
    for address, keys in by_worker.items():
        if any(str(k).startswith(prefix) for k in keys):
            return names.get(address)
    return None
    names = {a: w.get("name") for a, w in client.scheduler_info().get("workers", {}).items()}
    for address, keys in by_worker.items():
        if any(k.startswith(prefix) for k in keys):
            return names.get(address)
    return None


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1/localhost (PEM files): ca, cert, key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("emphy test CA")).issuer_name(name("emphy test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


def assert_readable(out: Path) -> dict:
    """What a reader sees in OUT at any moment: every table reads, every visible artifact opens
    (no partial file under its final name). Returns the count of files per kind."""
    import numpy as np
    import SimpleITK as sitk
    from PIL import Image

    for t in TABLES:
        read_frame(out, t)
    n = {"npz": 0, "nii.gz": 0, "png": 0}
    for p in out.rglob("*"):
        if not p.is_file() or any(part.startswith((".", "_")) for part in p.relative_to(out).parts):
            continue
        if p.name.endswith(".npz"):
            with np.load(p, allow_pickle=False) as f:
                f["layer4"]
            n["npz"] += 1
        elif p.name.endswith(".nii.gz"):
            sitk.ReadImage(str(p))
            n["nii.gz"] += 1
        elif p.suffix == ".png":
            Image.open(p).load()
            n["png"] += 1
    return n


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
