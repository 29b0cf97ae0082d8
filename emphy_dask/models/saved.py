"""Fitted linear models as JSON: loading never runs code (no pickle).

A model is the standardisation of its input columns, the columns it keeps, and a linear head:
``score = sum_j coef_j * (x_j - mean_j) / scale_j + intercept``; a logistic model's probability
is ``1 / (1 + exp(-score))``. ``model.json`` holds every model of a fit plus the run it came from
(backbone, weights hash, zones), which ``emphy predict`` checks before scoring another run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "emphy-linear-models"
FORMAT_VERSION = 1


@dataclass
class LinearModel:
    """One linear model over named input columns.

    ``kind``: logistic (binary weak label) or linear (regression of ``target``); ``inputs``:
    embedding (columns ``<zone>:<channel>``) or phenotypes; ``features`` the kept columns, with
    ``mean``/``scale`` their standardisation and ``coef`` their weights on standardised values.
    """

    kind: str
    inputs: str
    target: str
    features: list
    mean: list
    scale: list
    coef: list
    intercept: float
    info: dict = field(default_factory=dict)

    def design(self, X: np.ndarray, names: list) -> np.ndarray:
        """Standardised kept columns (n, k) of ``X`` whose columns are ``names``."""
        pos = {n: i for i, n in enumerate(names)}
        missing = [f for f in self.features if f not in pos]
        if missing:
            raise KeyError(f"model inputs missing from the data: {missing[:5]}")
        cols = np.asarray(X, float)[:, [pos[f] for f in self.features]]
        return (cols - np.asarray(self.mean)) / np.asarray(self.scale)

    def contributions(self, X: np.ndarray, names: list) -> np.ndarray:
        """coef_j x standardised x_j per kept column (n, k): they sum to score - intercept."""
        return self.design(X, names) * np.asarray(self.coef)

    def score(self, X: np.ndarray, names: list) -> np.ndarray:
        return self.contributions(X, names).sum(axis=1) + self.intercept

    def predict(self, X: np.ndarray, names: list) -> np.ndarray:
        """Probability of the positive class (logistic) or the predicted target (linear)."""
        s = self.score(X, names)
        return 1.0 / (1.0 + np.exp(-s)) if self.kind == "logistic" else s

    def raw_weights(self) -> tuple[dict, float]:
        """The head on unstandardised inputs: ({feature: coef/scale}, intercept - sum coef*mean/scale).

        With these, score = sum_f w_f x_f + bias: the weights a class-activation map uses.
        """
        w = np.asarray(self.coef) / np.asarray(self.scale)
        bias = float(self.intercept - np.sum(w * np.asarray(self.mean)))
        return dict(zip(self.features, w.tolist())), bias


def from_pipeline(pipe, names: list, *, kind: str, inputs: str, target: str, info=None) -> LinearModel:
    """A fitted scale [-> select] -> linear-model Pipeline as a LinearModel (kept columns only;
    an L1 model keeps its nonzero coefficients)."""
    scaler, head = pipe.named_steps["scale"], pipe.named_steps["model"]
    coef = np.ravel(head.coef_)
    keep = np.arange(len(names))
    if "select" in pipe.named_steps:
        keep = np.flatnonzero(pipe.named_steps["select"].get_support())
        order = pipe.named_steps["select"].selected_          # decreasing |t|
        coef = dict(zip(keep.tolist(), coef.tolist()))
        keep = np.asarray(order)
        coef = np.array([coef[i] for i in keep])
    elif kind == "logistic" and inputs == "embedding":
        nz = np.flatnonzero(coef != 0)
        keep, coef = nz, coef[nz]
    intercept = float(np.ravel(head.intercept_)[0]) if np.ndim(head.intercept_) else float(head.intercept_)
    return LinearModel(kind, inputs, target, [names[i] for i in keep], scaler.mean_[keep].tolist(),
                       scaler.scale_[keep].tolist(), [float(c) for c in coef], intercept, dict(info or {}))


def save_models(path, models: dict, run: dict) -> Path:
    """Write ``{name: LinearModel}`` and the run description (backbone, weights_sha256, zones, ...)."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "run": run,
           "models": {name: asdict(m) for name, m in models.items()}}
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def load_models(path) -> tuple[dict, dict]:
    """(models, run) from ``model.json``; a clear error for any other file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable model file ({exc})") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} file")
    return {name: LinearModel(**m) for name, m in doc["models"].items()}, doc["run"]
