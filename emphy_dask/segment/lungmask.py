"""lungmask (Hofmanninger et al. 2020) as three plain functions, so the GPU does only the U-Net.

lungmask's ``LMInferer.apply`` preprocesses (per-slice body crop, resize to 256 x 256), runs the
U-Net, then post-processes (largest components, label merging, resize back) in one call; the
first and last parts are CPU work that would keep a GPU idle. Here they are separate:

- ``lungmask_preprocess`` (CPU): the volume, LPS-oriented as lungmask does, through lungmask's
  own ``utils.preprocess``; int16 slices + crop boxes (what crosses to the GPU worker);
- ``lungmask_infer`` (GPU): lungmask's U-Net, built as ``LMInferer`` builds it (``load_unet``), on the
  slices in batches (halved on out-of-memory); uint8 labels at 256 x 256 come back;
- ``lungmask_postprocess`` (CPU): lungmask's ``utils.postprocessing`` and ``reshape_mask``, then
  back to the volume's orientation; labels 1 right / 2 left (R231), or the lobes of LTRCLobes
  (1 left upper, 2 left lower, 3 right upper, 4 right middle, 5 right lower).

``lung_mask_lungmask`` chains the three in one process (``emphy quantify``, tests).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk

from ..embed.weights import WeightsFile, resolve_lungmask_weights
from ..errors import ScanError
from ..volume import CTVolume

LOBES_TO_SIDE = np.array([0, 2, 2, 1, 1, 1], dtype=np.uint8)   # LTRCLobes label -> 1 right / 2 left
_LOCK = threading.Lock()


@dataclass
class LungmaskInput:
    """lungmask's preprocessed slices of one scan (crosses from a CPU to a GPU worker).

    slices : int16 (n_slices, 256, 256), HU clipped to [-1024, 600], body-cropped and resized
    boxes : int32 (n_slices, 4), each slice's body box (row0, col0, row1, col1) in the LPS image
    shape_lps : the LPS-oriented image's (z, y, x) shape
    orientation : the volume's DICOM orientation code (``LPS`` needs no reorientation)
    """

    slices: np.ndarray
    boxes: np.ndarray
    shape_lps: tuple
    orientation: str

    @property
    def nbytes(self) -> int:
        return int(self.slices.nbytes + self.boxes.nbytes)


def _lps_image(volume: CTVolume) -> tuple[sitk.Image, str]:
    img = volume.to_sitk()
    orient = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(img.GetDirection())
    return (img if orient == "LPS" else sitk.DICOMOrient(img, "LPS")), orient


def lungmask_preprocess(volume: CTVolume) -> LungmaskInput:
    """lungmask's preprocessing of ``volume`` (native grid HU), exactly as ``LMInferer`` does it."""
    from lungmask import utils

    img, orient = _lps_image(volume)
    arr = sitk.GetArrayFromImage(img)
    slices, boxes = utils.preprocess(arr, resolution=[256, 256])
    return LungmaskInput(np.asarray(slices, dtype=np.int16), np.asarray(boxes, dtype=np.int32),
                         tuple(arr.shape), orient)


@lru_cache(maxsize=2)
def _cached_inferer(path: str, sha256: str, model_name: str, device: str):
    return load_unet(path).to(device)


def load_unet(path: str):
    """lungmask's U-Net from a weight file, as ``lungmask.mask.get_model`` builds it, but loaded
    with ``torch.load(weights_only=True)``: a weight file cannot run code. (lungmask 0.2.22 calls
    ``torch.load`` without it: safe by default only from torch 2.6 on, and the environment variable
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 switches it off; an explicit True cannot be switched off.)"""
    import torch
    from lungmask.resunet import UNet

    state = torch.load(path, map_location="cpu", weights_only=True)
    n_classes = len(list(state.values())[-1])
    model = UNet(n_classes=n_classes, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    model.load_state_dict(state)
    return model.eval()


def load_lungmask_model(weights: WeightsFile, model_name: str = "R231", device: str = "cpu"):
    """lungmask's U-Net from ``weights`` (``load_unet``), once per process and device."""
    if weights.is_random:
        raise ValueError("lungmask needs a weight file; random weights are for the backbones' tests only")
    with _LOCK:
        return _cached_inferer(weights.path, weights.sha256, model_name, device)


def lungmask_infer(inp: LungmaskInput, model, device: str = "cpu", batch_size: int = 20,
                   log=None) -> np.ndarray:
    """U-Net labels of the preprocessed slices, uint8 (n_slices, 256, 256); batch halved on OOM."""
    import torch

    from ..embed.backbones import is_out_of_memory

    x = (np.minimum(inp.slices, 600).astype(np.float32) + 1024.0) / 1624.0
    out = np.empty(x.shape, dtype=np.uint8)
    i, bs = 0, max(1, int(batch_size))
    with torch.inference_mode():
        while i < len(x):
            try:
                t = torch.as_tensor(x[i:i + bs, None], dtype=torch.float32, device=device)
                out[i:i + bs] = torch.argmax(model(t), 1).to(torch.uint8).cpu().numpy()
                i += bs
            except Exception as exc:  # noqa: BLE001
                if not (is_out_of_memory(exc) and bs > 1):
                    raise
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                bs = max(1, bs // 2)
                if log:
                    log(f"lungmask: out of device memory; batch {bs}")
    return out


def lungmask_postprocess(raw: np.ndarray, inp: LungmaskInput, volume: CTVolume,
                         model_name: str = "R231") -> np.ndarray:
    """lungmask's post-processing, back onto ``volume``'s grid.

    Returns uint8 labels: R231 0 / 1 right / 2 left; LTRCLobes the lobes 1-5 (``LOBES_TO_SIDE``
    maps them to sides; the phenotypes report each lobe).
    """
    from lungmask import utils

    mask = utils.postprocessing(raw, disable_tqdm=True)
    mask = np.asarray([utils.reshape_mask(mask[i], inp.boxes[i], inp.shape_lps[1:]) for i in range(len(mask))],
                      dtype=np.uint8)
    if inp.orientation != "LPS":
        img = sitk.GetImageFromArray(mask)
        mask = sitk.GetArrayFromImage(sitk.DICOMOrient(img, inp.orientation))
    if mask.shape != volume.shape:
        raise ScanError("<array>", f"lungmask returned shape {mask.shape} for a volume of {volume.shape}",
                        stage="segment")
    if not mask.any():
        raise ScanError("<array>", "no lung found by lungmask", stage="segment")
    return mask.astype(np.uint8)


def lung_mask_lungmask(hu, spacing_zyx_mm, direction_xyz=(1, 0, 0, 0, 1, 0, 0, 0, 1), fov_mask=None, *,
                       weights: WeightsFile | None = None, model_name: str = "R231", device: str | None = None,
                       batch_size: int = 20) -> np.ndarray:
    """The whole of lungmask in one process, on the segmenter registry's calling convention."""
    import torch

    weights = weights or resolve_lungmask_weights(model_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    volume = CTVolume(hu=np.asarray(hu), spacing_zyx_mm=tuple(spacing_zyx_mm), direction_xyz=tuple(direction_xyz))
    inp = lungmask_preprocess(volume)
    raw = lungmask_infer(inp, load_lungmask_model(weights, model_name, device), device, batch_size)
    labels = lungmask_postprocess(raw, inp, volume, model_name)
    return LOBES_TO_SIDE[labels] if model_name == "LTRCLobes" else labels
