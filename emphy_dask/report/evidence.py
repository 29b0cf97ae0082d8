"""What the embeddings have been shown to do outside this run: the real-anatomy benchmark (issue 13).

A reader of one run's report sees its own cross-validated scores; this note says, beside them,
what the same default embeddings did on emphysema of known extent and pattern inserted into
four real chests. The figures are the recorded benchmark's, not recomputed here: they live in
``real_anatomy.json`` next to this module, written by ``benchmarks/real_anatomy.py --record``
from its run (numbers, machine and date in ``benchmarks/README.md``, method and limits in
``docs/real-anatomy.md``), so they carry that run's date, recipe and scan count.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .html import esc

#: keys of the recorded benchmark (``benchmarks/real_anatomy.py --record`` writes them)
RECORD_KEYS = ("date", "n_scans", "n_anatomies", "recipe", "hu_source", "r2_laa950", "r2_laa950_shuffled",
               "auc_label", "auc_label_shuffled", "pattern_accuracy", "pattern_accuracy_shuffled",
               "pattern_accuracy_phenotypes", "laa950_max_error_pts")


def recorded_benchmark(path=None) -> dict:
    """The record of the real-anatomy benchmark (default: the shipped ``real_anatomy.json``), checked for its keys."""
    source = resources.files(__package__).joinpath("real_anatomy.json") if path is None else Path(path)
    r = json.loads(source.read_text())
    missing = [k for k in RECORD_KEYS if k not in r]
    if missing:
        raise ValueError(f"{source.name} lacks {', '.join(missing)}: rewrite it with "
                         "benchmarks/real_anatomy.py --record")
    return r


def real_anatomy_note(r: dict | None = None) -> str:
    """One HTML paragraph: the benchmark's scores beside their controls, and its limits."""
    r = recorded_benchmark() if r is None else r
    return (
        '<p class="note"><b>On real anatomy with inserted emphysema</b> (benchmark of '
        f"{esc(r['date'])}: {r['n_scans']} scans of {r['n_anatomies']} real chests, each anatomy held out in "
        f"turn, penalties by grouped inner folds; input recipe {esc(r['recipe'])} on {esc(r['hu_source'])} HU): "
        "the embeddings named the emphysema pattern "
        f"{r['pattern_accuracy']:.2f} of the time (shuffled control {r['pattern_accuracy_shuffled']:.2f}; "
        f"density phenotypes {r['pattern_accuracy_phenotypes']:.2f}), separated the paper's label with AUC "
        f"{r['auc_label']:.3f} (control {r['auc_label_shuffled']:.3f}) and predicted LAA%-950 with "
        f"R&sup2; {r['r2_laa950']:.2f} (control {r['r2_laa950_shuffled']:.2f}); the measured LAA%-950 was "
        f"within {r['laa950_max_error_pts']:.2f} points of the inserted truth. Inserted lesions are not "
        "disease and four anatomies are few: read these as what the features can see, not as clinical "
        "accuracy (docs/real-anatomy.md).</p>")


__all__ = ["RECORD_KEYS", "real_anatomy_note", "recorded_benchmark"]
