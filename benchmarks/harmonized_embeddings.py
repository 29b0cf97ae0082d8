"""Do kernel-harmonised model inputs bring two reconstructions of one patient closer in feature space?

    python benchmarks/harmonized_embeddings.py

The real pair in ../shared/data (Lung_Dx-A0001: kernels L and B of one acquisition) and, for scale,
another patient (LIDC-IDRI-0013), through the job's own stages (``prepare_scan`` +
``embed_states``) with the default backbone (ct-i3resnet152, astra weights, bf16), once with
``[embed].hu_source = "raw"`` and once ``"harmonized"``. Prints, per zone, the cosine similarity
and the Euclidean distance between the L and B embeddings, and the distance from B to the other
patient. Results are recorded in benchmarks/README.md.
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from emphy_dask.device_stages import embed_states
from emphy_dask.embed.weights import resolve_weights
from emphy_dask.job.config import config_from_dict
from emphy_dask.job.manifest import build_manifest
from emphy_dask.pipeline import prepare_scan
from emphy_dask.scan_state import ScanTask

SHARED = Path(os.environ.get("EMPHY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    import torch

    torch.set_num_threads(1)
    _, tasks = build_manifest(SHARED / "lidc-idri-full")
    dx = SHARED / "lung-pet-ct-dx"

    def one_series(suffix, key):                     # one series folder of the pair, as a task
        folder = next(d for d in dx.rglob("*") if d.is_dir() and d.name.endswith(suffix))
        return ScanTask(key, "dicom", tuple(str(p) for p in sorted(folder.glob("*.dcm"))))

    series = {"L": one_series("40805", "dx-L"), "B": one_series("41315", "dx-B"), "other": tasks[0]}
    out = Path(tempfile.mkdtemp())
    for hu_source in ("raw", "harmonized"):
        cfg = resolve_weights(config_from_dict({"qc": {"max_hu": 4000.0}, "embed": {"hu_source": hu_source},
                                                "output": {"write_masks": False, "write_qc_png": False}}))
        emb = {}
        for name, task in series.items():
            state = prepare_scan(task, cfg, out)
            assert state.row["status"] == "ok", (name, state.row.get("reason"))
            rows = embed_states([state], cfg, out, "cpu")[0]["embeddings"]
            emb[name] = {r["zone"]: np.asarray(r["embedding"], np.float64) for r in rows}
        for zone in emb["L"]:
            a, b, o = emb["L"][zone], emb["B"][zone], emb["other"][zone]
            cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            print(f"{hu_source:<10} {zone:<6} cos(L,B) {cos:.4f}  |L-B| {np.linalg.norm(a - b):.3f}  "
                  f"|B-other| {np.linalg.norm(b - o):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
