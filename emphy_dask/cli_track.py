"""``emphy track``: a run's patients followed over time (registered by ``cli.build_parser``)."""
from __future__ import annotations

import argparse
import sys


def add_track_command(sub) -> None:
    p = sub.add_parser("track", help="follow each patient's scans over time: change, annual rate, "
                                     "volume-adjusted PD15 (writes longitudinal/ and track/)")
    p.add_argument("out", help="an extract run folder")
    p.add_argument("-o", "--track-dir", help="where to write longitudinal/ and track/ (default: the run folder)")
    p.add_argument("--by", default="patient",
                   help="group scans by: patient (scans.patient_key, the default) or another scans column")
    p.add_argument("--reference-volume", type=float, metavar="LITRES",
                   help="adjust PD15 to this whole-lung volume (default: each patient's first scan)")
    p.add_argument("--no-figures", action="store_true", help="tables and track.json only")
    p.set_defaults(func=cmd_track)


def cmd_track(args: argparse.Namespace) -> int:
    from .track.run import TrackError, track_run

    if args.reference_volume is not None and not args.reference_volume > 0:
        print("emphy track: --reference-volume must be a positive number of litres", file=sys.stderr)
        return 2
    try:
        s = track_run(args.out, args.track_dir, by=args.by,
                      reference="first" if args.reference_volume is None else args.reference_volume,
                      figures_on=not args.no_figures)
    except TrackError as exc:
        print(f"emphy track: {exc}", file=sys.stderr)
        return 2
    dest = args.track_dir or args.out
    print(f"{s['patients']} patients, {s['patients_with_pairs']} with 2+ scans, {s['pairs']} pairs "
          f"({s['same_day_pairs']} same day); {len(s['scans_left_out'])} scans left out"
          f"{' (see track/track.json)' if s['scans_left_out'] else ''}; in {s['seconds']:.1f} s")
    for r in s["fastest"][:3]:
        print(f"  fastest: {r['patient_key']}: PD15 {r['pd15_rate_g_l_per_year']:+.2f} g/L per year "
              f"(volume-adjusted), LAA%-950 {r['laa950_change_pct']:+.2f} points over {r['years']:.1f} years")
    print(f"tables: {dest}/longitudinal/  page: {dest}/track/index.html")
    return 0
