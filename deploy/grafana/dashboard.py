"""Writes deploy/grafana/emphy-dashboard.json (Grafana dashboard of emphy runs; import it and pick the
Prometheus that scrapes the Dask scheduler). Run: python deploy/grafana/dashboard.py"""
import json
from pathlib import Path
ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
R = 'run=~"$run"'
FAILED = 'status="failed"'
NOTOTAL = 'stage!="total"'
def sel(extra=""):
    return "{" + R + (("," + extra) if extra else "") + "}"
def panel(i, title, kind, targets, x, y, w=12, h=8, unit=None, desc=""):
    return {"id": i, "title": title, "type": kind, "datasource": ds, "description": desc,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "targets": [{"refId": chr(65 + j), "datasource": ds, "expr": e, "legendFormat": l}
                        for j, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []}, "options": {}}
panels = [
    panel(1, "Scans finished", "stat", [(f'sum by (status) (emphy_scans_total{sel()})', "{{status}}")], 0, 0, 8, 5,
          desc="ok / excluded (a QC rule) / failed (reasons in the run's scans/ and errors/ tables)"),
    panel(2, "Remaining / in flight", "stat", [(f'sum(emphy_scans_remaining{sel()})', "remaining"),
                                               (f'sum(emphy_scans_in_flight{sel()})', "in flight")], 8, 0, 8, 5),
    panel(3, "Estimated time left", "stat",
          [(f'sum by (run) (emphy_scans_remaining{sel()}) / sum by (run) (rate(emphy_scans_total{sel()}[15m]))',
            "{{run}}")], 16, 0, 8, 5, unit="s", desc="remaining scans / finish rate over 15 min"),
    panel(4, "Throughput (scans per hour)", "timeseries",
          [(f'sum by (status) (rate(emphy_scans_total{sel()}[5m])) * 3600', "{{status}}")], 0, 5, unit="short"),
    panel(5, "Failed fraction", "timeseries",
          [(f'sum(rate(emphy_scans_total{sel(FAILED)}[15m])) / sum(rate(emphy_scans_total{sel()}[15m]))',
            "failed")], 12, 5, unit="percentunit"),
    panel(6, "Seconds per scan per stage (median)", "timeseries",
          [(f'histogram_quantile(0.5, sum by (le, stage) (rate(emphy_stage_seconds_bucket{sel()}[10m])))', "{{stage}}")],
          0, 13, unit="s"),
    panel(7, "Seconds per scan per stage (p90)", "timeseries",
          [(f'histogram_quantile(0.9, sum by (le, stage) (rate(emphy_stage_seconds_bucket{sel()}[10m])))', "{{stage}}")],
          12, 13, unit="s"),
    panel(8, "Worker seconds per stage (share of the time)", "piechart",
          [(f'sum by (stage) (emphy_stage_seconds_sum{sel(NOTOTAL)})', "{{stage}}")], 0, 21, unit="s",
          desc="where the workers' time goes: the bottleneck stage"),
    panel(9, "Dask workers", "timeseries", [("dask_scheduler_workers", "{{state}}")], 12, 21, unit="short"),
    panel(10, "Dask tasks by state", "timeseries", [("dask_scheduler_tasks", "{{state}}")], 0, 29, 24, unit="short"),
]
dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                  "pluginName": "Prometheus", "description": "The Prometheus that scrapes the Dask scheduler's /metrics"}],
    "title": "emphy-dask runs", "uid": "emphy-dask-runs", "schemaVersion": 39, "version": 1, "editable": True,
    "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "tags": ["emphy", "dask"],
    "description": "Progress of emphy extract runs from the Dask scheduler's Prometheus endpoint (emphy_* series: "
                   "emphy_dask/job/metrics.py), beside Dask's own dask_scheduler_* series.",
    "templating": {"list": [{"name": "run", "label": "run (OUT folder)", "type": "query", "datasource": ds,
                             "query": "label_values(emphy_run_info, run)", "refresh": 2, "multi": True,
                             "includeAll": True, "current": {"text": "All", "value": "$__all"}}]},
    "panels": panels,
}
open(Path(__file__).with_name("emphy-dashboard.json"), "w").write(json.dumps(dash, indent=1) + "\n")
