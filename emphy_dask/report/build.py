"""``emphy report OUT``: the static HTML report in ``OUT/report/``.

``index.html`` (cohort, exclusions by scanner, the paper's tables, discordant labels, kernels,
both protocols' metrics and curves, features, PCA/t-SNE, the explanation gallery, an index of
every scan) and ``scans/<stem>.html`` per scan. Images are files: the run's own PNGs (QC,
model inputs) are linked where they lie, figures go to ``report/img/``, maps to ``report/maps/``.
No scripts and no network resources: it opens from disk and stays light at thousands of scans.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..scan_state import artifact_stem
from . import cohort as C
from .evidence import real_anatomy_note
from .html import ci, esc, fmt, img, link, page, rel, table
from .scan_pages import MapModel, scan_page, scan_page_path

GALLERY_N = 3          # most confident positives / negatives
GALLERY_MISSED = 6     # misclassified scans shown
LIST_CAP = 25          # rows of a discordant list drawn with montages


def build_report(out_dir, scan: str | None = None, *, progress=None) -> Path:
    """Write the report (or, with ``scan``, that scan's page only); returns the page written."""
    t0 = time.perf_counter()
    d = C.load_run(out_dir)
    report = d.out / "report"
    (report / "img").mkdir(parents=True, exist_ok=True)
    mm = MapModel.load(d.out)
    rows = {r["scan_key"]: r for r in d.scans.to_dict("records")}
    if scan is not None:
        if scan not in rows:
            raise KeyError(f"{d.out}: no scan {scan!r} in scans/")
        return scan_page(d, rows[scan], mm, report)
    for i, row in enumerate(rows.values()):
        scan_page(d, row, mm, report)
        if progress and (i + 1) % 100 == 0:
            progress(f"{i + 1}/{len(rows)} scan pages")
    index = report / "index.html"
    index.write_text(page("emphy report", _index_body(d, mm, report, time.perf_counter() - t0)))
    return index


def _scan_link(report: Path, key: str, here: Path) -> str:
    return link(rel(scan_page_path(report, key), here), key)


def _index_body(d: C.RunData, mm, report: Path, seconds: float) -> str:
    ok = C.ok_scans(d)
    parts = [f"<h1>emphy report: {esc(d.out.name)}</h1>",
             '<nav><a href="#cohort">cohort</a><a href="#tables">tables 1-2</a><a href="#discordant">discordant</a>'
             '<a href="#kernels">kernels</a><a href="#models">models</a><a href="#features">features</a>'
             '<a href="#explain">explanations</a><a href="#scans">all scans</a></nav>',
             f'<p class="note">{len(d.scans)} scans; label rule: LAA%-950 &ge; {d.laa_min_pct:g} % and MLD &lt; '
             f"{d.mld_max_hu:g} HU (whole lung, raw HU).</p>"]
    parts += _cohort_section(d, ok, report)
    parts += _models_section(d, report)
    parts += _gallery_section(d, mm, report)
    parts += _index_section(d, ok, report)
    parts.append(f'<p class="note">{len(d.scans)} scan pages written in {seconds:.1f} s.</p>')
    return "\n".join(parts)


def _cohort_section(d: C.RunData, ok: pd.DataFrame, report: Path) -> list[str]:
    here = report
    out = ['<h2 id="cohort">Cohort and exclusions</h2>', table(C.status_counts(d))]
    rules = C.exclusion_rules(d)
    if not rules.empty:
        out += ["<h3>Exclusions by QC rule</h3>", table(rules, digits=0)]
    by = C.exclusions_by_scanner(d)
    out += ["<h3>By manufacturer and kernel</h3>", table(by, digits=1)]
    if (by["excluded"] > 0).any() and by["excluded_pct"].nunique() > 1:
        out.append('<p class="warn">The QC rules exclude scanners and kernels at different rates: the cohort the '
                   "model sees is selected by scanner, not only by image quality.</p>")
    fails = C.failures(d)
    if not fails.empty:
        out += ["<h3>Failed scans</h3>", table(fails)]
    hist = C.laa_histogram_png(ok, d.laa_min_pct, report / "img" / "laa_histogram.png")
    out += ["<h3>LAA%-950</h3>", img(rel(hist, here), "LAA%-950 histogram")]
    out += ['<h2 id="tables">Summary statistics (table 1) and highest LAA% (table 2)</h2>',
            table(C.summary_table(ok), left=("label 0", "label 1", "all")), "<h3>Top 10 LAA%-950</h3>"]
    top = C.top_laa(ok).assign(scan_key=lambda t: [_scan_link(report, k, here) for k in t["scan_key"]])
    out.append(table(top, raw_html=("scan_key",)))
    a, b = C.discordant(ok, d.laa_min_pct)
    out += ['<h2 id="discordant">Discordant labels</h2>',
            f'<p>The weak label needs both LAA%-950 &ge; {d.laa_min_pct:g} % and MLD &lt; {d.mld_max_hu:g} HU. '
            "Scans over the LAA% threshold with label 0 (the MLD clause; upper-lobe emphysema in otherwise "
            "dense lungs reads like this) and the reverse:</p>",
            f"<h3>LAA%-950 &ge; {d.laa_min_pct:g} % but label 0: {len(a)}</h3>", _discordant_table(d, a, report),
            f"<h3>LAA%-950 &lt; {d.laa_min_pct:g} % but label 1: {len(b)}</h3>", _discordant_table(d, b, report),
            '<h2 id="kernels">Kernels</h2>', table(C.kernel_table(d), digits=1),
            '<p class="note">Sharp kernels raise LAA%-950 on the same lungs: compare the rows before comparing '
            "scans.</p>"]
    return out


def _discordant_table(d: C.RunData, df: pd.DataFrame, report: Path) -> str:
    if df.empty:
        return table(df)
    shown = df.head(LIST_CAP)
    t = pd.DataFrame({
        "scan_key": [_scan_link(report, k, report) for k in shown["scan_key"]],
        "laa950_pct": shown["laa950_pct"], "upper_laa950_pct": shown["upper_laa950_pct"],
        "hu_mean": shown["hu_mean"], "label": shown["label"],
        "montage": [img(rel(d.out / p, report), f"montage {k}", width=260)
                    if isinstance(p, str) and (d.out / p).exists() else ""
                    for k, p in zip(shown["scan_key"], shown["qc_montage_path"])]})
    more = f'<p class="note">{len(df) - LIST_CAP} more in the scan index.</p>' if len(df) > LIST_CAP else ""
    return table(t, raw_html=("scan_key", "montage")) + more


MODEL_ROWS = (("paper_protocol", "t-test top k + logistic regression", "balanced", "paper protocol: OPTIMISTIC"),
              ("nested_cv", "t-test top k + logistic regression", "balanced", "honest"),
              ("full_cohort.paper_protocol", "same, class weights", "full", "paper protocol: OPTIMISTIC"),
              ("full_cohort.nested_cv", "same, class weights", "full", "honest"),
              ("l1_logistic", "L1 logistic regression (C by grouped inner folds)", "balanced", "honest"),
              ("phenotypes_only", "logistic on laa950_pct, hu_mean, perc15_hu", "balanced",
               "honest (circularity check)"))


def _target_section(m: dict) -> list[str]:
    """``emphy fit --target``: embeddings vs the density baseline, each beside its shuffled control."""
    t = m.get("target")
    if not t:
        return []
    rows = []
    for name, mm in (("embeddings", t["embeddings"]), ("density phenotypes (per-third LAA%-950, Perc15, cluster D)",
                                                      t.get("density_baseline"))):
        if mm:
            c = mm.get("shuffled_control") or {}
            rows.append({"inputs": name, "accuracy [95 % CI]": ci(mm, "accuracy"),
                         "balanced accuracy": ci(mm, "balanced_accuracy"),
                         "accuracy, shuffled control": fmt(c.get("accuracy"), 3),
                         "balanced, shuffled control": fmt(c.get("balanced_accuracy"), 3)})
    conf = pd.DataFrame(t["embeddings"]["confusion"], columns=[f"predicted {c}" for c in t["classes"]])
    conf.insert(0, "true", t["classes"])
    return [f'<h3 id="target">Target: {esc(t["target"])} ({len(t["classes"])} classes, chance accuracy '
            f'{t["chance_accuracy"]:.3f})</h3>', table(pd.DataFrame(rows), left=("inputs",)),
            "<p>Confusion matrix of the embeddings model (honest, out of fold; rows: true class):</p>",
            table(conf, left=("true",)),
            '<p class="note">Multinomial logistic regression on the ANOVA-F top k channels, scaling and selection '
            "refitted inside each (grouped) training fold. Each scan's page shows which zones drove its "
            "predicted class.</p>"]


def _metric(m: dict, path: str):
    for part in path.split("."):
        m = (m or {}).get(part)
    return m


def _models_section(d: C.RunData, report: Path) -> list[str]:
    out = ['<h2 id="models">Models</h2>']
    m = d.metrics
    if m is None:
        return out + ['<p class="note">No model yet: run <code>emphy fit OUT</code>, then this report again.</p>']
    feats = m["features"]
    out.append(f"<p>Embeddings: {esc(feats['backbone'])} (weights {esc(feats['weights_sha256'][:12])}), zones "
               f"{esc(', '.join(feats['zones']))}; {feats['n_selected']} features selected by Student's t-test. "
               f"Cohort: {m['cohort']['positive']} positive, {m['cohort']['negative']} negative scans; balanced subset "
               f"{m['cohort']['balanced_subset']['n']}. Folds: {esc(m['nested_cv'].get('cv') or '')}; 95 % intervals "
               "by stratified bootstrap of scans.</p>")
    g = m.get("grouping") or {}
    out.append(f"<p><b>Grouping:</b> folds grouped by <code>{esc(g['by'])}</code> ({g['n_groups']} groups, the "
               f"largest {g['largest_group']} scans): no group is in a training fold and its test fold, inner loops "
               "included.</p>" if g.get("by") else f"<p><b>Grouping:</b> {esc(g.get('reason', 'none'))}.</p>")
    out.append(f'<p class="note">{esc(m.get("shuffled_control_note", ""))}</p>')
    out.append(real_anatomy_note())
    out.append('<p class="warn">The paper protocol selects its features with a t-test on every scan, test folds '
               "included: its figures are optimistic (on pure noise they read far above 0.5). The honest rows "
               "refit scaling, selection and model inside each training fold.</p>")
    rows = []
    for key, model, subset, kind in MODEL_ROWS:
        mm = _metric(m, key)
        if mm:
            ctrl = (mm.get("shuffled_control") or {}).get("auc")
            rows.append({"protocol": kind, "model": model, "subset": subset, "AUC [95 % CI]": ci(mm, "auc"),
                         "AUC, shuffled control": "n/a" if ctrl is None else f"{ctrl:.3f}",
                         "AP": ci(mm, "ap"), "accuracy": ci(mm, "accuracy"), "sensitivity": ci(mm, "sensitivity"),
                         "specificity": ci(mm, "specificity")})
    out.append(table(pd.DataFrame(rows), left=tuple(rows[0]) if rows else ()))
    r = m.get("ridge_laa950")
    if r:
        rc = (r.get("shuffled_control") or {}).get("r2")
        out.append(f"<p>Ridge regression of LAA%-950 on the embeddings (out of fold, full cohort, alpha by grouped "
                   f"inner folds): R&sup2; {ci(r, 'r2')} (shuffled control "
                   f"{'n/a' if rc is None else f'{rc:.3f}'}), Pearson r {ci(r, 'pearson_r')}, MAE {ci(r, 'mae')} "
                   "points.</p>")
    out += _target_section(m)
    fig = d.out / "model" / "figures"
    out.append('<div class="grid">' + "".join(
        img(rel(fig / f, report), cap, caption=cap) for f, cap in (
            ("roc.png", "ROC, both protocols"), ("pr.png", "precision-recall, both protocols"),
            ("ridge_laa950.png", "ridge: LAA%-950 out of fold")) if (fig / f).exists()) + "</div>")
    for col, bd in (m.get("breakdown") or {}).items():
        if bd:
            t = pd.DataFrame([{col: g, **v} for g, v in bd.items()])
            out += [f"<h3>Honest metrics by {esc(col)} (full cohort, out of fold)</h3>", table(t, digits=3)]
    out += ['<h2 id="features">Features</h2>']
    if d.selected is not None:
        out.append(table(d.selected, digits=3, left=("feature", "zone")))
        out.append('<p class="note">t and p on the balanced subset; coefficients of the final model on standardised '
                   "features; honest_selection_frequency = share of the cross-validation folds whose own t-test "
                   "picked the feature (low: the selection is unstable).</p>")
    out.append('<div class="grid">' + "".join(
        img(rel(fig / f, report), cap, caption=cap) for f, cap in (
            ("importance.png", "feature importance"), ("correlation.png", "correlation of the selected features "
                                                                          "and LAA%-950"),
            ("pca.png", "PCA"), ("tsne.png", "t-SNE")) if (fig / f).exists()) + "</div>")
    fc = m.get("feature_correlation") or {}
    if fc:
        out.append(f"<p class=\"note\">Selected features: median |r| between them "
                   f"{fc.get('median_abs_inter_feature_r', float('nan')):.2f}, median |r| with LAA%-950 "
                   f"{fc.get('median_abs_r_with_laa950', float('nan')):.2f}.</p>")
    return out


def _oof_full(d: C.RunData) -> pd.DataFrame | None:
    if d.oof is None:
        return None
    o = d.oof[(d.oof["model"] == "nested_cv") & (d.oof["subset"] == "full")]
    return o.set_index("scan_key")


def _gallery_section(d: C.RunData, mm, report: Path) -> list[str]:
    out = ['<h2 id="explain">Explanations</h2>']
    o = _oof_full(d)
    if o is None or mm is None:
        return out + ['<p class="note">No model: no explanations.</p>']
    p, y = o["prediction"], o["label"]
    picks = [("Most confident positives", o[(y == 1) & (p >= 0.5)].sort_values("prediction", ascending=False)
              .head(GALLERY_N)),
             ("Most confident negatives", o[(y == 0) & (p < 0.5)].sort_values("prediction").head(GALLERY_N)),
             ("Misclassified", o[(p >= 0.5) != (y == 1)].assign(conf=lambda t: (t["prediction"] - 0.5).abs())
              .sort_values("conf", ascending=False).head(GALLERY_MISSED))]
    out.append("<p>Probabilities are honest out-of-fold (full cohort); maps are the final paper model's exact "
               "contributions on each position of the zone's layer4 map, drawn on the model input.</p>")
    for title, sel in picks:
        out.append(f"<h3>{title} ({len(sel)})</h3>")
        figs = []
        for key, r in sel.iterrows():
            page_path = scan_page_path(report, key)
            stem = artifact_stem(key)
            cams = sorted((report / "maps").glob(f"{stem}_cam_*.jpg"))
            cap = f'{link(rel(page_path, report), key)}: p = {r["prediction"]:.2f}, label {int(r["label"])}'
            figs += [img(rel(c, report), f"map {key}", caption=cap) for c in cams[:1]] or [f"<p>{cap}</p>"]
        out.append('<div class="grid">' + "".join(figs) + "</div>" if figs else '<p class="note">(none)</p>')
    return out


def _index_section(d: C.RunData, ok: pd.DataFrame, report: Path) -> list[str]:
    s = d.scans.merge(ok[["scan_key", "upper_laa950_pct"]], how="left", on="scan_key")
    o = _oof_full(d)
    s["p_honest"] = s["scan_key"].map(o["prediction"]) if o is not None else np.nan
    cols = ["scan_key", "status", "qc_rule", "manufacturer", "kernel", "kernel_class", "laa950_pct",
            "upper_laa950_pct", "hu_mean", "label", "p_honest"]
    t = s[[c for c in cols if c in s]].copy()
    t["scan_key"] = [_scan_link(report, k, report) for k in t["scan_key"]]
    return [f'<h2 id="scans">All scans ({len(t)})</h2>', table(t, raw_html=("scan_key",))]
