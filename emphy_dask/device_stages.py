"""The stages that run on a device: lungmask's U-Net and the embedding backbone.

On a cluster with GPU workers these run there (``device="cuda"``); without, the same functions
run on CPU workers (``device="cpu"``). They take numpy arrays (``ScanState.model_input``,
``LungmaskInput``), hold the models in a per-process cache, and return numpy arrays and rows,
never device tensors. Feature maps are written by the worker itself into ``featuremaps/``, so
only small rows go back to the driver.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embed.weights import worker_weights
from .heap import trim_heap
from .io.atomic import atomic_write
from .scan_state import ScanState, StageClock, artifact_stem


@dataclass
class DeviceOutput:
    """What a device task returns for one scan: a value or the exception, its seconds, the device."""

    value: object
    seconds: float
    device: str


def device_name(device: str) -> str:
    """``cpu`` or ``cuda (<card>)`` for the scans table."""
    if device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name()})"
    return device


def lungmask_on_device(lungmask_input, config, device: str = "cpu") -> DeviceOutput:
    """lungmask's U-Net on one scan's preprocessed slices; never raises (the exception is returned)."""
    from .segment.lungmask import load_lungmask_model, lungmask_infer

    t0 = time.perf_counter()
    try:
        model = load_lungmask_model(worker_weights(config, "segment"), config.segment.model, device)
        value = lungmask_infer(lungmask_input, model, device, config.segment.batch_size)
    except Exception as exc:  # noqa: BLE001 - becomes the scan's failed row in finish_scan
        value = exc
    return DeviceOutput(value, time.perf_counter() - t0, device_name(device))


def embed_states(states: list[ScanState], config, out_dir, device: str = "cpu",
                 worker: str | None = None) -> list[dict]:
    """Backbone forward for a batch of scans; returns every scan's finished rows.

    Scans that failed or were excluded earlier pass through unchanged. The batch runs
    ``[embed].batch_size`` scans per forward on a GPU (halved on out-of-memory), one at a time on
    a CPU; each scan gets its share of the batch's seconds. A scan whose forward fails gets a
    failed row; the others go on.
    """
    from .embed import BACKBONES, load_model, run_batches

    todo = [s for s in states if s.ok and s.model_input is not None]
    if todo:
        e = config.embed
        t0 = time.perf_counter()
        batch = 1
        try:
            weights = worker_weights(config, "embed")
            model = load_model(e.backbone, weights, device, e.precision)
            maps, batch = run_batches(model, [s.model_input for s in todo], BACKBONES[e.backbone].recipe, device,
                                      e.precision, e.batch_size if device.startswith("cuda") else 1)
        except Exception as exc:  # noqa: BLE001 - e.g. weights missing on this worker: every scan says so
            weights, maps = None, [exc] * len(todo)
        trim_heap(collect=False)       # the forward's activations are freed: their pages go back now
        share = (time.perf_counter() - t0) / len(todo)
        name = device_name(device)
        for state, fmap in zip(todo, maps):
            run = StageClock(state, config)
            run.stage = "embed"
            t1 = time.perf_counter()
            try:
                if isinstance(fmap, BaseException):
                    raise fmap
                if fmap is None:
                    raise RuntimeError("backbone returned no feature map")
                run("embed", _store_embeddings, state, fmap, weights, config, Path(out_dir))
                state.row.update(device_embed=name, worker_embed=worker, embed_batch_size=batch)
            except Exception as exc:  # noqa: BLE001
                run.fail(exc)
            spent = share + time.perf_counter() - t1
            state.row["t_embed_s"] = round(spent, 4)
            state.row["t_total_s"] = round(state.row["t_total_s"] + spent, 4)
            state.model_input = None
    return [s.result for s in states]


def _store_embeddings(state: ScanState, fmap: np.ndarray, weights, config, out_dir: Path) -> None:
    """Zone embedding rows into the state; the layer4 map (float16) into ``featuremaps/``."""
    from .embed import zone_embeddings

    e, mi, key = config.embed, state.model_input, state.row["scan_key"]
    emb = zone_embeddings(fmap, mi)
    if not np.isfinite(emb).all():
        raise ValueError("non-finite embedding (numerical overflow in the backbone)")
    rel = None
    if e.save_feature_maps:
        rel = f"featuremaps/{artifact_stem(key)}.npz"
        # float16 halves the files; maps beyond its range (untrained weights) stay float32
        layer4 = fmap.astype(np.float16) if np.abs(fmap).max() < np.finfo(np.float16).max else fmap
        arrays = {"layer4": layer4, "zones": np.array(mi.zones),
                  "meta": np.array(json.dumps({**mi.meta, "backbone": e.backbone, "recipe": mi.recipe,
                                               "feature_depth": mi.feature_depth,
                                               "slice_indices": mi.slice_indices}))}
        if mi.zone_weights is not None:
            arrays["zone_weights"] = mi.zone_weights
        atomic_write(out_dir / rel, lambda p: _savez(p, arrays))
    sha = weights.sha256
    pngs = mi.meta.get("png_paths", {})
    state.row.update(backbone=e.backbone, backbone_weights_sha256=sha, featuremap_path=rel)
    state.result["embeddings"] = [{
        "scan_key": key, "config_hash": config.config_hash, "backbone": e.backbone, "weights_sha256": sha,
        "precision": e.precision, "hu_source": e.hu_source, "zone": zone,
        "zone_pooling": e.zone_pooling if mi.recipe == "volume" else None,
        "slice_indices": mi.slice_indices.get(zone),
        "feature_depth_start": mi.feature_depth.get(zone, (None, None))[0],
        "feature_depth_stop": mi.feature_depth.get(zone, (None, None))[1],
        "embedding": emb[i].tolist(), "featuremap_path": rel, "input_png_path": pngs.get(zone),
        "input_recipe": e.input_recipe,
    } for i, zone in enumerate(mi.zones)]


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:          # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
