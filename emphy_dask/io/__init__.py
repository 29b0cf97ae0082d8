"""Ingestion: find DICOM files, index headers, pick one CT series per scan, read HU volumes.

Typical distributed use: ``find_files(root)`` -> chunks -> ``index_files(chunk, root)`` on
workers -> ``scans_from_index`` (group + select per ``scan_key``) -> ``read_dicom_series``.
``load_ct`` is the one-call entry point for a single file or folder.
"""
from .dicom_index import find_files, index_files, read_header, scan_key_of
from .dicom_read import PADDING_BELOW_HU, read_dicom_series
from .image_io import load_ct, read_image, read_label_image, write_label_image
from .metadata import PHI_TAGS, PUBLIC_KEYS, is_sharp_kernel, scan_metadata
from .series import (SeriesChoice, SeriesInfo, broken_file_error, choose_by_scan, group_series, index_tree,
                     scans_from_index, select_series)

__all__ = [
    "find_files", "read_header", "index_files", "scan_key_of",
    "SeriesInfo", "SeriesChoice", "group_series", "select_series", "choose_by_scan", "index_tree", "scans_from_index",
    "broken_file_error",
    "read_dicom_series", "PADDING_BELOW_HU",
    "read_image", "read_label_image", "write_label_image", "load_ct",
    "scan_metadata", "is_sharp_kernel", "PHI_TAGS", "PUBLIC_KEYS",
]
