"""Job settings: ``jobs/*.toml`` files, validated on load, with a hash of what changes results.

A job file has sections ``[qc]``, ``[resample]``, ``[segment]``, ``[label]`` (these change
results and enter ``config_hash``), ``[cluster]`` and ``[output]`` (how it runs; they don't).
Every key is optional; defaults are the paper's settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..phenotypes.label import LabelRule
from ..preprocess.qc import QCRules

RESULT_SECTIONS = ("qc", "resample", "segment", "label")


class ConfigError(ValueError):
    """A job file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ResampleSettings:
    spacing_mm: tuple = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SegmentSettings:
    name: str = "threshold"


@dataclass(frozen=True)
class ClusterSettings:
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "6GiB"
    dashboard_address: str = "127.0.0.1:8787"
    max_in_flight: int = 0          # 0 = 2 x workers (backpressure bound)
    retries: int = 2                # task retries after a worker is lost
    gpu_workers: str = "auto"       # LocalCluster: "auto" = one dask-cuda worker per visible GPU, or "0", "1", ...


@dataclass(frozen=True)
class OutputSettings:
    part_size: int = 64             # scans per Parquet part (never one file per scan)
    write_masks: bool = True
    write_qc_png: bool = True


@dataclass(frozen=True)
class JobConfig:
    name: str = "default"
    description: str = ""
    qc: QCRules = field(default_factory=QCRules)
    resample: ResampleSettings = field(default_factory=ResampleSettings)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    label: LabelRule = field(default_factory=LabelRule)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def result_settings(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in RESULT_SECTIONS}

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.result_settings(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"qc": QCRules, "resample": ResampleSettings, "segment": SegmentSettings,
             "label": LabelRule, "cluster": ClusterSettings, "output": OutputSettings}


def _coerce(source: str, where: str, value, default):
    """Check ``value`` against the type of the default; ints are accepted for floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = type(default).__name__ if not isinstance(default, tuple) else f"a list of {len(default)} positive numbers"
        raise ConfigError(f"{source}: {where} must be {want}, got {value!r}")
    return value


def config_from_dict(data: dict, source: str = "<dict>") -> JobConfig:
    """Validate a parsed job file: unknown sections/keys and wrong types are errors."""
    top = {}
    for key, value in data.items():
        if key in ("name", "description"):
            top[key] = _coerce(source, key, value, "")
            continue
        if key not in _SECTIONS:
            known = ", ".join(["name", "description", *_SECTIONS])
            raise ConfigError(f"{source}: unknown section or key {key!r} (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        cls = _SECTIONS[key]
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {}
        for k, v in value.items():
            if k not in defaults:
                raise ConfigError(f"{source}: unknown key [{key}].{k} (known: {', '.join(defaults)})")
            values[k] = _coerce(source, f"[{key}].{k}", v, defaults[k])
        try:
            top[key] = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: [{key}]: {exc}") from None
    cfg = JobConfig(**top)
    if cfg.cluster.workers < 1 or cfg.output.part_size < 1:
        raise ConfigError(f"{source}: [cluster].workers and [output].part_size must be >= 1")
    from ..segment import SEGMENTERS

    if cfg.segment.name not in SEGMENTERS:
        raise ConfigError(f"{source}: [segment].name {cfg.segment.name!r} is not a known segmenter "
                          f"(known: {', '.join(SEGMENTERS)})")
    if not (cfg.cluster.gpu_workers == "auto" or cfg.cluster.gpu_workers.isdigit()):
        raise ConfigError(f"{source}: [cluster].gpu_workers must be \"auto\" or a count like \"1\", "
                          f"got {cfg.cluster.gpu_workers!r}")
    return cfg


def load_job(path: str | Path | None) -> JobConfig:
    """Load and validate ``jobs/NAME.toml`` (None -> defaults)."""
    if path is None:
        return JobConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, str(path))
