"""``emphy track OUT``: a run's tables in, ``longitudinal/`` and ``track/`` (summary, figures,
an HTML page) out. The computation is ``longitudinal.longitudinal_table``; this module reads
and writes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from ..jsonsafe import json_safe
from ..report.html import esc, img, page, rel, table
from ..tables import read_table, write_frame
from . import figures
from .adjust import pd15_g_l, sponge_adjust
from .longitudinal import LAA950_REPEATABILITY_PCT, PD15_REPEATABILITY_FRACTION, longitudinal_table

#: Per-patient trajectory plots drawn (the fastest decliners first): a page, not a flood.
MAX_TRAJECTORIES = 24
FASTEST_N = 10
_SCANS = ["scan_key", "status", "study_date_shifted", "kernel", "kernel_class", "tube_current_ma", "kvp",
          "slice_thickness_mm"]


class TrackError(ValueError):
    """The run cannot be tracked (no scans table, no patient column)."""


def load_inputs(out_dir, by: str = "patient") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(scans, phenotypes, embeddings by zone) of a run, with ``patient_key`` set from ``by``."""
    out = Path(out_dir)
    if not (out / "scans").is_dir():
        raise TrackError(f"{out}: not an extract run (no scans/ table)")
    column = "patient_key" if by == "patient" else by
    scans = read_table(out, "scans").to_pandas()
    if column not in scans.columns:
        raise TrackError(f"{out}: scans/ has no column {column!r} (runs made before patient keys existed need "
                         "`emphy extract ... --overwrite`)")
    scans = scans[_SCANS + ([column] if column not in _SCANS else [])].rename(columns={column: "patient_key"})
    pheno = read_table(out, "phenotypes", columns=["scan_key", "region", "hu_source", "laa950_pct", "perc15_hu",
                                                   "hu_mean", "volume_l"]).to_pandas()
    return scans, pheno, _embeddings(out, set(scans.loc[scans["status"] == "ok", "scan_key"]))


def _embeddings(out: Path, keys: set) -> dict:
    """{zone: {scan_key: vector}} of the run's one backbone (none when several or none)."""
    t = read_table(out, "embeddings", columns=["scan_key", "backbone", "weights_sha256", "zone", "embedding"])
    if t.num_rows == 0:
        return {}
    meta = t.select(["backbone", "weights_sha256"]).to_pandas().drop_duplicates()
    if len(meta) != 1:
        return {}
    df = t.select(["scan_key", "zone"]).to_pandas()
    emb = t.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
    out_: dict = {}
    for i, (k, z) in enumerate(zip(df["scan_key"], df["zone"])):
        if k in keys:
            out_.setdefault(z, {})[k] = vectors[i]
    return out_


def track_run(out_dir, track_dir=None, *, by: str = "patient", reference="first", figures_on: bool = True) -> dict:
    """Track a run's patients; write ``<track_dir>/longitudinal/`` and ``<track_dir>/track/``.

    ``track_dir`` defaults to the run's OUT. Returns the summary (also ``track/track.json``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    dest = Path(track_dir) if track_dir is not None else out
    scans, pheno, emb = load_inputs(out, by)
    frame, summary = longitudinal_table(scans, pheno, reference=reference, embeddings=emb)
    write_frame("longitudinal", frame, dest, "0")
    tdir = dest / "track"
    tdir.mkdir(parents=True, exist_ok=True)
    summary.update(run=str(out), by=by, seconds=round(time.perf_counter() - t0, 2),
                   repeatability={"pd15_fraction": PD15_REPEATABILITY_FRACTION,
                                  "laa950_points": LAA950_REPEATABILITY_PCT})
    summary["fastest"] = _fastest(frame).to_dict("records")
    if figures_on:
        _page(frame, scans, pheno, summary, tdir)
    (tdir / "track.json").write_text(json.dumps(json_safe(summary), indent=1))
    return summary


def _fastest(frame: pd.DataFrame) -> pd.DataFrame:
    whole = frame[(frame["region"] == "WholeLung") & (frame["pair_kind"] == "interval")]
    per = whole.groupby("patient_key", observed=True).agg(pairs=("scan_key_from", "size"),
                                                          days=("interval_days", "sum"),
                                                          pd15_change_g_l=("pd15_sponge_change_g_l", "sum"),
                                                          laa950_change_pct=("laa950_change_pct", "sum"))
    per["years"] = per.pop("days") / 365.25
    per = per[per["years"] > 0]
    per["pd15_rate_g_l_per_year"] = per["pd15_change_g_l"] / per["years"]
    return per.sort_values("pd15_rate_g_l_per_year").head(FASTEST_N).reset_index().astype({"patient_key": str})


def _page(frame: pd.DataFrame, scans: pd.DataFrame, pheno: pd.DataFrame, summary: dict, tdir: Path) -> None:
    img_dir = tdir / "img"
    whole = frame[(frame["region"] == "WholeLung") & (frame["pair_kind"] == "interval")]
    parts = ["<h1>emphy track</h1>",
             f"<p>{summary['patients']} patients, {summary['pairs']} pairs of scans "
             f"({summary['same_day_pairs']} on the same day), {len(summary['scans_left_out'])} scans left out.</p>"]
    if len(whole):
        figures.decline_png(whole["pd15_sponge_rate_g_l_per_year"].to_numpy(float),
                            whole["perc15_rate_hu_per_year"].to_numpy(float), img_dir / "decline.png")
        parts += ["<h2>Annual decline (whole lung)</h2>", img(rel(img_dir / "decline.png", tdir), "decline")]
    fastest = pd.DataFrame(summary["fastest"])
    if len(fastest):
        parts += ["<h2>Fastest decliners (volume-adjusted PD15)</h2>", table(fastest, left=("patient_key",))]
    placed = scans[scans["status"] == "ok"].merge(
        pheno[(pheno["region"] == "WholeLung") & (pheno["hu_source"] == "raw")], on="scan_key")
    placed["years"] = pd.to_datetime(placed["study_date_shifted"], errors="coerce")
    shown = list(fastest["patient_key"]) if len(fastest) else []
    shown += [p for p in whole["patient_key"].unique() if p not in shown]
    parts.append("<h2>Trajectories</h2>")
    for i, patient in enumerate(shown[:MAX_TRAJECTORIES]):
        pts = placed[placed["patient_key"] == patient].dropna(subset=["years"]).sort_values("years")
        pts = pts.assign(years=(pts["years"] - pts["years"].min()).dt.days / 365.25,
                         pd15_g_l=pd15_g_l(pts["perc15_hu"]),
                         pd15_adjusted_g_l=sponge_adjust(pd15_g_l(pts["perc15_hu"]), pts["volume_l"],
                                                         pts["volume_l"].iloc[0]))
        png = figures.trajectory_png(pts, img_dir / f"patient-{i:03d}.png", f"patient {patient}")
        parts.append(img(rel(png, tdir), f"patient {patient}", caption=esc(str(patient))))
    left = pd.DataFrame(summary["scans_left_out"])
    if len(left):
        parts += ["<h2>Scans left out</h2>", table(left, left=("scan_key", "reason"))]
    (tdir / "index.html").write_text(page("emphy track", "\n".join(parts)))

