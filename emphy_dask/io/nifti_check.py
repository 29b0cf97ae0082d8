"""Is a NIfTI file complete? ITK's NIfTI reader zero-fills a truncated file without a word.

Measured with SimpleITK: a ``.nii.gz`` cut to a third, or a ``.nii`` cut in half, reads as a
full-size image whose missing voxels are 0 (a mask that silently loses lung; a CT whose tail is
-0 HU "water"). NRRD and MetaImage readers raise on the same damage, so only NIfTI needs this
check: the header says how many bytes of voxels follow, and we count them.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_CHUNK = 1 << 20


def _header_bytes(path: Path) -> bytes:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return fh.read(540)
    except (OSError, EOFError, zlib.error):
        return b""


def expected_nifti_bytes(header: bytes) -> int | None:
    """vox_offset + voxel bytes promised by a single-file NIfTI-1/2 header; None if not one."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 \
                and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 \
                and header[4:7] == b"n+2":
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = dims[0]
    if not 1 <= n_dims <= 7 or bitpix <= 0:
        return None
    n_voxels = 1
    for d in dims[1:n_dims + 1]:
        n_voxels *= max(int(d), 1)
    return offset + n_voxels * bitpix // 8


def nifti_truncation(path) -> str | None:
    """Why the single-file NIfTI at ``path`` is incomplete, or None (complete, or not such a file).

    ``.nii.gz`` is decompressed as a stream (constant memory) to count its bytes.
    """
    path = Path(path)
    expected = expected_nifti_bytes(_header_bytes(path))
    if expected is None:
        return None
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        return None if size >= expected else (f"truncated file: {size} bytes, the NIfTI header promises "
                                              f"{expected}")
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                got += len(chunk)
    except (EOFError, zlib.error, OSError) as e:
        return f"truncated or corrupt gzip stream ({e})"
    return None if got >= expected else f"truncated file: {got} bytes, the NIfTI header promises {expected}"
