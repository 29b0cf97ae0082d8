"""Zone poolings compared offline on a real-anatomy run's layer4 maps (issue 13, part 4).

    python benchmarks/real_anatomy_pooling.py RUN [--work DIR] [--seed 0]

RUN is a `benchmarks/real_anatomy.py` run made with ``--feature-maps`` ([embed].save_feature_maps):
each scan's ``featuremaps/*.npz`` holds the ct-i3resnet152 layer4 map (2048 x 10 x 7 x 7, after the
last ReLU, so non-negative) and the per-zone position weights that ``[embed].zone_pooling = "lung"``
averages with. The network is not run again: every pooling below is a function of those two arrays,

- ``lung mean``: the product's pooling (checked equal to the run's stored embeddings);
- ``slab mean``: every position of the depth rows that hold any of the zone's lung, alike (close
  to, not the same as, ``zone_pooling = "slab"``, which gives each row to one zone);
- ``lung GeM p=3``: generalised mean, (sum w x^3)^(1/3): leans towards the strongest positions;
- ``lung mean + std``: the weighted mean and the weighted standard deviation, concatenated;
- ``lung max``: the largest response over the zone's positions,

and each is scored as `real_anatomy.py` scores embeddings: leave-one-anatomy-out, penalties by
grouped inner folds, beside the same features shuffled across scans. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_anatomy import scores  # noqa: E402

ZONES = ("upper", "middle", "lower")


def poolings(fmap: np.ndarray, weights: np.ndarray, zones: list) -> dict:
    """Pooled features per method, each of shape (len(ZONES) * channels,).

    fmap : (C, D, H, W) non-negative layer4 responses; weights : (Z, D, H, W), each zone's sum 1.
    """
    f = fmap.astype(np.float64).reshape(fmap.shape[0], -1)           # (C, P)
    out: dict = {k: [] for k in ("lung mean", "slab mean", "lung GeM p=3", "lung mean + std", "lung max")}
    depth = fmap.shape[1]
    for z in ZONES:
        w = weights[zones.index(z)].astype(np.float64).reshape(-1)    # (P,)
        mean = f @ w
        var = np.maximum((f ** 2) @ w - mean ** 2, 0.0)
        rows = weights[zones.index(z)].reshape(depth, -1).sum(1) > 0
        slab = fmap[:, rows].astype(np.float64).reshape(fmap.shape[0], -1).mean(1)
        out["lung mean"].append(mean)
        out["slab mean"].append(slab)
        out["lung GeM p=3"].append(np.cbrt(np.maximum(f, 0) ** 3 @ w))
        out["lung mean + std"].append(np.concatenate([mean, np.sqrt(var)]))
        out["lung max"].append(f[:, w > 0].max(1))
    return {k: np.concatenate(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="the benchmark folder (default: RUN's parent)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from emphy_dask.tables import read_frame

    work = a.work or a.run.parent
    truth = pd.read_csv(work / "cohort" / "truth.csv")
    scans = read_frame(a.run, "scans")
    emb = read_frame(a.run, "embeddings")
    ok = scans[scans["status"] == "ok"][["scan_key", "laa950_pct", "label"]].merge(truth, on="scan_key")
    paths = emb.drop_duplicates("scan_key").set_index("scan_key")["featuremap_path"]
    feats: dict = {}
    stored = emb.set_index(["scan_key", "zone"])["embedding"]
    max_diff = 0.0
    for key in ok["scan_key"]:
        with np.load(a.run / paths[key]) as z:
            zones = [str(v) for v in z["zones"]]
            pooled = poolings(z["layer4"], z["zone_weights"], zones)
        mine = pooled["lung mean"].reshape(len(ZONES), -1)
        theirs = np.stack([np.asarray(stored[(key, zn)]) for zn in ZONES])
        max_diff = max(max_diff, float(np.abs(mine - theirs).max() / (np.abs(theirs).max() + 1e-12)))
        for k, v in pooled.items():
            feats.setdefault(k, []).append(v)
    groups = ok["base_id"].to_numpy()
    y_laa, y_label = ok["laa950_pct"].to_numpy(float), ok["label"].to_numpy(int)
    pat = ok["pattern"].to_numpy() != "none"
    rows = []
    for name, X in feats.items():
        X = np.stack(X)
        rng = np.random.default_rng(a.seed)
        r = {**scores("ridge", X, y_laa, groups, rng), **scores("label", X, y_label, groups, rng)}
        p = scores("pattern", X[pat], ok["pattern"].to_numpy()[pat], groups[pat], rng)
        rows.append({"pooling": name, **r, **{f"pattern_{k}": v for k, v in p.items()}})
        print(json.dumps(rows[-1]), flush=True)
    print(f"lung mean vs stored embeddings: max relative difference {max_diff:.2e} (float16 maps)")
    print("| pooling | R² LAA%-950 (shuffled) | AUC label (shuffled) | pattern accuracy (shuffled) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['pooling']} | {r['r2']:.2f} ({r['shuffled_r2']:.2f}) | {r['auc']:.3f} ({r['shuffled_auc']:.3f}) | "
              f"{r['pattern_accuracy']:.2f} ({r['pattern_shuffled_accuracy']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
