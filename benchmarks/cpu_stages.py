"""CPU seconds of the per-scan CPU stages (no forward), and what they produce, to compare checkouts.

``python benchmarks/cpu_stages.py run OUT.pkl [--cohort DIR ...] [--real] [--repeats R] [--profile P]``:
``pipeline.prepare_scan`` (ingest -> qc -> segment -> phenotypes -> artifacts -> resample ->
inputs; the bf16 forward, ~16 s a scan on a CPU without AMX, is left out) on every scan of each
DICOM tree DIR (e.g. an ``emphy synth --size full`` cohort's ``dicom/``) and, with ``--real``, on
the full chests of ``../shared/data``, with ``[qc] max_hu = 4000`` (the paper's 1600 HU excludes
most real scans) and the default backbone's inputs. Per stage it records **CPU seconds of this
process** (``time.process_time``: the machine is shared, wall seconds are not comparable), the
best of R, and pickles, per scan, every row (timings aside), the label mask, the airway mask and
the model input's arrays (after one untimed warm-up scan: imports). ``--profile P`` writes a cProfile of the last repeat to P.

``python benchmarks/cpu_stages.py compare OLD.pkl NEW.pkl``: masks voxel for voxel (and Dice),
rows equal, model inputs equal, then CPU seconds per stage side by side.
``masks OUT.pkl`` / ``compare-masks OLD.pkl NEW.pkl``: the threshold segmenter's labels and
airway on every real series of ../shared/data (both kernels of Lung_Dx-A0001, the slabs too).
Run ``run`` with ``PYTHONPATH`` on each checkout, in turn. Results: benchmarks/README.md.
"""
import argparse
import cProfile
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = ("lidc-idri-full/LIDC-IDRI-0013", "lidc-idri-full/LIDC-IDRI-0002", "rider-lung-ct/RIDER-1225316081",
        "lung-pet-ct-dx/Lung_Dx-A0001")
CPU_STAGES = ("ingest", "qc", "segment", "phenotypes", "artifacts", "resample", "inputs")
VOLATILE = ("worker", "warnings")


class _CpuClock:
    """Stands in for the ``time`` module of ``scan_state``: its StageClock then times CPU seconds."""

    def __getattr__(self, name):
        return time.process_time if name == "perf_counter" else getattr(time, name)


def _tasks(cohorts: list[Path], real: bool):
    from emphy_dask.job.manifest import build_manifest

    out = []
    for d in cohorts:
        out += build_manifest(d)[1]
    if real:
        for name in REAL:
            out += [t for t in build_manifest(SHARED / name)[1] if t.kind == "dicom"]
    return out


def _keep(state, out: Path) -> dict:
    import SimpleITK as sitk

    res = state.result
    scans = {k: v for k, v in res["scans"].items() if not k.startswith("t_") and k not in VOLATILE}
    mask = None
    if res["scans"].get("mask_path"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / res["scans"]["mask_path"])))
    mi = state.model_input
    arrays = {} if mi is None else {k: np.asarray(v) for k, v in vars(mi).items() if isinstance(v, np.ndarray)}
    return {"scans": scans, "phenotypes": res["phenotypes"], "slices": res["slices"], "mask": mask,
            "inputs": arrays, "input_meta": None if mi is None else {k: v for k, v in mi.meta.items()}}


def run(a) -> None:
    from emphy_dask import scan_state
    from emphy_dask.job.config import load_job
    from emphy_dask.pipeline import prepare_scan

    scan_state.time = _CpuClock()
    config = load_job(None, ["qc.max_hu=4000"])
    tasks = _tasks(a.cohort, a.real)
    results, times = {}, {}
    prof = cProfile.Profile() if a.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        # imports (torch for the input's area resize, matplotlib for the curve) outside the timings
        prepare_scan(min(tasks, key=lambda t: len(t.paths)), config, Path(tmp) / "warm")
        for r in range(a.repeats):
            for task in tasks:
                out = Path(tmp) / f"r{r}"
                if prof is not None and r == a.repeats - 1:
                    prof.enable()
                state = prepare_scan(task, config, out)
                if prof is not None:
                    prof.disable()
                row = state.row
                t = {s: row.get(f"t_{s}_s") or 0.0 for s in CPU_STAGES}
                print(task.scan_key, row["status"], row.get("reason"), {k: round(v, 2) for k, v in t.items()},
                      round(sum(t.values()), 2), flush=True)
                old = times.get(task.scan_key)
                if old is None or sum(t.values()) < sum(old.values()):
                    times[task.scan_key] = t
                if r == 0:
                    results[task.scan_key] = _keep(state, out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("peak RSS MB", round(peak_mb))
    with open(a.out, "wb") as f:
        pickle.dump({"results": results, "times": times, "peak_rss_mb": peak_mb}, f)
    if prof is not None:
        prof.dump_stats(a.profile)


def masks(a) -> None:
    """``masks OUT.pkl``: labels and airway of the threshold segmenter on every real series of
    ../shared/data (each kernel of a multi-kernel patient, the short slabs too:
    ``segment_compare.real_series``), for ``compare-masks``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from segment_compare import real_series

    from emphy_dask.io import load_ct
    from emphy_dask.segment import segment_lungs

    out = {}
    for name, path in real_series():
        vol = load_ct(path)
        labels, airway = segment_lungs(vol, with_airway=True)
        out[name] = (labels, np.packbits(airway))
        print(name, vol.shape, flush=True)
    with open(a.out, "wb") as f:
        pickle.dump(out, f)


def compare_masks(a) -> int:
    old, new = (pickle.load(open(p, "rb")) for p in (a.old, a.new))
    bad = 0
    for name, (lo, ao) in old.items():
        ln, an = new[name]
        d = int((lo != ln).sum())
        dice = 2.0 * int(((lo > 0) & (ln > 0)).sum()) / max(1, int((lo > 0).sum() + (ln > 0).sum()))
        same_airway = bool(np.array_equal(ao, an))
        bad += bool(d) or not same_airway
        print(f"{name}: labels differ {d} voxels, Dice {dice:.6f}, airway equal {same_airway}")
    print("ALL MASKS IDENTICAL" if bad == 0 else f"{bad} series differ")
    return 1 if bad else 0


def _eq(x, y) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_eq(u, v) for u, v in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        return True
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return np.array_equal(x, y, equal_nan=True)
    return x == y


def compare(a) -> int:
    old, new = (pickle.load(open(p, "rb")) for p in (a.old, a.new))
    bad = 0
    for key, o in old["results"].items():
        n = new["results"][key]
        mo, mn = o["mask"], n["mask"]
        differ = -1 if mo is None else int((mo != mn).sum())
        dice = 1.0 if mo is None else 2.0 * int(((mo > 0) & (mn > 0)).sum()) / max(1, int((mo > 0).sum() + (mn > 0).sum()))
        same = {k: _eq(o[k], n[k]) for k in ("scans", "phenotypes", "slices", "inputs", "input_meta")}
        if differ or not all(same.values()):
            bad += 1
            for k in ("scans",):
                for c in set(o[k]) | set(n[k]):
                    if not _eq(o[k].get(c), n[k].get(c)):
                        print("   ", k, c, o[k].get(c), n[k].get(c))
        to, tn = old["times"][key], new["times"][key]
        print(f"{key}: voxels differ {differ}, Dice {dice:.6f}, equal {same}")
        print("   CPU s old", {s: round(to[s], 2) for s in CPU_STAGES}, round(sum(to.values()), 2))
        print("   CPU s new", {s: round(tn[s], 2) for s in CPU_STAGES}, round(sum(tn.values()), 2))
    print("peak RSS MB old/new", round(old["peak_rss_mb"]), round(new["peak_rss_mb"]))
    print("ALL IDENTICAL" if bad == 0 else f"{bad} scans differ")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--cohort", type=Path, action="append", default=[])
    r.add_argument("--real", action="store_true")
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--profile", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    m = sub.add_parser("masks")
    m.add_argument("out", type=Path)
    cm = sub.add_parser("compare-masks")
    cm.add_argument("old", type=Path)
    cm.add_argument("new", type=Path)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
    elif a.cmd == "masks":
        masks(a)
    elif a.cmd == "compare-masks":
        sys.exit(compare_masks(a))
    else:
        sys.exit(compare(a))


if __name__ == "__main__":
    main()
