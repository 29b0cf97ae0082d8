"""The ``emphy`` command: synth, insert, quantify, extract, fit, predict, report, demo, schemas."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", help="job file (jobs/NAME.toml); default: the paper's settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one job setting, checked like the job file (repeatable), e.g. --set qc.max_hu=3072")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="join a running cluster: tcp://HOST:PORT or a scheduler file")
    where.add_argument("--workers", type=int, help="LocalCluster worker processes (default from the job)")
    p.add_argument("--segmenter", help="lung segmenter (overrides the job's [segment].name)")
    p.add_argument("--backbone", help="embedding backbone: ct-i3resnet152, resnet152 or none (overrides [embed].backbone)")
    p.add_argument("--weights", help="the backbone's weight file (overrides [embed].weights)")
    p.add_argument("--input-recipe", dest="input_recipe",
                   help="HU windows of the backbone's input: upstream, lung, multiwindow or laamap (overrides "
                        "[embed].input_recipe; see docs/models.md)")
    p.add_argument("--limit", type=int, help="process only the first N scans of the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="start clean instead of resuming: removes what emphy wrote in OUT, refuses other files")
    p.add_argument("--force", action="store_true",
                   help="with --overwrite: OUT holds other files too; keep them, remove emphy's")
    p.add_argument("--retry", choices=("failed",),
                   help="'failed': redo every failed scan (a failed scan whose input changed is always redone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--pseudonymize", action="store_true",
                   help="scan keys -> keyed hashes (secret in $EMPHY_PSEUDONYM_KEY) in every table, file name and log")
    tls = p.add_argument_group("TLS (a cluster started with distributed's TLS settings; see docs/privacy.md)")
    tls.add_argument("--tls-ca-file", help="CA certificate (PEM) the cluster's certificates are signed with")
    tls.add_argument("--tls-cert", help="this client's certificate (PEM); with --workers, also the local cluster's")
    tls.add_argument("--tls-key", help="the private key of --tls-cert (PEM), if not in the same file")


def _security(args):
    """A ``distributed.security.Security`` from the --tls-* flags, or None (then Dask's own
    config, e.g. ``distributed.comm.tls`` in DASK_CONFIG, still applies)."""
    ca, cert, key = (getattr(args, a, None) for a in ("tls_ca_file", "tls_cert", "tls_key"))
    if not (ca or cert or key):
        return None
    from distributed.security import Security

    from .errors import ConfigError

    if not (ca and cert):
        raise ConfigError("--tls-ca-file and --tls-cert go together (and --tls-key unless the key is in the cert file)")
    for f in (ca, cert, key):
        if f and not Path(f).is_file():
            raise ConfigError(f"{f}: TLS file not found")
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert,
                    tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)


def _job_config(args):
    import dataclasses

    from .errors import ConfigError
    from .jobfile import load_jobfile

    cfg = load_jobfile(args.job, getattr(args, "overrides", None) or ())[0]   # [fit] checked too
    if getattr(args, "segmenter", None):
        from .segment import SEGMENTERS

        if args.segmenter not in SEGMENTERS:
            raise ConfigError(f"--segmenter: unknown segmenter {args.segmenter!r} (known: {', '.join(SEGMENTERS)})")
        cfg = dataclasses.replace(cfg, segment=dataclasses.replace(cfg.segment, name=args.segmenter))
    embed = {k: v for k, v in (("backbone", getattr(args, "backbone", None)),
                               ("weights", getattr(args, "weights", None)),
                               ("input_recipe", getattr(args, "input_recipe", None))) if v}
    if embed:
        from .job.config import config_from_dict

        merged = {**dataclasses.asdict(cfg.embed), **embed}
        cfg = dataclasses.replace(cfg, embed=config_from_dict({"embed": merged}, "command line").embed)
    return cfg


def cmd_extract(args) -> int:
    from .embed.weights import WeightsMissing
    from .errors import ConfigError, ScanError
    from .job.pseudonym import PseudonymError
    from .job.interrupt import Interrupted, install_sigterm, signal_of
    from .job.runner import SchedulerLost, run_extract
    from .job.store import ConfigMismatch

    install_sigterm()                 # SIGTERM stops the job like Ctrl-C: finished scans kept
    try:
        if args.force and not args.overwrite:
            raise ConfigError("--force goes with --overwrite (it keeps OUT's other files while removing emphy's)")
        cfg = _job_config(args)
        summary = run_extract(args.input, args.out, cfg, scheduler=args.scheduler, workers=args.workers,
                              limit=args.limit, overwrite=args.overwrite, progress=not args.no_progress,
                              security=_security(args), pseudonymize=args.pseudonymize, force=args.force,
                              retry_failed=args.retry == "failed")
    except (ConfigError, ConfigMismatch, ScanError, WeightsMissing, PseudonymError) as exc:
        print(f"emphy extract: {exc}", file=sys.stderr)
        return 2
    except SchedulerLost as exc:
        print(f"emphy extract: {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"emphy extract: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # before the job started (settings, cluster start-up)
        print(f"emphy extract: {Interrupted(0, 0, signal_of(exc))}", file=sys.stderr)
        return 128 + signal_of(exc)
    from .io.storage import as_url

    c = summary.counts
    redone = f", {summary.n_redone} failed redone" if summary.n_redone else ""
    print(f"{as_url(summary.out_dir)}: {summary.n_scans} scans ({summary.n_skipped} resumed{redone}) - ok {c.get('ok', 0)}, "
          f"excluded {c.get('excluded', 0)}, failed {c.get('failed', 0)} in {summary.wall_s:.1f} s")
    from .job.summary import end_of_run_lines

    lines, warnings = end_of_run_lines(summary.out_dir, cfg)
    for line in lines:
        print(line)
    for w in warnings:
        print(w, file=sys.stderr)
    return summary.exit_code


def cmd_synth(args) -> int:
    from .synth import synth_cohort

    truth = synth_cohort(args.out, args.patients, seed=args.seed, size=args.size)
    print(f"{args.out}: {len(truth)} patients, {int(truth['label'].sum())} emphysema-positive; truth in "
          f"{Path(args.out) / 'truth.csv'}")
    return 0


def cmd_insert(args) -> int:
    from .synth.insert_cohort import insert_cohort

    try:
        truth, refused = insert_cohort(args.base, args.out, patterns=args.patterns, severities=args.severities,
                                       seed=args.seed)
    except ValueError as exc:
        print(f"emphy insert: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(truth)} variants of {truth['base_id'].nunique()} bases, {len(refused)} bases refused; "
          f"truth in {Path(args.out) / 'truth.csv'}; run: emphy extract {Path(args.out) / 'dicom'} -o RUN")
    return 0 if len(truth) or not refused else 1


def cmd_demo(args) -> int:
    import pandas as pd

    from .job.runner import run_extract
    from .jobfile import load_jobfile
    from .synth import synth_cohort
    from .tables import read_frame

    out = Path(args.out)
    cohort = out / "cohort"
    if not (cohort / "truth.csv").exists():
        print(f"synthesising {args.patients} patients -> {cohort}")
        synth_cohort(cohort, args.patients, seed=args.seed, size="small")
    truth = pd.read_csv(cohort / "truth.csv")
    cfg = load_jobfile(args.job or REPO_JOBS / "demo.toml")[0]
    summary = run_extract(cohort / "dicom", out / "extract", cfg, workers=args.workers, overwrite=True,
                          progress=not args.no_progress)
    scans = read_frame(out / "extract", "scans")
    table = scans[["scan_key", "status", "kernel", "lung_volume_l", "laa950_pct", "hu_mean", "label"]].merge(
        truth[["scan_key", "laa950_pct", "label"]].rename(columns={"laa950_pct": "true_laa950_pct",
                                                                   "label": "true_label"}), on="scan_key")
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        print(table.round(2).to_string(index=False))
    agree = int((table["label"] == table["true_label"]).sum())
    print(f"\nlabels agree with truth: {agree}/{len(table)}; "
          f"LAA950 mean abs error {abs(table['laa950_pct'] - table['true_laa950_pct']).mean():.2f} points")
    written = sorted(f"{p.name}/" if p.is_dir() else p.name for p in (out / "extract").iterdir())
    print(f"outputs: {out / 'extract'} ({', '.join(written)})")
    from .cli_models import demo_fit_and_report

    index = demo_fit_and_report(out / "extract")
    print(f"report: {index.resolve()}  (open it in a browser; emphy report --scan KEY redraws one scan)")
    return summary.exit_code


def cmd_schemas(args) -> int:
    from .tables import schema_markdown

    print(schema_markdown())
    return 0


def cmd_export(args) -> int:
    from .errors import ScanError
    from .export.run import export_run
    from .job.pseudonym import PseudonymError

    try:
        summary = export_run(args.out, args.dicom, args.stow, args.pseudonymize, args.input, args.scan)
    except (ScanError, PseudonymError) as exc:
        print(f"emphy export: {exc}", file=sys.stderr)
        return 2
    print(f"{len(summary.written)} files written, {summary.stored} scans stored, {len(summary.failed)} not exported")
    return summary.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emphy", description="Emphysema quantification on chest CT with Dask")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="run the distributed job over a DICOM tree or a manifest")
    p.add_argument("input", help="DICOM tree (any layout), image tree, s3:// or gs:// prefix, or manifest "
                                 "(.csv scan_key,path|url / .parquet / IDC .s5cmd)")
    p.add_argument("-o", "--out", required=True, help="run folder or s3:// / gs:// prefix (Parquet tables, masks, "
                                                      "QC images)")
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("quantify", help="phenotypes of one CT (native grid)", add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("synth", help="write a synthetic chest-CT cohort as DICOM with ground truth")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.set_defaults(func=cmd_synth)

    from .synth.lesions import PATTERNS

    p = sub.add_parser("insert", help="insert emphysema of known extent into real chest CT (DICOM + truth)")
    p.add_argument("--base", nargs="+", required=True, metavar="[KEY=]PATH",
                   help="base chest CT: a patient or series folder; KEY names it (default: the folder name)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--severities", nargs="+", type=float, default=[0.0, 10.0, 25.0],
                   help="added LAA%%-950, percentage points of the lung (0-40); 0 = the base with new UIDs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_insert)

    p = sub.add_parser("demo", help="synthesise a small cohort and run the job on a LocalCluster")
    p.add_argument("-o", "--out", default="demo-out")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--job", help="job file (default jobs/demo.toml)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="a DICOM SEG and SR per ok scan of a run, to files and/or a PACS (STOW-RS)")
    p.add_argument("out", help="the run folder of emphy extract")
    p.add_argument("--dicom", metavar="DIR", help="write DIR/<shard>/<scan>/seg.dcm and sr.dcm")
    p.add_argument("--stow", metavar="URL", help="send them by STOW-RS to this DICOMweb root (http(s)://host/dicom-web)")
    p.add_argument("--pseudonymize", action="store_true",
                   help="patient/study identity and source UIDs -> the run's pseudonyms ($EMPHY_PSEUDONYM_KEY)")
    p.add_argument("--input", help="a --pseudonymize run's INPUT (its manifest holds no paths to the sources)")
    p.add_argument("--scan", help="only this scan key")
    p.set_defaults(func=cmd_export)

    from .cli_models import add_commands

    add_commands(sub)    # fit, predict, report
    from .cli_track import add_track_command

    add_track_command(sub)

    p = sub.add_parser("schemas", help="print the output tables' docs (Markdown), generated from schemas/")
    p.add_argument("--markdown", action="store_true", help="(default) Markdown tables")
    p.set_defaults(func=cmd_schemas)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantify":
        from .quantify import run_quantify_cli

        return run_quantify_cli(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
