"""Group header records into series and pick the one CT series to analyse per scan.

A "scan" is one top-level folder of the archive (``scan_key``, e.g. ``LIDC-IDRI-0001``);
it may hold localizers, non-CT objects and the same acquisition reconstructed with
several kernels. ``select_series`` makes one deterministic, documented choice and says
why every other series was not picked.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace, dataclass, field
from pathlib import Path

from ..errors import ScanError
from .dicom_index import empty_scan_folders, find_files, index_files, scan_key_of
from .metadata import is_sharp_kernel


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of one scan folder (facts from the headers, no pixels read).

    ``files`` are the image files to read (sorted paths; localizer images of a mixed
    series and pixel-less objects removed). ``z_min_mm``/``z_max_mm``: extent of the
    slice positions along the patient's head-feet axis (LPS z), mm.
    """

    scan_key: str
    study_uid: str | None
    series_uid: str | None
    series_number: int | None
    series_description: str | None
    modality: str | None
    kernel: str | None
    manufacturer: str | None
    slice_thickness_mm: float | None
    n_slices: int
    files: tuple
    is_localizer: bool
    frame_of_reference_uid: str | None
    acquisition_number: int | None
    model: str | None = None
    rows: int | None = None
    columns: int | None = None
    z_min_mm: float | None = None
    z_max_mm: float | None = None
    n_files: int = 0
    patient_ref: str | None = None   # one-way hash of PatientID (scans.patient_key; never the ID)
    study_date_shifted: str | None = None   # ISO date moved by the patient's offset (``shifted_date``)


@dataclass
class SeriesChoice:
    """The series picked for one scan, and why the others were not.

    not_picked : list of (series_uid, reason)
    multi_kernel_kernels : kernels (picked one first) when the same acquisition (same
        study and frame of reference, overlapping z range) was reconstructed with several
        kernels; empty tuple otherwise.
    """

    picked: SeriesInfo
    not_picked: list = field(default_factory=list)
    multi_kernel_kernels: tuple = ()
    n_candidates: int = 1   # CT, non-localizer series that competed (picked one included)


#: CT Image, Enhanced CT, Legacy Converted Enhanced CT storage SOP classes.
_CT_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


def _is_localizer_record(rec: dict) -> bool:
    return "LOCALIZER" in (rec.get("image_type") or [])


def _modality(recs: list[dict]) -> str | None:
    """The series' Modality; when the tag is missing (it is Type 1, but exports drop it) the
    SOP class decides: CT Image Storage is CT whatever the tags say is missing."""
    for r in recs:
        if r.get("modality"):
            return r["modality"]
    if recs and all(r.get("sop_class_uid") in _CT_IMAGE_CLASSES for r in recs):
        return "CT"
    return None


def _split_reexports(groups: dict) -> dict:
    """A SeriesInstanceUID found in several folders with the same slice positions under other
    SOP instances is a re-export (copies of one series), not one series: one group per folder.
    A series merely split across folders (no repeated position) stays whole."""
    out = {}
    for (key, uid, _), recs in groups.items():
        folders = defaultdict(list)
        for r in recs:
            folders[str(Path(r["path"]).parent)].append(r)
        positions = defaultdict(set)   # position -> SOP instances seen there
        for r in recs:
            if r.get("position_xyz_mm"):
                positions[tuple(round(v, 2) for v in r["position_xyz_mm"])].add(r.get("sop_instance_uid"))
        if len(folders) > 1 and any(len(sops) > 1 for sops in positions.values()):
            out.update({(key, uid, folder): rs for folder, rs in folders.items()})
        else:
            out[(key, uid, "")] = recs
    return out


def group_series(records) -> list[SeriesInfo]:
    """Group ``index_files`` records by (scan_key, series_uid) into ``SeriesInfo``.

    Localizer = every image has ImageType LOCALIZER, or the series has one slice. In a
    mixed series the LOCALIZER images are dropped from ``files``. Exact duplicate copies
    of one SOP instance are kept once. Output sorted by (scan_key, series_uid).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        if rec.get("read_error"):
            continue  # broken files: see ``broken_files``
        groups[(rec.get("scan_key") or "", rec.get("series_uid") or "", "")].append(rec)
    groups = _split_reexports(groups)
    out = []
    for (scan_key, series_uid, _folder), recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: r["path"])
        # Pixel-less objects (SR, presentation states) are dropped, but a CT image file
        # without pixels is kept so reading fails loudly on it (a truncated copy).
        images = [r for r in recs if r.get("has_pixels") or r.get("sop_class_uid") in _CT_IMAGE_CLASSES] or recs
        axial = [r for r in images if not _is_localizer_record(r)]
        use = axial or images
        seen, files = set(), []
        for r in use:
            sop = r.get("sop_instance_uid")
            if sop is not None and sop in seen:
                continue  # the same instance copied twice is not a duplicate slice
            seen.add(sop)
            files.append(r)
        first = files[0]
        zs = [r["position_xyz_mm"][2] for r in files if r.get("position_xyz_mm")]
        n = sum(int(r.get("n_frames") or 1) for r in files)
        out.append(SeriesInfo(
            scan_key=scan_key,
            study_uid=first.get("study_uid"),
            series_uid=first.get("series_uid"),
            series_number=first.get("series_number"),
            series_description=first.get("series_description"),
            modality=_modality(files),
            kernel=first.get("kernel"),
            manufacturer=first.get("manufacturer"),
            slice_thickness_mm=first.get("slice_thickness_mm"),
            n_slices=n,
            files=tuple(r["path"] for r in files),
            is_localizer=(not axial) or n <= 1,
            frame_of_reference_uid=first.get("frame_of_reference_uid"),
            acquisition_number=first.get("acquisition_number"),
            patient_ref=first.get("patient_ref"),
            study_date_shifted=first.get("study_date_shifted"),
            model=first.get("model"),
            rows=first.get("rows"),
            columns=first.get("columns"),
            z_min_mm=min(zs) if zs else None,
            z_max_mm=max(zs) if zs else None,
            n_files=len(recs),
        ))
    return out


def _kernel_rank(s: SeriesInfo) -> int:
    sharp = is_sharp_kernel(s.kernel, s.manufacturer)
    return 0 if sharp is False else 1 if sharp is True else 2


def _sort_key(s: SeriesInfo) -> tuple:
    inf = float("inf")
    return (
        -s.n_slices,
        s.slice_thickness_mm if s.slice_thickness_mm is not None else inf,
        _kernel_rank(s),
        s.series_number if s.series_number is not None else inf,
        s.series_uid or "",
    )


def _why_not(s: SeriesInfo, best: SeriesInfo) -> str:
    """Reason ``s`` lost to ``best``: the first tie-break criterion that differs."""
    if s.n_slices != best.n_slices:
        return f"fewer slices ({s.n_slices} < {best.n_slices})"
    if _sort_key(s)[1] != _sort_key(best)[1]:
        return (f"same slice count, thicker slices ({s.slice_thickness_mm} mm > "
                f"{best.slice_thickness_mm} mm)")
    if _kernel_rank(s) != _kernel_rank(best):
        label = {0: "soft", 1: "sharp", 2: "unknown"}
        return (f"same slice count and thickness, {label[_kernel_rank(s)]} kernel {s.kernel} "
                f"(preferred {label[_kernel_rank(best)]} kernel {best.kernel})")
    if s.series_number != best.series_number:
        return f"tie on slices, thickness and kernel; higher SeriesNumber ({s.series_number})"
    return "tie on slices, thickness, kernel and SeriesNumber; later series_uid"


def _overlaps(a: SeriesInfo, b: SeriesInfo, tol_mm: float = 1e-3) -> bool:
    if None in (a.z_min_mm, a.z_max_mm, b.z_min_mm, b.z_max_mm):
        return False
    return a.z_min_mm <= b.z_max_mm + tol_mm and b.z_min_mm <= a.z_max_mm + tol_mm


def select_series(series, where=None) -> SeriesChoice:
    """Pick the CT series to analyse among one scan's series.

    Candidates: modality CT and not a localizer. Pick the one with the most slices
    (whole-lung coverage, as in the paper). Ties are broken, in order, by:

    1. thinner ``slice_thickness_mm`` (unknown thickness last),
    2. softer kernel: soft/standard before sharp before unknown (``is_sharp_kernel``),
       because sharp kernels inflate LAA%-950,
    3. lower SeriesNumber (usually the scanner's primary reconstruction),
    4. lexically smaller series_uid (total determinism).

    Parameters
    ----------
    series : list of SeriesInfo
        All series of one scan (one ``scan_key``).
    where : str, optional
        Folder named in the error (default: the scan_key).

    Raises
    ------
    ScanError
        No candidate: message starts with "no CT series" and lists what was found.
    """
    series = list(series)
    where = where if where is not None else (series[0].scan_key if series else "?")
    not_picked = []
    cands = []
    for s in series:
        if (s.modality or "").upper() != "CT":
            not_picked.append((s.series_uid, f"not CT (modality {s.modality or 'missing'})"))
        elif s.is_localizer:
            not_picked.append((s.series_uid, f"localizer ({s.n_slices} slice(s))"))
        else:
            cands.append(s)
    if not cands:
        n_files = sum(s.n_files or len(s.files) for s in series)
        mods = sorted({s.modality or "missing" for s in series})
        extra = (", only localizers (scout images, single slices)"
                 if any((s.modality or "").upper() == "CT" for s in series) else "")
        raise ScanError(where, f"no CT series: {n_files} file{'s' * (n_files != 1)} in {len(series)} series, "
                               f"modalities {', '.join(mods) or 'none'}{extra}")
    cands.sort(key=_sort_key)
    best = cands[0]
    not_picked += [(s.series_uid, _why_not(s, best)) for s in cands[1:]]
    same_acq = [s for s in cands[1:] if s.study_uid == best.study_uid
                and s.frame_of_reference_uid == best.frame_of_reference_uid
                and _overlaps(s, best) and s.kernel != best.kernel]
    kernels = ()
    if same_acq:
        others = sorted({s.kernel or "unknown" for s in same_acq})
        kernels = (best.kernel or "unknown", *others)
    return SeriesChoice(picked=best, not_picked=not_picked, multi_kernel_kernels=kernels, n_candidates=len(cands))


def broken_file_error(records) -> ScanError | None:
    """ScanError naming the first unparseable DICOM file among ``records``, else None.

    A truncated file fails its whole scan: it may be a slice of the series we would pick,
    and a silently missing slice would only surface later as a confusing gap.
    """
    bad = [r for r in records if r.get("read_error")]
    if not bad:
        return None
    r = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return ScanError(r["path"], f"unreadable DICOM file {Path(r['path']).name}{more}: {r['read_error']}")


def split_patients(series: list[SeriesInfo]) -> list[SeriesInfo]:
    """One scan key per patient: a folder holding several patients' series (a flat PACS export)
    gets keys ``<folder>#1``, ``#2``, ... in order of each patient's first file path.

    Patients are told apart by ``patient_ref`` (a hash of PatientID); series without one stay
    under the folder's key.
    """
    by_key: dict[str, list] = defaultdict(list)
    for s in series:
        by_key[s.scan_key].append(s)
    out = []
    for key, group in by_key.items():
        first_file = {}
        for s in group:
            if s.patient_ref:
                first_file[s.patient_ref] = min(first_file.get(s.patient_ref, s.files[0]), *s.files)
        if len(first_file) <= 1:
            out += group
            continue
        number = {ref: i + 1 for i, ref in enumerate(sorted(first_file, key=first_file.get))}
        out += [replace(s, scan_key=f"{key}#{number[s.patient_ref]}") if s.patient_ref else s for s in group]
    return out


def choose_by_scan(records, root) -> dict:
    """Records of a tree -> {scan_key: SeriesChoice | ScanError} (errors returned, not raised)."""
    records = list(records)
    recs_by_key: dict[str, list] = defaultdict(list)
    for r in records:
        recs_by_key[r.get("scan_key") or ""].append(r)
    by_key: dict[str, list] = defaultdict(list)
    for s in split_patients(group_series(records)):
        by_key[s.scan_key].append(s)
    out = {}
    for key in sorted(set(recs_by_key) | set(by_key)):
        folder_key = key.split("#")[0]
        folder = Path(root) / folder_key if folder_key != Path(root).name else Path(root)
        err = broken_file_error(recs_by_key.get(key, []))
        if err is not None:
            out[key] = err
            continue
        if key not in by_key:
            continue   # a folder whose series all moved to per-patient keys
        try:
            out[key] = select_series(by_key[key], where=str(folder))
        except ScanError as e:
            out[key] = e
    return out


def scans_from_index(files, records, root) -> dict:
    """``{scan_key: SeriesChoice | ScanError}`` from a tree's file list and its header records.

    A scan folder whose files hold no DICOM at all maps to a ScanError too, unless it is a
    collection folder above other scans (README, LICENSE, metadata.csv lie there) or the
    root itself beside scan folders. So does an empty folder (no file at any depth) beside
    the scan folders: a patient whose export failed must not vanish from the results. That
    look at the folders needs the tree, so it is skipped when ``records`` come without
    ``files`` (a manifest's rows, keyed by the manifest, not by folders).
    """
    root = Path(root)
    records = list(records)
    out = choose_by_scan(records, root)
    counts: dict[str, int] = defaultdict(int)
    for f in files:
        counts[scan_key_of(f, root)] += 1
    for key, n in counts.items():
        if key in out:
            continue
        if key == root.name and (out or len(counts) > 1):
            continue
        if any(other.startswith((key + "/", key + "#")) for other in out):
            continue
        out[key] = ScanError(root / key if key != root.name else root, f"no DICOM files found ({n} other files)")
    if files or not records:
        for key in empty_scan_folders(root, set(counts) | set(out)):
            out.setdefault(key, ScanError(root / key, "empty folder: no files at all"))
    return dict(sorted(out.items()))


def index_tree(root) -> dict:
    """Serial convenience: ``{scan_key: SeriesChoice | ScanError}`` for a whole tree."""
    root = Path(root)
    files = find_files(root)
    return scans_from_index(files, index_files(files, root), root)
