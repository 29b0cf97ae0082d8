"""Job settings: ``jobs/*.toml`` files, validated on load, with a hash of what changes results.

A job file has sections ``[qc]``, ``[resample]``, ``[segment]``, ``[label]``, ``[embed]``,
``[harmonize]`` (these change results and enter ``config_hash``, with the SHA-256 of the weight files in place of their
paths), ``[cluster]`` and ``[output]`` (how it runs; they don't).
Every key is optional; defaults are the paper's settings. The ``[fit]`` section belongs to
``emphy fit`` (``models/settings``); ``jobfile.load_jobfile`` reads the file once and checks both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..phenotypes.label import LabelRule
from ..preprocess.qc import QCRules
from ..settings_table import coerce_value, settings_from_table

RESULT_SECTIONS = ("qc", "resample", "segment", "label", "embed", "harmonize")


@dataclass(frozen=True)
class ResampleSettings:
    spacing_mm: tuple = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class HarmonizeSettings:
    enabled: bool = False           # true: phenotypes also on kernel-harmonised HU, and the label uses them
    method: str = "nps_ratio"       # preprocess.harmonize.METHODS


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
    hu_source: str = "auto"         # "raw", or "harmonized": inputs cut from kernel-harmonised HU ([harmonize].method);
    #                                 "auto" = "raw" (see __post_init__)
    input_recipe: str = "auto"      # HU windows of the input (embed.inputs.INPUT_RECIPES): "upstream" (the backbone's
    #                                 own), "lung" (-1024..-600 HU), "multiwindow" (3 windows as channels; 3D only),
    #                                 "laamap" (upstream + lung windows + the lung's LAA-950 map; 3D only)

    def __post_init__(self):
        # "auto": what the real-anatomy benchmark chose for the 3D backbone (multiwindow on raw HU, the
        # HU its targets are measured on: docs/real-anatomy.md); the 2.5D paper model keeps its own
        # window, as published. Both read raw HU.
        three_d = self.backbone == "ct-i3resnet152"
        if self.hu_source == "auto":
            object.__setattr__(self, "hu_source", "raw")
        if self.input_recipe == "auto":
            object.__setattr__(self, "input_recipe", "multiwindow" if three_d else "upstream")


@dataclass(frozen=True)
class ClusterSettings:
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"      # per worker: "auto" = the machine's memory / workers, or e.g. "6GiB"
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
    #: ``embed.weights.resolve_weights`` before any work; it replaces the file paths in the hash.
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
        elif self.embed.backbone != "none":           # harmonised inputs depend on the method that made them
            out["embed"]["harmonize_method"] = self.harmonize.method
        if self.embed.input_recipe == "upstream":     # likewise: the recipe enters the hash when it is not upstream
            out["embed"].pop("input_recipe", None)
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


def config_from_dict(data: dict, source: str = "<dict>") -> JobConfig:
    """Validate a parsed job file's extract sections: unknown sections/keys and wrong types are errors.

    A ``[fit]`` table is left to ``models.settings`` (``jobfile.load_jobfile`` checks it too).
    """
    top = {}
    for key, value in data.items():
        if key in ("name", "description"):
            top[key] = coerce_value(source, key, value, "")
            continue
        if key == "fit":            # driver-side models (emphy fit): jobfile checks it
            continue
        if key == "storage":
            top[key] = _storage_table(value, source)
            continue
        if key not in _SECTIONS:
            known = ", ".join(["name", "description", *_SECTIONS, "fit", "storage"])
            raise ConfigError(f"{source}: unknown section or key {key!r} (known: {known})")
        top[key] = settings_from_table(_SECTIONS[key], value, source, key)
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
    if cfg.cluster.memory_limit != "auto":
        from dask.utils import parse_bytes

        try:
            parse_bytes(cfg.cluster.memory_limit)
        except ValueError:
            raise ConfigError(f"{source}: [cluster].memory_limit must be \"auto\" or a size like \"6GiB\", "
                              f"got {cfg.cluster.memory_limit!r}") from None
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
    from ..embed.inputs import INPUT_RECIPES

    if e.input_recipe not in INPUT_RECIPES:
        raise ConfigError(f"{source}: [embed].input_recipe must be one of {', '.join(INPUT_RECIPES)}, "
                          f"got {e.input_recipe!r}")
    if len(INPUT_RECIPES[e.input_recipe] or ()) > 1 and e.backbone == "resnet152":
        raise ConfigError(f"{source}: [embed].input_recipe = \"{e.input_recipe}\" needs the 3D backbone; resnet152's "
                          "three input channels are three slices (use \"upstream\" or \"lung\")")
    if e.zone_pooling not in ("lung", "slab"):
        raise ConfigError(f"{source}: [embed].zone_pooling must be \"lung\" or \"slab\", got {e.zone_pooling!r}")
    if e.batch_size < 1 or cfg.segment.batch_size < 1 or e.margin_mm < 0:
        raise ConfigError(f"{source}: [embed].batch_size and [segment].batch_size must be >= 1, "
                          f"[embed].margin_mm >= 0")
    if cfg.segment.model not in ("R231", "LTRCLobes"):
        raise ConfigError(f"{source}: [segment].model must be \"R231\" or \"LTRCLobes\", got {cfg.segment.model!r}")


def read_job_toml(path: str | Path) -> dict:
    """The parsed TOML of a job file; a missing or malformed file is a ``ConfigError`` naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_job(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """Load and validate the extract sections of ``jobs/NAME.toml`` (None -> defaults), then the
    command line's ``--set SECTION.KEY=VALUE`` overrides, checked like the file (their errors
    start with ``--set``). ``jobfile.load_jobfile`` also checks ``[fit]``; the CLI calls that.
    """
    data = read_job_toml(path) if path is not None else {}
    data.pop("fit", None)
    cfg = config_from_dict(data, str(path)) if path is not None else JobConfig()
    if not overrides:
        return cfg
    for item in overrides:
        apply_override(data, item)
    data.pop("fit", None)
    return config_from_dict(data, "--set")


def apply_override(data: dict, item: str) -> None:
    """``qc.max_hu=3072`` into the parsed job table ``data`` (in place). The value is read as a
    TOML value (numbers, true/false, ``[1, 1, 1]``, quoted strings); anything else is taken as a
    string, so ``segment.name=lungmask`` needs no quotes."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set: {item!r} is not KEY=VALUE (e.g. --set qc.max_hu=3072)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    section, dot, name = key.partition(".")
    if not dot:
        data[section] = value
        return
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"--set: [{section}] must be a table")
    table[name] = value


def settings_diff(old: dict, new: dict) -> list[str]:
    """``[section].key: old -> new`` for each setting that differs between two
    :meth:`JobConfig.result_settings` dicts (a key present on one side only shows ``(unset)``)."""
    lines = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key, "(unset)"), b.get(key, "(unset)")
            if _norm(va) != _norm(vb):
                lines.append(f"[{section}].{key}: {_show(va)} -> {_show(vb)}")
    return lines


def _norm(v):
    """Tuples and lists compare alike (run.json, being JSON, has only lists)."""
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f"sha256 {v[:12]}..."     # weight-file hashes: the start tells them apart
    return v if v == "(unset)" else json.dumps(_norm(v))


def config_from_run_json(info: dict) -> JobConfig | None:
    """The JobConfig recorded in a run's ``run.json`` (None when it cannot be rebuilt, e.g. a
    layout of another version); used to name the settings that differ when OUT is refused."""
    try:
        data = {k: v for k, v in info["config"].items() if k != "weights_sha256"}
        return dataclasses.replace(config_from_dict(data, "run.json"),
                                   weights_sha256=dict(info["config"].get("weights_sha256") or {}))
    except (KeyError, TypeError, AttributeError, ConfigError):
        return None
