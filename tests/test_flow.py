"""Task routing of the job on a mixed cluster: CPU stages on CPU workers, device stages on the
device worker only, every scan finished once. The "device" here is a worker advertising GPU=1 that
runs the device functions with device="cpu" (no CUDA on this machine): routing and batching are
what is tested, not CUDA."""
from __future__ import annotations

import numpy as np
import pytest

from emphy_dask.embed.weights import resolve_weights
from emphy_dask.job.config import load_job
from emphy_dask.job.flow import FlowLimits, ScanFlow
from emphy_dask.job.manifest import build_manifest


@pytest.fixture(scope="module")
def mixed_cluster():
    from distributed import Client, LocalCluster, Nanny

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="3GiB",
                           host="127.0.0.1", dashboard_address="127.0.0.1:0", resources={"CPU": 1})
    cluster.worker_spec["fake-gpu"] = {"cls": Nanny, "options": {
        "nthreads": 1, "memory_limit": "3GiB", "host": "127.0.0.1", "resources": {"GPU": 1}}}
    cluster.scale(2)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=120)
    yield client
    client.close()
    cluster.close()


def test_cpu_stages_never_run_on_the_device_worker_and_batches_are_bounded(tmp_path, mixed_cluster,
                                                                          random_resnet152_weights):
    from emphy_dask.synth import synth_cohort

    synth_cohort(tmp_path / "c", 4, seed=5, size="small")
    job = tmp_path / "j.toml"          # routing is tested, not the network: the cheap 2.5D backbone
    job.write_text(f'[output]\npart_size = 2\n[embed]\nbackbone = "resnet152"\nweights = "{random_resnet152_weights}"\n')
    cfg = resolve_weights(load_job(job))
    _, tasks = build_manifest(tmp_path / "c" / "dicom", None)
    info = mixed_cluster.scheduler_info()["workers"]
    device_worker = next(a for a, w in info.items() if "GPU" in (w.get("resources") or {}))
    flow = ScanFlow(mixed_cluster, cfg, str(tmp_path / "out"), {"CPU": 1}, {"GPU": 1}, "cpu",
                    FlowLimits(cpu_limit=2, device_backlog=3, batch_size=2, device_slots=1))
    results = dict((t.scan_key, r) for t, r in flow.run(iter(tasks)))
    assert sorted(results) == sorted(t.scan_key for t in tasks)
    for key, res in results.items():
        row = res["scans"]
        assert row["status"] == "ok", row["reason"]
        assert row["worker"] != device_worker            # decoding, segmentation, phenotypes: CPU worker
        assert row["worker_embed"] == device_worker      # the backbone: the device worker only
        assert 1 <= row["embed_batch_size"] <= 2
        emb = np.stack([e["embedding"] for e in res["embeddings"]])
        assert emb.shape == (3, 2048) and np.isfinite(emb).all()
    # the model lives on the device worker only, loaded once per process
    cached = mixed_cluster.run(lambda: __import__("emphy_dask.embed.backbones", fromlist=["x"])
                               ._cached_model.cache_info().currsize)
    assert cached[device_worker] == 1 and all(n == 0 for a, n in cached.items() if a != device_worker)
