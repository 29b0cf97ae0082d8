"""The job's own progress on the scheduler's Prometheus endpoint (``/metrics`` on the dashboard port).

The job registers ``EmphyMetricsPlugin`` on the scheduler (idempotent: one per scheduler, kept
for the scheduler's life, shared by every run) and sends it small events through
``Client.log_event`` (topic ``emphy-metrics``): counts per status, stage seconds, scans in
flight; every 2 s or 64 scans, never a scan key. The plugin adds these series to what
``prometheus_client`` serves there, next to Dask's own ``dask_scheduler_*``:

=================================  =========  ===============================================
``emphy_scans_total``              counter    scans finished, labels run, job, status (ok, excluded, failed)
``emphy_stage_seconds``            histogram  seconds per scan per stage (ingest ... embed, total)
``emphy_scans_in_flight``          gauge      scans submitted and not finished
``emphy_scans_remaining``          gauge      scans of the manifest not finished (resumed ones count as done)
``emphy_scans_in_manifest``        gauge      scans to process in this run's manifest
``emphy_run_active``               gauge      1 while the run goes on, 0 once it ended
``emphy_run_info``                 gauge      1, labels run, job, config_hash, version
=================================  =========  ===============================================

``run`` is the OUT folder's name, ``job`` the job file's ``name``. The scheduler needs
emphy-dask installed (it unpickles the plugin); where it is not, the job warns and runs without
these metrics.
"""
from __future__ import annotations

import threading
import time

from distributed.diagnostics.plugin import SchedulerPlugin

TOPIC = "emphy-metrics"
STAGES = ("ingest", "qc", "resample", "segment", "phenotypes", "artifacts", "inputs", "embed", "total")
#: Histogram buckets (s): stages of a full-size scan take 0.1-60 s on a CPU core.
BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0)
MAX_RUNS = 50                       # runs kept per scheduler (the oldest ended one goes first)


class _Run:
    """Metric state of one run on the scheduler."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.counts = {"ok": 0, "excluded": 0, "failed": 0}
        self.buckets = {s: [0] * (len(BUCKETS_S) + 1) for s in STAGES}   # last = +Inf (not cumulative here)
        self.sums = {s: 0.0 for s in STAGES}
        self.in_flight = self.remaining = self.in_manifest = 0
        self.active = 1
        self.updated = time.time()

    def apply(self, msg: dict) -> None:
        for status, n in (msg.get("counts") or {}).items():
            self.counts[status] = self.counts.get(status, 0) + int(n)
        for stage, values in (msg.get("seconds") or {}).items():
            if stage not in self.buckets:
                continue
            for v in values:
                i = next((i for i, b in enumerate(BUCKETS_S) if v <= b), len(BUCKETS_S))
                self.buckets[stage][i] += 1
                self.sums[stage] += float(v)
        for field in ("in_flight", "remaining", "in_manifest", "active"):
            if field in msg:
                setattr(self, field, int(msg[field]))
        self.updated = time.time()


class EmphyMetricsPlugin(SchedulerPlugin):
    """Keeps emphy runs' progress on the scheduler and exposes it to ``prometheus_client``."""

    name = "emphy-metrics"
    idempotent = True                 # a second run on the same scheduler reuses the first plugin

    def __init__(self):
        self.runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def __getstate__(self):           # pickled to the scheduler: without the lock
        return {"runs": {}}

    def __setstate__(self, state):
        self.__init__()

    def start(self, scheduler) -> None:
        _Collector.attach(self)

    async def close(self) -> None:
        _Collector.detach(self)

    def log_event(self, topic: str, msg) -> None:
        if topic != TOPIC or not isinstance(msg, dict) or "run" not in msg:
            return
        with self._lock:
            run = self.runs.get(msg["run"])
            if run is None or msg.get("event") == "start":
                run = self.runs[msg["run"]] = _Run(dict(msg.get("labels") or {}))
                self._forget_old()
            run.apply(msg)

    def _forget_old(self) -> None:
        while len(self.runs) > MAX_RUNS:
            ended = [k for k, r in self.runs.items() if not r.active] or list(self.runs)
            del self.runs[min(ended, key=lambda k: self.runs[k].updated)]

    def families(self):
        """Prometheus metric families of every run (``prometheus_client`` calls this on a scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        base = ["run", "job"]
        scans = CounterMetricFamily("emphy_scans", "Scans finished by an emphy run, by status",
                                    labels=[*base, "status"])
        stage = HistogramMetricFamily("emphy_stage_seconds", "Seconds per scan per pipeline stage",
                                      labels=[*base, "stage"])
        gauges = {f: GaugeMetricFamily(f"emphy_{name}", doc, labels=base) for f, name, doc in (
            ("in_flight", "scans_in_flight", "Scans submitted and not finished"),
            ("remaining", "scans_remaining", "Scans of the manifest not finished yet"),
            ("in_manifest", "scans_in_manifest", "Scans to process in the run's manifest"),
            ("active", "run_active", "1 while the run goes on, 0 once it ended"))}
        info = GaugeMetricFamily("emphy_run_info", "An emphy run (value 1)",
                                 labels=[*base, "config_hash", "version"])
        with self._lock:
            for run_id, r in self.runs.items():
                lab = [run_id, r.labels.get("job", "")]
                for status, n in r.counts.items():
                    scans.add_metric([*lab, status], n)
                for s in STAGES:
                    cum, acc = [], 0
                    for b, n in zip((*(str(b) for b in BUCKETS_S), "+Inf"), r.buckets[s]):
                        acc += n
                        cum.append((b, acc))
                    stage.add_metric([*lab, s], cum, sum_value=r.sums[s])
                for f, g in gauges.items():
                    g.add_metric(lab, getattr(r, f))
                info.add_metric([*lab, r.labels.get("config_hash", ""), r.labels.get("version", "")], 1)
        return [scans, stage, *gauges.values(), info]


class _Collector:
    """One ``prometheus_client`` collector per process for every live plugin (a process may run
    several schedulers, e.g. LocalClusters in tests; registering twice would be refused)."""

    plugins: list = []
    registered = False
    lock = threading.Lock()

    @classmethod
    def attach(cls, plugin) -> None:
        from prometheus_client import REGISTRY

        with cls.lock:
            cls.plugins.append(plugin)
            if not cls.registered:
                REGISTRY.register(cls())
                cls.registered = True

    @classmethod
    def detach(cls, plugin) -> None:
        with cls.lock:
            cls.plugins = [p for p in cls.plugins if p is not plugin]

    def collect(self):
        merged: dict = {}
        for plugin in list(self.plugins):
            for fam in plugin.families():
                if fam.name in merged:
                    merged[fam.name].samples.extend(fam.samples)
                else:
                    merged[fam.name] = fam
        yield from merged.values()

    def describe(self):          # no samples at registration: prometheus_client checks names lazily
        return []


class MetricsReporter:
    """Driver side: sends a run's progress to the plugin (batched: every ``every_s`` or ``every_n`` scans)."""

    def __init__(self, client, run: str, labels: dict, every_s: float = 2.0, every_n: int = 64, log=None):
        self.client, self.run, self.labels = client, run, labels
        self.every_s, self.every_n = every_s, every_n
        self.enabled = True
        self._pending_counts: dict[str, int] = {}
        self._pending_seconds: dict[str, list] = {}
        self._n = 0
        self._last = time.monotonic()
        self.log = log

    def register(self) -> bool:
        """Put the plugin on the scheduler; False (with a warning) where the scheduler cannot load it."""
        try:
            self.client.register_plugin(EmphyMetricsPlugin())
        except Exception as exc:  # noqa: BLE001 - the scheduler lacks emphy-dask: the job runs on without
            self.enabled = False
            if self.log:
                self.log(f"warning: no emphy metrics on the scheduler's /metrics ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); install emphy-dask where the "
                         "scheduler runs")
        return self.enabled

    def _send(self, msg: dict) -> None:
        if not self.enabled:
            return
        try:
            self.client.log_event(TOPIC, {"run": self.run, **msg})
        except Exception:  # noqa: BLE001 - metrics never stop the job (a lost scheduler is seen by the flow)
            pass

    def start(self, in_manifest: int, remaining: int) -> None:
        self._send({"event": "start", "labels": self.labels, "in_manifest": in_manifest, "remaining": remaining,
                    "in_flight": 0, "active": 1})

    def scan(self, row: dict, in_flight: int, remaining: int) -> None:
        """One finished scan (its scans row); sends when a batch is due."""
        status = row.get("status") or "failed"
        self._pending_counts[status] = self._pending_counts.get(status, 0) + 1
        for s in STAGES:
            v = row.get(f"t_{s}_s")
            if v is not None:
                self._pending_seconds.setdefault(s, []).append(round(float(v), 4))
        self._n += 1
        self.in_flight, self.remaining = in_flight, remaining
        if self._n >= self.every_n or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self, **extra) -> None:
        msg = {"counts": self._pending_counts, "seconds": self._pending_seconds,
               "in_flight": getattr(self, "in_flight", 0), "remaining": getattr(self, "remaining", 0), **extra}
        self._send(msg)
        self._pending_counts, self._pending_seconds, self._n = {}, {}, 0
        self._last = time.monotonic()

    def finish(self) -> None:
        self.flush(in_flight=0, active=0)
