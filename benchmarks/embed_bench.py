"""The embedding stage on this CPU: forward seconds, bf16 vs fp32 agreement on real CT, bytes moved.

``python benchmarks/embed_bench.py [--threads 1]``: for each real chest CT in ../shared/data
that has lungs from apex to base (the full LIDC-IDRI series and the two kernel reconstructions of
Lung_Dx-A0001), runs the CPU stages once, then the ct-i3resnet152 forward in bf16 and in fp32
(twice each, the second timed), and prints per zone the cosine similarity of the bf16 and fp32
embeddings, the forward seconds, and the bytes each device task receives and returns (what
crosses between workers per scan). Results are recorded in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emphy_dask.embed import load_model, run_batches, zone_embeddings
from emphy_dask.embed.weights import resolve_backbone_weights
from emphy_dask.job.config import JobConfig
from emphy_dask.embed.weights import resolve_weights
from emphy_dask.pipeline import prepare_scan
from emphy_dask.scan_state import ScanTask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCANS = {
    "LIDC-IDRI-0013 (GE STANDARD)": SHARED / "lidc-idri-full",
    "Lung_Dx-A0001 kernel L (sharp)": SHARED / "lung-pet-ct-dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805",
    "Lung_Dx-A0001 kernel B (standard)": SHARED / "lung-pet-ct-dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/3.000000-5mm-41315",
}


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    base = JobConfig()
    cfg = resolve_weights(dataclasses.replace(base, qc=dataclasses.replace(base.qc, max_hu=4000.0)))
    weights = resolve_backbone_weights("ct-i3resnet152")
    models = {p: load_model("ct-i3resnet152", weights, "cpu", p) for p in ("bf16", "fp32")}
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in SCANS.items():
            files = tuple(str(p) for p in sorted(folder.rglob("*.dcm")))
            state = prepare_scan(ScanTask(name, "dicom", files), cfg, tmp)
            assert state.ok, state.row.get("reason")
            mi = state.model_input
            out = {"scan": name, "slices": state.row["n_slices"], "cpu_stages_s": round(state.row["t_total_s"], 2),
                   "bytes_to_device": int(mi.nbytes), "bytes_rows_back": len(pickle.dumps(state.result))}
            emb = {}
            for prec, model in models.items():
                run_batches(model, [mi], "volume", "cpu", prec, 1)            # warm-up
                t0 = time.perf_counter()
                (fmap,), _ = run_batches(model, [mi], "volume", "cpu", prec, 1)
                out[f"forward_{prec}_s"] = round(time.perf_counter() - t0, 2)
                emb[prec] = zone_embeddings(fmap, mi).astype(np.float64)
            a, b = emb["bf16"], emb["fp32"]
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            out["cosine_bf16_fp32"] = {z: round(float(c), 5) for z, c in zip(mi.zones, cos)}
            report.append(out)
            print(json.dumps(out), flush=True)
    print(json.dumps({"threads": threads, "scans": report}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    main(ap.parse_args().threads)
