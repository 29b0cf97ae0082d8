"""What the embeddings have been shown to do outside this run: the real-anatomy benchmark (issue 13).

A reader of one run's report sees its own cross-validated scores; this note says, beside them,
what the same default embeddings did on emphysema of known extent and pattern inserted into
four real chests (``benchmarks/real_anatomy.py``; numbers, machine and date in
``benchmarks/README.md``, method and limits in ``docs/real-anatomy.md``). The figures are the
recorded benchmark's, not recomputed here, so they carry its date.
"""
from __future__ import annotations

from .html import esc

#: The recorded run (2026-12-07, 85 variants of 4 anatomies, leave-one-anatomy-out, upstream recipe).
REAL_ANATOMY = {
    "date": "2026-12-07", "n_scans": 85, "n_anatomies": 4,
    "r2_laa950": 0.65, "r2_laa950_shuffled": -0.21,
    "auc_label": 0.913, "auc_label_shuffled": 0.537,
    "pattern_accuracy": 0.91, "pattern_accuracy_shuffled": 0.17, "pattern_accuracy_phenotypes": 0.81,
    "laa950_max_error_pts": 0.20,
}


def real_anatomy_note(r: dict = REAL_ANATOMY) -> str:
    """One HTML paragraph: the benchmark's scores beside their controls, and its limits."""
    return (
        '<p class="note"><b>On real anatomy with inserted emphysema</b> (benchmark of '
        f"{esc(r['date'])}: {r['n_scans']} scans of {r['n_anatomies']} real chests, each anatomy held out in "
        "turn, penalties by grouped inner folds): the default embeddings named the emphysema pattern "
        f"{r['pattern_accuracy']:.2f} of the time (shuffled control {r['pattern_accuracy_shuffled']:.2f}; "
        f"density phenotypes {r['pattern_accuracy_phenotypes']:.2f}), separated the paper's label with AUC "
        f"{r['auc_label']:.3f} (control {r['auc_label_shuffled']:.3f}) and predicted LAA%-950 with "
        f"R&sup2; {r['r2_laa950']:.2f} (control {r['r2_laa950_shuffled']:.2f}); the measured LAA%-950 was "
        f"within {r['laa950_max_error_pts']:.2f} points of the inserted truth. Inserted lesions are not "
        "disease and four anatomies are few: read these as what the features can see, not as clinical "
        "accuracy (docs/real-anatomy.md).</p>")


__all__ = ["REAL_ANATOMY", "real_anatomy_note"]
