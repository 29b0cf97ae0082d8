"""A generator of broken archives: every way an input tree goes wrong, beside good scans.

``make_broken_archive(root, clean)`` copies the patients of a synthetic cohort (``emphy synth``,
``clean`` = its ``dicom/`` folder) into ``root`` and adds one scan folder per case. Each case says
what the job must make of it (``Case``): a ``failed`` row whose reason matches a pattern, or an
``ok`` row, for the cases that must be read correctly (compressed, flattened, untagged, tilted);
``same_as`` names the clean patient whose phenotype rows a good variant must reproduce exactly.

Files are written with the project's writers (``emphy_dask.synth`` and ``tests.dicom_factory``)
and edited with pydicom (``retag``), never byte by byte except to truncate. Broken cases use
tiny images (8x8 to 48x48) so the corpus stays quick to write and to run.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

from emphy_dask.io import find_files, load_ct, read_header

from .dicom_factory import make_slice, write_series

#: Voxel limit the corpus runs with (EMPHY_MAX_VOXELS): above every good scan (the tilted one,
#: grown by its padding rows, ~0.7 M), below the "too large" series.
LIMIT_VOXELS = 1_200_000
TOO_LARGE = (600, 48, 48)          # slices, rows, columns: 1.38 M voxels
TILT_BAD_DEG = 40.0
TILT_SHIFT_PX = 0.2                # rows per slice of the good tilted case (~8.5 degrees)


@dataclass(frozen=True)
class Case:
    """What the job must make of one scan folder of the corpus.

    key : scan key (the folder name under root)
    status : "ok" or "failed"
    reason : regex the ``scans.reason`` must match (failed cases)
    same_as : clean scan key whose phenotypes/slices rows this scan must reproduce (ok cases)
    rtol : relative tolerance of that comparison (0 = exact)
    what : the case, in words
    """

    key: str
    status: str
    what: str
    reason: str | None = None
    same_as: str | None = None
    rtol: float = 0.0


def retag(path, **changes) -> Path:
    """Rewrite DICOM attributes of one file in place; a value of None deletes the attribute."""
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)
    return Path(path)


def dicom_files(folder) -> list[Path]:
    return [p for p in find_files(folder) if read_header(p) is not None]


def series_files(patient) -> list[Path]:
    """Files of a synthetic patient's thin (picked) series, in slice order."""
    files = load_ct_files(patient)
    zs = [read_header(f)["position_xyz_mm"][2] for f in files]
    return [f for _, f in sorted(zip(zs, files))]


def load_ct_files(patient) -> list[Path]:
    from emphy_dask.io import index_tree

    choice = index_tree(patient)
    (c,) = choice.values()
    return [Path(p) for p in c.picked.files]


def truncate(path, keep: int) -> None:
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])


def write_tilted_series(folder, field, *, tilt_deg: float, n: int, rows: int, cols: int, spacing_mm: float,
                        table_step_mm: float, center_xyz_mm=(0.0, 0.0, 0.0), padding_value=-2000,
                        **ids) -> list[Path]:
    """A gantry-tilted axial series: slice planes tilted by ``tilt_deg`` about the patient's
    left-right (x) axis, stacked along the table (z) by ``table_step_mm`` (a sheared grid).

    ``field(points_xyz_mm (N, 3)) -> HU (N,)`` gives the HU at LPS points; NaN = outside the
    scan field of view (stored as ``padding_value``). Slice k's centre pixel row/column sits at
    ``center + (0, 0, (k - (n-1)/2) * table_step)``. Row cosine (1,0,0), column cosine
    (0, cos t, sin t). Returns the files in slice order.
    """
    t = math.radians(tilt_deg)
    r, c = np.array([1.0, 0, 0]), np.array([0.0, math.cos(t), math.sin(t)])
    ii, jj = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "for_uid": generate_uid(), **ids}
    out = []
    for k in range(n):
        centre = np.asarray(center_xyz_mm, float) + np.array([0, 0, (k - (n - 1) / 2) * table_step_mm])
        ipp = centre - (cols - 1) / 2 * spacing_mm * r - (rows - 1) / 2 * spacing_mm * c
        pts = ipp + (jj.ravel()[:, None] * spacing_mm) * r + (ii.ravel()[:, None] * spacing_mm) * c
        hu = np.asarray(field(pts), float).reshape(rows, cols)
        raw = np.where(np.isnan(hu), padding_value, np.rint(np.nan_to_num(hu)) + 1024).astype(np.int16)
        path = make_slice(Path(folder) / f"t{k:04d}.dcm", z_mm=0.0, raw=raw, rows=rows, cols=cols,
                          spacing_mm=spacing_mm, thickness_mm=table_step_mm, instance_number=k + 1,
                          padding_value=padding_value, **ids)
        retag(path, ImagePositionPatient=[f"{v:.6f}" for v in ipp],
              ImageOrientationPatient=[1, 0, 0, 0, f"{math.cos(t):.8f}", f"{math.sin(t):.8f}"],
              GantryDetectorTilt=f"{tilt_deg:.2f}")
        out.append(path)
    return out


def write_sheared_copy(volume, folder, *, shift_px_per_slice: float = TILT_SHIFT_PX, padding_value=-2000) -> float:
    """Write ``volume`` (a CTVolume, identity direction, square pixels) as a gantry-tilted series
    whose unshearing gives back exactly its voxel arrays (with padding rows added above and below).

    Slice k is acquired ``k * shift_px_per_slice`` rows further along its column axis, as a tilted
    gantry does while the table moves; 0.2 keeps every shift 0.1 pixel away from a rounding tie.
    The normal step stays the volume's slice spacing. Returns the tilt in degrees.
    """
    nz, ny, nx = volume.shape
    step, dy, _ = volume.spacing_zyx_mm
    t = math.atan(shift_px_per_slice * dy / step)
    r, c = np.array([1.0, 0, 0]), np.array([0.0, math.cos(t), math.sin(t)])
    normal = np.cross(r, c)
    top = int(np.rint(shift_px_per_slice * (nz - 1)))
    fov = volume.fov_mask if volume.fov_mask is not None else np.ones(volume.shape, bool)
    ids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "for_uid": generate_uid()}
    for k in range(nz):
        shift = int(np.rint(shift_px_per_slice * k))
        raw = np.full((ny + top, nx), padding_value, np.int16)
        raw[top - shift:top - shift + ny] = np.where(fov[k], volume.hu[k].astype(np.int32) + 1024, padding_value)
        ipp = np.asarray(volume.origin_xyz_mm) + k * step * normal + k * shift_px_per_slice * dy * c
        path = make_slice(Path(folder) / f"t{k:04d}.dcm", z_mm=0.0, raw=raw, rows=ny + top, cols=nx, spacing_mm=dy,
                          thickness_mm=step, instance_number=k + 1, padding_value=padding_value, **ids)
        retag(path, ImagePositionPatient=[f"{v:.6f}" for v in ipp],
              ImageOrientationPatient=[1, 0, 0, 0, f"{math.cos(t):.8f}", f"{math.sin(t):.8f}"],
              GantryDetectorTilt=f"{math.degrees(t):.2f}")
    return math.degrees(t)


def linear_field(points_xyz_mm: np.ndarray) -> np.ndarray:
    """HU = 2 x - 3 y + 1.5 z - 300 (LPS mm): exact under linear interpolation, so any geometry
    error of a resampler shows up as a difference."""
    p = np.asarray(points_xyz_mm, float)
    return 2.0 * p[:, 0] - 3.0 * p[:, 1] + 1.5 * p[:, 2] - 300.0


def _dicomdir(dst: Path, example: Path) -> None:
    """A real DICOMDIR (pydicom FileSet) referencing ``example``; only the index file is kept."""
    import tempfile

    from pydicom.fileset import FileSet

    ds = pydicom.dcmread(example)
    for tag, value in (("PatientID", "ANON"), ("PatientName", "ANON"), ("StudyDate", "20000101"),
                       ("StudyTime", "120000"), ("StudyID", "1"), ("InstanceNumber", 1)):
        if tag not in ds:                   # what the default directory records need
            setattr(ds, tag, value)
    with tempfile.TemporaryDirectory() as tmp:
        fs = FileSet()
        fs.add(ds)
        fs.write(tmp)
        shutil.copy(Path(tmp) / "DICOMDIR", dst / "DICOMDIR")


def _junk(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("exported from PACS\n")
    (folder / "notes.xml").write_text("<notes><n>not DICOM</n></notes>\n")
    (folder / "empty.dcm").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "thumb.jpg")


def _tiny(folder, n=6, **kw) -> list[Path]:
    return write_series(folder, n=n, **kw)


def make_broken_archive(root, clean) -> list[Case]:
    """Write the corpus under ``root`` from the clean synthetic archive ``clean``; return the cases.

    ``clean`` must hold at least two synthetic patients (``emphy synth``); the first two (sorted)
    are copied unchanged (``A``, ``B``) and every variant derives from them or is tiny.
    """
    root, clean = Path(root), Path(clean)
    a_key, b_key = sorted(p.name for p in clean.iterdir() if p.is_dir())[:2]
    A, B = clean / a_key, clean / b_key
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    # --- good scans, unchanged (non-DICOM files beside them: README, XML, JPEG, DICOMDIR, empty file)
    shutil.copytree(A, root / a_key)
    shutil.copytree(B, root / b_key)
    study = next(p for p in (root / a_key).iterdir() if p.is_dir())
    _junk(study)
    _dicomdir(root / a_key, series_files(root / a_key)[0])
    (root / "README.md").write_text("archive notes\n")
    (root / "metadata.csv").write_text("scan,notes\n")
    cases += [Case(a_key, "ok", "clean patient with non-DICOM files and a DICOMDIR beside its series", same_as=a_key),
              Case(b_key, "ok", "clean patient", same_as=b_key)]

    # --- good variants: same pixels, other encodings or tags -> the same numbers
    for key, syntax in (("OK-JPEG2000", JPEG2000Lossless), ("OK-JPEGLS", JPEGLSLossless)):
        shutil.copytree(A, root / key)
        for f in dicom_files(root / key):
            ds = pydicom.dcmread(f)
            ds.compress(syntax)
            ds.save_as(f)
        cases.append(Case(key, "ok", f"series stored as {syntax.name}: decoded", same_as=a_key))
    flat = root / "OK-SEVERAL-SERIES-ONE-FOLDER"
    flat.mkdir()
    for f in dicom_files(A):
        shutil.copy(f, flat / f"{f.parent.name[-6:]}-{f.name}")
    cases.append(Case(flat.name, "ok", "localizer, thin and thick series in one folder", same_as=a_key))
    shutil.copytree(A, root / "OK-NO-MODALITY")
    for f in dicom_files(root / "OK-NO-MODALITY"):
        retag(f, Modality=None)
    cases.append(Case("OK-NO-MODALITY", "ok", "Modality tag missing; CT Image Storage says CT", same_as=a_key))
    shutil.copytree(A, root / "OK-HU-WITHOUT-RESCALE")
    for f in dicom_files(root / "OK-HU-WITHOUT-RESCALE"):
        ds = pydicom.dcmread(f)
        raw = ds.pixel_array.astype(np.int32)
        pad = raw == -2000
        hu = np.where(pad, -3024, raw - 1024).astype(np.int16)   # stored values are HU already
        ds.PixelData = hu.tobytes()
        ds.add_new(0x00280120, "SS", -3024)                      # PixelPaddingValue, signed
        for tag in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(f)
    cases.append(Case("OK-HU-WITHOUT-RESCALE", "ok", "HU stored directly, no rescale tags", same_as=a_key))
    shutil.copytree(B, root / "OK-SAME-FILE-TWICE")
    victim = series_files(root / "OK-SAME-FILE-TWICE")[10]
    shutil.copy(victim, victim.with_name("copy-of-" + victim.name))
    cases.append(Case("OK-SAME-FILE-TWICE", "ok", "one slice file copied twice (same SOP instance)", same_as=b_key))
    tilt = write_sheared_copy(load_ct(A), root / "OK-TILTED-GANTRY" / "study" / "series")
    cases.append(Case("OK-TILTED-GANTRY", "ok", f"{a_key} acquired with a {tilt:.1f} degree gantry tilt: once "
                                                "unsheared, its voxels are the untilted ones", same_as=a_key,
                      rtol=1e-6))

    # --- broken: each fails with a reason naming the file and what is wrong
    files = _tiny(root / "BAD-TRUNCATED-HEADER" / "st" / "se")
    truncate(files[3], 600)
    cases.append(Case("BAD-TRUNCATED-HEADER", "failed", "a file cut inside its header",
                      r"unreadable DICOM file s003\.dcm: truncated"))
    files = _tiny(root / "BAD-TRUNCATED-PIXELS" / "st" / "se")
    truncate(files[2], -40)
    cases.append(Case("BAD-TRUNCATED-PIXELS", "failed", "a file cut inside its pixel data",
                      r"s002\.dcm.*(truncated|broken)"))
    _tiny(root / "BAD-NOT-CT" / "st" / "se", n=5, modality="MR")
    cases.append(Case("BAD-NOT-CT", "failed", "an MR series only", r"no CT series: 5 files in 1 series, modalities MR"))
    loc = next(f for f in dicom_files(A) if "LOCALIZER" in read_header(f)["image_type"])
    (root / "BAD-LOCALIZER-ONLY" / "st" / "se").mkdir(parents=True)
    shutil.copy(loc, root / "BAD-LOCALIZER-ONLY" / "st" / "se" / loc.name)
    cases.append(Case("BAD-LOCALIZER-ONLY", "failed", "a study holding only its scout image",
                      r"no CT series: 1 file in 1 series, modalities CT, only localizers"))
    shutil.copytree(B, root / "BAD-MISSING-SLICE")
    gone = series_files(root / "BAD-MISSING-SLICE")
    gone[len(gone) // 2].unlink()
    cases.append(Case("BAD-MISSING-SLICE", "failed", "the middle slice of the picked series missing",
                      r"slice gap: .* expected 5\.000 mm: 1 slice\(s\) missing"))
    ids = dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())
    _tiny(root / "BAD-DUPLICATE-SLICE" / "st" / "se", **ids)
    make_slice(root / "BAD-DUPLICATE-SLICE" / "st" / "se" / "again.dcm", z_mm=4.0, raw=np.full((8, 8), 900), **ids)
    cases.append(Case("BAD-DUPLICATE-SLICE", "failed", "two different images at one slice position",
                      r"duplicate slice position 4\.00 mm: files (again\.dcm and s002\.dcm|s002\.dcm and again\.dcm)"))
    ids = dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())
    for i, z in enumerate((0, 2, 4, 6, 9, 12, 15)):
        make_slice(root / "BAD-MIXED-SLICE-SPACING" / "st" / "se" / f"m{i}.dcm", z_mm=z, **ids)
    cases.append(Case("BAD-MIXED-SLICE-SPACING", "failed", "slice steps of 2 mm then 3 mm in one series",
                      r"mixed slice spacing within the series .*steps of 2\.000 mm \(3x\), 3\.000 mm \(3x\); "
                      r"the step changes from 2\.000 to 3\.000 mm between positions 6\.00 mm and 9\.00 mm "
                      r"\(files m3\.dcm, m4\.dcm\)"))
    files = _tiny(root / "BAD-MIXED-PIXEL-SPACING" / "st" / "se")
    retag(files[4], PixelSpacing=[0.6, 0.6])
    cases.append(Case("BAD-MIXED-PIXEL-SPACING", "failed", "one slice with another pixel spacing",
                      r"mixed pixel spacing within the series: PixelSpacing 0\.6 x 0\.6 mm in s004\.dcm"))
    write_tilted_series(root / "BAD-TILTED-40" / "st" / "se", linear_field, tilt_deg=TILT_BAD_DEG, n=5, rows=16,
                        cols=16, spacing_mm=1.0, table_step_mm=2.0)
    cases.append(Case("BAD-TILTED-40", "failed", f"a {TILT_BAD_DEG:g} degree shear, beyond any gantry",
                      r"gantry tilt 40\.0 degrees .*exceeds 30 degrees"))
    (root / "BAD-EMPTY-FOLDER").mkdir()
    cases.append(Case("BAD-EMPTY-FOLDER", "failed", "an empty patient folder", r"empty folder: no files at all"))
    _junk(root / "BAD-NOT-DICOM" / "docs")
    cases.append(Case("BAD-NOT-DICOM", "failed", "a folder of non-DICOM files",
                      r"no DICOM files found \(4 other files\)"))
    files = _tiny(root / "BAD-RAW-WITHOUT-RESCALE" / "st" / "se")
    for f in files:
        retag(f, RescaleIntercept=None, RescaleSlope=None)
    cases.append(Case("BAD-RAW-WITHOUT-RESCALE", "failed", "raw scanner values without rescale tags",
                      r"no RescaleIntercept/RescaleSlope in s000\.dcm and 5 more files.*not HU"))
    n, rows, cols = TOO_LARGE
    ids = dict(series_uid=generate_uid(), study_uid=generate_uid(), for_uid=generate_uid())
    raw = np.full((rows, cols), 24, np.int16)
    for k in range(n):
        make_slice(root / "BAD-TOO-LARGE" / "st" / "se" / f"z{k:04d}.dcm", z_mm=0.5 * k, raw=raw, **ids)
    cases.append(Case("BAD-TOO-LARGE", "failed", f"{n} slices of {rows}x{cols}, over the voxel limit",
                      rf"series too large, not decoded: {n} slices of {rows}x{cols} = 1\.4 M voxels.*"
                      r"over the limit of 1\.2 M voxels \(EMPHY_MAX_VOXELS\)"))
    return cases
