"""A real PACS for the tests: Orthanc with its DICOMweb plugin, started on a free localhost port.

``OrthancServer`` writes a configuration into a temporary folder (storage there, HTTP on a free
port of 127.0.0.1, the DICOM port off, no authentication), starts ``/usr/sbin/Orthanc CONFIG``,
waits until ``/system`` answers and stops it on ``stop()``. ``upload`` loads real series over
the REST API (``POST /instances``), as a hospital's modality or router would send them.
The pytest fixture ``orthanc`` holds one server for a test module (Debian packages ``orthanc``
and ``orthanc-dicomweb``; ``.ci/system-packages.txt``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ORTHANC_BIN = os.environ.get("EMPHY_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process with its storage in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        return {
            "Name": "emphy-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,      # 127.0.0.1 only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,       # no DICOM port: the tests speak DICOMweb and REST
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "StableAge": 1,
            "HttpTimeout": 60,
            "ConcurrentJobs": 2,
        }

    def start(self, timeout_s: float = 60.0) -> "OrthancServer":
        for tool, what in ((ORTHANC_BIN, "Debian package orthanc"), (DICOMWEB_PLUGIN, "Debian package orthanc-dicomweb")):
            assert Path(tool).exists(), f"{tool} missing: install the {what} (see .ci/system-packages.txt)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url}/system within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def upload(self, folder: Path) -> int:
        """Send every DICOM file under ``folder`` (``POST /instances``); returns how many were stored."""
        n = 0
        with requests.Session() as s:
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", "")):
                r = s.post(f"{self.url}/instances", data=path.read_bytes(),
                           headers={"Content-Type": "application/dicom"}, timeout=60)
                if r.ok:
                    n += 1
        return n

    def series_count(self) -> int:
        return len(requests.get(f"{self.url}/series", timeout=10).json())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running, empty Orthanc (module scope): ``server.dicomweb`` is its DICOMweb root."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir / "storage", ignore_errors=True)
