"""An S3-compatible object store on 127.0.0.1 for tests: moto's standalone server (as s3fs's own
tests use), started and stopped by a fixture, loaded with a copy of the shared LIDC slabs.

moto keeps its buckets in this process's memory, so the server can be stopped (the store "goes
away": connections refused) and started again on the same port with its objects intact.
"""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Credentials the test server accepts (moto checks none unless told to, see ``refuse_credentials``).
KEY, SECRET = "emphy-test-key", "emphy-test-secret-0f9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    port: int
    server: object = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self, **extra) -> dict:
        """fsspec/s3fs options for this server (what ``[storage.s3]`` in a job file holds)."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET, **extra}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)

    def new_bucket(self, prefix: str = "emphy") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return name

    def upload(self, local: Path, url: str) -> int:
        """Copy a local tree under ``url`` (``bucket/prefix``); returns the file count."""
        fs = self.fs()
        files = [p for p in Path(local).rglob("*") if p.is_file()]
        fs.put([str(p) for p in files], [f"{url}/{p.relative_to(local).as_posix()}" for p in files])
        return len(files)

    def stop(self) -> None:
        """The store goes away: connections to its port are refused."""
        self.server.stop()

    def start(self) -> None:
        """The store comes back, on the same port, with the same objects."""
        from moto.server import ThreadedMotoServer

        for _ in range(50):
            try:
                self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                self.server.start()
                break
            except OSError:              # the port not yet released by the old server
                time.sleep(0.1)
        _wait_up(self.port)


def _wait_up(port: int, timeout_s: float = 20) -> None:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto S3 server did not start on port {port}")


@pytest.fixture(scope="module")
def s3_server():
    """A running moto S3 server (module scope); stopped at teardown."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_up(port)
    s3 = S3Server(port, server)
    try:
        yield s3
    finally:
        s3.server.stop()


@pytest.fixture(scope="module")
def s3_slabs(s3_server):
    """The shared LIDC slabs (3 patients) copied to ``s3://<bucket>/lidc-idri-slabs``: (server, URL)."""
    from ..conftest import SHARED_DATA

    assert SHARED_DATA.is_dir(), f"real test data missing: {SHARED_DATA} (see ../shared/data/README.md)"
    bucket = s3_server.new_bucket("archive")
    n = s3_server.upload(SHARED_DATA / "lidc-idri-slabs", f"{bucket}/lidc-idri-slabs")
    assert n >= 39
    return s3_server, f"s3://{bucket}/lidc-idri-slabs"


@pytest.fixture
def refuse_credentials(monkeypatch):
    """From now on the server checks credentials (moto's IAM authentication): unknown keys refused."""
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
