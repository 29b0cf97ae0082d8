"""Synthetic chest-CT cohort: analytic phantoms with known lungs and emphysema, written as DICOM.

See ``phantom`` (the image), ``dicom_write`` (CT Image Storage files), ``cohort`` (a whole
cohort on disk with its truth table and true masks) and ``kernels`` (one noise-free object
reconstructed with two kernels, for harmonisation tests).
"""
from emphy_dask.synth.cohort import TRUTH_COLUMNS, synth_cohort, synth_patient, write_mask_nifti
from emphy_dask.synth.dicom_write import synth_uid, write_dicom_series, write_localizer
from emphy_dask.synth.kernels import KERNEL_MODELS, render_kernel
from emphy_dask.synth.phantom import PADDING_HU_SYNTH, PATTERNS, Phantom, make_phantom, truth_from

__all__ = ["make_phantom", "Phantom", "truth_from", "PADDING_HU_SYNTH", "PATTERNS", "write_dicom_series",
           "write_localizer", "synth_uid", "synth_cohort", "synth_patient", "write_mask_nifti", "TRUTH_COLUMNS",
           "render_kernel", "KERNEL_MODELS"]
