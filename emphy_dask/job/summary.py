"""What a run excluded and why, in words a user notices: per QC rule, how many scans, the range
of their values and the job key that changes the rule; a plain warning when a rule removes
more than half of the scans (the paper's literal max-HU rule does that to most clinical CT).

Read from the run's ``scans/`` table, so it covers every scan of OUT (resumed ones included).
Used by ``emphy extract``'s end-of-run summary and ``run.json``.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..tables import read_table
from .manifest import MANIFEST_FILE, PASSED_OVER

#: QC rule name (prefix of ``scans.qc_rule``, e.g. "max_hu>1600") -> (job key, scans column, what).
QC_RULES = {
    "max_hu": ("[qc].max_hu", "qc_max_hu", "max HU"),
    "std_hu": ("[qc].max_std_hu", "qc_std_hu", "HU std"),
    "empty_fov": (None, None, "voxels in the field of view"),
}
#: A rule excluding more than this fraction of the scans gets a warning.
WARN_FRACTION = 0.5

_WHY = {
    "max_hu": "dense cortical bone, calcifications and metal reach 2000-3071 HU in most clinical chest CT, "
              "so the paper's limit removes scans that are fine for lung measurements",
    "std_hu": "a large HU spread usually means metal or streak artefacts; check a few of these scans",
}


def exclusion_report(out_dir) -> dict:
    """Exclusions of the run in ``out_dir`` per QC rule.

    Returns
    -------
    dict
        ``n_scans`` (rows in scans/), ``n_excluded``, ``rules``: one dict per rule that
        excluded anything (``rule``, ``n_excluded``, ``fraction``, ``value_column``,
        ``value_min``, ``value_max``, ``job_key``), ``warnings`` (list of str), and
        ``skipped_files`` (``n`` and ``examples``: files of the manifest that are not scans).
    """
    t = read_table(Path(out_dir), "scans", columns=["status", "qc_rule", "qc_max_hu", "qc_std_hu"]).to_pylist()
    n = len(t)
    excluded = [r for r in t if r["status"] == "excluded"]
    by_rule: dict[str, list] = {}
    for r in excluded:
        by_rule.setdefault(r["qc_rule"] or "unknown", []).append(r)
    rules, warnings = [], []
    for rule, rows in sorted(by_rule.items(), key=lambda kv: -len(kv[1])):
        name = rule.split(">")[0]
        job_key, column, what = QC_RULES.get(name, (None, None, rule))
        values = [r[column] for r in rows if column and r.get(column) is not None
                  and not math.isnan(r[column])]
        entry = {"rule": rule, "n_excluded": len(rows), "fraction": round(len(rows) / n, 4) if n else None,
                 "value_column": column, "value_min": min(values) if values else None,
                 "value_max": max(values) if values else None, "job_key": job_key}
        rules.append(entry)
        if n and len(rows) > WARN_FRACTION * n:
            hint = _set_hint(name, entry["value_max"])
            msg = (f"QC rule {rule} excluded {len(rows)} of {n} scans ({100 * len(rows) / n:.0f} %)"
                   + (f"; {_WHY[name]}" if name in _WHY else "")
                   + (f"; to keep them rerun with {hint} --overwrite (or into a new OUT), or set {job_key} "
                      "in your job file" if hint else f"; set {job_key} in your job file (--job) to keep them"
                      if job_key else ""))
            warnings.append(msg)
    return {"n_scans": n, "n_excluded": len(excluded), "rules": rules, "warnings": warnings,
            "skipped_files": _skipped_files(Path(out_dir))}


def _set_hint(rule: str, value_max) -> str | None:
    """The exact ``--set`` that keeps the scans a max-HU rule excluded: 3072 (one above the
    12-bit CT ceiling, 3071 HU) or just above the largest value seen."""
    if rule != "max_hu":
        return None
    limit = 3072 if value_max is None or value_max < 3072 else int(math.floor(value_max)) + 1
    return f"--set qc.max_hu={limit}"


def _skipped_files(out_dir: Path, at_most: int = 20) -> dict:
    """Manifest rows of kind ``skipped``: files that are not scans (label maps) and what the folder walk
    passed over (link loops, unreadable folders, dangling links): counts and the first few of each with the reason."""
    import pyarrow.parquet as pq

    from ..io import storage

    path = out_dir / MANIFEST_FILE
    if not storage.exists(path):
        return {"n": 0, "examples": []}
    filesystem, where = storage.arrow_filesystem(path)       # a local path or an object-store URL
    rows = [r for r in pq.read_table(where, columns=["scan_key", "kind", "error"], filesystem=filesystem).to_pylist()
            if r["kind"] == "skipped"]
    walk, files = [], []
    for r in rows:
        (walk if (r["error"] or "").startswith(PASSED_OVER) else files).append(r)
    return {"n": len(rows), "n_passed_over": len(walk),
            "examples": [{"scan_key": r["scan_key"], "reason": r["error"]} for r in files[:at_most] + walk[:at_most]]}


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def exclusion_lines(report: dict) -> tuple[list[str], list[str]]:
    """(lines for stdout, warnings for stderr) of :func:`exclusion_report`'s result."""
    lines = []
    for r in report["rules"]:
        what = QC_RULES.get(r["rule"].split(">")[0], (None, None, "value"))[2]
        values = (f", {what} {_fmt(r['value_min'])}-{_fmt(r['value_max'])}"
                  if r["value_min"] is not None else "")
        hint = _set_hint(r["rule"].split(">")[0], r["value_max"])
        change = (f"; change with {r['job_key']}" + (f" (e.g. {hint})" if hint else "")) if r["job_key"] else ""
        lines.append(f"  excluded by {r['rule']}: {r['n_excluded']} of {report['n_scans']} scans{values}{change}")
    skipped = report.get("skipped_files") or {"n": 0}
    walk = [e for e in skipped.get("examples", []) if (e["reason"] or "").startswith(PASSED_OVER)]
    files = [e for e in skipped.get("examples", []) if e not in walk]
    n_walk = skipped.get("n_passed_over", 0)
    if skipped["n"] - n_walk:
        first = files[0] if files else {"scan_key": "?", "reason": "?"}
        lines.append(f"  not scans, skipped: {skipped['n'] - n_walk} file(s), e.g. {first['scan_key']}: {first['reason']} "
                     "(all in manifest.parquet, kind = skipped)")
    if n_walk:
        lines.append(f"  passed over by the folder walk: {n_walk}, "
                     + "; ".join(f"{e['scan_key']}: {e['reason'][len(PASSED_OVER):].strip()}" for e in walk[:3])
                     + (" ..." if n_walk > 3 else "") + " (all in manifest.parquet, kind = skipped)")
    return lines, [f"warning: {w}" for w in report["warnings"]]


#: Scans flagged in ``scans/`` that a user should know about: column, test, what, and what to do.
FLAGS = (
    ("kernel_class", lambda v: v in ("sharp", "very_sharp"), "sharp-kernel scans",
     "LAA% reads high on sharp kernels; harmonise them with [harmonize] enabled = true "
     "(--set harmonize.enabled=true)"),
    ("multi_kernel", lambda v: bool(v), "multi-kernel studies",
     "one reconstruction was picked (ties go to the softer kernel; scans.not_picked lists the others); "
     "[harmonize] enabled = true makes kernels comparable"),
    ("fov_truncated", lambda v: bool(v), "FOV-truncated scans",
     "part of the lung lies outside the image: volumes and LAA% undercount; no job key restores it, "
     "leave them out of analyses (scans.fov_truncated)"),
)
#: Runs of at most this many scans get one line of headline values per scan.
HEADLINE_MAX_SCANS = 20


def end_of_run_lines(out_dir, config=None) -> tuple[list[str], list[str]]:
    """Everything the end of ``emphy extract`` tells: exclusions per rule, flagged scans with the
    job key that addresses each, headline values of a small run, and the next commands.

    Returns (lines for stdout, warnings for stderr).
    """
    out_dir = Path(out_dir)
    lines, warnings = exclusion_lines(exclusion_report(out_dir))
    cols = ["scan_key", "status", "reason", "kernel", "kernel_class", "multi_kernel", "fov_truncated",
            "laa950_pct", "hu_mean", "label"]
    rows = read_table(out_dir, "scans", columns=cols).to_pylist()
    harmonized = bool(config is not None and config.harmonize.enabled)
    for column, test, what, todo in FLAGS:
        n = sum(1 for r in rows if test(r[column]))
        if n and not (harmonized and column == "kernel_class"):
            lines.append(f"  {what}: {n} of {len(rows)}; {todo}")
    if 0 < len(rows) <= HEADLINE_MAX_SCANS:
        lines.append("  scan: status, kernel, LAA%-950, MLD (HU), label")
        for r in sorted(rows, key=lambda r: r["scan_key"]):
            lines.append("    " + _headline(r))
    n_ok = sum(r["status"] == "ok" for r in rows)
    if n_ok:
        lines.append(f"next: emphy fit {out_dir}   (the models; needs >= 5 scans of each label)   "
                     f"emphy report {out_dir}   (the HTML report)")
    return lines, warnings


def _headline(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['scan_key']}: {r['status']} - {(r['reason'] or '')[:120]}"
    label = {1: "emphysema", 0: "no emphysema"}.get(r["label"], "no label")
    return (f"{r['scan_key']}: ok, {r['kernel'] or '?'} ({r['kernel_class'] or '?'}), "
            f"{_num(r['laa950_pct'], '.2f')} %, {_num(r['hu_mean'], '.1f')} HU, {label}")


def _num(x, fmt: str) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
