"""How much of lungmask is CPU work that would idle a GPU: its three parts timed on one scan.

``python benchmarks/lungmask_split.py``: one full-size synthetic chest (512 x 512, ~300 slices),
one thread. Times ``lungmask_preprocess`` (CPU), the U-Net on this CPU for a few slices
(extrapolated; on a GPU worker it is the device part), and ``lungmask_postprocess`` (CPU) fed
with what a trained net would output (the phantom's true lungs on lungmask's 256 x 256 slices, so
the connected-component work is realistic). Also the bytes each part hands to the next.
"""
from __future__ import annotations

import json
import tempfile
import time

import numpy as np
import torch
from scipy import ndimage as ndi


def main() -> None:
    from lungmask.resunet import UNet

    from emphy_dask.embed.weights import WeightsFile, sha256_file
    from emphy_dask.segment.lungmask import load_lungmask_model, lungmask_infer, lungmask_postprocess, \
        lungmask_preprocess
    from emphy_dask.synth.phantom import make_phantom
    from emphy_dask.volume import CTVolume

    torch.set_num_threads(1)
    ph = make_phantom((300, 512, 512), (1.0, 0.7, 0.7), 10.0, "centrilobular", np.random.default_rng(0))
    vol = CTVolume(hu=np.maximum(ph.hu, -1024).astype(np.int16), spacing_zyx_mm=ph.spacing_zyx_mm)
    out = {"slices": vol.shape[0]}
    t0 = time.perf_counter()
    inp = lungmask_preprocess(vol)
    out["preprocess_cpu_s"] = round(time.perf_counter() - t0, 2)
    out["bytes_to_device"] = inp.nbytes
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/unet.pth"
        torch.save(UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                        residual=False).state_dict(), path)
        model = load_lungmask_model(WeightsFile(path, sha256_file(path), "explicit"), "R231", "cpu")
        few = type(inp)(inp.slices[:8], inp.boxes[:8], inp.shape_lps, inp.orientation)
        t0 = time.perf_counter()
        lungmask_infer(few, model, "cpu", 8)
        out["unet_cpu_s_per_slice"] = round((time.perf_counter() - t0) / 8, 3)
    # a trained net's answer: the true lungs, cropped and resized like lungmask's input slices
    truth = ph.lung_labels                      # identity direction: already LPS
    raw = np.stack([ndi.zoom(truth[i, b[0]:b[2], b[1]:b[3]], 256 / np.asarray((b[2] - b[0], b[3] - b[1])), order=0)
                    for i, b in enumerate(inp.boxes)]).astype(np.uint8)
    out["bytes_back"] = int(raw.nbytes)
    t0 = time.perf_counter()
    labels = lungmask_postprocess(raw, inp, vol)
    out["postprocess_cpu_s"] = round(time.perf_counter() - t0, 2)
    out["dice_vs_truth"] = round(float(2 * ((labels > 0) & (truth > 0)).sum() / ((labels > 0).sum() + (truth > 0).sum())), 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
