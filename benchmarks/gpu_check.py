"""Device check of the GPU stages (run by gpu_check.sh on a machine with an NVIDIA GPU).

1. Backbone throughput: ct-i3resnet152 forward on the GPU, bf16, batches of 1, 8 and 16 inputs of
   160 x 224 x 224: scans per second (target >= 50 on an H100-class card).
2. bf16 vs fp32 on the GPU: cosine similarity of the zone embeddings of real-recipe inputs.
3. lungmask's U-Net on a 300-slice scan (256 x 256 slices, batch 20): seconds (target <= 2 s).
   The U-Net's speed does not depend on its weights: a random state_dict is used when lungmask's
   file is absent (said so in the output).
4. ``emphy extract`` with the default cluster (LocalCUDACluster + CPU workers) over a synthetic
   full-size cohort: per-stage seconds per scan, where each stage ran, GPU utilisation sampled
   with nvidia-smi during the run.

``python benchmarks/gpu_check.py OUT [--patients N]``; prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _weights(backbone: str):
    from emphy_dask.embed.weights import WeightsFile, WeightsMissing, resolve_backbone_weights

    try:
        return resolve_backbone_weights(backbone), "real"
    except WeightsMissing:
        return WeightsFile(None, "random", "random"), "random (file absent on this machine)"


def backbone_throughput(report: dict) -> None:
    import torch

    from emphy_dask.embed import load_model
    from emphy_dask.embed.backbones import feature_maps, zone_embeddings
    from emphy_dask.embed.inputs import ModelInput

    weights, kind = _weights("ct-i3resnet152")
    report["backbone_weights"] = kind
    rng = np.random.default_rng(0)
    inputs = [ModelInput(rng.random((160, 224, 224)).astype(np.float16), "volume", ("whole",),
                         np.full((1, 10, 7, 7), 1 / 490, np.float32)) for _ in range(16)]
    model = load_model("ct-i3resnet152", weights, "cuda", "bf16")
    for bs in (1, 8, 16):
        feature_maps(model, inputs[:bs], "volume", "cuda", "bf16")          # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            feature_maps(model, inputs[:bs], "volume", "cuda", "bf16")
        torch.cuda.synchronize()
        report[f"backbone_scans_per_s_batch{bs}"] = round(3 * bs / (time.perf_counter() - t0), 1)
    m32 = load_model("ct-i3resnet152", weights, "cuda", "fp32")
    a = np.stack([zone_embeddings(f, m) for f, m in zip(feature_maps(model, inputs[:4], "volume", "cuda", "bf16"),
                                                         inputs[:4])])[:, 0]
    b = np.stack([zone_embeddings(f, m) for f, m in zip(feature_maps(m32, inputs[:4], "volume", "cuda", "fp32"),
                                                         inputs[:4])])[:, 0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    report["cosine_bf16_fp32_gpu_min"] = round(float(cos.min()), 5)
    report["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def lungmask_speed(report: dict) -> None:
    import torch
    from lungmask.resunet import UNet

    from emphy_dask.embed.weights import WeightsFile, sha256_file
    from emphy_dask.segment.lungmask import LungmaskInput, load_lungmask_model, lungmask_infer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet_random.pth"
        torch.save(UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                        residual=False).state_dict(), path)
        model = load_lungmask_model(WeightsFile(str(path), sha256_file(path), "explicit"), "R231", "cuda")
        slices = np.random.default_rng(0).integers(-1024, 600, (300, 256, 256)).astype(np.int16)
        inp = LungmaskInput(slices, np.zeros((300, 4), np.int32), (300, 512, 512), "LPS")
        lungmask_infer(inp, model, "cuda", 20)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lungmask_infer(inp, model, "cuda", 20)
        torch.cuda.synchronize()
        report["lungmask_unet_s_300_slices"] = round(time.perf_counter() - t0, 3)


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation every 0.5 s while the job runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.strip().splitlines()
            if out:
                self.samples.append(float(out[0]))
            time.sleep(0.5)


def extract_run(out: Path, n: int, report: dict) -> None:
    import dataclasses

    from emphy_dask.job.config import JobConfig
    from emphy_dask.job.runner import run_extract
    from emphy_dask.scan_state import STAGES
    from emphy_dask.synth import synth_patient
    from emphy_dask.tables import read_frame

    t0 = time.perf_counter()
    for i in range(1, n + 1):
        synth_patient(out / "cohort", i, ("centrilobular", "panlobular")[i % 2], 4.0 * i, seed=5, size="full")
    report["synth_s"] = round(time.perf_counter() - t0, 1)
    base = JobConfig()
    weights, _ = _weights("ct-i3resnet152")
    cfg = dataclasses.replace(base, embed=dataclasses.replace(base.embed, weights="random" if weights.is_random else ""),
                              cluster=dataclasses.replace(base.cluster, workers=12, dashboard_address="127.0.0.1:0"))
    sampler = GpuSampler()
    sampler.start()
    summary = run_extract(out / "cohort" / "dicom", out / "run", cfg, progress=False, log=lambda *a: None)
    sampler.stop.set()
    scans = read_frame(out / "run", "scans")
    report["extract"] = {
        "counts": dict(summary.counts), "wall_s": round(summary.wall_s, 1),
        "per_stage_s_mean": {s: round(float(scans[f"t_{s}_s"].mean()), 3) for s in STAGES},
        "device_embed": sorted(scans["device_embed"].dropna().unique().tolist()),
        "embed_batch_size": sorted(scans["embed_batch_size"].dropna().astype(int).unique().tolist()),
        "gpu_util_pct_mean": round(float(np.mean(sampler.samples)), 1) if sampler.samples else None,
        "gpu_util_pct_max": max(sampler.samples) if sampler.samples else None,
    }


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--patients", type=int, default=6)
    args = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for step in (backbone_throughput, lungmask_speed):
        try:
            step(report)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next check
            report[step.__name__ + "_error"] = f"{type(exc).__name__}: {exc}"
    try:
        extract_run(args.out, args.patients, report)
    except Exception as exc:  # noqa: BLE001
        report["extract_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
