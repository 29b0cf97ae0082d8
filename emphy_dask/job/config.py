"""Job settings: ``jobs/*.toml`` files, validated on load, with a hash of what changes results.

A job file has sections ``[qc]``, ``[resample]``, ``[segment]``, ``[label]``, ``[embed]``,
``[harmonize]`` (these change results and enter ``config_hash``, with the SHA-256 of the weight files in place of their
paths), ``[cluster]`` and ``[output]`` (how it runs; they don't).
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

RESULT_SECTIONS = ("qc", "resample", "segment", "label", "embed", "harmonize")


class ConfigError(ValueError):
    """A job file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ResampleSettings:
    spacing_mm: tuple = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class HarmonizeSettings:
    enabled: bool = False           # true: phenotypes also on kernel-harmonised HU, and the label uses them
    method: str = "nps"             # preprocess.harmonize.METHODS


@dataclass(frozen=True)
class SegmentSettings:
    name: str = "threshold"         # "threshold" (CPU, offline) or "lungmask" (U-Net on GPU workers)
    model: str = "R231"             # lungmask model: "R231" or "LTRCLobes"
    weights: str = ""               # lungmask weight file; "" = $EMPHY_LUNGMASK_WEIGHTS, then the torch hub cache
    batch_size: int = 20            # lungmask slices per forward (halved on out-of-memory)


@dataclass(frozen=True)
class EmbedSettings:
    backbone: str = "ct-i3resnet152"  # "ct-i3resnet152" (3D, offline weights), "resnet152" (paper, 2.5D) or "none"
    weights: str = ""               # weight file; "" = the backbone's default place; "random" = tests only
    precision: str = "bf16"         # "bf16" (AMX CPUs, GPUs) or "fp32"
    zone_pooling: str = "lung"      # "lung" (lung-weighted positions) or "slab" (plain average of the zone's rows)
    margin_mm: float = 10.0         # margin around the lung box of the model input
    batch_size: int = 8             # scans per forward on a GPU (halved on out-of-memory); 1 on CPU
    save_feature_maps: bool = True  # layer4 maps in featuremaps/ (for exact class-activation maps)
    hu_source: str = "raw"          # "raw", or "harmonized": inputs cut from kernel-harmonised HU ([harmonize].method)


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
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    harmonize: HarmonizeSettings = field(default_factory=HarmonizeSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    #: SHA-256 of the model weight files actually used ({"embed": ..., "segment": ...}), filled in by
    #: ``device_stages.resolve_weights`` before any work; it replaces the file paths in the hash.
    weights_sha256: dict = field(default_factory=dict)
    #: ``[storage.<protocol>]`` fsspec options ({"s3": {"endpoint_url": ...}}): where files are,
    #: not what is computed (no hash); may hold credentials, so never printed or written (``to_dict``).
    storage: dict = field(default_factory=dict, repr=False)

    def result_settings(self) -> dict:
        out = {s: dataclasses.asdict(getattr(self, s)) for s in RESULT_SECTIONS}
        for section in ("embed", "segment"):
            out[section].pop("weights")              # where a file lies does not change results
            out[section].pop("batch_size")           # batch invariance is tested
            out[section]["weights_sha256"] = self.weights_sha256.get(section, "")
        if self.segment.name != "lungmask":          # lungmask settings matter only when it runs
            for k in ("model", "weights_sha256"):
                out["segment"].pop(k)
        out["embed"].pop("save_feature_maps")
        if self.embed.backbone == "none":
            out["embed"] = {"backbone": "none"}
        elif self.embed.backbone != "ct-i3resnet152":   # zone pooling only exists for the 3D map
            out["embed"].pop("zone_pooling")
        if self.embed.hu_source == "raw":             # runs before the option existed keep their hash
            out["embed"].pop("hu_source", None)
        elif self.embed.backbone != "none":
            out["embed"]["harmonize_method"] = self.harmonize.method
        if not self.harmonize.enabled:               # the method matters only when it runs
            out["harmonize"] = {"enabled": False}
        return out

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.result_settings(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """Everything, storage secrets replaced by ``***`` (for run.json)."""
        from ..io.storage import redacted

        out = dataclasses.asdict(self)
        out["storage"] = redacted(self.storage)
        return out


_SECTIONS = {"qc": QCRules, "resample": ResampleSettings, "segment": SegmentSettings,
             "label": LabelRule, "embed": EmbedSettings, "harmonize": HarmonizeSettings,
             "cluster": ClusterSettings, "output": OutputSettings}


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
        if key == "fit":            # driver-side models (emphy fit): checked here, used there
            from ..models.settings import fit_settings_from_table

            fit_settings_from_table(value, source)
            continue
        if key == "storage":
            top[key] = _storage_table(value, source)
            continue
        if key not in _SECTIONS:
            known = ", ".join(["name", "description", *_SECTIONS, "fit", "storage"])
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
    _check_models(cfg, source)
    from ..preprocess.harmonize import METHODS

    if cfg.harmonize.method not in METHODS:
        raise ConfigError(f"{source}: [harmonize].method {cfg.harmonize.method!r} is not known (known: {', '.join(METHODS)})")
    if not (cfg.cluster.gpu_workers == "auto" or cfg.cluster.gpu_workers.isdigit()):
        raise ConfigError(f"{source}: [cluster].gpu_workers must be \"auto\" or a count like \"1\", "
                          f"got {cfg.cluster.gpu_workers!r}")
    return cfg


def _storage_table(value, source: str) -> dict:
    """``[storage.s3]``, ``[storage.gs]`` ...: fsspec options per protocol (checked by fsspec itself
    when the store is first opened)."""
    from ..io.storage import PROTOCOLS

    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{source}: [storage] holds one table per protocol, e.g. [storage.s3]")
    unknown = sorted(set(value) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"{source}: unknown storage protocol(s) {', '.join(unknown)} (known: {', '.join(PROTOCOLS)})")
    return value


def _check_models(cfg: JobConfig, source: str) -> None:
    from ..embed.backbones import BACKBONES, PRECISIONS

    e = cfg.embed
    if e.backbone not in (*BACKBONES, "none"):
        raise ConfigError(f"{source}: [embed].backbone {e.backbone!r} is not a known backbone "
                          f"(known: {', '.join(BACKBONES)}, none)")
    if e.precision not in PRECISIONS:
        raise ConfigError(f"{source}: [embed].precision must be one of {', '.join(PRECISIONS)}, got {e.precision!r}")
    if e.hu_source not in ("raw", "harmonized"):
        raise ConfigError(f"{source}: [embed].hu_source must be raw or harmonized, got {e.hu_source!r}")
    if e.zone_pooling not in ("lung", "slab"):
        raise ConfigError(f"{source}: [embed].zone_pooling must be \"lung\" or \"slab\", got {e.zone_pooling!r}")
    if e.batch_size < 1 or cfg.segment.batch_size < 1 or e.margin_mm < 0:
        raise ConfigError(f"{source}: [embed].batch_size and [segment].batch_size must be >= 1, "
                          f"[embed].margin_mm >= 0")
    if cfg.segment.model not in ("R231", "LTRCLobes"):
        raise ConfigError(f"{source}: [segment].model must be \"R231\" or \"LTRCLobes\", got {cfg.segment.model!r}")


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
