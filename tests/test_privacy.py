"""Privacy and safety: --pseudonymize end to end, weights that cannot run code, TLS, localhost binding."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from emphy_dask.job.pseudonym import ENV, pseudonym
from emphy_dask.tables import TABLES, read_frame, read_table

from .dicom_factory import write_series
from .jobutil import DaskCLICluster, extract_cmd, make_tls_files

SECRET = "test-secret-0123456789abcdef"
#: Folder names that identify patients (name, record number, study date), as archives have them.
JANE, JANE_STUDY = "DOE_JANE_MRN99887766", "2001-03-12-CT CHEST-DOE JANE"
ROE, ROE_STUDY = "ROE_RICHARD_MRN12345", "1999-01-01-ROE"
NEEDLES = ("DOE_JANE", "MRN99887766", "2001-03-12", "DOE JANE", "ROE_RICHARD", "MRN12345", "1999-01-01", "ROE")


@pytest.fixture(scope="module")
def phi_archive(tmp_path_factory):
    """Two good patients and a broken one (truncated slice) under identifying folder names."""
    from emphy_dask.synth import synth_cohort

    base = tmp_path_factory.mktemp("phi")
    synth_cohort(base / "synth", 2, seed=8, size="small")
    root = base / "archive"
    a, b = sorted((base / "synth" / "dicom").iterdir())
    shutil.copytree(a, root / JANE)
    (next((root / JANE).iterdir())).rename(root / JANE / JANE_STUDY)
    shutil.copytree(b, root / "PATIENT-B")
    files = write_series(root / ROE / ROE_STUDY / "CT 1.25", n=5)
    files[2].write_bytes(files[2].read_bytes()[:300])
    return root


def _env(secret=SECRET):
    env = dict(os.environ)
    env.pop(ENV, None)
    if secret:
        env[ENV] = secret
    return env


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def test_pseudonymize_every_table_file_name_and_log_line(phi_archive, tmp_path, random_resnet152_weights):
    job = tmp_path / "job.toml"            # a backbone writes feature maps (their meta is searched too)
    job.write_text('[cluster]\nworkers = 2\nmemory_limit = "3GiB"\ndashboard_address = "127.0.0.1:0"\n'
                   f'[embed]\nbackbone = "resnet152"\nweights = "{random_resnet152_weights}"\n')
    out = tmp_path / "out"
    cmd = extract_cmd(phi_archive, out, "--job", str(job), "--pseudonymize")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = proc.stdout + proc.stderr

    expected = {pseudonym(k, SECRET.encode()): k for k in (JANE, "PATIENT-B", ROE)}
    scans = read_frame(out, "scans").set_index("scan_key")
    assert set(scans.index) == set(expected)
    jane, roe = pseudonym(JANE, SECRET.encode()), pseudonym(ROE, SECRET.encode())
    assert scans.loc[jane, "status"] == "ok" and scans.loc[roe, "status"] == "failed"
    assert scans.loc[roe, "reason"].startswith(f"{roe}/s002.dcm: unreadable DICOM file s002.dcm"), scans.loc[roe, "reason"]
    assert len(read_frame(out, "embeddings")) == 6 and scans.loc[jane, "featuremap_path"].endswith(f"{jane}.npz")

    # nothing identifying: file names, every string of every table (and the manifest), every other file, the log
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".parquet", ".png", ".gz", ".npz", ".json"}
    texts = [logs] + [p.relative_to(out).as_posix() for p in files]
    for table in TABLES:
        texts += [v for col in read_table(out, table).to_pylist() for v in _strings(col)]
    manifest = pq.read_table(out / "manifest.parquet")
    texts += [v for row in manifest.to_pylist() for v in _strings(row)]
    assert manifest.column("paths").null_count == len(manifest)      # no paths under INPUT at all
    for p in files:
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                texts.append(str(f["meta"]))
        texts.append(data.decode("latin-1"))
    for needle in NEEDLES:
        hits = [t[:120] for t in texts if needle in t]
        assert not hits, f"{needle!r} found: {hits[:3]}"
    # whose scan it is: the run's pseudonym of the PatientID's hash, never the ID nor its public (unkeyed) hash
    import pydicom

    from emphy_dask.io.dicom_index import patient_ref

    pid = pydicom.dcmread(next((phi_archive / JANE).rglob("*.dcm")), stop_before_pixels=True).PatientID
    assert scans.loc[jane, "patient_key"].startswith("anon-")
    assert not [t for t in texts if patient_ref(pid) in t or (len(pid) > 4 and pid in t)]

    # stable: a rerun with the same secret resumes (same keys); another secret or none is refused
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert again.returncode == 0 and "3 already done" in again.stdout, again.stdout + again.stderr
    other = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env("another-secret-0123456789"))
    assert other.returncode == 2 and "another secret" in other.stderr
    plain = subprocess.run(extract_cmd(phi_archive, out, "--job", str(job)), capture_output=True, text=True,
                           timeout=300, env=_env())
    assert plain.returncode == 2 and "pseudonymised results" in plain.stderr
    missing = subprocess.run(extract_cmd(phi_archive, tmp_path / "new", "--pseudonymize"), capture_output=True,
                             text=True, timeout=300, env=_env(None))
    assert missing.returncode == 2 and ENV in missing.stderr
    assert not (tmp_path / "new").exists()


def test_pseudonyms_are_keyed_hashes():
    a = pseudonym("LIDC-IDRI-0001", b"k" * 16)
    assert a == pseudonym("LIDC-IDRI-0001", b"k" * 16) and a.startswith("anon-") and len(a) == 25
    assert a != pseudonym("LIDC-IDRI-0001", b"j" * 16) and a != pseudonym("LIDC-IDRI-0002", b"k" * 16)
    import hashlib
    import hmac

    assert a[5:] == hmac.new(b"k" * 16, b"LIDC-IDRI-0001", hashlib.sha256).hexdigest()[:20]


# --- weights: loading never runs code ------------------------------------------------------------


class _Payload:
    """Unpickling this runs a command (what a tampered weight file can do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weight_files_cannot_run_code_when_loaded(tmp_path, monkeypatch):
    import torch
    from lungmask.mask import get_model

    from emphy_dask.embed.backbones import load_state
    from emphy_dask.embed.weights import WeightsFile
    from emphy_dask.segment.lungmask import load_unet

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"last.bias": _Payload(marker)}, evil)
    # the escape hatch an environment may set: torch then unpickles anything where the caller did not say
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_unet(str(evil))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_state("resnet152", WeightsFile(str(evil), "x", "explicit"))
    assert not marker.exists()
    # lungmask's own loader (what LMInferer calls) would have run it: why the job does not use it
    with pytest.raises(Exception):
        get_model("R231", str(evil))
    assert marker.exists()


# --- TLS and where the dashboard listens ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("tls-cohort")
    synth_cohort(root, 2, seed=12, size="small")
    return root / "dicom"


def test_job_on_tls_secured_clusters(two_patients, tmp_path):
    """A LocalCluster started with --tls-*, then an external TLS-only cluster joined with them."""
    from distributed import Client

    ca, cert, key = make_tls_files(tmp_path / "tls")
    job = tmp_path / "job.toml"
    job.write_text('[cluster]\nworkers = 1\nmemory_limit = "3GiB"\ndashboard_address = "127.0.0.1:0"\n'
                   '[embed]\nbackbone = "none"\n')
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    local = subprocess.run(extract_cmd(two_patients, tmp_path / "local", "--job", str(job), *tls),
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "scheduler tls://127.0.0.1:" in local.stdout
    assert (read_frame(tmp_path / "local", "scans")["status"] == "ok").all()

    cluster = DaskCLICluster(n_workers=1, tls=(ca, cert, key))
    try:
        assert cluster.address.startswith("tls://")
        from distributed.security import Security

        rogue = [str(f) for f in make_tls_files(tmp_path / "rogue")]    # a certificate of another CA
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.address, timeout="5s", security=Security(
                tls_ca_file=rogue[0], tls_client_cert=rogue[1], tls_client_key=rogue[2], require_encryption=True))
        joined = subprocess.run(extract_cmd(two_patients, tmp_path / "joined", "--job", str(job), "--scheduler",
                                            cluster.address, *tls), capture_output=True, text=True, timeout=600)
    finally:
        cluster.close()
    assert joined.returncode == 0, joined.stdout + joined.stderr
    pd_local = read_frame(tmp_path / "local", "phenotypes", stable=True)
    pd_joined = read_frame(tmp_path / "joined", "phenotypes", stable=True)
    assert pd_local.equals(pd_joined)


def test_local_cluster_listens_on_localhost_only_and_without_malloc_trim():
    """Every socket of a default LocalCluster (scheduler, dashboard, workers, nannies) is bound to
    127.0.0.1; its workers start without MALLOC_TRIM_THRESHOLD_ (glibc keeps its dynamic mmap
    threshold) and with one malloc arena, and the driver's Dask config is left as it was."""
    import dask
    import psutil

    from emphy_dask.job.cluster import connect
    from emphy_dask.job.config import ClusterSettings

    conn = connect(ClusterSettings(workers=1, memory_limit="2GiB", dashboard_address="127.0.0.1:0"))
    try:
        assert conn.dashboard_link.startswith("http://127.0.0.1:")
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = [c.laddr for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 3                           # scheduler, dashboard, worker (+ nanny)
        assert {a.ip for a in listening} == {"127.0.0.1"}, listening
        env = conn.client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset"),
                                       os.environ.get("MALLOC_ARENA_MAX")))
        assert list(env.values()) == [("unset", "1")]
    finally:
        conn.close()
    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536
