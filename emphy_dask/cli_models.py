"""The driver-side subcommands of ``emphy``: fit, predict, report (registered by ``cli.build_parser``)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_commands(sub) -> None:
    """Register ``fit``, ``predict`` and ``report`` on the ``emphy`` subparsers."""
    p = sub.add_parser("fit", help="fit the paper's model and the honest protocol on an extract run (driver)")
    p.add_argument("out", help="an extract run folder (reads its Parquet tables; writes OUT/model/)")
    p.add_argument("--job", help="job file; its [fit] section (defaults otherwise)")
    p.add_argument("--backbone", help="backbone to use when the run holds several")
    p.add_argument("--features", choices=("middle", "zones", "whole"),
                   help="middle zone (paper), upper+middle+lower concatenated, or the whole-lung embedding")
    p.add_argument("--n-features", type=int, help="t-test top k (paper: 20)")
    p.add_argument("--folds", type=int, help="honest protocol: folds (default 5)")
    p.add_argument("--repeats", type=int, help="honest protocol: repeats (default 5)")
    p.add_argument("--bootstrap", type=int, dest="n_bootstrap", help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int)
    p.add_argument("--group-by", dest="group_by", metavar="COLUMN",
                   help="scans sharing a value of COLUMN never straddle a split, in every outer and inner loop "
                        "(patient_key, or base_key with --covariates); default: patient_key when a patient has "
                        "several scans; scan_key = no grouping")
    p.add_argument("--covariates", metavar="FILE",
                   help="CSV or Parquet keyed by scan_key: extra columns for --group-by and --target")
    p.add_argument("--target", metavar="COLUMN",
                   help="also predict this categorical column (e.g. pattern) with the grouped honest protocol")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score an extract run with a saved model (writes OUT/predictions/)")
    p.add_argument("model_dir", help="a fit's model folder (OUT/model) or its model.json")
    p.add_argument("out", help="the extract run to score")
    p.add_argument("--model", default="paper",
                   help="which saved model: paper, full_weighted, l1_logistic, ridge_laa950, phenotypes_only")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="write the static HTML report OUT/report/ (cohort, models, maps)")
    p.add_argument("out", help="an extract run folder (with OUT/model/ after emphy fit)")
    p.add_argument("--scan", help="only (re)draw this scan's page and maps")
    p.set_defaults(func=cmd_report)


def _fmt(m: dict | None, key: str = "auc") -> str:
    if not m or m.get(key) is None:
        return "n/a"
    iv = (m.get("ci") or {}).get(key)
    ctrl = (m.get("shuffled_control") or {}).get(key)
    return (f"{m[key]:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
            + (f" (shuffled control {ctrl:.3f})" if ctrl is not None else ""))


def cmd_fit(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .jobfile import load_fit_settings
    from .models import CohortError
    from .models.covariates import GroupingWarning
    from .models.fit import fit_run

    try:
        s = load_fit_settings(args.job, backbone=args.backbone, features=args.features, n_features=args.n_features,
                              folds=args.folds, repeats=args.repeats, n_bootstrap=args.n_bootstrap, seed=args.seed,
                              group_by=getattr(args, "group_by", None), covariates=getattr(args, "covariates", None),
                              target=getattr(args, "target", None))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GroupingWarning)
            m = fit_run(args.out, s, log=lambda msg: print(f"emphy fit: {msg}", file=sys.stderr))
        for w in caught:
            if issubclass(w.category, GroupingWarning):
                print(f"emphy fit: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (ConfigError, CohortError) as exc:
        print(f"emphy fit: {exc}", file=sys.stderr)
        return 2
    c, g = m["cohort"], m["grouping"]
    print(f"folds grouped by {g['by']} ({g['n_groups']} groups)" if g.get("by") else f"folds: {g['reason']}")
    print(f"cohort: {c['positive']} positive / {c['negative']} negative ok scans with embeddings; balanced subset "
          f"{c['balanced_subset']['n']}; features: {', '.join(m['features']['zones'])} ({m['features']['backbone']})")
    print(f"paper protocol (OPTIMISTIC, selection saw the test folds): AUC {_fmt(m['paper_protocol'])}")
    print(f"honest protocol (selection inside each training fold):    AUC {_fmt(m['nested_cv'])}")
    print(f"L1 logistic (honest): AUC {_fmt(m['l1_logistic'])}; phenotypes only (honest): "
          f"AUC {_fmt(m['phenotypes_only'])}; ridge LAA%-950: R2 {_fmt(m['ridge_laa950'], 'r2')}")
    t = m.get("target")
    if t:
        print(f"target {t['target']} ({len(t['classes'])} classes, chance {t['chance_accuracy']:.3f}): accuracy "
              f"{_fmt(t['embeddings'], 'accuracy')}, balanced {_fmt(t['embeddings'], 'balanced_accuracy')}; "
              f"density phenotypes: accuracy {_fmt(t['density_baseline'], 'accuracy')}")
    print(f"model: {Path(args.out) / 'model'} (metrics.json, model.json, figures/) in {m['timing_s']['total']:.1f} s")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .models import CohortError
    from .models.predict import RunMismatch, predict_run

    try:
        path, counts = predict_run(args.model_dir, args.out, args.model)
    except (RunMismatch, CohortError, KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"emphy predict: {msg}", file=sys.stderr)
        return 2
    print(f"{path}: {counts['scored']} scans scored with {args.model}"
          + (f"; {counts['without_inputs']} ok scans lack the model's inputs" if counts["without_inputs"] else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    try:
        path = build_report(args.out, args.scan, progress=lambda msg: print(msg, file=sys.stderr))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"emphy report: {msg}", file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}")
    return 0


def demo_fit_and_report(run_dir, job=None) -> Path:
    """The demo's last steps: fit (or say why no model) and the report; returns index.html."""
    ns = argparse.Namespace(out=str(run_dir), job=job, backbone=None, features=None, n_features=None, folds=None,
                            repeats=None, n_bootstrap=None, seed=None, group_by=None, covariates=None, target=None)
    if cmd_fit(ns) != 0:
        print("(no model: the report shows the cohort only)")
    from .report import build_report

    return build_report(run_dir)
