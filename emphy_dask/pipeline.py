"""One scan, start to finish, as plain functions: the units of work the Dask job schedules.

The CPU half of a scan is ``prepare_scan`` (ingest -> QC -> segment -> phenotypes -> artifacts
-> resample the lung box to 1 mm -> model inputs); with the ``lungmask`` segmenter it stops after
lungmask's preprocessing, the U-Net runs on a device (``device_stages.lungmask_on_device``) and
``finish_scan`` does the rest. The device half is ``device_stages.embed_states`` (backbone
forward on a batch of scans). Each returns a ``ScanState`` (``scan_state``): the rows for every
output table so far plus the arrays the next task needs. ``local.process_scan`` chains them in
one process, ``job/flow`` on a cluster.

Nothing here raises for a bad scan: errors become a ``failed`` row with the stage and a one-line
reason, QC exclusions an ``excluded`` row. Nothing knows about Dask, so the same functions run
in a loop, a test or on workers.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ScanError
from .heap import trim_heap
from .io.atomic import atomic_write
from .scan_state import STAGES, ScanState, ScanTask, StageClock, artifact_stem


def _trim() -> None:
    """After each stage: its freed temporaries go back to the OS (glibc keeps them otherwise, and
    the next stage's peak would stack on them: -0.25 GB peak RSS on a full-size scan)."""
    trim_heap(collect=False)


def _meta_columns(meta: dict) -> dict:
    keys = ("series_uid", "study_uid", "series_number", "series_description", "manufacturer", "model",
            "kernel", "kernel_class", "kvp", "tube_current_ma", "slice_thickness_mm", "spacing_x_mm",
            "spacing_y_mm", "spacing_z_mm", "n_slices", "rows", "columns", "transfer_syntax")
    row = {k: meta.get(k) for k in keys}
    row["source_format"] = meta.get("source_format", "dicom")
    return row


def _load(task: ScanTask):
    from .io import read_dicom_series, read_image

    if task.kind == "dicom":
        return read_dicom_series([Path(p) for p in task.paths])
    if task.kind == "image":
        return read_image(Path(task.paths[0]))
    if task.kind == "dicomweb":
        from .io.dicomweb import read_dicomweb_series

        return read_dicomweb_series(task.paths)
    raise ScanError(task.error_path or task.scan_key, task.error or f"unknown scan kind {task.kind!r}", stage="index")


def prepare_scan(task: ScanTask, config, out_dir, worker: str | None = None) -> ScanState:
    """CPU half of a scan: ingest -> QC -> segment -> phenotypes -> artifacts -> resample -> inputs.

    With ``[segment].name = "lungmask"`` it stops after lungmask's preprocessing (the state then
    carries ``lungmask_input`` and the volume); ``finish_scan`` goes on once the U-Net ran.

    Parameters
    ----------
    task : ScanTask
    config : emphy_dask.job.config.JobConfig (weights resolved, see ``embed.weights.resolve_weights``)
    out_dir : path
        Run folder; masks go to ``masks/``, QC images to ``qc/`` (paths in the row are relative).
    worker : str, optional
        Recorded in the scans row.
    """
    from .preprocess import resampled_shape

    row = {"scan_key": task.scan_key, "config_hash": config.config_hash, "status": "ok",
           "emphy_version": __version__, "worker": worker, **task.selection,
           **{f"t_{s}_s": None for s in STAGES}, "t_total_s": 0.0}
    state = ScanState({"scans": row, "phenotypes": [], "slices": [], "embeddings": [], "errors": []})
    run = StageClock(state, config, after_stage=_trim)
    t0 = time.perf_counter()
    try:
        volume = run("ingest", _load, task)
        row.update(_meta_columns(volume.meta))
        qc = run("qc", _run_qc, volume, config)
        row.update(qc_max_hu=qc.max_hu, qc_std_hu=qc.std_hu, qc_rule=qc.rule)
        if not qc.passed:
            row.update(status="excluded", reason=f"QC rule {qc.rule}: value {qc.value:.1f}")
            return state
        grid = resampled_shape(volume, tuple(config.resample.spacing_mm))
        row.update(grid_1mm_z=grid[0], grid_1mm_y=grid[1], grid_1mm_x=grid[2],
                   segmenter=config.segment.name if config.segment.name != "lungmask"
                   else f"lungmask:{config.segment.model}")
        if config.segment.name == "lungmask":
            from .segment.lungmask import lungmask_preprocess

            state.lungmask_input = run("segment", lungmask_preprocess, volume)
            state.volume = volume
            return state
        labels, airway = run("segment", _segment, volume, config)
        row["device_segment"] = "cpu"
        return _measure(state, run, task.scan_key, volume, labels, config, Path(out_dir), airway)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the job goes on
        return run.fail(exc)
    finally:
        row["t_total_s"] = round(row["t_total_s"] + time.perf_counter() - t0, 4)


def finish_scan(state: ScanState, raw_labels, config, out_dir) -> ScanState:
    """CPU, after lungmask's U-Net: its post-processing, then phenotypes -> artifacts -> inputs.

    ``raw_labels`` is what ``device_stages.lungmask_on_device`` returned for this scan (a
    ``DeviceOutput``: the U-Net's labels or the exception that stopped it, seconds, device).
    """
    from .segment.lungmask import lungmask_postprocess

    if not state.ok:
        return state
    run = StageClock(state, config, after_stage=_trim)
    run.stage = "segment"
    t0 = time.perf_counter()
    try:
        state.row["device_segment"] = raw_labels.device
        state.row["t_segment_s"] = round((state.row["t_segment_s"] or 0.0) + raw_labels.seconds, 4)
        state.row["t_total_s"] += raw_labels.seconds
        if isinstance(raw_labels.value, BaseException):
            raise raw_labels.value
        labels = run("segment", lungmask_postprocess, raw_labels.value, state.lungmask_input, state.volume,
                     config.segment.model)
        volume = state.volume
        state.volume = state.lungmask_input = None
        labels, airway = run("segment", _airway_out, volume, labels)     # lungmask's R231 keeps bronchi
        return _measure(state, run, state.row["scan_key"], volume, labels, config, Path(out_dir), airway)
    except Exception as exc:  # noqa: BLE001
        return run.fail(exc)
    finally:
        state.row["t_total_s"] = round(state.row["t_total_s"] + time.perf_counter() - t0, 4)


def _measure(state: ScanState, run: StageClock, key: str, volume, labels, config, out_dir: Path,
             airway=None) -> ScanState:
    row, h = state.row, config.config_hash
    if airway is not None:          # trachea and bronchi kept out of the lungs (segment/airway.py)
        row["airway_ml_removed"] = round(float(airway.count) * volume.voxel_volume_mm3 / 1000.0, 2)
    lobes = config.segment.name == "lungmask" and config.segment.model == "LTRCLobes"
    pheno = run("phenotypes", _phenotypes, volume, labels, config, "ltrc-lobes" if lobes else None)
    if lobes:                       # lobes measured; the mask file and model inputs keep the sides
        from .segment.lungmask import LOBES_TO_SIDE

        labels = LOBES_TO_SIDE[labels]
    row.update(pheno["summary"])
    state.result["phenotypes"] = [{"scan_key": key, "config_hash": h, **r} for r in pheno["regions"]]
    state.result["slices"] = [{"scan_key": key, "config_hash": h, **r} for r in pheno["slices"]]
    row.update(run("artifacts", _artifacts, key, volume, labels, pheno, config, out_dir, airway))
    if config.embed.backbone != "none":
        resampled, labels_1mm = run("resample", _resample_lung_box, volume, labels, config,
                                    pheno["harmonized_volume"])
        state.model_input = run("inputs", _model_input, key, resampled, labels_1mm, config, out_dir)
    return state


def _resample_lung_box(volume, labels, config, harmonized=None):
    """The 1 mm volume and mask over the lung box plus the input's margin only: the same voxels as
    resampling the whole scan (``preprocess.roi_on_grid``), at a fraction of the cost.

    ``[embed].hu_source = "harmonized"``: from the kernel-harmonised volume ``harmonized``
    (``kernel_stage`` made it, the phenotypes' own when ``[harmonize]`` is on).
    """
    from .embed import BACKBONES
    from .embed.inputs import ras_axes
    from .preprocess import resample_labels, resample_volume, roi_on_grid

    if config.embed.hu_source == "harmonized":
        volume = harmonized
    spacing = tuple(config.resample.spacing_mm)
    # the 2.5D recipe cuts an in-plane square around the lung box: widen the box to it
    square = ras_axes(volume.direction_xyz)[0][1:] if BACKBONES[config.embed.backbone].recipe == "slabs" else ()
    roi = roi_on_grid(volume, labels > 0, spacing, config.embed.margin_mm, square_axes=square)
    resampled = resample_volume(volume, spacing, roi=roi)
    resampled.meta["roi_1mm_zyx"] = [list(b) for b in roi]     # where the box lies on the whole 1 mm grid
    return resampled, resample_labels(labels, volume, resampled)


def _model_input(key: str, resampled, labels_1mm, config, out_dir: Path):
    """The backbone's input from the 1 mm volume and mask; its QC pictures go to ``qc/``."""
    from .embed import inputs_for

    mi = inputs_for(config.embed, resampled.hu, labels_1mm, resampled.direction_xyz,
                    clip_hu=(config.qc.clip_min_hu, config.qc.clip_max_hu))
    mi.meta["roi_1mm_zyx"] = resampled.meta.get("roi_1mm_zyx")
    if config.output.write_qc_png:
        from PIL import Image

        stem = artifact_stem(key)
        for zone, img in mi.png_slices.items():
            rel = f"qc/{stem}_input_{zone}.png"
            pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            atomic_write(out_dir / rel, lambda p: Image.fromarray(pixels).save(p, format="PNG"))
            mi.meta.setdefault("png_paths", {})[zone] = rel
    mi.png_slices = {}      # written: no need to ship them to the device
    return mi


def _run_qc(volume, config):
    from .preprocess import qc_check

    return qc_check(volume, config.qc)


def _segment(volume, config):
    from .segment import segment_lungs

    labels, airway = segment_lungs(volume, config.segment.name, with_airway=True)
    return labels, BitMask.pack(airway)


def _airway_out(volume, labels):
    from .segment import airway_out

    labels, airway = airway_out(volume, labels)
    return labels, BitMask.pack(airway)


class BitMask:
    """A bool volume packed 8 voxels to a byte (``np.packbits``), with its voxel count.

    The airway mask is kept from the segmentation to the QC montage; packed, it holds 1/8 of a
    bool array's memory while the phenotypes, the scan's peak, run. ``unpack`` gives it back exactly.
    """

    def __init__(self, bits: np.ndarray, shape: tuple, count: int):
        self.bits, self.shape, self.count = bits, tuple(shape), int(count)

    @classmethod
    def pack(cls, mask: np.ndarray) -> "BitMask":
        mask = np.asarray(mask, bool)
        return cls(np.packbits(mask, axis=None), mask.shape, np.count_nonzero(mask))

    def unpack(self) -> np.ndarray:
        """The bool array, shape ``self.shape``."""
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).view(bool).reshape(self.shape)



def _phenotypes(volume, labels, config, encoding: str | None = None) -> dict:
    from .phenotypes import fov_columns, measure_lungs, region_phenotypes

    # kernel class (+ image estimate) always; harmonised HU when [harmonize] is on: then the
    # label, summary and slice curve use them and the phenotypes come on both HU (hu_source)
    kernel_cols, harmonized_volume = kernel_stage(volume, config)
    harmonized = harmonized_volume if config.harmonize.enabled else None     # else made for the model inputs
    source = "raw" if harmonized is None else "harmonized"
    label_hu = volume.hu if harmonized is None else harmonized.hu
    m = measure_lungs(label_hu, labels, volume.spacing_zyx_mm, volume.direction_xyz, config.label, encoding)
    regions = [{**r, "hu_source": source} for r in m.regions]
    if harmonized is not None:
        raw = region_phenotypes(volume.hu, m.mask, volume.spacing_zyx_mm)
        regions = [{**r, "hu_source": "raw"} for r in raw] + regions
        raw_mld = next(r["hu_mean"] for r in raw if r["region"] == "WholeLung")
        kernel_cols["harmonize_mld_shift_hu"] = round(float(m.whole["hu_mean"] - raw_mld), 2)
    c = m.curve
    slices = [{"slice_index": int(k), "rank_from_superior": int(r), "depth_mm": float(dmm),
               "n_lung_voxels": int(n), "laa950_pct": float(pct)}
              for k, r, dmm, n, pct in zip(c["slice_index"], c["rank_from_superior"], c["depth_mm"],
                                           c["n_lung_voxels"], c["laa_pct"]) if n > 0]
    summary = {"lung_volume_l": m.whole["volume_l"], "laa950_pct": m.whole["laa950_pct"],
               "hu_mean": m.whole["hu_mean"],
               "cluster_d": float(m.cluster_d) if np.isfinite(m.cluster_d) else None, "label": m.label,
               **fov_columns(m.lung, volume.fov_mask, volume.direction_xyz), **kernel_cols, "hu_source": source}
    return {"regions": regions, "slices": slices, "summary": summary, "harmonized_volume": harmonized_volume}


def kernel_stage(volume, config):
    """Kernel columns of the scans row and the harmonised volume: made when ``[harmonize]`` is on
    or the model inputs want it (``[embed].hu_source``), from one kernel estimate; else None."""
    from .preprocess.harmonize import harmonize_scan

    return harmonize_scan(volume, config.harmonize.enabled, config.harmonize.method,
                          volume_only=config.embed.backbone != "none" and config.embed.hu_source == "harmonized")


def _artifacts(key: str, volume, labels, pheno, config, out_dir: Path, airway=None) -> dict:
    from .io import write_label_image
    from .qc_images import laa_curve_png, qc_montage_png

    name = artifact_stem(key)
    paths = {"mask_path": None, "qc_montage_path": None, "qc_curve_path": None}
    if config.output.write_masks:
        rel = f"masks/{name}.nii.gz"
        atomic_write(out_dir / rel, lambda p: write_label_image(labels, volume, p))
        paths["mask_path"] = rel
    if config.output.write_qc_png:
        rel_m, rel_c = f"qc/{name}_montage.png", f"qc/{name}_laa_curve.png"
        airway = None if airway is None else airway.unpack()
        atomic_write(out_dir / rel_m, lambda p: qc_montage_png(volume.hu, labels, volume.direction_xyz, p,
                                                               airway=airway))
        atomic_write(out_dir / rel_c, lambda p: laa_curve_png(pheno["slices"], p, title=key))
        paths.update(qc_montage_path=rel_m, qc_curve_path=rel_c)
    return paths


