"""One HTML page per scan: facts, predicted probability, zone values, QC images, model inputs with
their contribution maps and the top features' activation maps (``models.cam``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..models.cam import contribution_maps, load_featuremap, overlay_png, png_slice, top_channels
from ..models.saved import LinearModel
from ..scan_state import artifact_stem
from .cohort import RunData
from .html import esc, fmt, img, link, page, rel, table

FACTS = ("status", "reason", "qc_rule", "qc_max_hu", "qc_std_hu", "manufacturer", "model", "kernel", "kernel_class",
         "slice_thickness_mm", "n_slices", "lung_volume_l", "laa950_pct", "hu_mean", "cluster_d", "label",
         "fov_truncated", "segmenter", "backbone",
         # kernel harmonisation: the noise spectrum's mean frequency before/after, what T kept
         "kernel_nps_fav_lpmm", "hu_source", "harmonize_applied", "harmonize_fav_before_lpmm",
         "harmonize_fav_after_lpmm", "harmonize_gain_03", "harmonize_gain_05", "harmonize_mld_shift_hu",
         "harmonize_reason")


@dataclass
class MapModel:
    """The model whose maps are drawn (model.json's ``paper``) and what it needs of a run."""

    model: LinearModel
    backbone: str
    weights_sha256: str
    top: list = field(default_factory=list)

    @classmethod
    def load(cls, out: Path, name: str = "paper") -> "MapModel | None":
        from ..models.saved import load_models

        path = out / "model" / "model.json"
        if not path.exists():
            return None
        models, run = load_models(path)
        m = models.get(name)
        if m is None or m.inputs != "embedding":
            return None
        return cls(m, run["backbone"], run["weights_sha256"], top_channels(m, 3))


def scan_page_path(report_dir: Path, scan_key: str) -> Path:
    return report_dir / "scans" / f"{artifact_stem(scan_key)}.html"


def draw_maps(d: RunData, row, mm: MapModel | None, maps_dir: Path) -> tuple[list, str]:
    """Overlays of one scan: [(zone, kind, path, caption)], and a one-line note (why none, or the identity)."""
    fmap = row.get("featuremap_path")
    if mm is None:
        return [], "no model (run emphy fit) - inputs shown without maps"
    if not isinstance(fmap, str) or not fmap:
        return [], "no saved feature map for this scan ([embed].save_feature_maps = false, or no embedding)"
    if row.get("backbone") != mm.backbone or row.get("backbone_weights_sha256") != mm.weights_sha256:
        return [], "the model was fitted on another backbone or weights: no map"
    fm = load_featuremap(d.out / fmap)
    maps, bias = contribution_maps(fm, mm.model)
    total = float(sum(m.sum() for m in maps.values()))
    stem = artifact_stem(row["scan_key"])      # <shard>/<key>: the folders of the run's own files
    out = []
    slices = {z: png_slice(fm, z, m) for z, m in maps.items()}
    scale = max(float(np.abs(s).max()) for s in slices.values()) or 1.0
    pngs = fm.meta.get("png_paths", {})
    for zone, vals in slices.items():
        base = d.out / pngs.get(zone, "")
        if not pngs.get(zone) or not base.exists():
            continue
        path = overlay_png(base, vals, maps_dir / f"{stem}_cam_{zone}.jpg", scale=scale)
        out.append((zone, "contribution", path,
                    f"{zone}: contribution map (red: toward emphysema, blue: against; ±{scale:.3g} per "
                    f"position); zone total {float(maps[zone].sum()):+.3f}"))
    for zone, ch, coef in mm.top:
        base = d.out / pngs.get(zone, "")
        if not pngs.get(zone) or not base.exists():
            continue
        act = fm.activations(zone)[ch].astype(np.float64)
        vals = png_slice(fm, zone, act)
        path = overlay_png(base, vals, maps_dir / f"{stem}_f{ch:04d}_{zone}.jpg", signed=False,
                           scale=float(np.max(act)) or 1.0)
        out.append((zone, "activation", path, f"{zone}:{ch:04d} activation (coefficient {coef:+.2f}); "
                                              f"pooled value {float(fm.embedding(zone, [ch])[0]):.3f}"))
    note = (f"score = bias {bias:+.3f} + sum of the maps {total:+.3f} = {bias + total:+.3f} "
            f"(probability {1 / (1 + np.exp(-(bias + total))):.3f}; exact for this linear head)")
    return out, note


def _predictions(d: RunData, key: str) -> pd.DataFrame:
    if d.oof is None:
        return pd.DataFrame()
    p = d.oof[d.oof["scan_key"] == key]
    if p.empty:
        return pd.DataFrame()
    p = p.assign(kind=np.where(p["optimistic"], "optimistic (selection saw this scan)", "honest (out of fold)"))
    return p[["model", "subset", "kind", "prediction", "prediction_sd", "n_repeats"]]


def _target_section(d: RunData, key: str) -> str:
    """``emphy fit --target``: the scan's predicted class and how much each zone pushed toward it."""
    if d.target is None or key not in set(d.target["scan_key"]):
        return ""
    r = d.target[d.target["scan_key"] == key].iloc[0]
    zones = [c for c in d.target.columns if c.startswith("zone_contribution_")]
    t = pd.DataFrame({"zone": [c.removeprefix("zone_contribution_") for c in zones],
                      "contribution to the predicted class": [float(r[c]) for c in zones]})
    return (f"<h2>{esc(r['target'])}: predicted {esc(r['final_predicted_class'])}</h2>"
            f"<p>True: {esc(r['true_class'])}; honest out-of-fold prediction: {esc(r['oof_predicted_class'])} "
            f"(p = {float(r['oof_probability']):.2f}).</p>" + table(t, digits=3, left=("zone",)) +
            '<p class="note">Which zones drove the final model\'s prediction: per zone, the sum of its exact '
            "contribution map for the predicted class (weights on raw embedding channels x the zone's embedding); "
            "the largest value pushed hardest toward that class.</p>")


def scan_page(d: RunData, row: dict, mm: MapModel | None, report_dir: Path) -> Path:
    """Write ``report/scans/<stem>.html`` for one scans row (any status); returns its path."""
    key = row["scan_key"]
    path = scan_page_path(report_dir, key)
    here = path.parent
    parts = [f'<nav>{link(rel(report_dir / "index.html", here), "report index")}'
             f'{link(rel(report_dir / "index.html", here) + "#scans", "all scans")}</nav>',
             f"<h1>{esc(key)}</h1>"]
    facts = pd.DataFrame([{"field": f, "value": fmt(row.get(f), 3)} for f in FACTS if f in row
                          and row.get(f) is not None and row.get(f) == row.get(f)])
    parts.append(table(facts, left=("field", "value")))
    pred = _predictions(d, key)
    if not pred.empty:
        parts.append("<h2>Predicted probability</h2>" + table(pred, digits=3) +
                     '<p class="note">prediction = mean over the cross-validation repeats (ridge_laa950: '
                     'LAA%-950 in %). Only the honest rows estimate how the model does on unseen scans.</p>')
    parts.append(_target_section(d, key))
    zones = d.regions[d.regions["scan_key"] == key].drop(columns=["scan_key"])
    if not zones.empty:
        parts.append("<h2>Zone values (raw HU)</h2>" + table(zones, left=("region",)))
    qc = [(row.get("qc_montage_path"), "QC montage"), (row.get("qc_curve_path"), "per-slice LAA%-950 curve")]
    figs = [img(rel(d.out / p, here), cap, caption=esc(cap)) for p, cap in qc
            if isinstance(p, str) and (d.out / p).exists()]
    if figs:
        parts.append("<h2>QC</h2><div class=\"grid\">" + "".join(figs) + "</div>")
    parts.append(_inputs_section(d, row, mm, report_dir, here))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(f"{key} - emphy report", "\n".join(parts)))
    return path


def _inputs_section(d: RunData, row: dict, mm, report_dir: Path, here: Path) -> str:
    inputs = d.inputs[d.inputs["scan_key"] == row["scan_key"]]
    if inputs.empty:
        return ""
    try:
        maps, note = draw_maps(d, row, mm, report_dir / "maps")
    except ValueError as exc:          # an unreadable feature map: said on the page, the report goes on
        maps, note = [], str(exc)
    figs = []
    for r in inputs.sort_values("zone").itertuples():
        p = r.input_png_path
        if isinstance(p, str) and (d.out / p).exists():
            figs.append(img(rel(d.out / p, here), f"{r.zone} input", caption=f"{esc(r.zone)}: model input"))
    for zone, kind, p, cap in maps:
        figs.append(img(rel(p, here), f"{zone} {kind}", caption=esc(cap)))
    return (f"<h2>Model inputs and maps ({esc(row.get('backbone'))})</h2><p class=\"note\">{esc(note)}. Axial "
            "slices in the radiological view (anterior up, patient right on the left).</p>"
            f"<div class=\"grid\">{''.join(figs)}</div>")
