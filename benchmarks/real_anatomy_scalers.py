"""R² of LAA%-950 from embeddings, ridge on standardised columns vs on one common scale.

    python benchmarks/real_anatomy_scalers.py --work /tmp/ra RUN [RUN ...]

For each run folder of a real-anatomy benchmark (``real_anatomy.py``), leave-one-anatomy-out with
the alpha chosen by grouped inner folds over ``RIDGE_ALPHAS``, once with ``StandardScaler`` (the
ridge before 2026-12-08) and once with the product's ``ridge_pipeline`` (``CommonScaler``); each
beside the same with embedding rows shuffled across scans (seed 0). Prints one Markdown row per run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from real_anatomy import logo_predict
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from emphy_dask.models.cohort import load_cohort
    from emphy_dask.models.pipelines import ridge_pipeline
    from emphy_dask.tables import read_frame

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/emphy-real-anatomy")
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    work = Path(a.work)
    truth = pd.read_csv(work / "cohort" / "truth.csv").set_index("scan_key")
    print("| run | scans | R², standardised columns (shuffled) | R², common scale (shuffled) |\n|---|---|---|---|")
    for run in a.runs:
        c = load_cohort(work / run, ("upper", "middle", "lower"))
        keys = [k for k in c.keys if k in truth.index]
        X = pd.DataFrame(c.X, index=c.keys).loc[keys].to_numpy()
        y = read_frame(work / run, "scans").set_index("scan_key").loc[keys, "laa950_pct"].to_numpy(float)
        groups = truth.loc[keys, "base_id"].to_numpy()
        shuffled = X[np.random.default_rng(0).permutation(len(X))]

        def r2(Xi, make) -> float:
            return float(r2_score(y, logo_predict("ridge", Xi, y, groups, ridge=make)))

        cells = [f"{r2(X, make):.2f} ({r2(shuffled, make):.2f})"
                 for make in (lambda: Pipeline([("scale", StandardScaler()), ("model", Ridge())]), ridge_pipeline)]
        print(f"| {run} | {len(y)} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
