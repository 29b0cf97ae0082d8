"""deploy/kubernetes/object-storage: a Kubernetes run reading from and writing to object storage,
with no shared volume. The manifests validate (as tests/test_deploy.py does for the base ones),
and the way they hand the store to the pods (AWS_ENDPOINT_URL, credentials in the environment,
anonymous without them) works against the local S3 server."""
from __future__ import annotations

import yaml

from emphy_dask.io import storage

from .servers.s3 import KEY, SECRET, s3_server, s3_slabs  # noqa: F401 - fixtures
from .test_deploy import K8S, _flag, _validate_crd, deploy_settings

OBJ = K8S / "object-storage"


def _docs():
    for f in sorted(OBJ.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            yield from ((f.name, d) for d in yaml.safe_load_all(f.read_text()) if d)


def _pod_specs(doc):
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    return [doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]]


def test_object_storage_manifests_validate_and_use_no_shared_volume():
    import kubernetes_validate

    kustom = yaml.safe_load((OBJ / "kustomization.yaml").read_text())
    assert sorted(kustom["resources"]) == sorted(f.name for f in OBJ.glob("*.yaml") if f.name != "kustomization.yaml")
    version = kubernetes_validate.utils.latest_version()
    docs = {d["kind"]: d for _, d in _docs()}
    assert sorted(docs) == ["DaskCluster", "Job"]
    assert _validate_crd(docs["DaskCluster"]) == []
    kubernetes_validate.validate(docs["Job"], version, strict=True)
    for doc in docs.values():
        for spec in _pod_specs(doc):
            # only the Dask config: no PersistentVolumeClaim, hostPath or NFS anywhere
            assert [v["name"] for v in spec["volumes"]] == ["dask-config"], doc["kind"]
            assert "persistentVolumeClaim" not in str(spec) and "hostPath" not in str(spec)
    cluster, job = docs["DaskCluster"], docs["Job"]
    (x,) = job["spec"]["template"]["spec"]["containers"]
    assert x["args"][:2] == ["emphy", "extract"] and storage.protocol(x["args"][2]) == "s3"
    assert storage.protocol(_flag(x["args"], "-o")) == "s3"
    assert _flag(x["args"], "--scheduler") == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    # the driver and every worker see the same store the same way
    (w,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert w["env"] == x["env"] and w["envFrom"] == x["envFrom"]
    assert all(e["secretRef"]["optional"] for e in w["envFrom"])       # no Secret: public buckets, anonymous
    want = deploy_settings()["cpu-worker"]
    assert _flag(w["args"], "--memory-limit") == want["memory-limit"]
    assert _flag(w["args"], "--resources") == want["resources"]


def test_the_pods_environment_reaches_the_store(s3_slabs, monkeypatch):
    """What the manifests give a pod (AWS_ENDPOINT_URL + the Secret's keys, no job-file options) is
    enough to list the archive; without any credential the store is read anonymously."""
    s3, src = s3_slabs
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")     # no instance role lookup here
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage.configure({})
    fs, inner = storage.filesystem(src)
    assert not getattr(fs, "anon", False)
    assert sorted(n for n, is_dir in storage.list_dir(src) if is_dir) == [
        "LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.configure({})                                          # forget the cached credential lookup
    fs, inner = storage.filesystem(src)
    assert fs.anon is True
    assert len(storage.list_files(f"{src}/LIDC-IDRI-0003")) == 11
