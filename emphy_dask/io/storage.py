"""Where files live: a local path or an object-store URL (``s3://``, ``gs://``; fsspec).

Every read of input and every write of a run's outputs that may hit object storage goes through
here, so the rest of the code keeps working on path strings. A URL stays a URL: ``s3://b/k``
(``pathlib`` collapses it to ``s3:/b/k``; both are accepted, ``as_url`` restores the first).

Credentials come the fsspec way (environment, AWS profile, instance role, gcloud) or from the job
file's ``[storage.<protocol>]`` table (``configure``; never written anywhere). An S3 URL without
any credential is read anonymously (public buckets such as NCI Imaging Data Commons'); gcsfs does
the same by itself. Object stores have no rename, but a PUT is all-or-nothing: ``write_bytes``
writes the object whole (local files: temporary name + rename), so readers never see half a file.
"""
from __future__ import annotations

import copy
import functools
import io
import os
import posixpath
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import StorageUnavailable

#: Object-store protocols handled as URLs (``memory`` is fsspec's in-process store, for tests).
PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
_URL = re.compile(r"^(?P<proto>[a-z][a-z0-9]*):/+(?P<rest>.*)$")
#: Header reads fetch this much of a remote file (one ranged GET; pydicom stops before the pixels).
HEAD_BYTES = 1 << 16
#: Remote files fetched concurrently per worker thread pool (latency hiding, bounded memory).
FETCH_THREADS = 8
#: An option whose name holds one of these is a credential (key, secret, aws_session_token, ...).
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")
_OPTIONS: dict[str, dict] = {}


def protocol(path) -> str | None:
    """The object-store protocol of ``path`` (``"s3"``, ``"gs"`` ...), None for a local path."""
    m = _URL.match(str(path))
    return m["proto"] if m and m["proto"] in PROTOCOLS else None


def is_url(path) -> bool:
    return protocol(path) is not None


def as_url(path) -> str:
    """``s3:/b/k`` (a URL that went through ``pathlib``) -> ``s3://b/k``; local paths unchanged."""
    m = _URL.match(str(path))
    if not m or m["proto"] not in PROTOCOLS:
        return str(path)
    return f"{m['proto']}://{m['rest']}"


def join(base, *parts) -> str | Path:
    """``base / parts`` for a URL (str) or a local path (Path)."""
    if is_url(base):
        return posixpath.join(as_url(base).rstrip("/"), *[str(p).strip("/") for p in parts])
    return Path(base, *parts)


def configure(options: dict | None) -> None:
    """Set this process's storage options per protocol (``{"s3": {"endpoint_url": ...}}``), e.g.
    from the job file's ``[storage]``; workers get them through ``job.storage_options``' plugin."""
    _OPTIONS.clear()
    _OPTIONS.update(copy.deepcopy(options or {}))
    _anonymous_s3.cache_clear()


def redacted(options: dict | None) -> dict:
    """Storage options safe to write (run.json, logs): secret values replaced by ``"***"``."""
    def walk(v, key=""):
        if isinstance(v, dict):
            return {k: walk(x, k) for k, x in v.items()}
        return "***" if any(w in key.lower() for w in _SECRET_WORDS) else v
    return walk(options or {})


@functools.lru_cache(maxsize=None)
def _anonymous_s3(profile: str | None) -> bool:
    """No AWS credential anywhere the fsspec/botocore way (env, profile, config, role)."""
    import botocore.session

    try:
        return botocore.session.Session(profile=profile).get_credentials() is None
    except Exception:  # noqa: BLE001 - an unknown profile etc.: let s3fs report it on first use
        return False


def filesystem(path):
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    import fsspec

    proto = protocol(path)
    if proto is None:
        return fsspec.filesystem("file"), os.path.abspath(str(path))
    opts = copy.deepcopy(_OPTIONS.get(proto, {}))
    if proto in ("s3", "s3a") and not any(k in opts for k in ("anon", "key", "secret", "token", "profile")):
        if _anonymous_s3(None):
            opts["anon"] = True          # public bucket: unsigned requests
    fs = fsspec.filesystem(proto, **opts)
    return fs, fs._strip_protocol(as_url(path))


def _url(inner: str, proto: str) -> str:
    return f"{proto}://{inner.lstrip('/')}"


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) means the store could not be reached (connection refused,
    reset, timed out): a transient fault, unlike a missing file or a refused credential."""
    seen = 0
    while exc is not None and seen < 8:
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or name in (
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def fault(path, exc: BaseException) -> BaseException:
    """What to raise for ``exc`` met reading ``path``: StorageUnavailable (transient, the scan is
    left for a rerun) when the store could not be reached, else ``exc`` itself."""
    if unreachable(exc):
        return StorageUnavailable(as_url(path), f"object store unreachable ({type(exc).__name__}: "
                                                f"{' '.join(str(exc).split())[:200]}); rerun to complete this scan")
    return exc


# -- reading --------------------------------------------------------------------------------
def read_bytes(path, end: int | None = None) -> bytes:
    """A whole file, or its first ``end`` bytes (one GET, ranged, for a remote one); a store that
    cannot be reached -> StorageUnavailable."""
    if not is_url(path):
        with open(path, "rb") as fh:
            return fh.read(end if end is not None else -1)
    fs, inner = filesystem(path)
    try:
        return fs.cat_file(inner, start=None if end is None else 0, end=end)
    except Exception as exc:  # noqa: BLE001
        raise fault(path, exc) from exc


def source(path):
    """What readers (pydicom) take: the local path itself, or a remote file's bytes in memory."""
    return str(path) if not is_url(path) else io.BytesIO(read_bytes(path))


def fetch_map(fn, items, remote: bool | None = None, window: int = FETCH_THREADS):
    """``fn(item)`` for each item, in order. Remote items (``remote``; default: the first item is
    a URL) run ``window`` at a time on threads (a GET waits on the network, not the CPU), so at
    most ``window`` results wait unconsumed; local ones run one by one."""
    paths = list(items)
    if remote is None:
        remote = bool(paths) and is_url(paths[0])
    if not remote:
        yield from map(fn, paths)
        return
    with ThreadPoolExecutor(window) as pool:
        pending: deque = deque()
        it = iter(paths)
        for p in it:
            pending.append(pool.submit(fn, p))
            if len(pending) >= window:
                break
        for p in it:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, p))
        while pending:
            yield pending.popleft().result()


def list_files(root) -> list[str]:
    """Every file below a URL (recursive; hidden names skipped), as sorted URLs; [root] for a file."""
    proto = protocol(root)
    fs, inner = filesystem(root)
    try:
        if fs.isfile(inner):
            return [as_url(root)]
        found = fs.find(inner)
    except Exception as exc:  # noqa: BLE001
        raise fault(root, exc) from exc
    base = inner.rstrip("/")
    out = []
    for f in found:
        rel = f[len(base):].lstrip("/")
        if rel and not any(part.startswith(".") for part in rel.split("/")):
            out.append(_url(f, proto))
    return sorted(out)


def list_dir(root) -> list[tuple[str, bool]]:
    """(name, is_dir) of the folders and files directly under a folder or a URL, hidden names
    skipped, sorted (symlinked folders are not followed: they count as neither)."""
    if not is_url(root):
        with os.scandir(root) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith("."))
        return [(name, is_dir) for name, is_dir in entries if is_dir or Path(root, name).is_file()]
    fs, inner = filesystem(root)
    entries = fs.ls(inner.rstrip("/"), detail=True)
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name and not name.startswith("."):
            out.append((name, e["type"] == "directory"))
    return sorted(out)


def check_input(path) -> None:
    """Refuse, before any work, an input URL that cannot be listed: no such bucket or prefix, a
    refused credential, an unreachable endpoint. Raises ScanError (one line, no secret)."""
    from ..errors import ScanError

    fs, inner = filesystem(path)
    try:
        fs.invalidate_cache()
        if fs.isfile(inner):
            return
        if not fs.ls(inner.rstrip("/")):
            raise FileNotFoundError(inner)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore/gcsfs raise many types
        raise ScanError(as_url(path), f"cannot read the input: {_why(exc)}", stage="index") from None


def check_output(path) -> None:
    """Refuse, before any work, an output URL that cannot be written (a probe object written and
    removed). Raises ScanError (one line, no secret)."""
    from ..errors import ScanError

    fs, inner = filesystem(path)
    probe = inner.rstrip("/") + "/.emphy-write-probe"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001
        raise ScanError(as_url(path), f"cannot write the output: {_why(exc)}", stage="index") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such bucket, prefix or file"
    if isinstance(exc, PermissionError):
        return f"access refused (check the credentials; {' '.join(str(exc).split())[:160]})"
    if unreachable(exc):
        return f"the object store cannot be reached ({type(exc).__name__})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# -- writing (outputs) ----------------------------------------------------------------------
def write_bytes(path, data: bytes) -> None:
    """Write a whole file atomically: temporary name + rename locally, one PUT remotely."""
    if not is_url(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)


def write_via_file(path, write) -> None:
    """``write(local_file)`` then move or upload it to ``path`` whole (for writers that want a file
    name: SimpleITK, PIL, numpy)."""
    if not is_url(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        write(tmp)
        os.replace(tmp, path)
        return
    import tempfile

    name = as_url(path).rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="emphy-up-") as d:
        local = Path(d) / name            # the suffix tells writers the format (.nii.gz, .png)
        write(local)
        fs, inner = filesystem(path)
        fs.put_file(str(local), inner)


def exists(path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, inner = filesystem(path)
    return fs.exists(inner)


def glob(pattern) -> list[str]:
    """Paths (URLs for a URL pattern) matching ``pattern``."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(str(pattern)))
    proto = protocol(pattern)
    fs, inner = filesystem(pattern)
    return sorted(_url(p, proto) for p in fs.glob(inner))


def remove(path, recursive: bool = False) -> None:
    """Delete a file (or a tree); a missing one is not an error."""
    if not is_url(path):
        p = Path(path)
        if recursive and p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    try:
        fs.rm(inner, recursive=recursive)
    except FileNotFoundError:
        pass


def parquet_file(path):
    """``pyarrow.parquet.ParquetFile`` of a local file or an object-store URL."""
    import pyarrow.parquet as pq

    filesystem, where = arrow_filesystem(path)
    return pq.ParquetFile(where, filesystem=filesystem)


def arrow_filesystem(path):
    """(pyarrow filesystem or None, path) for pyarrow.dataset / parquet on a URL or a local path."""
    if not is_url(path):
        return None, str(path)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, inner = filesystem(path)
    return PyFileSystem(FSSpecHandler(fs)), inner
