"""Time ``emphy fit`` and ``emphy report`` on a fabricated run of N scans (default 1,000).

The tables are fabricated from random arrays with a density signal (``models.fabricate``); the
scans share 8 random feature-map files and PNGs, so every scan page draws its maps as a real run's
would. Prints the seconds of each step, the largest page and the report's size.

    .venv/bin/python benchmarks/fit_report_scale.py [N] [--out DIR]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from emphy_dask.models.fabricate import fabricate_run
from emphy_dask.models.fit import fit_run
from emphy_dask.models.settings import FitSettings
from emphy_dask.report import build_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=1000)
    ap.add_argument("--out", help="keep the run here (default: a temporary folder, removed)")
    args = ap.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="emphy-scale-"))
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    fabricate_run(run, args.n, seed=0, signal=0.5, n_excluded=args.n // 20, n_featuremaps=8, discordant_every=8)
    print(f"fabricated {args.n} ok + {args.n // 20} excluded scans in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    m = fit_run(run, FitSettings())
    print(f"fit: {time.perf_counter() - t:.1f} s  (steps: {m['timing_s']})")
    print(f"  paper AUC {m['paper_protocol']['auc']:.3f}, honest AUC {m['nested_cv']['auc']:.3f}")
    t = time.perf_counter()
    index = build_report(run)
    print(f"report: {time.perf_counter() - t:.1f} s")
    files = [p for p in (run / "report").rglob("*") if p.is_file()]
    pages = [p for p in files if p.suffix == ".html"]
    biggest = max(pages, key=lambda p: p.stat().st_size)
    print(f"  {len(pages)} pages, largest {biggest.name} {biggest.stat().st_size / 1e6:.2f} MB "
          f"(index {index.stat().st_size / 1e6:.2f} MB); report folder {sum(p.stat().st_size for p in files) / 1e6:.0f} MB "
          f"in {len(files)} files")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
