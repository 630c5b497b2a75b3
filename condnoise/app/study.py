"""``condnoise study PRESET_OR_YAML`` and ``condnoise demo`` (the ``make demo`` entry)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from condnoise.app.common import add_device_option, add_parser, add_progress_option, show_progress

DEMO_PRESET = "fmnist-quick"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="study folder (default: the preset's out_dir or runs/study/NAME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (cells, status, estimated cost) and exit")
    p.add_argument("--stage", action="append", default=None, metavar="STAGE",
                   help="run only this stage (corrupt, train, sample, evaluate, walk, "
                        "theory, report); repeatable")  # fmt: skip
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only cells whose id contains TEXT (e.g. cep-u, seed0, s3) plus "
                        "their dependencies; repeatable")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="override a study field, e.g. --set seeds=[0,1,2] --set "
                        "sample.num_samples=500")  # fmt: skip
    add_device_option(p, "torch device for every cell (None: cuda if present, else cpu; "
                         "under torchrun cuda:LOCAL_RANK)")
    add_progress_option(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_parser(
        subparsers,
        "study",
        help="run a cached, resumable study grid and write its report",
        description=(
            "corrupt -> train -> sample -> evaluate -> report over a preset's grid. Every cell "
            "is cached under its config hash: rerunning skips finished cells and a killed "
            "study resumes where it stopped. Under torchrun every rank runs whole cells on "
            "its own GPU."
        ),
    )
    p.add_argument("study", metavar="PRESET_OR_YAML",
                   help="a preset (micro, fmnist-quick, fmnist-full, in1k-dit-xl2, "
                        "in1k-ldm4) or a study YAML file")  # fmt: skip
    _add_common(p)
    p.set_defaults(func=run_study_command)

    d = add_parser(
        subparsers,
        "demo",
        help=f"run the {DEMO_PRESET} study (about 20 minutes on 2 CPU cores) and print the report path",
        description=f"`make demo`: the {DEMO_PRESET} study end to end, then where its report is.",
    )
    d.add_argument("--preset", default=DEMO_PRESET, help="study preset or YAML file to run")
    _add_common(d)
    d.set_defaults(func=run_demo_command)


def run_study_command(args: argparse.Namespace) -> int:
    from condnoise.study.grid import format_seconds
    from condnoise.study.runner import default_study_dir, plan, run_study
    from condnoise.study.spec import load_study

    spec = load_study(args.study, args.overrides)
    study_dir = Path(args.out) if args.out else default_study_dir(spec)
    if args.dry_run:
        print(plan(spec, study_dir, stages=args.stage, only=args.only))
        return 0
    t0 = time.perf_counter()
    result = run_study(spec, study_dir, stages=args.stage, only=args.only, device=args.device,
                       progress=show_progress(args))  # fmt: skip
    print(
        f"study {spec.name}: ran {len(result.ran)} cell(s), {len(result.skipped)} already done, "
        f"in {format_seconds(time.perf_counter() - t0)}"
    )
    if result.report:
        print(f"report: {result.report.resolve()}")
        print(f"        {result.report.with_suffix('.md').resolve()} (Markdown), "
              f"{(result.report.parent / 'results.csv').resolve()} (CSV)")  # fmt: skip
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    args.study = args.preset
    return run_study_command(args)
