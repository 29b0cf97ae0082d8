"""``emphy predict MODEL_DIR OUT``: score another extract run with a saved model.

The run must hold embeddings of the model's backbone and weights hash, cut from the same HU (raw or
kernel-harmonised, ``[embed].hu_source``): embeddings of another network, of the same network with
other weights, or of other HU live in another feature space and would be scored silently wrong, so
such a run is refused with the reason.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..tables import read_frame, write_part
from .cohort import (CohortError, embedding_hu_source, embedding_input_recipe, embedding_matrix, feature_names,
                     run_backbones, wholelung_phenotypes)
from .saved import load_models


class RunMismatch(ValueError):
    """The run's embeddings were made with another backbone or weights than the model's."""


def check_run(out_dir, run: dict) -> None:
    """Refuse a run whose embeddings do not include the model's backbone + weights hash."""
    found = run_backbones(out_dir)
    if found.empty:
        raise RunMismatch(f"{out_dir}: no embeddings/ table: nothing the model ({run['backbone']}) can score")
    same = found[(found["backbone"] == run["backbone"]) & (found["weights_sha256"] == run["weights_sha256"])]
    if same.empty:
        have = ", ".join(f"{r.backbone} (weights {r.weights_sha256[:12]})" for r in found.itertuples())
        raise RunMismatch(f"{out_dir}: embeddings made with {have}; the model needs {run['backbone']} "
                          f"(weights {run['weights_sha256'][:12]}): refusing to score another feature space")
    have_hu, need_hu = embedding_hu_source(out_dir, run["backbone"], run["weights_sha256"]), run.get("hu_source", "raw")
    if have_hu != need_hu:
        raise RunMismatch(f"{out_dir}: embeddings cut from {have_hu} HU; the model was fitted on {need_hu} HU "
                          f"([embed].hu_source): refusing to score another feature space")
    have, need = (embedding_input_recipe(out_dir, run["backbone"], run["weights_sha256"]),
                  run.get("input_recipe", "upstream"))
    if have != need:
        raise RunMismatch(f"{out_dir}: embeddings of the {have!r} input recipe; the model was fitted on {need!r} "
                          f"([embed].input_recipe): refusing to score another feature space")


def predict_run(model_dir, out_dir, model_name: str = "paper") -> tuple[Path, dict]:
    """Score every ok scan of ``out_dir`` with ``model_name``; write ``out_dir/predictions/``.

    Returns (the Parquet part written, counts {"scored", "without_inputs"}).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model_file = model_dir / "model.json" if model_dir.is_dir() else model_dir
    models, run = load_models(model_file)
    if model_name not in models:
        raise KeyError(f"{model_file}: no model {model_name!r} (has {', '.join(models)})")
    model = models[model_name]
    sha = hashlib.sha256(model_file.read_bytes()).hexdigest()
    scans = read_frame(out_dir, "scans")
    ok = scans[scans["status"] == "ok"].set_index("scan_key")
    if model.inputs == "embedding":
        check_run(out_dir, run)
        keys, X = embedding_matrix(out_dir, run["backbone"], run["weights_sha256"], run["zones"])
        names = feature_names(run["zones"], run["embedding_dim"])
        backbone, weights = run["backbone"], run["weights_sha256"]
    else:
        ph = wholelung_phenotypes(out_dir).dropna()
        keys, X = ph["scan_key"].to_numpy(object), ph[["laa950_pct", "hu_mean", "perc15_hu"]].to_numpy(float)
        names, backbone, weights = ["laa950_pct", "hu_mean", "perc15_hu"], None, None
    keep = np.isin(keys, ok.index.to_numpy())
    keys, X = keys[keep], X[keep]
    if not len(keys):
        raise CohortError(f"{out_dir}: no ok scan with the model's inputs ({', '.join(run['zones'])} embeddings)")
    contrib = model.contributions(X, names)
    score = contrib.sum(axis=1) + model.intercept
    pred = model.predict(X, names)
    logistic = model.kind == "logistic"
    rows = []
    for i, key in enumerate(keys):
        label = ok.at[key, "label"]
        rows.append({
            "scan_key": str(key), "model": model_name, "model_sha256": sha, "backbone": backbone,
            "weights_sha256": weights, "probability": float(pred[i]) if logistic else None,
            "value": None if logistic else float(pred[i]), "score": float(score[i]),
            "predicted_label": int(pred[i] >= 0.5) if logistic else None,
            "label": None if label is None or label != label else int(label),
            "laa950_pct": float(ok.at[key, "laa950_pct"]) if ok.at[key, "laa950_pct"] == ok.at[key, "laa950_pct"]
            else None,
            "contributions": json.dumps({f: round(float(v), 6) for f, v in zip(model.features, contrib[i])}),
        })
    path = write_part("predictions", rows, out_dir, f"model-{model_name}")
    return path, {"scored": len(rows), "without_inputs": int(len(ok) - len(rows))}
