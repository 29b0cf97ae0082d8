"""Today's classical segmenter against the reference copy of commit c896889: masks and seconds.

``python benchmarks/segment_compare.py [--repeats R] [--ref] [EXTRA_DICOM_DIR ...]``: every real
series of ``../shared/data`` (each series of a multi-kernel patient separately) plus the patient
folders under each EXTRA_DICOM_DIR (e.g. a full-size ``emphy synth`` cohort's ``dicom/``). Per
series: the reference and today's ``lung_mask_threshold``, interleaved R times (the machine is
shared: the best of R is printed), then the voxels that differ, Dice per lung and the voxels of
the airway that today's segmenter removed (label 1 or 2 in the reference, 0 now, HU < -900).
Results are recorded in benchmarks/README.md.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segment_reference  # noqa: E402  (the copy of commit c896889, not part of the package)

from emphy_dask.io import load_ct  # noqa: E402
from emphy_dask.segment import lung_mask_threshold  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_series() -> list[tuple[str, Path]]:
    """(name, folder) of every real CT series in ../shared/data."""
    out = []
    for name in ("lidc-idri-full/LIDC-IDRI-0013", "lidc-idri-full/LIDC-IDRI-0002",
                 "rider-lung-ct/RIDER-1225316081", "lidc-idri-slabs/LIDC-IDRI-0001",
                 "lidc-idri-slabs/LIDC-IDRI-0002", "lidc-idri-slabs/LIDC-IDRI-0003"):
        out.append((name, SHARED / name))
    for series in sorted((SHARED / "lung-pet-ct-dx/Lung_Dx-A0001").glob("*/*")):
        if series.is_dir():
            out.append((f"lung-pet-ct-dx/Lung_Dx-A0001/{series.name}", series))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def compare(name: str, path: Path, repeats: int) -> dict:
    vol = load_ct(path)
    args = (vol.hu, vol.spacing_zyx_mm, vol.direction_xyz, vol.fov_mask)
    t_ref, t_new = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = segment_reference.lung_mask_threshold(*args)
        t_ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = lung_mask_threshold(*args)
        t_new.append(time.perf_counter() - t0)
    voxel_ml = vol.voxel_volume_mm3 / 1000.0
    removed = (ref > 0) & (new == 0)
    return {"series": name, "shape": list(vol.shape), "ref_s": round(min(t_ref), 2), "new_s": round(min(t_new), 2),
            "voxels_differ": int((ref != new).sum()),
            "dice_right": round(dice(ref == 1, new == 1), 5), "dice_left": round(dice(ref == 2, new == 2), 5),
            "dice_lung": round(dice(ref > 0, new > 0), 5),
            "lung_ml_ref": round(float((ref > 0).sum()) * voxel_ml, 1),
            "lung_ml_new": round(float((new > 0).sum()) * voxel_ml, 1),
            "removed_ml": round(float(removed.sum()) * voxel_ml, 1),
            "removed_air_ml": round(float((removed & (vol.hu < -900)).sum()) * voxel_ml, 1),
            "laa950_ref_pct": laa_pct(vol.hu, ref), "laa950_new_pct": laa_pct(vol.hu, new),
            **truth_dice(path, vol, ref, new)}


def laa_pct(hu: np.ndarray, labels: np.ndarray) -> float:
    lung = labels > 0
    return round(100.0 * float((lung & (hu < -950)).sum()) / max(int(lung.sum()), 1), 3)


def truth_dice(path: Path, vol, ref: np.ndarray, new: np.ndarray) -> dict:
    """Dice of both masks against the true lungs of an ``emphy synth`` cohort (``masks/KEY.nii.gz``
    beside ``dicom/``; the truth excludes the trachea and main bronchi); {} for real series."""
    from emphy_dask.io import read_label_image

    truth_path = path.parent.parent / "masks" / f"{path.name}.nii.gz"
    if not truth_path.exists():
        return {}
    truth = read_label_image(truth_path, vol) > 0
    return {"dice_truth_ref": round(dice(ref > 0, truth), 5), "dice_truth_new": round(dice(new > 0, truth), 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="substring of the series names to run")
    ap.add_argument("extra", nargs="*", type=Path)
    a = ap.parse_args()
    todo = real_series() + [(f"synth/{p.name}", p) for d in a.extra for p in sorted(d.iterdir()) if p.is_dir()]
    for name, path in todo:
        if a.only in name:
            print(json.dumps(compare(name, path, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
