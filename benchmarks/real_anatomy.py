"""Real anatomy, known truth: emphysema inserted into the real chests of ../shared/data, through
`emphy extract`, then evaluated leave-one-anatomy-out (issue 13, part 3).

    python benchmarks/real_anatomy.py [--work DIR] [--severities 5 10 20 30] [--seed 0] [--workers 2]
    python benchmarks/real_anatomy.py --recipe upstream --hu-source raw --subset-severities 0 10 30
    python benchmarks/real_anatomy.py --evaluate-only --restrict-severities 0 10 30   # the default run, same scans
    python benchmarks/real_anatomy.py --compare                                      # one table of every run

Steps (each skipped when its output exists, so a rerun resumes):
1. `emphy insert`: every full real chest (LIDC-IDRI-0013, LIDC-IDRI-0002, RIDER-1225316081,
   Lung_Dx-A0001 kernels B and L = 4 anatomies) x the four patterns x severities, plus each
   base unchanged (severity 0).
2. `emphy extract WORK/cohort/dicom -o WORK/RUN --job WORK/job-RUN.toml` ([qc] max_hu 4000: real
   chests hold dense bone above the paper's 1600); RUN = ``run-multiwindow-harmonized`` for the
   product's default embeddings (``--recipe``/``--hu-source`` auto), ``run`` for upstream on raw HU.
3. Evaluation on the run's tables (pandas + scikit-learn), grouped by anatomy (the hash id that
   is every variant's PatientID; the two Lung_Dx kernels are one anatomy):
   - measured LAA%-950 (the run's own masks) vs base + inserted truth, per pattern;
   - leave-one-anatomy-out ridge R^2 of LAA%-950 and logistic AUC / PR-AUC / accuracy of the
     paper's label from the embeddings (upper, middle, lower zones), every penalty chosen by
     grouped inner folds (GroupKFold over the training anatomies);
   - the same with embedding rows shuffled across scans (read one-sided: below 0.5 is the
     grouped folds' bias), and from density phenotypes only;
   - the pattern (4 classes) from embeddings vs from phenotypes that know location and size
     (per-third LAA%-950 and Perc15, whole-lung cluster D).
Results: WORK/results-RUN.json and a Markdown table on stdout (copied into benchmarks/README.md);
``--record`` also writes the run's headline figures to ``emphy_dask/report/real_anatomy.json``,
which every report quotes beside its own scores (``report/evidence.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("EMPHY_SHARED_DATA", REPO.parent / "shared" / "data"))
LUNG_DX = DATA / "lung-pet-ct-dx" / "Lung_Dx-A0001"
PAPER = {"auc": 0.939, "pr_auc": 0.935, "accuracy": 0.91}
RECORD = REPO / "emphy_dask" / "report" / "real_anatomy.json"
CS = np.logspace(-4, 1, 6)          # C > 10 on standardised 6,144 columns: no penalty left, lbfgs crawls


def bases() -> list[str]:
    series = {s.name.split("-")[0].split(".")[0]: s for s in LUNG_DX.glob("*/*") if s.is_dir()}
    return [f"LIDC-IDRI-0013={DATA / 'lidc-idri-full' / 'LIDC-IDRI-0013'}",
            f"LIDC-IDRI-0002={DATA / 'lidc-idri-full' / 'LIDC-IDRI-0002'}",
            f"RIDER-1225316081={DATA / 'rider-lung-ct' / 'RIDER-1225316081'}",
            f"Lung_Dx-A0001#L={series['2']}", f"Lung_Dx-A0001#B={series['3']}"]


JOB = """name = "real-anatomy"
description = "Inserted emphysema in real chests: paper settings but max HU 4000 (dense bone)."
[qc]
max_hu = 4000.0
max_std_hu = 600.0
clip_min_hu = -1000
clip_max_hu = 400
[resample]
spacing_mm = [1.0, 1.0, 1.0]
[segment]
name = "threshold"
[label]
laa950_min_pct = 6.0
mld_max_hu = -850.0
[embed]
backbone = "ct-i3resnet152"
precision = "bf16"
zone_pooling = "lung"
margin_mm = 10.0
batch_size = 4
save_feature_maps = {feature_maps}
hu_source = "{hu_source}"
input_recipe = "{recipe}"
[cluster]
workers = {workers}
threads_per_worker = 1
memory_limit = "5GiB"
dashboard_address = ":0"
retries = 1
gpu_workers = "auto"
[output]
part_size = 8
write_masks = true
write_qc_png = false
"""


def emphy(*args) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "emphy_dask.cli", *map(str, args)], check=True, env=env)


# ---------------------------------------------------------------- evaluation (scikit-learn)

def _grouped_search(estimator, grid, X, y, groups, scoring):
    from sklearn.model_selection import GridSearchCV, GroupKFold

    n_inner = min(3, len(np.unique(groups)))
    if n_inner < 2:          # one training anatomy: no grouped inner fold exists; the grid's middle penalty
        (name, values), = grid.items()
        return estimator.set_params(**{name: values[len(values) // 2]}).fit(X, y)
    return GridSearchCV(estimator, grid, cv=GroupKFold(n_splits=n_inner), scoring=scoring).fit(X, y, groups=groups)


def logo_predict(kind: str, X, y, groups, ridge=None) -> np.ndarray:
    """Out-of-anatomy predictions: outer LeaveOneGroupOut, penalty from inner GroupKFold.
    ``ridge``: a factory of another ridge pipeline (steps ``scale``, ``model``) than the product's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from emphy_dask.models.pipelines import RIDGE_ALPHAS, ridge_pipeline

    out = np.zeros(len(y)) if kind != "pattern" else np.empty(len(y), dtype=object)
    for train, test in LeaveOneGroupOut().split(X, y, groups):
        assert not set(groups[train]) & set(groups[test])       # no anatomy on both sides
        if kind == "ridge":
            est, grid, scoring = (ridge or ridge_pipeline)(), {"model__alpha": RIDGE_ALPHAS}, "r2"
        else:
            est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            grid, scoring = {"logisticregression__C": CS}, ("roc_auc" if kind == "label" else "accuracy")
        if kind == "label" and len(np.unique(y[train])) < 2:
            out[test] = float(np.mean(y[train]))
            continue
        model = _grouped_search(est, grid, X[train], y[train], groups[train], scoring)
        if kind == "ridge":
            out[test] = model.predict(X[test])
        elif kind == "label":
            out[test] = model.predict_proba(X[test])[:, 1]
        else:
            out[test] = model.predict(X[test])
    return out


def scores(kind, X, y, groups, rng) -> dict:
    from sklearn.metrics import accuracy_score, average_precision_score, r2_score, roc_auc_score

    res = {}
    if len(np.unique(groups)) < 2:
        return {"error": "fewer than 2 groups: no leave-one-group-out"}
    for name, Xi in (("", X), ("shuffled_", X[rng.permutation(len(X))])):
        p = logo_predict(kind, Xi, y, groups)
        if kind == "ridge":
            res[name + "r2"] = float(r2_score(y, p))
        elif kind == "label":
            res[name + "auc"] = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
            res[name + "pr_auc"] = float(average_precision_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
            res[name + "accuracy"] = float(accuracy_score(y, p >= 0.5))
        else:
            res[name + "accuracy"] = float(accuracy_score(y.astype(str), p.astype(str)))
    return res


def evaluate(work: Path, seed: int, group_by: str = "base_id", run_name: str = "run", severities=None) -> dict:
    from emphy_dask.models.cohort import load_cohort
    from emphy_dask.tables import read_frame

    run, truth = work / run_name, pd.read_csv(work / "cohort" / "truth.csv")
    if severities:                  # score a bigger run on a comparison subset's scans only
        truth = truth[truth["severity_aimed_pct"].isin(list(severities))]
    scans = read_frame(run, "scans")
    ok = scans[scans["status"] == "ok"].merge(truth, on="scan_key", how="inner")
    res = {"n_variants": int(len(truth)), "n_ok": int(len(ok)),
           "status": scans["status"].value_counts().to_dict()}
    ok["laa_error_pts"] = ok["laa950_pct"] - ok["expected_laa950_pct"]
    res["laa_vs_truth"] = (ok.groupby("pattern")["laa_error_pts"]
                           .agg(n="size", mean="mean", max_abs=lambda e: float(np.abs(e).max())).round(3)
                           .reset_index().to_dict("records"))
    res["laa_vs_truth_by_base"] = (ok.groupby("base_key")["laa_error_pts"]
                                   .agg(mean="mean", max_abs=lambda e: float(np.abs(e).max())).round(3)
                                   .reset_index().to_dict("records"))
    res["lung_volume_run_vs_base_pct"] = float(((ok["lung_volume_l_x"] / ok["lung_volume_l_y"] - 1) * 100)
                                              .abs().max())
    c = load_cohort(run, ("upper", "middle", "lower"))
    frame = pd.DataFrame({"scan_key": c.keys}).merge(truth, on="scan_key", how="left")
    keep = frame["base_id"].notna().to_numpy()
    X, groups = c.X[keep], frame[group_by].to_numpy()[keep]
    fr = frame[keep].reset_index(drop=True)
    # Phenotypes that know location and size: per-third LAA%-950 and Perc15, whole-lung cluster D.
    ph = read_frame(run, "phenotypes")
    ph = ph[ph["hu_source"] == "raw"]
    wide = ph.pivot_table(index="scan_key", columns="region", values=["laa950_pct", "perc15_hu", "hu_mean"])
    wide.columns = [f"{r}:{v}" for v, r in wide.columns]
    cols = [f"{t}Third:{v}" for t in ("Upper", "Middle", "Lower") for v in ("laa950_pct", "perc15_hu")]
    cols += ["WholeLung:hu_mean"]
    P = (fr[["scan_key"]].merge(wide[cols].reset_index(), on="scan_key", how="left")
         .merge(scans[["scan_key", "cluster_d", "laa950_pct", "label"]], on="scan_key", how="left"))
    P["cluster_d"] = P["cluster_d"].fillna(P["cluster_d"].median())
    Xp = P[cols + ["cluster_d"]].to_numpy(float)
    y_laa, y_label = P["laa950_pct"].to_numpy(float), P["label"].to_numpy(int)
    rng = np.random.default_rng(seed)
    res["group_by"], res["n_model"], res["n_groups"] = group_by, int(len(fr)), int(len(np.unique(groups)))
    res["label_counts"] = {str(k): int(v) for k, v in zip(*np.unique(y_label, return_counts=True))}
    res["embeddings"] = {**scores("ridge", X, y_laa, groups, rng), **scores("label", X, y_label, groups, rng)}
    res["phenotypes"] = {**scores("ridge", Xp, y_laa, groups, rng), **scores("label", Xp, y_label, groups, rng)}
    pat = fr["pattern"].to_numpy() != "none"
    y_pat = fr["pattern"].to_numpy()[pat]
    res["pattern_embeddings"] = scores("pattern", X[pat], y_pat, groups[pat], rng)
    res["pattern_phenotypes"] = scores("pattern", Xp[pat], y_pat, groups[pat], rng)
    res["paper"] = PAPER
    return res


def markdown(res: dict) -> str:
    lines = ["| pattern | n | measured - truth LAA%-950, mean (points) | max abs |", "|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['n']} | {r['mean']:+.2f} | {r['max_abs']:.2f} |" for r in res["laa_vs_truth"]]
    e, p = res["embeddings"], res["phenotypes"]
    if "error" in e:
        return "\n".join(lines + ["", f"models: {e['error']}"])
    lines += ["", "| leave-one-anatomy-out | R² LAA%-950 | AUC label | PR-AUC | accuracy | pattern accuracy (4 classes) |",
              "|---|---|---|---|---|---|",
              f"| embeddings (3 zones) | {e['r2']:.2f} | {e['auc']:.3f} | {e['pr_auc']:.3f} | {e['accuracy']:.2f} | "
              f"{res['pattern_embeddings']['accuracy']:.2f} |",
              f"| embeddings shuffled across scans | {e['shuffled_r2']:.2f} | {e['shuffled_auc']:.3f} | "
              f"{e['shuffled_pr_auc']:.3f} | {e['shuffled_accuracy']:.2f} | "
              f"{res['pattern_embeddings']['shuffled_accuracy']:.2f} |",
              f"| phenotypes (per-third LAA%, Perc15, MLD, D) | {p['r2']:.2f} | {p['auc']:.3f} | {p['pr_auc']:.3f} | "
              f"{p['accuracy']:.2f} | {res['pattern_phenotypes']['accuracy']:.2f} |",
              f"| paper (its own protocol, LIDC-IDRI) | - | {PAPER['auc']} | {PAPER['pr_auc']} | {PAPER['accuracy']} | - |"]
    return "\n".join(lines)


def record_of(res: dict, date: str) -> dict:
    """The shipped record (``report/evidence.RECORD_KEYS``) of a full run's results."""
    e, pe, pp = res["embeddings"], res["pattern_embeddings"], res["pattern_phenotypes"]
    return {"date": date, "n_scans": res["n_model"], "n_anatomies": res["n_groups"],
            "recipe": res["recipe"], "hu_source": res["hu_source"],
            "r2_laa950": round(e["r2"], 2), "r2_laa950_shuffled": round(e["shuffled_r2"], 2),
            "auc_label": round(e["auc"], 3), "auc_label_shuffled": round(e["shuffled_auc"], 3),
            "pattern_accuracy": round(pe["accuracy"], 2), "pattern_accuracy_shuffled": round(pe["shuffled_accuracy"], 2),
            "pattern_accuracy_phenotypes": round(pp["accuracy"], 2),
            "laa950_max_error_pts": round(max(r["max_abs"] for r in res["laa_vs_truth"]), 2)}


def subset_links(work: Path, severities) -> Path:
    """A folder of links to the cohort's variants of ``severities`` (the walk follows linked folders)."""
    truth = pd.read_csv(work / "cohort" / "truth.csv")
    keep = truth[truth["severity_aimed_pct"].isin(list(severities))]["scan_key"]
    folder = work / ("sub-" + "-".join(f"{v:g}" for v in severities)) / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    for key in keep:
        link = folder / key
        if not link.exists():
            link.symlink_to(work / "cohort" / "dicom" / key, target_is_directory=True)
    return folder


def fit_summary(m: dict) -> dict:
    """The scores of ``emphy fit``'s metrics.json that the tables below quote (NaN where absent)."""
    out = {}
    for name, path in {"auc": ("full_cohort", "nested_cv", "auc"),
                       "shuffled_auc": ("full_cohort", "nested_cv", "shuffled_control", "auc"),
                       "ridge_r2": ("ridge_laa950", "r2"), "shuffled_ridge_r2": ("ridge_laa950", "shuffled_control", "r2"),
                       "pattern_accuracy": ("target", "embeddings", "accuracy"),
                       "shuffled_pattern_accuracy": ("target", "embeddings", "shuffled_control", "accuracy"),
                       "pattern_density_accuracy": ("target", "density_baseline", "accuracy"),
                       "phenotypes_auc": ("phenotypes_only", "auc")}.items():
        cur = m
        for k in path:
            cur = cur.get(k) if isinstance(cur, dict) else None
        out[name] = float(cur) if isinstance(cur, (int, float)) else float("nan")
    out["grouping"] = m.get("grouping")
    return out


def compare(work: Path) -> str:
    """One row per evaluated run (input recipe x HU source) of ``WORK/results-*.json``."""
    lines = ["| recipe | HU | scans | R² LAA%-950 (shuffled) | AUC label (shuffled) | PR-AUC | accuracy | "
             "pattern accuracy (shuffled) | `emphy fit` AUC (shuffled) | pattern, `emphy fit` |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(work.glob("results-*.json")):
        r = json.loads(f.read_text())
        e, pe, fit = r["embeddings"], r["pattern_embeddings"], r.get("emphy_fit") or {}
        lines.append(f"| {r.get('recipe', 'upstream')} | {r.get('hu_source', 'raw')} | {r['n_model']} | {e['r2']:.2f} ({e['shuffled_r2']:.2f}) | "
                     f"{e['auc']:.3f} ({e['shuffled_auc']:.3f}) | {e['pr_auc']:.3f} | {e['accuracy']:.2f} | "
                     f"{pe['accuracy']:.2f} ({pe['shuffled_accuracy']:.2f}) | "
                     + (f"{fit['auc']:.3f} ({fit['shuffled_auc']:.3f}) | {fit['pattern_accuracy']:.2f} |" if fit
                        else "- | - |"))          # --no-fit runs
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/emphy-real-anatomy")
    ap.add_argument("--severities", nargs="+", type=float, default=[5.0, 10.0, 20.0, 30.0])
    ap.add_argument("--recipe", default="auto",
                    help="[embed].input_recipe of this run (auto = the product's default, upstream, lung, multiwindow, laamap)")
    ap.add_argument("--hu-source", default="auto", choices=("auto", "raw", "harmonized"),
                    help="[embed].hu_source of this run (auto = the product's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--group-by", default="base_id", help="truth column of the folds (base_id = anatomy)")
    ap.add_argument("--subset-severities", nargs="+", type=float,
                    help="extract only the variants of these severities (a folder of links to them): "
                         "cheaper recipe comparisons; the run's name gets '-sub'")
    ap.add_argument("--feature-maps", action="store_true",
                    help="[embed].save_feature_maps: keep layer4 maps to compare poolings offline")
    ap.add_argument("--restrict-severities", nargs="+", type=float,
                    help="with --evaluate-only: score only these severities' variants (compare a full run with "
                         "a --subset-severities one); no emphy fit")
    ap.add_argument("--no-fit", action="store_true", help="skip `emphy fit` on the run (recipe comparisons)")
    ap.add_argument("--record", action="store_true",
                    help=f"write this full run's headline figures to {RECORD.relative_to(REPO)} (the reports quote them)")
    ap.add_argument("--compare", action="store_true", help="print one table of every evaluated run in WORK")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate the run as it stands (e.g. a partial one)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.compare:
        print(compare(work))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.perf_counter()
    if not (work / "cohort" / "truth.csv").exists() and not a.evaluate_only:
        emphy("insert", "--base", *bases(), "-o", work / "cohort", "--severities", 0, *a.severities,
              "--seed", a.seed)
    t["insert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from emphy_dask.job.config import EmbedSettings

    embed = EmbedSettings(input_recipe=a.recipe, hu_source=a.hu_source)      # "auto" resolved as the product does
    a.recipe, a.hu_source = embed.input_recipe, embed.hu_source
    # WORK/run: the first benchmark's recipe (upstream on raw HU); other recipes get their own folder
    run_name = "run" if (a.recipe, a.hu_source) == ("upstream", "raw") else f"run-{a.recipe}-{a.hu_source}"
    dicom = work / "cohort" / "dicom"
    if a.subset_severities:
        run_name += "-sub"
        dicom = subset_links(work, a.subset_severities)
    job = work / f"job-{run_name}.toml"
    job.write_text(JOB.format(workers=a.workers, recipe=a.recipe, hu_source=a.hu_source,
                              feature_maps=str(a.feature_maps).lower()))
    if not a.evaluate_only:
        emphy("extract", dicom, "-o", work / run_name, "--job", job, "--no-progress")
    t["extract_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(work, a.seed, a.group_by, run_name, a.restrict_severities)
    res["recipe"], res["hu_source"] = a.recipe, a.hu_source
    t["evaluate_s"] = time.perf_counter() - t0
    if a.restrict_severities:
        res["restricted_to"] = a.restrict_severities
        run_name += "-restricted"
        (work / f"results-{run_name}.json").write_text(json.dumps(res, indent=1, default=str))
        print(markdown(res))
        return 0
    # The product's own protocol on the same run: `emphy fit` grouped by anatomy, the pattern as target.
    t0 = time.perf_counter()
    if not a.no_fit:
        emphy("fit", work / run_name, "--features", "zones", "--group-by", a.group_by,
              "--covariates", work / "cohort" / "truth.csv", "--target", "pattern", "--seed", a.seed)
        res["emphy_fit"] = fit_summary(json.loads((work / run_name / "model" / "metrics.json").read_text()))
    t["fit_s"] = time.perf_counter() - t0
    res["wall_s"] = {k: round(v, 1) for k, v in t.items()}
    truth = pd.read_csv(work / "cohort" / "truth.csv")
    res["t_insert_s"] = {"median": float(truth["t_insert_s"].median()), "max": float(truth["t_insert_s"].max())}
    (work / f"results-{run_name}.json").write_text(json.dumps(res, indent=1, default=str))
    if a.record:
        if a.subset_severities:
            raise SystemExit("--record takes a full run, not a --subset-severities one")
        RECORD.write_text(json.dumps(record_of(res, time.strftime("%Y-%m-%d")), indent=1) + "\n")
    print(json.dumps(res, indent=1, default=str))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
