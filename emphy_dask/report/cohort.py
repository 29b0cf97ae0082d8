"""The report's cohort tables (from the run's Parquet tables): counts, exclusions by scanner,
the paper's tables 1 and 2, discordant labels, kernels, LAA% histogram."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..tables import arrow_schema, read_frame, read_table


@dataclass
class RunData:
    """What the report reads once: scans (all statuses), WholeLung/UpperThird raw phenotypes,
    embedding rows (no vectors), the label rule, and the model artifacts when ``emphy fit`` ran."""

    out: Path
    scans: pd.DataFrame
    regions: pd.DataFrame          # scan_key x region (raw HU) -> laa950_pct, hu_mean, perc15_hu, volume_l
    inputs: pd.DataFrame           # embeddings rows without the vectors
    laa_min_pct: float
    mld_max_hu: float
    metrics: dict | None
    selected: pd.DataFrame | None
    oof: pd.DataFrame | None
    target: pd.DataFrame | None = None     # emphy fit --target: per scan, predicted class and zone contributions


def anatomical_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by scan, then region in anatomical order: WholeLung, RightLung, LeftLung, the
    thirds apex to base, the per-lung thirds (right, then left), then the lobes; any other region
    name last, alphabetically."""
    from ..phenotypes.labelmaps import LOBES
    from ..phenotypes.regions import REGIONS

    rank = {name: i for i, name in enumerate((*REGIONS, *LOBES))}
    key = df["region"].map(lambda r: (rank.get(r, len(rank)), r))
    return (df.assign(_order=key).sort_values(["scan_key", "_order"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def load_run(out_dir) -> RunData:
    out = Path(out_dir)
    if not (out / "scans").is_dir():
        raise FileNotFoundError(f"{out}: not an extract run (no scans/ table)")
    scans = read_frame(out, "scans")
    ph = read_frame(out, "phenotypes")
    if "hu_source" in ph.columns:
        ph = ph[ph["hu_source"].fillna("raw") == "raw"]
    regions = anatomical_order(ph[["scan_key", "region", "laa950_pct", "hu_mean", "perc15_hu", "volume_l"]])
    cols = [c for c in arrow_schema("embeddings").names if c != "embedding"]     # the vectors stay on disk
    inputs = read_table(out, "embeddings", columns=cols).to_pandas()
    laa_min, mld_max = 6.0, -850.0
    run_json = out / "run.json"
    if run_json.exists():
        label = json.loads(run_json.read_text()).get("config", {}).get("label", {})
        laa_min, mld_max = float(label.get("laa950_min_pct", laa_min)), float(label.get("mld_max_hu", mld_max))
    mdir = out / "model"
    metrics = json.loads((mdir / "metrics.json").read_text()) if (mdir / "metrics.json").exists() else None
    sel = pd.read_parquet(mdir / "selected_features.parquet") if metrics else None
    oof = pd.read_parquet(mdir / "oof_predictions.parquet") if metrics else None
    target = (pd.read_parquet(mdir / "target_predictions.parquet")
              if metrics and (mdir / "target_predictions.parquet").exists() else None)
    return RunData(out, scans, regions, inputs, laa_min, mld_max, metrics, sel, oof, target)


def status_counts(d: RunData) -> pd.DataFrame:
    s = d.scans["status"].value_counts()
    return pd.DataFrame({"status": s.index.astype(str), "scans": s.to_numpy()})


def _group_cols(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in ("manufacturer", "kernel", "kernel_class"):
        out[c] = out[c].fillna("(unknown)").astype(str) if c in out else "(unknown)"
    return out


def exclusions_by_scanner(d: RunData) -> pd.DataFrame:
    """Status counts per manufacturer x kernel, with the QC rules that excluded: a rule that
    excludes by scanner is a selection bias."""
    s = _group_cols(d.scans)
    s["rule"] = s["qc_rule"].fillna("")
    tab = s.pivot_table(index=["manufacturer", "kernel", "kernel_class"], columns="status", values="scan_key",
                        aggfunc="count", fill_value=0)
    for col in ("ok", "excluded", "failed"):
        if col not in tab:
            tab[col] = 0
    tab = tab[["ok", "excluded", "failed"]]
    tab["excluded_pct"] = 100.0 * tab["excluded"] / tab.sum(axis=1)
    rules = (s[s["status"] == "excluded"].groupby(["manufacturer", "kernel", "kernel_class"])["rule"]
             .agg(lambda r: ", ".join(f"{k} x{v}" for k, v in r.value_counts().items())))
    tab["rules"] = rules.reindex(tab.index).fillna("")
    return tab.reset_index()


def exclusion_rules(d: RunData) -> pd.DataFrame:
    """Per QC rule: scans excluded and the range of their values."""
    ex = d.scans[d.scans["status"] == "excluded"]
    if ex.empty:
        return pd.DataFrame()
    return (ex.groupby(ex["qc_rule"].fillna("(none)"))
            .agg(scans=("scan_key", "count"), max_hu_min=("qc_max_hu", "min"), max_hu_max=("qc_max_hu", "max"),
                 std_hu_min=("qc_std_hu", "min"), std_hu_max=("qc_std_hu", "max"))
            .reset_index().rename(columns={"qc_rule": "rule"}))


def failures(d: RunData) -> pd.DataFrame:
    f = d.scans[d.scans["status"] == "failed"]
    if f.empty:
        return pd.DataFrame()
    return (f.groupby([f["error_stage"].fillna(""), f["reason"].fillna("").str.slice(0, 120)])["scan_key"]
            .count().reset_index().rename(columns={"error_stage": "stage", "scan_key": "scans"}))


def ok_scans(d: RunData) -> pd.DataFrame:
    """Ok scans with the upper-third LAA% and perc15 joined."""
    ok = d.scans[d.scans["status"] == "ok"]
    r = d.regions.drop_duplicates(["scan_key", "region"])
    up = r[r["region"] == "UpperThird"][["scan_key", "laa950_pct"]].rename(columns={"laa950_pct": "upper_laa950_pct"})
    whole = r[r["region"] == "WholeLung"][["scan_key", "perc15_hu"]]
    return ok.merge(up, how="left", on="scan_key").merge(whole, how="left", on="scan_key")


SUMMARY = (("laa950_pct", "LAA%-950 (%)"), ("hu_mean", "MLD (HU)"), ("perc15_hu", "Perc15 (HU)"),
           ("lung_volume_l", "lung volume (L)"), ("cluster_d", "cluster exponent D"))


def summary_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Table 1: mean +- SD and median [IQR] of the density figures, by label and overall."""
    groups = [("label 0", ok[ok["label"] == 0]), ("label 1", ok[ok["label"] == 1]), ("all", ok)]
    rows = []
    for col, name in SUMMARY:
        row = {"measure": name}
        for gname, g in groups:
            v = g[col].dropna().to_numpy(float) if col in g else np.array([])
            row[gname] = (f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}; "
                          f"{np.median(v):.1f} [{np.percentile(v, 25):.1f}, {np.percentile(v, 75):.1f}]"
                          if len(v) else "")
        rows.append(row)
    rows.append({"measure": "scans", **{g: str(len(df)) for g, df in groups}})
    return pd.DataFrame(rows)


def top_laa(ok: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """Table 2: the n scans with the highest whole-lung LAA%-950."""
    cols = ["scan_key", "laa950_pct", "upper_laa950_pct", "hu_mean", "perc15_hu", "label", "manufacturer",
            "kernel"]
    return ok.sort_values("laa950_pct", ascending=False).head(n)[cols]


def discordant(ok: pd.DataFrame, laa_min: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(LAA% >= threshold but label 0 (the MLD clause), LAA% < threshold but label 1)."""
    a = ok[(ok["laa950_pct"] >= laa_min) & (ok["label"] == 0)]
    b = ok[(ok["laa950_pct"] < laa_min) & (ok["label"] == 1)]
    key = "upper_laa950_pct"
    return a.sort_values(key, ascending=False), b.sort_values(key, ascending=False)


def kernel_table(d: RunData) -> pd.DataFrame:
    s = _group_cols(d.scans)
    s["is_ok"] = s["status"] == "ok"
    okv = s[s["is_ok"]]
    g = s.groupby(["manufacturer", "kernel", "kernel_class"])
    out = g.agg(scans=("scan_key", "count"), ok=("is_ok", "sum")).reset_index()
    stats = okv.groupby(["manufacturer", "kernel", "kernel_class"]).agg(
        laa950_pct_mean=("laa950_pct", "mean"), mld_hu_mean=("hu_mean", "mean"),
        label1_pct=("label", lambda v: 100.0 * np.nanmean(v.astype(float)))).reset_index()
    return out.merge(stats, how="left", on=["manufacturer", "kernel", "kernel_class"])


def laa_histogram_png(ok: pd.DataFrame, laa_min: float, path) -> Path:
    """Histogram of whole-lung LAA%-950 by label with the label threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    v = ok["laa950_pct"].dropna()
    bins = np.linspace(0, max(float(v.max()) if len(v) else 1.0, laa_min) * 1.05, 30)
    for lab, colour in ((0, "#2b83ba"), (1, "#d7191c")):
        ax.hist(ok.loc[ok["label"] == lab, "laa950_pct"].dropna(), bins=bins, alpha=0.65, color=colour,
                label=f"label {lab}")
    ax.axvline(laa_min, color="black", linestyle="--", linewidth=1, label=f"{laa_min:g} % threshold")
    ax.set_xlabel("whole-lung LAA%-950 (%)")
    ax.set_ylabel("scans")
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
