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
            msg = (f"QC rule {rule} excluded {len(rows)} of {n} scans ({100 * len(rows) / n:.0f} %)"
                   + (f"; {_WHY[name]}" if name in _WHY else "")
                   + (f"; set {job_key} in your job file (--job) to keep them" if job_key else ""))
            warnings.append(msg)
    return {"n_scans": n, "n_excluded": len(excluded), "rules": rules, "warnings": warnings,
            "skipped_files": _skipped_files(Path(out_dir))}


def _skipped_files(out_dir: Path, at_most: int = 20) -> dict:
    """Files of the manifest that are not scans (label maps): count and the first few with the reason."""
    import pyarrow.parquet as pq

    from .manifest import MANIFEST_FILE

    from ..io import storage

    path = out_dir / MANIFEST_FILE
    if not storage.exists(path):
        return {"n": 0, "examples": []}
    filesystem, where = storage.arrow_filesystem(path)       # a local path or an object-store URL
    rows = [r for r in pq.read_table(where, columns=["scan_key", "kind", "error"], filesystem=filesystem).to_pylist()
            if r["kind"] == "skipped"]
    return {"n": len(rows), "examples": [{"scan_key": r["scan_key"], "reason": r["error"]} for r in rows[:at_most]]}


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def exclusion_lines(report: dict) -> tuple[list[str], list[str]]:
    """(lines for stdout, warnings for stderr) of :func:`exclusion_report`'s result."""
    lines = []
    for r in report["rules"]:
        what = QC_RULES.get(r["rule"].split(">")[0], (None, None, "value"))[2]
        values = (f", {what} {_fmt(r['value_min'])}-{_fmt(r['value_max'])}"
                  if r["value_min"] is not None else "")
        change = f"; change with {r['job_key']}" if r["job_key"] else ""
        lines.append(f"  excluded by {r['rule']}: {r['n_excluded']} of {report['n_scans']} scans{values}{change}")
    skipped = report.get("skipped_files") or {"n": 0}
    if skipped["n"]:
        first = skipped["examples"][0]
        lines.append(f"  not scans, skipped: {skipped['n']} file(s), e.g. {first['scan_key']}: {first['reason']} "
                     "(all in manifest.parquet, kind = skipped)")
    return lines, [f"warning: {w}" for w in report["warnings"]]
