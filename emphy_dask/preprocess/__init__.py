"""Preprocessing: scan quality control, HU clipping and resampling."""
from emphy_dask.preprocess.qc import QCResult, QCRules, clip_hu, qc_check
from emphy_dask.preprocess.resample import resample_labels, resample_volume, resampled_shape, roi_on_grid

__all__ = ["QCRules", "QCResult", "qc_check", "clip_hu", "resample_volume", "resample_labels", "resampled_shape", "roi_on_grid"]
