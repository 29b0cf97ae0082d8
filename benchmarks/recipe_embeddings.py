"""How far apart are two kernels of one patient, and two patients, under each embedding input recipe?

    python benchmarks/recipe_embeddings.py [--hu-source harmonized] [RECIPE ...]

A quick sanity check of ``[embed].input_recipe`` (upstream, lung, multiwindow) on real anatomy, not
the benchmark that picks the default (that one needs inserted emphysema of known extent: issue 13,
``benchmarks/real_anatomy.py``). The real pair in ../shared/data (Lung_Dx-A0001: kernels L and B of
one acquisition) and another patient (LIDC-IDRI-0013) go through the job's own stages
(``prepare_scan`` + ``embed_states``, ct-i3resnet152, astra weights, bf16). Per recipe and zone it
prints |L - B| (the kernel's effect), |B - other| (another anatomy) and their ratio: a recipe that
widens the window on lung densities also widens what a sharp kernel's noise does to them.
Results are recorded in benchmarks/README.md.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emphy_dask.device_stages import embed_states, resolve_weights
from emphy_dask.job.config import config_from_dict
from emphy_dask.job.manifest import build_manifest
from emphy_dask.pipeline import prepare_scan
from emphy_dask.scan_state import ScanTask

SHARED = Path(os.environ.get("EMPHY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RECIPES = ("upstream", "lung", "multiwindow")


def main(argv=None) -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--hu-source", default="raw", choices=("raw", "harmonized"))
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    _, tasks = build_manifest(SHARED / "lidc-idri-full")
    other = next(t for t in tasks if t.scan_key.endswith("0013"))
    dx = SHARED / "lung-pet-ct-dx"

    def one_series(suffix, key):                     # one series folder of the pair, as a task
        folder = next(d for d in dx.rglob("*") if d.is_dir() and d.name.endswith(suffix))
        return ScanTask(key, "dicom", tuple(str(p) for p in sorted(folder.glob("*.dcm"))))

    series = {"L": one_series("40805", "dx-L"), "B": one_series("41315", "dx-B"), "other": other}
    out = Path(tempfile.mkdtemp())
    print("recipe      HU         zone   |L-B|   |B-other|  ratio  cos(L,B)", flush=True)
    for recipe in args.recipes:
        t0 = time.perf_counter()
        embed = {"input_recipe": recipe, "hu_source": args.hu_source}
        cfg = resolve_weights(config_from_dict({"qc": {"max_hu": 4000.0}, "embed": embed,
                                                "output": {"write_masks": False, "write_qc_png": False}}))
        emb = {}
        for name, task in series.items():
            state = prepare_scan(task, cfg, out)
            assert state.row["status"] == "ok", (name, state.row.get("reason"))
            rows = embed_states([state], cfg, out, "cpu")[0]["embeddings"]
            assert {r["input_recipe"] for r in rows} == {recipe}
            emb[name] = {r["zone"]: np.asarray(r["embedding"], np.float64) for r in rows}
        for zone in emb["L"]:
            a, b, o = emb["L"][zone], emb["B"][zone], emb["other"][zone]
            lb, bo = np.linalg.norm(a - b), np.linalg.norm(b - o)
            cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            print(f"{recipe:<11} {args.hu_source:<10} {zone:<6} {lb:6.3f}  {bo:8.3f}  {lb / bo:5.2f}  {cos:.4f}", flush=True)
        print(f"({recipe}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
