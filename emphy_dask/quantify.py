"""``emphy quantify``: one scan in, the CIP phenotype table out.

Everything runs on the CT's native grid (no resampling), so the numbers are those
SlicerCIP's parenchyma analysis gives for the same CT and label map.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from emphy_dask.errors import ScanError
from emphy_dask.io import load_ct, read_label_image, write_label_image
from emphy_dask.phenotypes import PHENOTYPE_COLUMNS, measure_lungs, parenchyma_phenotypes

SHARP_KERNEL_WARNING = ("sharp reconstruction kernel {kernel!r}: LAA%-950 reads several points "
                        "higher than on a soft kernel; prefer a soft-kernel series for emphysema")


def quantify_volume(volume, labels) -> pd.DataFrame:
    """Phenotype table of one CT and its lung label map.

    Parameters
    ----------
    volume : CTVolume
        HU (int16, shape (n_z, n_y, n_x)) with spacing and direction.
    labels : ndarray, shape ``volume.shape``
        0 background, 1 right lung, 2 left lung; other nonzero values = lung
        without sides (binarised: WholeLung and thirds only).

    Returns
    -------
    DataFrame
        One row per region (``REGIONS`` order), columns ``region`` + PHENOTYPE_COLUMNS.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"label map shape {labels.shape} does not match CT shape {volume.shape}")
    return _table(parenchyma_phenotypes(volume.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz))


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=("region",) + PHENOTYPE_COLUMNS)
    df["n_voxels"] = df["n_voxels"].astype(np.int64)
    return df


def scan_notes(meta: dict) -> tuple[str | None, list[str]]:
    """(kernel, warnings) to publish with a result, from ``CTVolume.meta``.

    Reads ``kernel``, ``kernel_is_sharp`` (io.metadata) and ``multi_kernel_kernels``
    (io.load_ct: picked kernel first).
    """
    meta = meta or {}
    kernel = meta.get("kernel")
    warnings = []
    if meta.get("kernel_is_sharp"):
        warnings.append(SHARP_KERNEL_WARNING.format(kernel=kernel))
    kernels = tuple(meta.get("multi_kernel_kernels") or ())
    if len(kernels) > 1:
        # io lists the picked kernel first, then the other reconstructions of the same scan
        warnings.append(f"same acquisition reconstructed with {len(kernels)} kernels "
                        f"({', '.join(map(str, kernels))}); used {kernels[0]}")
    return kernel, warnings


def _read_failure(path, exc: Exception, what: str) -> ScanError:
    # One line, no traceback: the reason is the first line of the library's message.
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ScanError(path, f"cannot read {what}: {msg}")


def quantify_path(ct_path, mask_path=None, save_mask_path=None, segmenter: str = "threshold"):
    """Load a CT (and a mask, or segment one), then quantify it.

    Parameters
    ----------
    ct_path : path
        CT file or DICOM folder (anything ``emphy_dask.io.load_ct`` reads).
    mask_path : path, optional
        Lung label map on the CT grid; without it ``segment_lungs(volume, segmenter)``.
    save_mask_path : path, optional
        Where to write the label map used (NIfTI / NRRD by extension).
    segmenter : str
        Segmenter name for ``emphy_dask.segment.segment_lungs``.

    Returns
    -------
    table : DataFrame
        As :func:`quantify_volume`.
    extras : dict
        ``label`` (whole-lung emphysema label, 1/0/None), ``kernel``, ``kernel_is_sharp``,
        ``warnings`` (list of str: sharp kernel, multi-kernel notes), ``cluster_d``
        (Mishima D of the whole lung), ``mask_source`` ("file" or "segment:<name>").

    Raises
    ------
    ScanError
        Missing / unreadable CT or mask, or a mask on a different grid.
    """
    for path in (ct_path, mask_path):
        if path is not None and not os.path.exists(path):
            raise ScanError(path, "no such file or folder")
    try:
        volume = load_ct(ct_path)
    except ScanError:
        raise
    except Exception as exc:  # SimpleITK / pydicom errors -> one actionable line
        raise _read_failure(ct_path, exc, "CT") from exc

    if mask_path is not None:
        try:
            labels = read_label_image(mask_path, like=volume)
        except ScanError:
            raise
        except Exception as exc:
            raise _read_failure(mask_path, exc, "mask") from exc
        if np.shape(labels) != volume.shape:
            raise ScanError(mask_path, f"mask grid {np.shape(labels)} differs from CT grid {volume.shape}",
                            stage="quantify")
        source = "file"
    else:
        from emphy_dask.segment import SEGMENTERS, segment_lungs
        if segmenter not in SEGMENTERS:
            raise ScanError(ct_path, f"unknown segmenter {segmenter!r}; known: {', '.join(sorted(SEGMENTERS))}",
                            stage="segment")
        try:
            labels = segment_lungs(volume, name=segmenter)
        except ScanError as exc:
            # segmenters only see arrays ("<array>"); name the file the user passed
            raise ScanError(ct_path, exc.reason, stage=exc.stage) from exc
        source = f"segment:{segmenter}"
    labels = np.asarray(labels)

    if save_mask_path is not None:
        write_label_image(labels.astype(np.uint8, copy=False), volume, save_mask_path)

    m = measure_lungs(volume.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz)
    table = _table(m.regions)
    kernel, warnings = scan_notes(volume.meta)
    if int(m.whole["n_voxels"]) == 0:
        warnings.append("empty lung mask: no phenotypes")
    extras = {
        "label": m.label,
        "kernel": kernel,
        "kernel_is_sharp": (volume.meta or {}).get("kernel_is_sharp"),
        "warnings": warnings,
        "cluster_d": m.cluster_d,
        "mask_source": source,
    }
    return table, extras


def _display_table(table: pd.DataFrame) -> str:
    """Human-readable table: percentages 2 dp, HU 1 dp, volume 3 dp, mass 1 dp."""
    shown = table.copy()
    for col in shown.columns:
        if col.endswith("_pct"):
            shown[col] = shown[col].round(2)
        elif col.endswith("_hu") or col in ("hu_mean", "hu_std", "hu_median"):
            shown[col] = shown[col].round(1)
        elif col in ("hu_skewness", "hu_kurtosis"):
            shown[col] = shown[col].round(3)
        elif col.endswith("_l"):
            shown[col] = shown[col].round(3)
        elif col.endswith("_g"):
            shown[col] = shown[col].round(1)
    return shown.to_string(index=False)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None                      # JSON has no NaN
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emphy quantify",
                                description="CIP-compatible emphysema phenotypes of one CT scan.")
    p.add_argument("--ct", required=True, help="CT file (NIfTI/NRRD/MHA) or DICOM series folder")
    p.add_argument("--mask", default=None, help="lung label map on the CT grid (1 right, 2 left)")
    p.add_argument("--save-mask", default=None, help="write the label map used to this file")
    p.add_argument("--segmenter", default="threshold", help="segmenter when no --mask (default: threshold)")
    p.add_argument("-o", "--output", default=None, help="OUT.csv (one row per region) or OUT.json")
    return p


def run_quantify_cli(argv=None) -> int:
    """``emphy quantify`` entry point; returns the process exit code.

    0 success; 2 bad arguments or unreadable input (one line on stderr, no traceback).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:            # argparse already printed usage + reason
        return int(exc.code or 0)
    if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".json"):
        print(f"emphy quantify: {args.output}: output must end in .csv or .json", file=sys.stderr)
        return 2
    try:
        table, extras = quantify_path(args.ct, mask_path=args.mask, save_mask_path=args.save_mask,
                                      segmenter=args.segmenter)
    except ScanError as exc:
        print(f"emphy quantify: {exc}", file=sys.stderr)
        return 2
    for w in extras["warnings"]:
        print(f"warning: {w}", file=sys.stderr)

    if args.output is None:
        print(_display_table(table))
        d = extras["cluster_d"]
        print(f"label: {extras['label']}  kernel: {extras['kernel']}  "
              f"cluster_d: {'nan' if d is None or math.isnan(d) else f'{d:.3f}'}")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        table.to_csv(out, index=False)
    else:
        doc = {"regions": table.to_dict(orient="records"), "label": extras["label"],
               "kernel": extras["kernel"], "cluster_d": extras["cluster_d"],
               "mask_source": extras["mask_source"], "warnings": extras["warnings"]}
        out.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    return 0
