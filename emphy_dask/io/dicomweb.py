"""A PACS as INPUT: ``emphy extract 'dicomweb+http://host:port/dicom-web?ModalitiesInStudy=CT&...'``.

Three steps, each where the data is:

1. on the driver, ``list_patients``: QIDO-RS ``/studies`` with the URL's query parameters passed
   through as they are (``ModalitiesInStudy=CT``, ``StudyDate=2019-2020``, ...), paged; the
   studies are grouped by patient, as a folder tree groups them under the patient's folder. The
   scan key is ``pt-`` + a one-way hash of PatientID (``pacs_scan_key``), never the ID itself
   (with ``--pseudonymize`` it then becomes the run's keyed pseudonym like any key);
2. on a worker per patient, ``index_patient``: QIDO-RS ``/series?Modality=CT`` of each study and
   WADO-RS series *metadata* (headers, no pixels), turned into the records ``io.dicom_index``
   reads from files, so the very same series selection runs (``io.series.choose_by_scan``). A
   picked series is a list of instance URLs;
3. on the worker that processes the scan, ``read_dicomweb_series``: WADO-RS retrieves its own
   series (never through the driver) into a temporary folder of that worker, which is read by
   ``read_dicom_series`` and removed. A transfer that fails is retried (``TRANSFER_ATTEMPTS``,
   with a pause); then the scan fails with ``TRANSFER_FAILED`` and the reason, the others go on,
   and a rerun of the same command retries it (``job.runner`` does not count such scans done).

Credentials never go in the URL (it lands in logs and ``run.json``): requests reads
``~/.netrc`` for the host, or ``EMPHY_DICOMWEB_TOKEN`` is sent as a bearer token.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import ScanError

PREFIX = "dicomweb+"
TOKEN_ENV = "EMPHY_DICOMWEB_TOKEN"
TIMEOUT_S = float(os.environ.get("EMPHY_DICOMWEB_TIMEOUT_S", "60"))
#: how often one series' retrieval is tried before the scan fails (a PACS restarting, a proxy
#: dropping a long transfer); the pause doubles each time
TRANSFER_ATTEMPTS = int(os.environ.get("EMPHY_DICOMWEB_ATTEMPTS", "3"))
TRANSFER_PAUSE_S = float(os.environ.get("EMPHY_DICOMWEB_PAUSE_S", "1"))
#: how a failed transfer's reason starts: the runner retries such scans on a rerun
TRANSFER_FAILED = "DICOMweb transfer failed"
QIDO_PAGE = 500
_PIXEL_DATA = "7FE00010"
_INSTANCE = re.compile(r"^(?P<base>.+)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")


def is_dicomweb_url(value) -> bool:
    """True for ``dicomweb+http://...`` and ``dicomweb+https://...``."""
    return isinstance(value, str) and value.lower().startswith((PREFIX + "http://", PREFIX + "https://"))


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb root and the QIDO-RS filters of the studies to process.

    Attributes
    ----------
    base_url : str
        ``http(s)://host:port/prefix`` (the service root, without ``dicomweb+``).
    filters : tuple of (str, str)
        The URL's query parameters, passed to ``/studies`` as they are.
    """

    base_url: str
    filters: tuple = ()

    @property
    def url(self) -> str:
        """The INPUT as the user wrote it (no credentials: those are refused)."""
        query = "&".join(f"{k}={v}" for k, v in self.filters)
        return PREFIX + self.base_url + (f"?{query}" if query else "")


def parse_source(url: str) -> DicomwebSource:
    """``dicomweb+http(s)://host[:port]/path?filters`` -> DicomwebSource.

    Raises
    ------
    ScanError
        (stage ``index``, one line) not a DICOMweb URL, no host, a bad port, or credentials
        written in the URL.
    """
    if not is_dicomweb_url(url):
        raise ScanError(url, "not a DICOMweb URL: write dicomweb+http://host:port/dicom-web?filters", stage="index")
    parts = urlsplit(url[len(PREFIX):])
    if parts.username or parts.password:
        shown = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        raise ScanError(PREFIX + shown, "credentials in the URL would be written to logs and run.json: put them in "
                                        f"~/.netrc (machine {parts.hostname}) or ${TOKEN_ENV}", stage="index")
    try:
        port = parts.port
    except ValueError as exc:
        raise ScanError(url, f"bad port in the URL ({exc})", stage="index") from None
    if not parts.hostname:
        raise ScanError(url, "no host in the DICOMweb URL", stage="index")
    netloc = parts.hostname + (f":{port}" if port else "")
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return DicomwebSource(base, tuple(parse_qsl(parts.query, keep_blank_values=True)))


def dicomweb_client(base_url: str, timeout_s: float = TIMEOUT_S):
    """A ``dicomweb_client.DICOMwebClient`` for ``base_url``: ``~/.netrc`` credentials (requests'
    own lookup) or the bearer token in ``$EMPHY_DICOMWEB_TOKEN``."""
    from dicomweb_client.api import DICOMwebClient

    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = DICOMwebClient(base_url, headers=headers, timeout=timeout_s)
    # its own retries wait up to 30 s per request (exponential, 5 tries) even on a refused
    # connection: the transfer is retried here instead, per series and bounded (TRANSFER_ATTEMPTS)
    client.set_http_retry_params(retry=False)
    return client


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _http_reason(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the PACS refused the credentials (HTTP {status}; see ~/.netrc or ${TOKEN_ENV})"
    if status is not None:
        return f"the PACS answered HTTP {status} to the query"
    return f"the PACS cannot be reached ({_one_line(exc)})"


def pacs_scan_key(patient_id: str | None, study_uid: str) -> str:
    """The scan key of a patient's studies: ``pt-`` + 20 hex digits of a salted SHA-256 of
    PatientID (of the StudyInstanceUID when PatientID is empty): stable across runs, never the
    ID itself. ``--pseudonymize`` replaces it by the run's keyed pseudonym, like any key."""
    basis = f"patient/{patient_id}" if patient_id else f"study/{study_uid}"
    return "pt-" + hashlib.sha256(b"emphy-dask/dicomweb/" + basis.encode()).hexdigest()[:20]


def _value(dataset_json: dict, tag: str):
    values = (dataset_json.get(tag) or {}).get("Value") or [None]
    return values[0]


def check_source(source: DicomwebSource) -> None:
    """One QIDO-RS query (``limit=1``) before any work: the PACS answers, accepts the
    credentials and the filters; otherwise ScanError (stage ``index``) with the reason."""
    import requests

    try:
        dicomweb_client(source.base_url, timeout_s=min(TIMEOUT_S, 20)).search_for_studies(
            limit=1, search_filters=dict(source.filters))
    except (requests.RequestException, OSError) as exc:
        raise ScanError(source.url, _http_reason(exc), stage="index") from None


def list_patients(source: DicomwebSource) -> list[tuple[str, tuple[str, ...]]]:
    """QIDO-RS: [(scan key, study UIDs)] of the studies matching the source's filters, sorted
    by key. Runs on the driver and is the reachability check: nothing starts when it fails.

    Raises
    ------
    ScanError
        (stage ``index``) the PACS cannot be reached, refuses the credentials or the query.
    """
    import requests

    dw = dicomweb_client(source.base_url)
    studies: dict[str, list[str]] = defaultdict(list)
    offset = 0
    while True:
        try:
            page = dw.search_for_studies(offset=offset, limit=QIDO_PAGE, search_filters=dict(source.filters),
                                         fields=["PatientID"])
        except (requests.RequestException, OSError) as exc:
            raise ScanError(source.url, _http_reason(exc), stage="index") from None
        for study in page:
            uid = _value(study, "0020000D")
            if uid:
                studies[pacs_scan_key(_value(study, "00100020"), uid)].append(uid)
        if len(page) < QIDO_PAGE:
            break
        offset += len(page)
    return sorted((key, tuple(sorted(set(uids)))) for key, uids in studies.items())


def _records_of_series(dw, study_uid: str, series_uid: str, key: str) -> list[dict]:
    """``io.dicom_index`` records of one series from its WADO-RS metadata (no pixels)."""
    from pydicom import Dataset

    from .dicom_index import header_record

    records = []
    for item in dw.retrieve_series_metadata(study_uid, series_uid):
        sop = _value(item, "00080018")
        # the pixels are bulk data: the header fields are all the index needs
        header = {tag: v for tag, v in item.items() if tag != _PIXEL_DATA and "BulkDataURI" not in v}
        ds = Dataset.from_json(header)
        url = f"{dw.base_url}/studies/{study_uid}/series/{series_uid}/instances/{sop}"
        rec = header_record(ds, url, _PIXEL_DATA in item, _value(item, "00020010"))
        rec["scan_key"] = key
        records.append(rec)
    return records


def index_patient(unit: tuple[str, tuple[str, ...]], base_url: str) -> dict:
    """One patient's CT series picked from the PACS (runs on a worker).

    Parameters
    ----------
    unit : (scan key, study UIDs)
    base_url : str
        The DICOMweb root.

    Returns
    -------
    dict
        ``{scan_key: SeriesChoice | ScanError}`` as ``io.series.choose_by_scan`` on a folder;
        the picked series' ``files`` are instance URLs.
    """
    from .series import choose_by_scan

    key, study_uids = unit
    dw = dicomweb_client(base_url)
    records: list[dict] = []
    try:
        for study_uid in study_uids:
            for series in dw.search_for_series(study_uid, search_filters={"Modality": "CT"}):
                records += _records_of_series(dw, study_uid, _value(series, "0020000E"), key)
    except Exception as exc:  # noqa: BLE001 - any transfer error is this patient's, told in one line
        return {key: ScanError(f"{base_url}/studies/{','.join(study_uids)}",
                               f"{TRANSFER_FAILED} while indexing: {_http_reason(exc)}")}
    if not records:
        return {key: ScanError(f"{base_url}/studies/{','.join(study_uids)}", "no CT series in these studies")}
    return choose_by_scan(records, Path(key))


def _retrieve(dw, study_uid: str, series_uid: str, wanted: set[str], folder: Path) -> list[Path]:
    """WADO-RS one series in its stored transfer syntax, streamed to ``folder``; only ``wanted``
    SOP instances are kept (the files the selection picked)."""
    files = []
    for ds in dw.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
        sop = str(ds.SOPInstanceUID)
        if sop in wanted:
            path = folder / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    missing = wanted - {p.stem for p in files}
    if missing:
        raise OSError(f"{len(missing)} of {len(wanted)} instances missing from the answer")
    return files


def retrieve_instances(instance_urls, folder: Path, attempts: int = TRANSFER_ATTEMPTS,
                       pause_s: float = TRANSFER_PAUSE_S) -> tuple[str, list[Path]]:
    """WADO-RS one series' instances into ``folder``: (series URL, files ``<SOPInstanceUID>.dcm``).

    Parameters
    ----------
    instance_urls : sequence of str
        ``<root>/studies/<uid>/series/<uid>/instances/<uid>`` of one series (the manifest's paths).
    attempts, pause_s : int, float
        Tries of the transfer, and the first pause between them (doubling).

    Raises
    ------
    ScanError
        ``TRANSFER_FAILED`` with the last reason after ``attempts`` tries.
    """
    parsed = [_INSTANCE.match(u) for u in instance_urls]
    if not parsed or not all(parsed):
        raise ScanError(instance_urls[0] if instance_urls else "<none>", "not DICOMweb instance URLs")
    base, study, series = parsed[0]["base"], parsed[0]["study"], parsed[0]["series"]
    series_url = f"{base}/studies/{study}/series/{series}"
    wanted = {m["sop"] for m in parsed}
    dw = dicomweb_client(base)
    for attempt in range(1, attempts + 1):
        try:
            return series_url, _retrieve(dw, study, series, wanted, folder)
        except Exception as exc:  # noqa: BLE001 - network, HTTP, truncated multipart: all retried
            for f in folder.iterdir():
                f.unlink()
            if attempt == attempts:
                raise ScanError(series_url, f"{TRANSFER_FAILED} after {attempts} attempts: "
                                            f"{_http_reason(exc)}") from None
            time.sleep(pause_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def read_dicomweb_series(instance_urls):
    """Retrieve one series by WADO-RS into a temporary folder of this worker and read it.

    Returns
    -------
    CTVolume
        As ``read_dicom_series`` (int16 HU, (z, y, x), spacing in mm).

    Raises
    ------
    ScanError
        ``TRANSFER_FAILED`` (``retrieve_instances``); any reading error of ``read_dicom_series``,
        naming the instance URL instead of the temporary file.
    """
    from .dicom_read import read_dicom_series

    folder = Path(tempfile.mkdtemp(prefix="emphy-wado-"))
    try:
        series_url, files = retrieve_instances(instance_urls, folder)
        try:
            return read_dicom_series(files)
        except ScanError as exc:
            where = exc.path
            if where.startswith(str(folder)):
                where = f"{series_url}/instances/{Path(where).stem}"
            raise ScanError(where, exc.reason.replace(str(folder) + "/", ""), stage=exc.stage) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
