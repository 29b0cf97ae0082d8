"""``emphy quantify``: one scan in, the CIP phenotype table out.

Everything runs on the CT's native grid (no resampling), so the numbers are those
SlicerCIP's parenchyma analysis gives for the same CT and label map.

The terminal shows the result only. What the libraries say on the way (pydicom on an odd header,
a Python warning) is recorded with the scan as in ``emphy extract``: each distinct message once,
``<stage>: <message>`` (``scan_state.scan_warnings``), in the output's ``warnings`` and in a log
file (``RunLogs``: beside ``-o`` as ``OUT.log``, else under the temporary folder), never printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from emphy_dask.errors import ScanError
from emphy_dask.io import load_ct, write_label_image
from emphy_dask.io.image_io import read_label_map
from emphy_dask.phenotypes import PHENOTYPE_COLUMNS, fov_columns, measure_lungs, parenchyma_phenotypes
from emphy_dask.phenotypes.labelmaps import ENCODING_TEXT
from emphy_dask.scan_state import scan_warnings

FOV_WARNING = ("the lung runs into the edge of the field of view ({pct:.1f} % of its border): part of it is "
               "cut away, so volume, mass and percentages describe the imaged part only")
SHARP_KERNEL_WARNING = ("sharp reconstruction kernel {kernel!r}: LAA%-950 reads several points "
                        "higher than on a standard kernel; use --harmonize, or a soft-kernel series")


def quantify_volume(volume, labels, encoding: str | None = None) -> pd.DataFrame:
    """Phenotype table of one CT and its lung label map.

    Parameters
    ----------
    volume : CTVolume
        HU (int16, shape (n_z, n_y, n_x)) with spacing and direction.
    labels : ndarray, shape ``volume.shape``
        A lung label map in any encoding of ``phenotypes.labelmaps``: 0/1 right/2 left,
        binary (sides split by components), CIP (region = value & 0xFF), LTRCLobes 1-5.
    encoding : str, optional
        Force the encoding instead of detecting it.

    Returns
    -------
    DataFrame
        One row per region (``REGIONS``, then the lobes when the map has them), columns
        ``region``, ``hu_source`` ("raw": these HU as given) + PHENOTYPE_COLUMNS.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"label map shape {labels.shape} does not match CT shape {volume.shape}")
    rows = parenchyma_phenotypes(volume.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz, encoding)
    return _table([{**r, "hu_source": "raw"} for r in rows], extra=("hu_source",))


def _table(rows: list[dict], extra: tuple = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=("region", *extra) + PHENOTYPE_COLUMNS)
    df["n_voxels"] = df["n_voxels"].astype(np.int64)
    return df


def scan_notes(meta: dict) -> tuple[str | None, list[str]]:
    """(kernel, warnings) to publish with a result, from ``CTVolume.meta``.

    Reads ``kernel``, ``kernel_class`` (io.metadata; sharp / very_sharp warn) and
    ``multi_kernel_kernels`` (io.load_ct: picked kernel first).
    """
    meta = meta or {}
    kernel = meta.get("kernel")
    warnings = []
    if meta.get("kernel_class") in ("sharp", "very_sharp"):
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


def quantify_path(ct_path, mask_path=None, save_mask_path=None, segmenter: str = "threshold",
                  mask_encoding: str | None = None, harmonize: bool = False):
    """Load a CT (and a mask, or segment one), then quantify it.

    Parameters
    ----------
    ct_path : path
        CT file or DICOM folder (anything ``emphy_dask.io.load_ct`` reads).
    mask_path : path, optional
        Lung label map on the CT grid (any encoding of ``phenotypes.labelmaps``); without it
        ``segment_lungs(volume, segmenter)``.
    save_mask_path : path, optional
        Where to write the lung labels used, 0 / 1 right / 2 left (1 = lung when sides are
        unknown), NIfTI / NRRD by extension.
    segmenter : str
        Segmenter name for ``emphy_dask.segment.segment_lungs``.
    mask_encoding : str, optional
        Force the mask's encoding (binary, right-left, cip, ltrc-lobes) instead of detecting it.
    harmonize : bool
        Also measure on kernel-harmonised HU (``preprocess.harmonize``): the table then holds
        the rows of both (``hu_source`` raw / harmonized) and the label uses the harmonised ones.

    Returns
    -------
    table : DataFrame
        As :func:`quantify_volume`; with ``harmonize`` the ``hu_source = "harmonized"`` rows follow.
    extras : dict
        ``label`` (whole-lung emphysema label, 1/0/None), ``kernel``, the kernel columns of
        ``preprocess.harmonize.harmonize_scan`` (``kernel_class`` ...), ``harmonize`` (its
        parameters, or None), ``hu_source`` (what the label used),
        ``warnings`` (list of str: sharp kernel, multi-kernel, lung cut by the field of view),
        ``cluster_d`` (Mishima D of the whole lung), ``mask_source`` ("file" or
        "segment:<name>"), ``mask_encoding`` and ``mask_notes`` (how the mask was read),
        ``fov_truncated`` and ``lung_border_at_fov_edge_pct``, ``series_uid`` (DICOM; None
        for an image file), ``library_warnings`` (list of ``<stage>: <message>``: what pydicom,
        SimpleITK's readers or a Python warning said, each once; not printed).

    Raises
    ------
    ScanError
        Missing / unreadable CT or mask, or a mask on a different grid.
    """
    for path in (ct_path, mask_path):
        if path is not None and not os.path.exists(path):
            raise ScanError(path, "no such file or folder")
    notes = {"scan_key": scan_key_of(ct_path)}     # library warnings, as a scans row's
    with scan_warnings(notes, "ingest"):
        volume, labels = _read_inputs(ct_path, mask_path)
    with scan_warnings(notes, "segment"):
        labels, source = _lung_labels(volume, labels, ct_path, mask_path, segmenter)
    with scan_warnings(notes, "phenotypes"):
        table, extras = _measure(volume, labels, ct_path, mask_path, save_mask_path, mask_encoding, harmonize)
    extras["library_warnings"] = notes["warnings"].split("; ") if notes.get("warnings") else []
    extras["mask_source"] = source
    return table, extras


def _read_inputs(ct_path, mask_path):
    """(CTVolume, the mask's labels or None); unreadable files as one-line ``ScanError``s."""
    try:
        volume = load_ct(ct_path)
    except ScanError:
        raise
    except Exception as exc:  # SimpleITK / pydicom errors -> one actionable line
        raise _read_failure(ct_path, exc, "CT") from exc
    if mask_path is None:
        return volume, None
    try:
        return volume, read_label_map(mask_path, like=volume)
    except ScanError:
        raise
    except Exception as exc:
        raise _read_failure(mask_path, exc, "mask") from exc


def _lung_labels(volume, labels, ct_path, mask_path, segmenter: str):
    """(labels without the airway, where they came from): the given mask's, or the segmenter's."""
    if labels is not None:
        if np.shape(labels) != volume.shape:
            raise ScanError(mask_path, f"mask grid {np.shape(labels)} differs from CT grid {volume.shape}",
                            stage="quantify")
        from emphy_dask.segment import airway_out

        labels, _ = airway_out(volume, labels)     # a given mask may hold the trachea and bronchi
        return np.asarray(labels), "file"
    from emphy_dask.segment import SEGMENTERS, segment_lungs

    if segmenter not in SEGMENTERS:
        raise ScanError(ct_path, f"unknown segmenter {segmenter!r}; known: {', '.join(sorted(SEGMENTERS))}",
                        stage="segment")
    try:
        labels = segment_lungs(volume, name=segmenter)
    except ScanError as exc:
        # segmenters only see arrays ("<array>"); name the file the user passed
        raise ScanError(ct_path, exc.reason, stage=exc.stage) from exc
    return np.asarray(labels), f"segment:{segmenter}"


def _measure(volume, labels, ct_path, mask_path, save_mask_path, mask_encoding, harmonize: bool):
    """The table and extras of ``quantify_path`` (``mask_source`` and ``library_warnings`` aside)."""
    try:
        m = measure_lungs(volume.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz,
                          encoding=mask_encoding)
    except ValueError as exc:            # values that fit no label encoding
        raise ScanError(mask_path or ct_path, f"cannot use the mask: {exc}", stage="quantify") from exc
    if save_mask_path is not None:
        write_label_image(m.mask.side_labels(), volume, save_mask_path)
    from emphy_dask.preprocess.harmonize import harmonize_scan

    kern, harmonized = harmonize_scan(volume, harmonize)
    rows, label, cluster_d = [{**r, "hu_source": "raw"} for r in m.regions], m.label, m.cluster_d
    if harmonized is not None:
        mh = measure_lungs(harmonized.hu, labels, volume.spacing_zyx_mm, volume.direction_xyz, encoding=mask_encoding)
        rows += [{**r, "hu_source": "harmonized"} for r in mh.regions]
        label, cluster_d = mh.label, mh.cluster_d
    table = _table(rows, extra=("hu_source",))
    kernel, warnings = scan_notes({**(volume.meta or {}), "kernel_class": None if harmonize else kern["kernel_class"]})
    if int(m.whole["n_voxels"]) == 0:
        warnings.append("empty lung mask: no phenotypes")
    fov = fov_columns(m.lung, volume.fov_mask, volume.direction_xyz)
    if fov["fov_truncated"]:
        warnings.append(FOV_WARNING.format(pct=fov["lung_border_at_fov_edge_pct"]))
    extras = {
        "label": label,
        "kernel": kernel,
        **{k: v for k, v in kern.items() if not k.startswith(("harmonize_", "t_"))},
        "harmonize": json.loads(kern["harmonize_params"]) if kern["harmonize_params"] else None,
        "hu_source": "raw" if harmonized is None else "harmonized",
        "warnings": warnings,
        "cluster_d": cluster_d,
        "mask_encoding": m.mask.encoding,
        "mask_notes": list(m.mask.notes) if mask_path is not None else [],
        "series_uid": (volume.meta or {}).get("series_uid"),
        **fov,
    }
    return table, extras


def _display_table(table: pd.DataFrame) -> str:
    """Human-readable table: percentages 2 dp, HU 1 dp, volume 3 dp, mass 1 dp."""
    shown = table.copy()
    for col in shown.columns:
        if col.endswith("_pct"):
            shown[col] = shown[col].round(2)
        elif col.endswith("_hu") or col in ("hu_mean", "hu_std", "hu_median", "hu_median_cli", "hu_mode"):
            shown[col] = shown[col].round(1)
        elif col in ("hu_skewness", "hu_kurtosis", "hu_kurtosis_pearson"):
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
    p.add_argument("--mask", default=None, help="lung label map on the CT grid: 1 right/2 left, binary, CIP "
                                                "(region = value & 0xFF) or LTRCLobes 1-5 (detected)")
    p.add_argument("--mask-encoding", default=None, choices=sorted(set(ENCODING_TEXT) - {"empty"}),
                   help="read --mask in this encoding instead of detecting it")
    p.add_argument("--save-mask", default=None, help="write the label map used to this file")
    p.add_argument("--segmenter", default="threshold", help="segmenter when no --mask (default: threshold)")
    p.add_argument("--harmonize", action="store_true",
                   help="also measure on kernel-harmonised HU (sharp kernels filtered toward a standard one); "
                        "the label then uses them")
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
    from emphy_dask.embed.weights import WeightsMissing, resolve_lungmask_weights

    from emphy_dask.job.logs import RunLogs

    log = log_path(args.ct, args.output)
    try:
        if args.segmenter == "lungmask" and not args.mask:
            resolve_lungmask_weights("R231")      # a missing weight file stops here, before reading the CT
        with RunLogs(log.parent, log.name):        # library records and warnings: the file, not the terminal
            table, extras = quantify_path(args.ct, mask_path=args.mask, save_mask_path=args.save_mask,
                                          segmenter=args.segmenter, mask_encoding=args.mask_encoding,
                                          harmonize=args.harmonize)
    except (ScanError, WeightsMissing) as exc:
        print(f"emphy quantify: {exc}", file=sys.stderr)
        return 2
    for note in extras["mask_notes"]:
        print(f"note: {note}", file=sys.stderr)
    for w in extras["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if extras["library_warnings"] and args.output is None:     # with -o the file and summary line say so
        print(f"note: {len(extras['library_warnings'])} warning(s) from reading the input, in {log}",
              file=sys.stderr)

    if args.output is None:
        print(_display_table(table))
        d = extras["cluster_d"]
        h = extras["harmonize"]
        print(f"label: {extras['label']} ({extras['hu_source']} HU)  kernel: {extras['kernel']} "
              f"[{extras['kernel_class']}, {extras['kernel_class_source']}]  "
              + (f"harmonized: strength {h['strength']}  " if h and h["applied"] else "")
              + f"cluster_d: {'nan' if d is None or math.isnan(d) else f'{d:.3f}'}  "
              f"mask: {extras['mask_source']} ({extras['mask_encoding']})")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = scan_columns(args.ct, extras)
    if out.suffix.lower() == ".csv":
        # every row names its scan and carries the scan-level facts: CSVs of many scans concatenate
        pd.concat([pd.DataFrame([ids] * len(table), index=table.index), table], axis=1).to_csv(out, index=False)
    else:
        doc = {**ids, "regions": table.to_dict(orient="records"), "label": extras["label"],
               "kernel": extras["kernel"], "kernel_class": extras["kernel_class"],
               "kernel_class_source": extras["kernel_class_source"],
               "kernel_strength": extras["kernel_strength"], "harmonize": extras["harmonize"],
               "hu_source": extras["hu_source"], "cluster_d": extras["cluster_d"],
               "mask_source": extras["mask_source"], "mask_encoding": extras["mask_encoding"],
               "mask_notes": extras["mask_notes"], "fov_truncated": extras["fov_truncated"],
               "lung_border_at_fov_edge_pct": extras["lung_border_at_fov_edge_pct"],
               "warnings": extras["warnings"], "library_warnings": extras["library_warnings"]}
        out.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    print(summary_line(out, table, extras))
    return 0


def scan_key_of(ct_path) -> str:
    """The CT's name without its image suffix (a DICOM folder's name as it is)."""
    name = Path(ct_path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def log_path(ct_path, output=None) -> Path:
    """Where ``emphy quantify`` keeps what the libraries said: ``OUT.log`` beside ``-o OUT.csv``
    (or ``.json``); without ``-o``, ``quantify-<scan key>.log`` under the temporary folder."""
    if output is not None:
        return Path(output).with_suffix(".log")
    key = scan_key_of(ct_path)
    return Path(tempfile.gettempdir()) / "emphy-logs" / f"quantify-{key}.log"


def scan_columns(ct_path, extras: dict) -> dict:
    """The scan-level columns that lead every row of ``quantify -o``: ``scan_key`` (the CT's
    name without suffix), ``input`` (the path given), series UID, label, kernel, kernel class,
    and the warnings (ours, then the libraries') joined by "; "."""
    return {"scan_key": scan_key_of(ct_path), "input": str(ct_path), "series_uid": extras.get("series_uid"),
            "label": extras["label"], "kernel": extras["kernel"], "kernel_class": extras["kernel_class"],
            "warnings": "; ".join([*extras.get("warnings", []), *extras.get("library_warnings", [])])}


def summary_line(out: Path, table: pd.DataFrame, extras: dict) -> str:
    """One line after ``quantify -o``: what was written and the whole-lung headline values."""
    whole = table[(table["region"] == "WholeLung") & (table.get("hu_source", "raw") == extras["hu_source"])]
    laa = whole["laa950_pct"].iloc[0] if len(whole) else float("nan")
    mld = whole["hu_mean"].iloc[0] if len(whole) else float("nan")
    n_warn = len(extras["warnings"]) + len(extras.get("library_warnings", []))
    warn = f", {n_warn} warning(s)" if n_warn else ""
    return (f"{out}: {len(table)} rows; WholeLung LAA%-950 {laa:.2f} %, MLD {mld:.1f} HU, label {extras['label']} "
            f"({extras['hu_source']} HU), kernel {extras['kernel'] or '?'} [{extras['kernel_class']}]{warn}")
