"""Fabricated extract runs for tests and benchmarks: tables written from random arrays.

``fabricate_run`` writes ``scans/``, ``phenotypes/``, ``embeddings/`` (and, on request, shared
feature maps and PNGs) exactly as ``extract`` lays them out, with no image processing:

- ``signal = 0``: pure noise; labels drawn at random, independent of the embeddings.
- ``signal > 0``: a density signal; LAA%-950 drives the label (paper rule) and shifts the first
  ``n_signal`` embedding channels by ``signal`` standard deviations per standard deviation of LAA%;
  with ``discordant_every = k``, every k-th scan over 6 % gets an MLD above -850 HU, hence label 0
  (the paper's discordant case).
- ``n_groups > 0``: scans belong to that many patients / base anatomies (``scans.patient_key``
  and ``base_key`` in ``covariates.csv``); each group shifts every embedding channel by its own
  offset (``group_signal`` standard deviations: anatomy dominates). With ``signal = 0`` the label
  is drawn per group, so it is learnable only by recognising a group seen in training: a split
  that is not grouped scores high, a grouped one reads chance or below.
- ``n_classes > 0``: a categorical ``pattern`` (``covariates.csv``) drawn per scan, each class
  shifting its own block of 5 channels by ``class_signal`` standard deviations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..tables import write_part

ZONES = ("whole", "upper", "middle", "lower")


def fabricate_run(out, n_scans: int, *, seed: int = 0, signal: float = 0.0, n_signal: int = 10, dim: int = 2048,
                  backbone: str = "ct-i3resnet152", weights_sha256: str = "f" * 64, n_excluded: int = 0,
                  n_featuremaps: int = 0, discordant_every: int = 0, part_size: int = 200,
                  hu_source: str = "raw", n_groups: int = 0, group_signal: float = 3.0, n_classes: int = 0,
                  class_signal: float = 2.0, input_recipe: str | None = "upstream") -> Path:
    """Write a run of ``n_scans`` ok scans (+ ``n_excluded`` excluded ones) under ``out``.

    ``n_featuremaps`` > 0: that many random float16 layer4 files (shape of ct-i3resnet152) and
    grey PNGs, shared cyclically by the scans (for the report's scale benchmark; the maps do not
    reproduce the table's embeddings).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    n = n_scans
    if signal > 0:
        laa = np.where(rng.random(n) < 0.5, rng.uniform(6.5, 25, n), rng.uniform(0.2, 5, n))
        mld = -845.0 - 1.3 * laa + rng.normal(0, 2, n)
        if discordant_every:                   # dense lungs over 6 %: label 0 (the paper's discordant case)
            over = np.flatnonzero(laa >= 6)[::discordant_every]
            mld[over] = np.linspace(-849, -835, len(over))
        label = ((laa >= 6) & (mld < -850)).astype(int)
    else:
        laa = rng.uniform(0.2, 25, n)
        mld = rng.uniform(-880, -830, n)
        label = rng.permutation(np.arange(n) % 2)          # random, balanced, unrelated to anything
    emb = rng.normal(size=(n, len(ZONES), dim)).astype(np.float32)
    if signal > 0:
        z = (laa - laa.mean()) / laa.std()
        emb[:, :, :n_signal] += (signal * z)[:, None, None]
    group = np.arange(n) % n_groups if n_groups else None
    if n_groups:
        offsets = rng.normal(scale=group_signal, size=(n_groups, 1, dim)).astype(np.float32)
        emb += offsets[group]
        if signal == 0:                                   # the label belongs to the group, not to the scan
            label = rng.permutation(np.arange(n_groups) % 2)[group]
    pattern = rng.integers(0, n_classes, n) if n_classes else None
    if n_classes:
        for cl in range(n_classes):
            emb[pattern == cl, :, n_signal + 5 * cl:n_signal + 5 * cl + 5] += class_signal
    maps = _shared_files(out, n_featuremaps, rng) if n_featuremaps else []
    manufacturers = np.array(["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"])
    kernels = {"SIEMENS": ("B30f", "standard"), "GE MEDICAL SYSTEMS": ("LUNG", "sharp"), "Philips": ("B", "soft")}
    scans, pheno, embs = [], [], []
    for i in range(n + n_excluded):
        key = f"FAB-{i:05d}"
        man = str(manufacturers[i % 3])
        files = maps[i % len(maps)] if maps else {}
        row = {"scan_key": key, "config_hash": "fabricated", "status": "ok", "manufacturer": man,
               "kernel": kernels[man][0], "kernel_class": kernels[man][1], "qc_max_hu": 1200.0, "qc_std_hu": 400.0,
               "segmenter": "threshold", "qc_montage_path": files.get("montage"), "qc_curve_path": files.get("curve")}
        if i >= n:                                         # excluded by the max-HU rule, mostly one vendor
            row.update(status="excluded", qc_rule="max_hu>1600", qc_max_hu=3071.0, reason="max HU 3071 > 1600",
                       manufacturer="GE MEDICAL SYSTEMS", kernel="LUNG", kernel_class="sharp")
            scans.append(row)
            continue
        if n_groups:
            row["patient_key"] = f"PAT-{group[i]:03d}"
        row.update(laa950_pct=float(laa[i]), hu_mean=float(mld[i]), label=int(label[i]), lung_volume_l=4.5,
                   cluster_d=1.5, backbone=backbone, backbone_weights_sha256=weights_sha256,
                   featuremap_path=files.get("featuremap"))
        scans.append(row)
        for region, f in (("WholeLung", 1.0), ("UpperThird", 1.3), ("MiddleThird", 1.0), ("LowerThird", 0.7)):
            pheno.append({"scan_key": key, "config_hash": "fabricated", "region": region, "hu_source": "raw",
                          "n_voxels": 100000, "laa950_pct": float(laa[i] * f), "hu_mean": float(mld[i]),
                          "perc15_hu": float(mld[i] - 60 - 2 * laa[i] * f), "volume_l": 1.5})
        for zi, zone in enumerate(ZONES):
            embs.append({"scan_key": key, "config_hash": "fabricated", "backbone": backbone,
                         "weights_sha256": weights_sha256, "precision": "fp32", "hu_source": hu_source, "zone": zone,
                         "input_recipe": input_recipe,
                         "zone_pooling": "lung", "embedding": emb[i, zi].tolist(),
                         "featuremap_path": files.get("featuremap"), "input_png_path": files.get(zone)})
    for table, rows, per in (("scans", scans, part_size), ("phenotypes", pheno, part_size * 4),
                             ("embeddings", embs, part_size * len(ZONES))):
        for j in range(0, len(rows), per):
            write_part(table, rows[j:j + per], out, f"fab{j // per:04d}")
    if n_groups or n_classes:
        import pandas as pd

        cov = pd.DataFrame({"scan_key": [f"FAB-{i:05d}" for i in range(n)]})
        if n_groups:
            cov["base_key"] = [f"BASE-{g:03d}" for g in group]
        if n_classes:
            cov["pattern"] = np.array(["centrilobular", "panlobular", "paraseptal", "bullous", "other"])[pattern % 5]
        cov.to_csv(out / "covariates.csv", index=False)
    (out / "run.json").write_text(json.dumps({"command": "fabricated", "config": {
        "label": {"laa950_min_pct": 6.0, "mld_max_hu": -850.0}}}))
    return out


def _shared_files(out: Path, k: int, rng) -> list[dict]:
    """k random feature-map files (float16 layer4, zone weights, meta) with grey PNGs of their zones."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    files = []
    for j in range(k):
        stem = f"fab{j:03d}"
        rel = {"featuremap": f"featuremaps/{stem}.npz", "montage": f"qc/{stem}_montage.png",
               "curve": f"qc/{stem}_laa_curve.png"}
        zw = rng.random((len(ZONES), 10, 7, 7)).astype(np.float32)
        zw /= zw.sum(axis=(1, 2, 3), keepdims=True)
        meta = {"input_size": [160, 224, 224], "png_depth": {z: 20 + 40 * i for i, z in enumerate(ZONES)},
                "png_paths": {}, "axes": "S,R,A"}
        for zone in ZONES:
            rel[zone] = meta["png_paths"][zone] = f"qc/{stem}_input_{zone}.png"
        (out / "featuremaps").mkdir(parents=True, exist_ok=True)
        (out / "qc").mkdir(parents=True, exist_ok=True)
        np.savez(out / rel["featuremap"], layer4=np.abs(rng.normal(size=(2048, 10, 7, 7))).astype(np.float16),
                 zones=np.array(ZONES), zone_weights=zw, meta=np.array(json.dumps(meta)))
        for name in (*ZONES, "montage", "curve"):
            size = (224, 224) if name in ZONES else ((600, 600) if name == "montage" else (400, 200))
            # smooth blobs, not pixel noise: compresses like a CT slice does
            smooth = gaussian_filter(rng.normal(size=size), 6)
            grey = 255 * (smooth - smooth.min()) / (np.ptp(smooth) or 1)
            Image.fromarray(grey.astype(np.uint8)).save(out / rel[name])
        files.append(rel)
    return files
